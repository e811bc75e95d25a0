//! This node's lease in the database: join, renew, fence, leave; and the
//! reaping of other nodes' lapsed leases.
//!
//! The rules (docs/cluster.md, "When a node dies"):
//! - A node renews every `cluster.lease_renew`; each renewal that the
//!   database takes extends the lease to `lease_ttl` after the database
//!   ran it, which is never earlier than `lease_ttl` after the node sent it.
//! - **Fencing.** If `lease_ttl - lease_renew` passes since the node sent
//!   its last renewal that was taken, it stops accepting connections and
//!   asks every client to close (1012, `lease_lost`), so that no
//!   connection lives on past the lease on a node whose close could not be
//!   recorded. It accepts again once a renewal is taken.
//! - **Reaping.** After each renewal, a node looks for lapsed leases and
//!   reaps them: each of the dead node's sessions is closed with
//!   `connection.closed` (1006, `node_lost`) and `user.offline` where due,
//!   exactly once (`storage::cluster` says why).
//! - **Lost.** A renewal that finds the lease reaped (the node was frozen
//!   or cut off for longer than the lease) fences at once, then joins
//!   again: the sessions it still held were closed by a survivor, and
//!   their own closes now find nothing to record.
//! - **Leaving.** A clean shutdown ends the lease once its sessions are
//!   closed; anything still recorded is reaped by a survivor at once
//!   rather than after a lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::config::ClusterConfig;
use crate::delivery::CloseReason;
use crate::events::{self, CloseInfo};
use crate::metrics::Metrics;
use crate::outbox::Wakeup;
use crate::storage::cluster::{ClusterStore, Joined, NodeInfo, Renewal};

/// What this node is told when its lease changes: `true` when it must stop
/// serving (fenced), `false` when it may serve again.
pub type OnFence = Arc<dyn Fn(bool) + Send + Sync>;

/// This node's lease.
pub struct Lease {
    node_id: String,
    address: String,
    incarnation: String,
    config: ClusterConfig,
    store: Arc<dyn ClusterStore>,
    metrics: Arc<Metrics>,
    /// Wakes the webhook workers after a reap wrote events.
    wakeup: Wakeup,
    /// The other nodes whose lease is live, as of the last renewal.
    peers: ArcSwap<Vec<NodeInfo>>,
    fenced: AtomicBool,
    stopped: AtomicBool,
}

impl Lease {
    /// Takes this node's lease. If another incarnation of the same id holds
    /// it live (a previous run killed a moment ago), waits for it to lapse,
    /// at most twice the lease; longer means another live process has this
    /// id, and the start fails.
    pub async fn join(
        store: Arc<dyn ClusterStore>,
        config: &ClusterConfig,
        node_id: &str,
        address: &str,
        metrics: Arc<Metrics>,
        wakeup: Wakeup,
    ) -> anyhow::Result<Arc<Lease>> {
        let incarnation = ulid::Ulid::new().to_string().to_lowercase();
        let give_up = Instant::now() + config.lease_ttl * 2;
        loop {
            match store
                .node_join(node_id, &incarnation, address, config.lease_ttl)
                .await?
            {
                Joined::Holding => break,
                Joined::HeldByAnother { remaining_ms } => {
                    let wait = Duration::from_millis(remaining_ms as u64 + 50);
                    if Instant::now() + wait > give_up {
                        anyhow::bail!(
                            "node id `{node_id}` is held by another live node (its lease ends in {} ms); \
                             give each node its own cluster.node_id",
                            remaining_ms
                        );
                    }
                    tracing::warn!(
                        node_id, wait_ms = wait.as_millis() as u64,
                        "this node id's lease is held by an earlier run that did not leave; waiting for it to lapse"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
        tracing::info!(node_id, incarnation = %incarnation, "joined the cluster");
        let lease = Arc::new(Lease {
            node_id: node_id.to_string(),
            address: address.to_string(),
            incarnation,
            config: config.clone(),
            store,
            metrics,
            wakeup,
            peers: ArcSwap::from_pointee(Vec::new()),
            fenced: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        });
        lease.refresh_peers().await;
        Ok(lease)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This run's incarnation (new at every start).
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// The other nodes whose lease was live at the last renewal.
    pub fn peers(&self) -> Arc<Vec<NodeInfo>> {
        self.peers.load_full()
    }

    /// This node stopped serving because its lease is in doubt.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Every node the cluster table knows.
    pub async fn nodes(&self) -> crate::storage::Result<Vec<NodeInfo>> {
        self.store.nodes().await
    }

    /// Reads the live nodes from the database.
    pub async fn refresh_peers(&self) {
        match self.store.nodes().await {
            Ok(nodes) => {
                let peers: Vec<NodeInfo> = nodes
                    .into_iter()
                    .filter(|n| n.alive && n.node_id != self.node_id)
                    .collect();
                self.metrics.cluster_nodes.set(peers.len() as i64 + 1);
                self.peers.store(Arc::new(peers));
            }
            Err(e) => tracing::debug!(error = %e, "cannot list the cluster's nodes"),
        }
    }

    /// Renews until [`Lease::leave`], fencing and reaping as the module
    /// docs say. `on_fence` is told of every change of the fenced state.
    pub fn start(self: &Arc<Self>, on_fence: OnFence) -> tokio::task::JoinHandle<()> {
        let lease = self.clone();
        tokio::spawn(async move { lease.run(on_fence).await })
    }

    async fn run(self: Arc<Self>, on_fence: OnFence) {
        let ttl = self.config.lease_ttl;
        let every = self.config.lease_renew;
        // The join was sent before now: counting from now is later than the
        // truth only by the join's own round trip, which the fence margin
        // (one renewal interval) covers.
        let mut valid_until = Instant::now() + ttl - every / 2;
        let mut next = Instant::now() + every;
        loop {
            let fence_at = valid_until - every;
            tokio::time::sleep_until(next.min(fence_at.max(Instant::now()))).await;
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            if Instant::now() >= fence_at && !self.is_fenced() {
                tracing::error!(
                    node_id = %self.node_id,
                    "cannot renew this node's cluster lease in time; refusing connections and closing every client"
                );
                self.fence(true, &on_fence);
            }
            if Instant::now() < next {
                continue;
            }
            let sent = Instant::now();
            let renewal = tokio::time::timeout(
                every,
                self.store.node_renew(&self.node_id, &self.incarnation, ttl),
            )
            .await;
            match renewal {
                Ok(Ok(Renewal::Renewed)) => {
                    valid_until = sent + ttl;
                    next = sent + every;
                    self.metrics.cluster_lease_renewals.inc();
                    if self.is_fenced() {
                        tracing::info!(node_id = %self.node_id, "cluster lease renewed; accepting connections again");
                        self.fence(false, &on_fence);
                    }
                    self.refresh_peers().await;
                    self.reap_lapsed().await;
                }
                Ok(Ok(Renewal::Lost)) => {
                    tracing::error!(
                        node_id = %self.node_id,
                        "this node's cluster lease lapsed and its connections were closed by another node; closing every client and joining again"
                    );
                    self.fence(true, &on_fence);
                    match self
                        .store
                        .node_join(&self.node_id, &self.incarnation, &self.address, ttl)
                        .await
                    {
                        Ok(Joined::Holding) => {
                            valid_until = sent + ttl;
                            self.fence(false, &on_fence);
                        }
                        Ok(Joined::HeldByAnother { .. }) => tracing::error!(
                            node_id = %self.node_id,
                            "another live node holds this node id; staying fenced"
                        ),
                        Err(e) => tracing::warn!(error = %e, "cannot join the cluster again yet"),
                    }
                    next = Instant::now() + every / 2;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the cluster lease; trying again");
                    self.metrics.cluster_lease_failures.inc();
                    next = Instant::now() + every / 4;
                }
                Err(_) => {
                    tracing::warn!("renewing the cluster lease timed out; trying again");
                    self.metrics.cluster_lease_failures.inc();
                    next = Instant::now() + every / 4;
                }
            }
        }
    }

    fn fence(&self, fenced: bool, on_fence: &OnFence) {
        if self.fenced.swap(fenced, Ordering::AcqRel) != fenced {
            self.metrics.cluster_fenced.set(i64::from(fenced));
            on_fence(fenced);
        }
    }

    /// Closes the sessions of every lapsed lease but this node's own.
    async fn reap_lapsed(&self) {
        let lapsed = match self.store.nodes_lapsed().await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "cannot look for lapsed leases");
                return;
            }
        };
        for node in lapsed.into_iter().filter(|n| *n != self.node_id) {
            let info = CloseInfo {
                reason: CloseReason::NodeLost,
                code: CloseReason::NodeLost.code(),
                message: format!("node {node} lost its cluster lease"),
            };
            match self
                .store
                .node_reap(&node, events::session_closed(info, None))
                .await
            {
                Ok(Some(closed)) => {
                    tracing::warn!(
                        node_id = %node, closed,
                        "reaped a node whose cluster lease lapsed: closed its connections"
                    );
                    self.metrics.cluster_reaped_sessions.inc_by(closed as u64);
                    self.metrics
                        .lifecycle_events
                        .get_or_create(&crate::metrics::LifecycleLabel {
                            event: "closed".into(),
                            reason: CloseReason::NodeLost.as_str().into(),
                        })
                        .inc_by(closed as u64);
                    self.wakeup.wake();
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(node_id = %node, error = %e, "cannot reap a lapsed lease yet")
                }
            }
        }
    }

    /// Ends the lease (a clean shutdown, once this node's sessions were
    /// closed). What is still recorded for this node is reaped by a
    /// survivor at once.
    pub async fn leave(&self) {
        self.stopped.store(true, Ordering::Release);
        if let Err(e) = self
            .store
            .node_leave(&self.node_id, &self.incarnation)
            .await
        {
            tracing::warn!(error = %e, "cannot end this node's cluster lease; it lapses on its own");
        }
    }
}
