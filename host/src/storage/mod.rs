//! Durable storage: the narrow interface everything durable goes through.
//!
//! The gateway never writes SQL outside this module. [`Storage`] is the
//! contract; [`sqlite::SqliteStorage`] is the embedded implementation (WAL,
//! one writer thread that groups concurrent writes into one transaction).
//! A deployment that outgrows one machine implements the same trait on
//! another engine.
//!
//! Invariant: an operation that changes state writes the outbox events that
//! the change causes in the same transaction, and its future resolves only
//! after that transaction committed.

pub mod controls;
pub mod messages;
pub mod sqlite;
mod sqlite_controls;
mod sqlite_messages;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

pub use controls::ControlStore;
pub use messages::MessageStore;
pub use sqlite::SqliteStorage;

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("cannot open the database at {path}: {message}")]
    Open { path: String, message: String },
    #[error("storage is shut down")]
    Closed,
    #[error("quota exceeded: {0}")]
    Quota(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// The durable record of one open connection.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionRecord {
    pub connection_id: String,
    pub user_id: String,
    pub device_id: String,
    pub node_id: String,
    /// Unix milliseconds.
    pub opened_at: i64,
    pub remote_addr: String,
}

/// A user's presence after a change, counted inside the transaction that made it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
pub struct Presence {
    /// Open connections of the user, on all nodes.
    pub connections: u32,
    /// Distinct devices among them.
    pub devices: u32,
}

/// An event to append to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// `evt_…`; doubles as the webhook id and idempotency key.
    pub id: String,
    pub event_type: String,
    /// Events with the same key are delivered in order (the user id).
    pub order_key: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub data: serde_json::Value,
}

/// Builds the events of a session change once the new presence is known.
pub type SessionEvents = Arc<dyn Fn(&SessionRecord, Presence) -> Vec<NewEvent> + Send + Sync>;

/// Decides which event types an endpoint takes.
pub type EventFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// An event claimed for delivery to one endpoint.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    pub seq: i64,
    pub id: String,
    pub event_type: String,
    pub order_key: String,
    pub created_at: i64,
    pub data: String,
    /// Attempts already made before this one.
    pub attempts: u32,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone)]
pub enum Settlement {
    Delivered,
    /// Try again at `next_at` (unix ms).
    Retry {
        next_at: i64,
        error: String,
    },
    /// Not counted against the retry budget (the endpoint was disabled by
    /// this answer): due again at once when it is re-enabled.
    Hold {
        error: String,
    },
    /// A formatter declined the event for this endpoint: removed, counted as skipped.
    Skipped,
    /// Retries exhausted: kept as failed, visible in the admin API.
    Failed {
        error: String,
    },
}

/// Durable state of one webhook endpoint.
#[derive(Debug, Clone, Serialize, Default)]
pub struct EndpointState {
    pub name: String,
    /// Outbox sequence up to which events were considered for this endpoint.
    pub cursor: i64,
    pub disabled_at: Option<i64>,
    pub disabled_reason: Option<String>,
    /// Start of the current run of failures (unix ms), if failing.
    pub failing_since: Option<i64>,
    pub delivered_total: i64,
    /// Events a formatter declined for this endpoint.
    pub skipped_total: i64,
    pub pending: i64,
    pub failed: i64,
    /// Creation time (unix ms) of the oldest undelivered event.
    pub oldest_pending_at: Option<i64>,
    pub last_error: Option<String>,
}

/// The storage contract.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Records an open session and its events (built from the presence after the insert).
    async fn open_session(&self, record: SessionRecord, events: SessionEvents) -> Result<Presence>;

    /// Removes a session and records its events. Returns `None`, and writes
    /// nothing, when the session is not recorded (already closed): this is
    /// what makes `connection.closed` exactly-once.
    async fn close_session(
        &self,
        connection_id: &str,
        events: SessionEvents,
    ) -> Result<Option<Presence>>;

    /// Closes every session recorded for `node_id` (left behind by a crash),
    /// each with its own events. Returns how many were closed.
    async fn close_node_sessions(&self, node_id: &str, events: SessionEvents) -> Result<usize>;

    /// A user's presence and open sessions.
    async fn presence(&self, user_id: &str) -> Result<(Presence, Vec<SessionRecord>)>;

    /// Makes sure an endpoint has durable state; a new endpoint starts after
    /// the newest event already in the outbox.
    async fn endpoint_register(&self, name: &str) -> Result<EndpointState>;

    /// Moves outbox events past the endpoint's cursor into its delivery queue
    /// (those `accepts` keeps). Returns how many outbox events it considered,
    /// so a caller can tell whether more are waiting (`== limit`).
    async fn endpoint_fanout(
        &self,
        name: &str,
        accepts: EventFilter,
        limit: usize,
    ) -> Result<usize>;

    /// Claims up to `limit` due deliveries (at most one per order key) and
    /// leases them until `lease_until`.
    async fn deliveries_claim(
        &self,
        name: &str,
        now: i64,
        limit: usize,
        lease_until: i64,
    ) -> Result<Vec<ClaimedEvent>>;

    /// Earliest time a delivery of this endpoint is due, if any is pending.
    async fn deliveries_next_due(&self, name: &str) -> Result<Option<i64>>;

    /// Records the outcome of an attempt for the given events. Returns the
    /// endpoint's `failing_since` afterwards.
    async fn deliveries_settle(
        &self,
        name: &str,
        seqs: Vec<i64>,
        outcome: Settlement,
        now: i64,
    ) -> Result<Option<i64>>;

    /// Disables (with a reason) or re-enables an endpoint.
    async fn endpoint_set_disabled(
        &self,
        name: &str,
        reason: Option<String>,
        now: i64,
    ) -> Result<()>;

    /// Puts failed deliveries of an endpoint back in the queue. Returns how many.
    async fn endpoint_retry_failed(&self, name: &str, now: i64) -> Result<usize>;

    /// Durable state and counts of one endpoint.
    async fn endpoint_state(&self, name: &str) -> Result<Option<EndpointState>>;

    /// Deliveries pending (due or in flight) for the given endpoints.
    async fn deliveries_outstanding(&self, names: Vec<String>, now: i64) -> Result<i64>;

    /// Total outbox events not yet handled by every listed endpoint.
    async fn outbox_depth(&self) -> Result<i64>;

    /// Deletes outbox events every listed endpoint has moved past and no delivery refers to.
    async fn outbox_prune(&self, names: Vec<String>) -> Result<usize>;

    /// Appends events that no other state change carries (the gateway's own
    /// service events); durable when the future resolves.
    async fn append_events(&self, events: Vec<NewEvent>) -> Result<()>;

    /// Reads a key of a plugin's key-value store.
    async fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>>;

    /// Writes a key of a plugin's key-value store (durable on return).
    async fn kv_set(&self, plugin: &str, key: &str, value: Vec<u8>) -> Result<()>;

    /// Deletes a key of a plugin's key-value store.
    async fn kv_delete(&self, plugin: &str, key: &str) -> Result<()>;
}
