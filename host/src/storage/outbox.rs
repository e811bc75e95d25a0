//! The outbox and per-endpoint delivery queues of webhook events.
//!
//! Every state change writes its events into the outbox in its own
//! transaction; a worker per endpoint copies them into that endpoint's
//! delivery queue, claims due deliveries, and settles each attempt.
//!
//! Properties every engine keeps:
//! - **Durable before acknowledged**: an event is in the outbox once the
//!   future of the change that wrote it resolves.
//! - **Outbox order is commit order**: an event's `seq` is greater than the
//!   `seq` of every event committed before its transaction, so a cursor
//!   moving over `seq` never skips an event that commits late (engines with
//!   concurrent writers serialise event appends, e.g. with a lock held until
//!   commit).
//! - **Only the oldest pending delivery per (endpoint, order key) is due.**
//!   A claim never returns a delivery while an older one of its key is
//!   pending or in flight, so per-user order holds across retries, batches
//!   and concurrent workers; two concurrent claims never return the same
//!   delivery. A delivery settled as failed is set aside (the next of its
//!   key becomes due); put back by `endpoint_retry_failed`, it is pending
//!   again and due once the key's current head is settled.
//! - **A lease ends at its time**: a claimed delivery still pending at
//!   `lease_until` is due again, so a worker that died holds nothing for
//!   long. Whether leases are also voided when the storage opens is the
//!   engine's: SQLite does (one process owns the file), PostgreSQL does
//!   not (another live process may hold them).
//! - **One holder per endpoint lease.** [`OutboxStore::endpoint_lease`]
//!   grants an endpoint's delivery lease to one holder (a worker of one
//!   process) at a time: it is taken only when no one holds it, when its
//!   holder let it lapse, or by its own holder (a renewal); two concurrent
//!   takers never both get it. A lease granted by a call sent at local time
//!   `t` lasts at least until `t + ttl` in real time, so a holder that
//!   counts from when it sent the call never believes it holds a lease
//!   another has taken. [`OutboxStore::endpoint_release`] frees it at once,
//!   and only for its holder. Engines shared by several processes keep
//!   lease times on the database's clock, so the processes' clocks never
//!   have to agree; SQLite, owned by one process, grants every request
//!   (there is no one to exclude) and only remembers the last grant for
//!   [`EndpointState::lease_holder`]. The endpoint lease chooses which
//!   worker works; the per-delivery claim leases above still keep two
//!   workers from sending one delivery, should two ever overlap.
//! - **Endpoint state is shared.** A disable, a re-enable or failed
//!   deliveries put back are in storage the moment the call resolves, for
//!   every process's workers to read ([`OutboxStore::endpoint_disabled`]
//!   is cheap enough to ask before every claim round).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use super::Result;

/// An event to append to the outbox.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// `evt_…`; doubles as the webhook id and idempotency key.
    pub id: String,
    pub event_type: String,
    /// Events with the same key are delivered in order (the user id).
    pub order_key: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The event's `data` as JSON text, serialised once where the event is
    /// built and stored as it is (see [`event_data`]).
    pub data: Box<serde_json::value::RawValue>,
}

impl PartialEq for NewEvent {
    fn eq(&self, other: &NewEvent) -> bool {
        self.id == other.id
            && self.event_type == other.event_type
            && self.order_key == other.order_key
            && self.created_at == other.created_at
            && self.data.get() == other.data.get()
    }
}

/// An event's `data` as JSON text.
pub fn event_data<T: Serialize + ?Sized>(value: &T) -> Box<serde_json::value::RawValue> {
    // Serialising to text fails only for maps with keys that are not
    // strings, which no event has.
    serde_json::value::to_raw_value(value).expect("event data serialises to JSON")
}

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
    /// Who holds the endpoint's delivery lease now (`None` when no one does,
    /// or the last holder's lease lapsed).
    pub lease_holder: Option<String>,
    /// When that lease ends (unix ms; the database's clock where it has one).
    pub lease_until: Option<i64>,
}

/// The outbox and delivery contract.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
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
    ) -> Result<Option<i64>> {
        self.deliveries_settle_all(name, vec![(outcome, seqs)], now)
            .await
    }

    /// Records several outcomes (each for its events) in one write, in the
    /// order given, so that a round of finished requests costs the writer
    /// one job. Returns the endpoint's `failing_since` after the last.
    async fn deliveries_settle_all(
        &self,
        name: &str,
        settlements: Vec<(Settlement, Vec<i64>)>,
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

    /// The reason an endpoint is disabled at run time, or `None` when it is
    /// not (or is unknown): one row read, for the worker's every round.
    async fn endpoint_disabled(&self, name: &str) -> Result<Option<String>>;

    /// Takes or renews the endpoint's delivery lease for `holder`: true when
    /// `holder` holds it for `ttl` from now, false when another holder's
    /// lease is live (nothing changes then). See the module docs.
    async fn endpoint_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool>;

    /// Ends `holder`'s lease of the endpoint at once (nothing if another
    /// holds it), so another process's worker can take it without waiting
    /// for it to lapse.
    async fn endpoint_release(&self, name: &str, holder: &str) -> Result<()>;

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
}
