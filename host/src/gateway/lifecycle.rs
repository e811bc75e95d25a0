//! The lifecycle state machine: how a connection's open and close become
//! durable events (their builders are in [`crate::events`]).
//!
//! A connection is *open* once the upgrade succeeded, the client
//! authenticated and [`Lifecycle::record_open`] committed. From then on
//! exactly one close takes effect: the session row is the guard (closing
//! deletes it, and a close that finds no row writes nothing), so a close
//! racing a crash recovery or a shutdown sweep still yields one
//! `connection.closed`. Presence (`user.online` / `user.offline`) is counted
//! from the session rows inside the same transaction.
//!
//! A close that storage cannot take (it is unavailable, or a write failed)
//! is not lost: [`Lifecycle::close`] keeps it in a retry queue, and a task
//! records it once storage takes writes again, with the time the connection
//! really ended. Retrying is safe because of the guard: a retried close
//! whose row is already gone writes nothing. A close still queued when the
//! process stops leaves its row behind, and the next start's crash recovery
//! closes it (as `gateway_crash`), so it is still reported exactly once.
//!
//! The WebSocket service itself has a lifecycle too: `service.enabled` when
//! it starts accepting (at start, or a reload that turns it on) and
//! `service.disabled` when it stops (a reload that turns it off, or a
//! graceful shutdown).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::events::{self, CloseInfo, ServiceReason};
use crate::metrics::Metrics;
use crate::outbox::Wakeup;
use crate::storage::{OutboxStore, Presence, SessionRecord, SessionStore, StorageError};
use crate::unavailable::Backoff;

pub use crate::delivery::CloseReason;

/// The first wait before a failed close is tried again; waits double from there.
const RETRY_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between two tries of the queued closes.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How often the idle retry task checks that the gateway still exists.
const RETRY_IDLE: Duration = Duration::from_secs(30);

/// What became of a close.
#[derive(Debug)]
pub enum Closed {
    /// `connection.closed` is recorded.
    Recorded,
    /// It was already recorded (by a sweep or a recovery): nothing written.
    AlreadyClosed,
    /// Storage did not take it; it is queued and recorded once storage does.
    Queued(StorageError),
}

/// A close waiting for storage.
struct PendingClose {
    connection_id: String,
    info: CloseInfo,
    /// Unix ms when the connection ended.
    closed_at: i64,
}

/// Records opens and closes. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Arc<dyn SessionStore>,
    /// For the service events, which no session change carries.
    outbox: Arc<dyn OutboxStore>,
    metrics: Arc<Metrics>,
    wakeup: Wakeup,
    node_id: String,
    /// Closes storage did not take yet, oldest first. A round of tries
    /// takes them out while it tries them.
    pending: Mutex<Vec<PendingClose>>,
    /// Held by a round of tries (the retry task's or a shutdown's flush),
    /// so that a flush waits for a round under way and sees what it left.
    trying: tokio::sync::Mutex<()>,
    /// Signalled when a close is queued.
    queued: Arc<Notify>,
}

impl Lifecycle {
    /// A lifecycle recorder, with its close retry task on the current runtime.
    pub fn start(
        storage: Arc<dyn SessionStore>,
        outbox: Arc<dyn OutboxStore>,
        metrics: Arc<Metrics>,
        wakeup: Wakeup,
        node_id: String,
    ) -> Self {
        let inner = Arc::new(Inner {
            storage,
            outbox,
            metrics,
            wakeup,
            node_id,
            pending: Mutex::new(Vec::new()),
            trying: tokio::sync::Mutex::new(()),
            queued: Arc::new(Notify::new()),
        });
        tokio::spawn(retry_closes(Arc::downgrade(&inner), inner.queued.clone()));
        Lifecycle { inner }
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Records an open connection with `connection.opened` (and `user.online`
    /// for the user's first connection). The connection is open once this
    /// returns Ok; a failed open wrote nothing (no engine commits part of a
    /// failed operation), so a refused connection has no events.
    pub async fn record_open(
        &self,
        connection_id: &str,
        user_id: &str,
        device_id: &str,
        remote_addr: &str,
    ) -> Result<Presence, StorageError> {
        let record = SessionRecord {
            connection_id: connection_id.to_string(),
            user_id: user_id.to_string(),
            device_id: device_id.to_string(),
            node_id: self.inner.node_id.clone(),
            opened_at: crate::now_ms(),
            remote_addr: remote_addr.to_string(),
        };
        let i = &self.inner;
        let presence = i
            .storage
            .open_session(record, events::session_opened())
            .await?;
        i.metrics.lifecycle("opened", "open");
        i.metrics.connections_open.inc();
        i.wakeup.wake();
        Ok(presence)
    }

    /// Records the end of a connection. A close storage does not take is
    /// queued and recorded once it does (see the module docs).
    pub async fn close(&self, connection_id: &str, info: CloseInfo) -> Closed {
        let closed_at = crate::now_ms();
        match self.inner.record_close(connection_id, &info, None).await {
            Ok(true) => Closed::Recorded,
            Ok(false) => Closed::AlreadyClosed,
            Err(e) => {
                self.queue_close(connection_id, info, closed_at);
                Closed::Queued(e)
            }
        }
    }

    /// Queues a close without trying it first (the shutdown sweep, which
    /// then flushes the queue once).
    pub fn queue_close(&self, connection_id: &str, info: CloseInfo, closed_at: i64) {
        let i = &self.inner;
        let len = {
            let mut pending = i.lock();
            pending.push(PendingClose {
                connection_id: connection_id.to_string(),
                info,
                closed_at,
            });
            pending.len()
        };
        i.metrics.lifecycle_closes_pending.set(len as i64);
        i.queued.notify_one();
    }

    /// Tries every queued close once, in order, stopping at the first one
    /// storage refuses as unavailable (the rest would fail the same way).
    /// Returns how many are still queued. At shutdown: what is left is
    /// closed out by the next start's crash recovery.
    pub async fn flush_closes(&self) -> usize {
        self.inner.try_pending().await;
        self.inner.lock().len()
    }

    /// Records `service.enabled` (`enabled`) or `service.disabled` for this
    /// node; durable when it returns.
    pub async fn record_service(
        &self,
        enabled: bool,
        reason: ServiceReason,
    ) -> Result<(), StorageError> {
        let i = &self.inner;
        i.outbox
            .append_events(vec![events::service(enabled, &i.node_id, reason)])
            .await?;
        i.wakeup.wake();
        Ok(())
    }

    /// Closes every session this node left open when it died. Run once at
    /// start-up, before the listener accepts anything.
    pub async fn recover_crashed(&self) -> Result<usize, StorageError> {
        let info = CloseInfo {
            reason: CloseReason::GatewayCrash,
            code: CloseReason::GatewayCrash.code(),
            message:
                "the gateway stopped without closing this connection; closed at the next start"
                    .into(),
        };
        let i = &self.inner;
        let n = i
            .storage
            .close_node_sessions(&i.node_id, events::session_closed(info, None))
            .await?;
        if n > 0 {
            i.metrics
                .lifecycle_events
                .get_or_create(&crate::metrics::LifecycleLabel {
                    event: "closed".into(),
                    reason: CloseReason::GatewayCrash.as_str().into(),
                })
                .inc_by(n as u64);
            i.wakeup.wake();
        }
        Ok(n)
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PendingClose>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One close, in one transaction. False (nothing written) when it was
    /// already recorded. `closed_at`: when the connection ended, if not now.
    async fn record_close(
        &self,
        connection_id: &str,
        info: &CloseInfo,
        closed_at: Option<i64>,
    ) -> Result<bool, StorageError> {
        let closed = self
            .storage
            .close_session(
                connection_id,
                events::session_closed(info.clone(), closed_at),
            )
            .await?;
        if closed.is_some() {
            self.metrics.lifecycle("closed", info.reason.as_str());
            self.metrics.connections_open.dec();
            self.wakeup.wake();
        }
        Ok(closed.is_some())
    }

    /// Tries the queued closes in order. Returns false when storage refused one.
    async fn try_pending(&self) -> bool {
        let _round = self.trying.lock().await;
        let mut batch = std::mem::take(&mut *self.lock());
        let mut left = Vec::new();
        let mut failure = None;
        for p in batch.drain(..) {
            if failure.as_ref().is_some_and(StorageError::is_unavailable) {
                left.push(p);
                continue;
            }
            match self
                .record_close(&p.connection_id, &p.info, Some(p.closed_at))
                .await
            {
                Ok(true) => tracing::info!(
                    connection_id = %p.connection_id, reason = p.info.reason.as_str(),
                    "connection closed: its close is recorded now that storage takes it"
                ),
                Ok(false) => tracing::debug!(
                    connection_id = %p.connection_id,
                    "a close that waited for storage was recorded by someone else meanwhile"
                ),
                Err(e) => {
                    left.push(p);
                    failure = Some(e);
                }
            }
        }
        let len = {
            let mut pending = self.lock();
            // Closes queued while this ran go after the ones tried.
            left.append(&mut pending);
            *pending = left;
            pending.len()
        };
        self.metrics.lifecycle_closes_pending.set(len as i64);
        match failure {
            Some(e) => {
                tracing::warn!(
                    pending = len, error = %e,
                    "connection closes wait for storage; they are tried again"
                );
                false
            }
            None => true,
        }
    }
}

/// Tries the queued closes again with a growing wait while storage refuses
/// them, until the lifecycle is dropped.
async fn retry_closes(inner: Weak<Inner>, queued: Arc<Notify>) {
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    loop {
        let idle = match inner.upgrade() {
            None => return,
            Some(i) => i.lock().is_empty(),
        };
        if idle {
            let _ = tokio::time::timeout(RETRY_IDLE, queued.notified()).await;
            continue;
        }
        // Storage just refused these: wait before asking again.
        tokio::time::sleep(backoff.failed()).await;
        let Some(i) = inner.upgrade() else { return };
        if i.try_pending().await {
            backoff.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::storage::{SessionEvents, SqliteStorage};

    /// Sessions in SQLite, except that the next `fail` closes are refused
    /// as unavailable, as a database that is restarting would.
    struct Flaky {
        inner: Arc<SqliteStorage>,
        fail: AtomicUsize,
    }

    #[async_trait]
    impl SessionStore for Flaky {
        async fn open_session(
            &self,
            record: SessionRecord,
            events: SessionEvents,
        ) -> crate::storage::Result<Presence> {
            self.inner.open_session(record, events).await
        }

        async fn close_session(
            &self,
            connection_id: &str,
            events: SessionEvents,
        ) -> crate::storage::Result<Option<Presence>> {
            let refuse = self
                .fail
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
            if refuse {
                return Err(StorageError::Unavailable("restarting".into()));
            }
            self.inner.close_session(connection_id, events).await
        }

        async fn close_node_sessions(
            &self,
            node_id: &str,
            events: SessionEvents,
        ) -> crate::storage::Result<usize> {
            self.inner.close_node_sessions(node_id, events).await
        }

        async fn presence(
            &self,
            user_id: &str,
        ) -> crate::storage::Result<(Presence, Vec<SessionRecord>)> {
            self.inner.presence(user_id).await
        }
    }

    /// Every event written since endpoint `t` was registered, in order.
    async fn events_of(store: &SqliteStorage) -> Vec<(String, serde_json::Value)> {
        use crate::storage::{OutboxStore, Settlement};
        let all: crate::storage::EventFilter = Arc::new(|_: &str| true);
        while store.endpoint_fanout("t", all.clone(), 1000).await.unwrap() == 1000 {}
        let mut out = Vec::new();
        loop {
            let now = crate::now_ms();
            let claimed = store
                .deliveries_claim("t", now, 1000, now + 60_000)
                .await
                .unwrap();
            if claimed.is_empty() {
                return out;
            }
            let seqs = claimed.iter().map(|e| e.seq).collect();
            store
                .deliveries_settle("t", seqs, Settlement::Delivered, now)
                .await
                .unwrap();
            for e in claimed {
                out.push((e.event_type, serde_json::from_str(&e.data).unwrap()));
            }
        }
    }

    #[tokio::test]
    async fn a_close_storage_refuses_is_recorded_once_when_it_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Arc::new(
            SqliteStorage::open(&dir.path().join("t.db"), &Default::default(), None).unwrap(),
        );
        let flaky = Arc::new(Flaky {
            inner: sqlite.clone(),
            fail: AtomicUsize::new(3),
        });
        crate::storage::OutboxStore::endpoint_register(&*sqlite, "t")
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let lc = Lifecycle::start(
            flaky.clone(),
            sqlite.clone(),
            metrics.clone(),
            Wakeup::default(),
            "edge-1".into(),
        );
        lc.record_open("conn_1", "alice", "phone", "127.0.0.1:1")
            .await
            .unwrap();
        let info = CloseInfo {
            reason: CloseReason::ClientClose,
            code: 1000,
            message: "bye".into(),
        };
        let before = crate::now_ms();
        assert!(matches!(
            lc.close("conn_1", info.clone()).await,
            Closed::Queued(e) if e.is_unavailable()
        ));
        // Two more refusals, then the retry task gets it through.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while metrics.lifecycle_closes_pending.get() > 0 || flaky.fail.load(Ordering::Acquire) > 0 {
            assert!(tokio::time::Instant::now() < deadline, "never recorded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (presence, _) = sqlite.presence("alice").await.unwrap();
        assert_eq!(presence.connections, 0);
        // A close of the same connection later (a sweep) writes nothing more.
        assert!(matches!(
            lc.close("conn_1", info).await,
            Closed::AlreadyClosed
        ));
        let events = events_of(&sqlite).await;
        let kinds: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "connection.opened",
                "user.online",
                "connection.closed",
                "user.offline"
            ]
        );
        let closed = &events[2].1;
        assert_eq!(closed["reason"], "client_close");
        // `closed_at` is when the connection ended, not when storage came back.
        let at = humantime::parse_rfc3339(closed["closed_at"].as_str().unwrap()).unwrap();
        let at_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!(
            at_ms - before < 200,
            "closed_at {at_ms} long after {before}"
        );
    }
}
