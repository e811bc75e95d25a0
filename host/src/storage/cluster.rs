//! Cluster bookkeeping: node leases, and the reads a node needs to fill
//! gaps in what was routed to it. Only engines that several gateway
//! processes share implement it (PostgreSQL); cluster mode requires one.
//!
//! Properties every engine keeps:
//! - **Lease times are the database's clock**, so nodes' clocks never
//!   have to agree. A lease granted by a renewal that was sent at local
//!   time `t` lasts at least until `t + ttl` in real time; a node that has
//!   not renewed by then must have closed its clients (see `cluster::lease`).
//! - **A lapsed lease is reaped once.** [`ClusterStore::node_reap`] marks
//!   the node reaped and closes its sessions in one transaction, through the
//!   sessions' row guard; of two nodes reaping the same lease at once, the
//!   second finds it reaped and writes nothing. A renewal and a reap of the
//!   same lease are ordered by the row: either the renewal extends the
//!   lease first (the reap finds it live and does nothing) or the reap
//!   comes first (the renewal answers [`Renewal::Lost`]).
//! - **No session opens on a lapsed lease.** Opening a session (the
//!   `SessionStore`) refuses, as unavailable, while its node's lease is
//!   lapsed or reaped, in the transaction that would insert the row; so a
//!   reap never misses a session, and a node cut off cannot add one.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use super::messages::StoredMessage;
use super::{Result, SessionEvents};

/// What joining the cluster found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// This incarnation holds the node's lease now.
    Holding,
    /// Another incarnation of the same node id holds a live lease (a
    /// previous run that died a moment ago, or a second process with the
    /// same id): it ends in this many milliseconds.
    HeldByAnother { remaining_ms: i64 },
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// The lease lapsed and was reaped, or another incarnation took it: this
    /// incarnation's sessions are no longer recorded as live.
    Lost,
}

/// A node as the cluster table shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: String,
    pub incarnation: String,
    /// Where the node serves HTTP (as it announced it).
    pub address: String,
    /// Unix ms (the database's clock).
    pub started_at: i64,
    pub lease_until: i64,
    /// Its lease is live now.
    pub alive: bool,
    /// Its lease lapsed and its sessions were closed by a survivor (or it left).
    pub reaped: bool,
}

/// The cluster contract.
#[async_trait]
pub trait ClusterStore: Send + Sync + 'static {
    /// Takes the lease of `node_id` for `incarnation` for `ttl`, unless another
    /// incarnation holds it live.
    async fn node_join(
        &self,
        node_id: &str,
        incarnation: &str,
        address: &str,
        ttl: Duration,
    ) -> Result<Joined>;

    /// Extends this incarnation's lease to `ttl` from now. Not queued behind
    /// other writes.
    async fn node_renew(&self, node_id: &str, incarnation: &str, ttl: Duration) -> Result<Renewal>;

    /// Ends this incarnation's lease at once (a clean shutdown, after its
    /// sessions were closed): the next reap by a survivor finds it lapsed
    /// and closes whatever is still recorded for it (usually nothing).
    async fn node_leave(&self, node_id: &str, incarnation: &str) -> Result<()>;

    /// Nodes whose lease lapsed and that nobody reaped yet.
    async fn nodes_lapsed(&self) -> Result<Vec<String>>;

    /// Reaps a lapsed lease: marks the node reaped and closes each of its
    /// sessions with its events, in one transaction. `None` when the lease
    /// is live again or was reaped already (nothing is written).
    async fn node_reap(&self, node_id: &str, events: SessionEvents) -> Result<Option<usize>>;

    /// Every node the cluster table knows, live or not.
    async fn nodes(&self) -> Result<Vec<NodeInfo>>;

    /// Remembers a signed request's signature (a hash of it) until
    /// `until_ms`; false when any node already did and it is still
    /// remembered (a replay). Forgets expired ones as it goes.
    async fn signature_first_use(&self, signature_hash: &str, until_ms: i64) -> Result<bool>;

    /// The newest `seq` of each of these channels that has messages.
    async fn channel_heads(&self, channel_keys: Vec<String>) -> Result<Vec<(String, u64)>>;

    /// Messages of one channel after `after_seq`, oldest first, at most
    /// `limit`, with no reader's membership check (the node fills gaps for
    /// its members' connections).
    async fn channel_messages(
        &self,
        channel_key: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;
}
