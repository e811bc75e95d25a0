//! `ClusterDelivery`: the [`Delivery`] of a node in a cluster.
//!
//! What crosses NATS, and how:
//! - **Committed messages**: one frame per message on the cluster's
//!   fan-out subject, whatever the number of members (every node fans it
//!   out to its own sessions), numbered per publisher; the member list
//!   travels with it unless it would not fit the NATS payload limit, when
//!   receivers read it from the database. Each node passes what it
//!   committed itself and what it received through its `Sequencer`, which
//!   keeps every channel in `seq` order and fills gaps from the database.
//! - **Pushes, kicks and questions** (`to_user`, `to_connection`,
//!   `kick_*`, `online*`): this node answers for its own sessions at once,
//!   and asks every other live node (by lease) on that node's own subject,
//!   waiting at most `cluster.request_timeout`; a node that does not answer
//!   in time counts as having nothing (metric
//!   `plugboard_cluster_requests_total{outcome}`).
//! - `close_all` drains this node only (a drain is a node's own business).
//!
//! Nothing durable depends on NATS: a push that does not arrive is what a
//! push missed on one node already is (the client catches up from storage).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

use super::lease::Lease;
use super::sequencer::{self, Sequencer};
use super::wire::{self, FanoutFrame, Reply, Request, WireMessage, WirePush};
use super::Subjects;
use crate::delivery::{CloseReason, Connection, Delivery, Lane, Push};
use crate::gateway::local::LocalDelivery;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::storage::groups::GroupStore;
use crate::storage::messages::Appended;

/// How long a node waits for the others to apply a reload or a plugin
/// change (compiling a component can take seconds).
const OPS_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a publisher tells the others its last frame number.
const BEAT: Duration = Duration::from_secs(1);
/// Room left under the NATS payload limit for the frame's other fields.
const PAYLOAD_HEADROOM: usize = 4096;

/// What a node does for requests that are not about sessions (reloads,
/// plugins): the server implements it, since it spans the services.
#[async_trait::async_trait]
pub trait NodeOps: Send + Sync + 'static {
    async fn reload(&self) -> Value;
    async fn plugin_load(&self, name: &str) -> Value;
    async fn plugin_reload(&self, name: &str) -> Value;
    async fn plugin_unload(&self, name: &str) -> Value;
    async fn plugins(&self) -> Value;
}

/// The cluster's delivery (see the module docs).
pub struct ClusterDelivery {
    local: Arc<LocalDelivery>,
    sequencer: Arc<Sequencer>,
    publisher: mpsc::UnboundedSender<Appended>,
    nats: async_nats::Client,
    subjects: Subjects,
    lease: Arc<Lease>,
    node_id: String,
    request_timeout: Duration,
    metrics: Arc<Metrics>,
    ops: OnceLock<Arc<dyn NodeOps>>,
}

impl ClusterDelivery {
    /// Subscribes to the fan-out subject and this node's own, and starts
    /// the publisher. `sequencer` is the one `nats`' reconnects resync.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        local: Arc<LocalDelivery>,
        sequencer: Arc<Sequencer>,
        nats: async_nats::Client,
        subjects: Subjects,
        lease: Arc<Lease>,
        groups: Arc<dyn GroupStore>,
        incarnation: String,
        request_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<ClusterDelivery>> {
        let node_id = lease.node_id().to_string();
        let fanout = nats.subscribe(subjects.fanout()).await?;
        let requests = nats.subscribe(subjects.node(&node_id)).await?;
        // Once the server has both subscriptions, read the live nodes again:
        // a node that joins later is heard of by its first beat, which it
        // sends after its join, so no node is missed in between.
        nats.flush().await?;
        lease.refresh_peers().await;
        let (publisher, queue) = mpsc::unbounded_channel();
        let delivery = Arc::new(ClusterDelivery {
            local,
            sequencer: sequencer.clone(),
            publisher,
            nats: nats.clone(),
            subjects: subjects.clone(),
            lease,
            node_id: node_id.clone(),
            request_timeout,
            metrics: metrics.clone(),
            ops: OnceLock::new(),
        });
        tokio::spawn(publish(
            queue,
            nats.clone(),
            subjects.fanout(),
            node_id.clone(),
            incarnation,
            metrics.clone(),
        ));
        tokio::spawn(receive(
            fanout,
            sequencer,
            groups,
            delivery.lease.clone(),
            metrics,
        ));
        tokio::spawn(serve(requests, Arc::downgrade(&delivery), nats));
        Ok(delivery)
    }

    /// Sets what answers reload and plugin requests from other nodes.
    pub fn set_ops(&self, ops: Arc<dyn NodeOps>) {
        let _ = self.ops.set(ops);
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This node's NATS connection: `connected`, `disconnected` or `pending`.
    pub fn nats_state(&self) -> &'static str {
        match self.nats.connection_state() {
            async_nats::connection::State::Connected => "connected",
            async_nats::connection::State::Disconnected => "disconnected",
            async_nats::connection::State::Pending => "pending",
        }
    }

    /// Asks every other live node and returns the answers that came in time.
    pub async fn ask_all(&self, request: &Request) -> Vec<(String, Reply)> {
        self.ask_peers(request)
            .await
            .into_iter()
            .filter_map(|(node, reply)| Some((node, reply?)))
            .collect()
    }

    /// Asks every other live node; each with its answer, or `None` when it
    /// gave none in time.
    pub async fn ask_peers(&self, request: &Request) -> Vec<(String, Option<Reply>)> {
        let payload = match serde_json::to_vec(request) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a cluster request");
                return Vec::new();
            }
        };
        let peers = self.lease.peers();
        if self.nats.connection_state() != async_nats::connection::State::Connected {
            // Nobody can be asked: answer at once for this node alone.
            self.metrics
                .cluster_requests
                .get_or_create(&OutcomeLabel {
                    outcome: "disconnected".into(),
                })
                .inc_by(peers.len() as u64);
            return peers.iter().map(|p| (p.node_id.clone(), None)).collect();
        }
        let wait = match request {
            Request::Reload
            | Request::PluginLoad { .. }
            | Request::PluginReload { .. }
            | Request::PluginUnload { .. }
            | Request::Plugins => OPS_TIMEOUT.max(self.request_timeout),
            _ => self.request_timeout,
        };
        let asks = peers.iter().map(|peer| {
            let subject = self.subjects.node(&peer.node_id);
            let payload = payload.clone();
            async move {
                let ask = async_nats::Request::new()
                    .payload(payload)
                    .timeout(Some(wait));
                let answer =
                    tokio::time::timeout(wait, self.nats.send_request(subject, ask)).await;
                let outcome = match answer {
                    Ok(Ok(m)) => match serde_json::from_slice::<Reply>(&m.payload) {
                        Ok(reply) => Ok(reply),
                        Err(e) => Err(("malformed", e.to_string())),
                    },
                    Ok(Err(e)) => Err(match e.kind() {
                        async_nats::client::RequestErrorKind::NoResponders => {
                            ("no_responders", e.to_string())
                        }
                        async_nats::client::RequestErrorKind::TimedOut => {
                            ("timeout", e.to_string())
                        }
                        _ => ("error", e.to_string()),
                    }),
                    Err(_) => Err(("timeout", "no answer in time".to_string())),
                };
                let label = match &outcome {
                    Ok(_) => "ok",
                    Err((kind, _)) => kind,
                };
                self.metrics
                    .cluster_requests
                    .get_or_create(&OutcomeLabel {
                        outcome: label.to_string(),
                    })
                    .inc();
                match outcome {
                    Ok(reply) => (peer.node_id.clone(), Some(reply)),
                    Err((_, error)) => {
                        tracing::debug!(node_id = %peer.node_id, error = %error, "a node did not answer a cluster request");
                        (peer.node_id.clone(), None)
                    }
                }
            }
        });
        futures_util::future::join_all(asks).await
    }

    /// Every other live node's report for `request` (reload, plugins), in
    /// node order: `{"node_id", "answered", "report"}`.
    pub async fn reports(&self, request: &Request) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .ask_peers(request)
            .await
            .into_iter()
            .map(|(node, reply)| match reply {
                Some(Reply::Report { report }) => {
                    serde_json::json!({"node_id": node, "answered": true, "report": report})
                }
                Some(Reply::Error { error }) => {
                    serde_json::json!({"node_id": node, "answered": true, "error": error})
                }
                _ => serde_json::json!({"node_id": node, "answered": false}),
            })
            .collect();
        out.sort_by(|a, b| a["node_id"].as_str().cmp(&b["node_id"].as_str()));
        out
    }

    /// What this node answers to `request` (for its own sessions).
    async fn answer(&self, request: Request) -> Reply {
        let local = &self.local;
        match request {
            Request::Online { user } => Reply::Connections {
                connections: local.online_here(user.as_deref()),
            },
            Request::OnlineAmong { users } => Reply::Users {
                users: local.online_among_here(&users).into_iter().collect(),
            },
            Request::OnlineUsers => Reply::Users {
                users: local.online_users_here().into_iter().collect(),
            },
            Request::ToUser {
                user,
                push,
                lane,
                except,
            } => Reply::Count {
                count: local.to_user_here(&user, &push.push(), lane.into(), except.as_deref()),
            },
            Request::ToConnection {
                user,
                connection_id,
                push,
                lane,
            } => Reply::Done {
                done: local.to_connection_here(&user, &connection_id, &push.push(), lane.into()),
            },
            Request::KickUser {
                user,
                device,
                reason,
                message,
            } => match wire::close_reason(&reason) {
                Ok(reason) => Reply::Ids {
                    ids: local.kick_user_here(&user, device.as_deref(), reason, &message),
                },
                Err(error) => Reply::Error { error },
            },
            Request::KickConnection {
                user,
                connection_id,
                reason,
                message,
            } => match wire::close_reason(&reason) {
                Ok(reason) => Reply::Done {
                    done: local.kick_connection_here(&user, &connection_id, reason, &message),
                },
                Err(error) => Reply::Error { error },
            },
            Request::Reload
            | Request::PluginLoad { .. }
            | Request::PluginReload { .. }
            | Request::PluginUnload { .. }
            | Request::Plugins => {
                let Some(ops) = self.ops.get() else {
                    return Reply::Error {
                        error: "this node is still starting".into(),
                    };
                };
                Reply::Report {
                    report: match request {
                        Request::Reload => ops.reload().await,
                        Request::PluginLoad { name } => ops.plugin_load(&name).await,
                        Request::PluginReload { name } => ops.plugin_reload(&name).await,
                        Request::PluginUnload { name } => ops.plugin_unload(&name).await,
                        _ => ops.plugins().await,
                    },
                }
            }
        }
    }
}

/// Publishes this node's committed messages, numbered, and a beat every
/// second. While NATS is unreachable frames are not queued without bound:
/// they are dropped and counted, and their numbers are skipped, so every
/// receiver notices and reads them from the database.
async fn publish(
    mut queue: mpsc::UnboundedReceiver<Appended>,
    nats: async_nats::Client,
    subject: String,
    node: String,
    incarnation: String,
    metrics: Arc<Metrics>,
) {
    let mut n = 0u64;
    let mut beat = tokio::time::interval(BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let frame = tokio::select! {
            next = queue.recv() => match next {
                Some(appended) => {
                    n += 1;
                    let limit = (nats.server_info().max_payload).saturating_sub(PAYLOAD_HEADROOM);
                    let encode = |with_members| serde_json::to_vec(&FanoutFrame::Message {
                        node: node.clone(),
                        incarnation: incarnation.clone(),
                        n,
                        message: WireMessage::of(&appended, with_members),
                    });
                    match encode(true) {
                        Ok(bytes) if bytes.len() <= limit => bytes,
                        Ok(_) => match encode(false) {
                            Ok(bytes) => bytes,
                            Err(e) => { tracing::error!(error = %e, "cannot encode a routed message"); continue }
                        },
                        Err(e) => { tracing::error!(error = %e, "cannot encode a routed message"); continue }
                    }
                }
                None => return,
            },
            _ = beat.tick() => match serde_json::to_vec(&FanoutFrame::Beat {
                node: node.clone(), incarnation: incarnation.clone(), n,
            }) {
                Ok(bytes) => bytes,
                Err(_) => continue,
            },
        };
        if nats.connection_state() != async_nats::connection::State::Connected {
            metrics.cluster_dropped_frames.inc();
            continue;
        }
        match nats.publish(subject.clone(), Bytes::from(frame)).await {
            Ok(()) => {
                metrics.cluster_published.inc();
            }
            Err(e) => {
                metrics.cluster_dropped_frames.inc();
                tracing::debug!(error = %e, "cannot publish a routed message");
            }
        }
    }
}

/// Takes the other nodes' committed messages into this node's sequencer,
/// noticing lost frames by their publishers' numbers.
async fn receive(
    mut fanout: async_nats::Subscriber,
    sequencer: Arc<Sequencer>,
    groups: Arc<dyn GroupStore>,
    lease: Arc<Lease>,
    metrics: Arc<Metrics>,
) {
    // Per publishing node: its incarnation and the last frame number seen.
    let mut last: HashMap<String, (String, u64)> = HashMap::new();
    while let Some(m) = fanout.next().await {
        let frame: FanoutFrame = match serde_json::from_slice(&m.payload) {
            Ok(f) => f,
            Err(e) => {
                metrics.cluster_malformed_frames.inc();
                tracing::warn!(error = %e, "dropped a routed frame that does not parse");
                continue;
            }
        };
        let (node, incarnation, n, message) = match frame {
            FanoutFrame::Message {
                node,
                incarnation,
                n,
                message,
            } => (node, incarnation, n, Some(message)),
            FanoutFrame::Beat {
                node,
                incarnation,
                n,
            } => (node, incarnation, n, None),
        };
        let known = last.get(&node).is_some_and(|(inc, _)| *inc == incarnation);
        if !known
            && !lease
                .peers()
                .iter()
                .any(|p| p.node_id == node && p.incarnation == incarnation)
        {
            // A node that joined since the last renewal: ask the database
            // now, so that requests reach it at once (its first beat comes
            // as it starts).
            let lease = lease.clone();
            tokio::spawn(async move { lease.refresh_peers().await });
        }
        let expected = match last.get(&node) {
            Some((inc, seen)) if *inc == incarnation => seen + u64::from(message.is_some()),
            // A publisher heard of for the first time (or restarted): its
            // frame numbers start at 1.
            _ => u64::from(message.is_some()),
        };
        if n > expected {
            metrics.cluster_resyncs.inc();
            tracing::debug!(node_id = %node, expected, got = n, "routed frames were missed; comparing channels with the database");
            sequencer.resync();
        }
        last.insert(node, (incarnation, n));
        let Some(message) = message else { continue };
        metrics.cluster_received.inc();
        let stored = message.stored();
        let members = match message.members {
            Some(m) => Arc::new(m),
            None => match sequencer::group_members(groups.as_ref(), &stored).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a group's members for a routed message; it is read back later");
                    // The next resync finds the channel behind.
                    continue;
                }
            },
        };
        sequencer.submit(
            Appended {
                message: stored,
                duplicate: false,
                members,
            },
            None,
        );
    }
}

/// Answers the requests other nodes make of this one.
async fn serve(
    mut requests: async_nats::Subscriber,
    delivery: std::sync::Weak<ClusterDelivery>,
    nats: async_nats::Client,
) {
    while let Some(m) = requests.next().await {
        let Some(reply_to) = m.reply.clone() else {
            continue;
        };
        let Some(d) = delivery.upgrade() else { return };
        let nats = nats.clone();
        tokio::spawn(async move {
            let reply = match serde_json::from_slice::<Request>(&m.payload) {
                Ok(request) => d.answer(request).await,
                Err(e) => {
                    d.metrics.cluster_malformed_frames.inc();
                    Reply::Error {
                        error: format!("request does not parse: {e}"),
                    }
                }
            };
            let encoded = serde_json::to_vec(&reply).map(|bytes| {
                let limit = nats.server_info().max_payload.saturating_sub(PAYLOAD_HEADROOM);
                if bytes.len() <= limit {
                    return bytes;
                }
                // An answer larger than NATS carries (tens of thousands of
                // connections): refused, rather than lost on the way.
                serde_json::to_vec(&Reply::Error {
                    error: format!(
                        "the answer is {} bytes, more than NATS carries ({limit}); narrow the question",
                        bytes.len()
                    ),
                })
                .unwrap_or_default()
            });
            match encoded {
                Ok(bytes) => {
                    if let Err(e) = nats.publish(reply_to, Bytes::from(bytes)).await {
                        tracing::debug!(error = %e, "cannot answer a cluster request");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a cluster answer"),
            }
        });
    }
}

#[async_trait::async_trait]
impl Delivery for ClusterDelivery {
    fn fan_out(&self, appended: Appended, origin: Option<String>) {
        // The sequencer first: this node's sessions never wait for NATS.
        let _ = self.publisher.send(appended.clone());
        self.sequencer.submit(appended, origin);
    }

    async fn to_user(&self, user: &str, push: &Push, lane: Lane, except: Option<&str>) -> usize {
        let here = self.local.to_user_here(user, push, lane, except);
        let request = Request::ToUser {
            user: user.to_string(),
            push: WirePush::of(push),
            lane: lane.into(),
            except: except.map(str::to_string),
        };
        here + self
            .ask_all(&request)
            .await
            .into_iter()
            .map(|(_, r)| match r {
                Reply::Count { count } => count,
                _ => 0,
            })
            .sum::<usize>()
    }

    async fn to_connection(
        &self,
        user: &str,
        connection_id: &str,
        push: &Push,
        lane: Lane,
    ) -> bool {
        if self
            .local
            .to_connection_here(user, connection_id, push, lane)
        {
            return true;
        }
        let request = Request::ToConnection {
            user: user.to_string(),
            connection_id: connection_id.to_string(),
            push: WirePush::of(push),
            lane: lane.into(),
        };
        self.ask_all(&request)
            .await
            .into_iter()
            .any(|(_, r)| matches!(r, Reply::Done { done: true }))
    }

    async fn kick_user(
        &self,
        user: &str,
        device: Option<&str>,
        reason: CloseReason,
        message: &str,
    ) -> Vec<String> {
        let mut ids = self.local.kick_user_here(user, device, reason, message);
        let request = Request::KickUser {
            user: user.to_string(),
            device: device.map(str::to_string),
            reason: reason.as_str().to_string(),
            message: message.to_string(),
        };
        for (_, reply) in self.ask_all(&request).await {
            if let Reply::Ids { ids: more } = reply {
                ids.extend(more);
            }
        }
        ids
    }

    async fn kick_connection(
        &self,
        user: &str,
        connection_id: &str,
        reason: CloseReason,
        message: &str,
    ) -> bool {
        if self
            .local
            .kick_connection_here(user, connection_id, reason, message)
        {
            return true;
        }
        let request = Request::KickConnection {
            user: user.to_string(),
            connection_id: connection_id.to_string(),
            reason: reason.as_str().to_string(),
            message: message.to_string(),
        };
        self.ask_all(&request)
            .await
            .into_iter()
            .any(|(_, r)| matches!(r, Reply::Done { done: true }))
    }

    fn close_all(&self, reason: CloseReason, message: &str) -> usize {
        self.local.close_all_here(reason, message)
    }

    async fn online(&self, user: Option<&str>) -> Vec<Connection> {
        let mut all = self.local.online_here(user);
        let request = Request::Online {
            user: user.map(str::to_string),
        };
        for (_, reply) in self.ask_all(&request).await {
            if let Reply::Connections { connections } = reply {
                all.extend(connections);
            }
        }
        all
    }

    async fn online_users(&self) -> HashSet<String> {
        let mut found = self.local.online_users_here();
        for (_, reply) in self.ask_all(&Request::OnlineUsers).await {
            if let Reply::Users { users } = reply {
                found.extend(users);
            }
        }
        found
    }

    async fn online_among(&self, users: &[String]) -> HashSet<String> {
        let mut found = self.local.online_among_here(users);
        let rest: Vec<String> = users
            .iter()
            .filter(|u| !found.contains(*u))
            .cloned()
            .collect();
        if rest.is_empty() {
            return found;
        }
        let request = Request::OnlineAmong { users: rest };
        for (_, reply) in self.ask_all(&request).await {
            if let Reply::Users { users } = reply {
                found.extend(users);
            }
        }
        found
    }
}
