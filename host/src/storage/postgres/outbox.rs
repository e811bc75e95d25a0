//! The outbox and webhook delivery queues on PostgreSQL: the SQLite
//! engine's queue (see `storage::sqlite`), statement for statement in
//! meaning, with every write under the write lock.
//!
//! Delivery queue: a row per (endpoint, event). Only the oldest pending row
//! of each order key is ever due (`next_at` holds a time); the rows behind it
//! hold [`NOT_HEAD`]. Settling the head promotes the next row of its key.
//!
//! Several processes, one database:
//! - **Claims** are writes: under the write lock a claim sees every claim
//!   and settlement committed before it, and leases what it returns
//!   (`next_at` = the lease's end) before the lock passes on, so two
//!   workers (of one process or of two) never claim one delivery, and the
//!   head-of-key rule keeps at most one delivery of a key in flight.
//! - **Fan-out** reads the endpoint's cursor and moves it in one write
//!   under the lock, so two processes fanning out one endpoint take
//!   disjoint ranges of the outbox; the deliveries primary key (`ON
//!   CONFLICT DO NOTHING`) would absorb a repeat regardless.
//! - **Outbox `seq`** is drawn under the lock ([`super::insert_events`]), so
//!   a cursor never passes an event that commits later.
//! - **Leases** end at `lease_until` and are not voided at start: another
//!   live process may hold them (see the module doc of `postgres`). A claim
//!   takes a leased delivery once its lease has ended, as on SQLite.
//! - **Endpoint leases** (`endpoint_leases`, one row per endpoint) are not
//!   writes of the writer: each take, renewal or release is one statement
//!   on a pooled connection of its own, so it never waits for the write
//!   lock or behind a burst of messages, and a batch that fails cannot take
//!   a renewal with it. Nothing else is ordered by them, so the write lock
//!   has nothing to add: the row decides. A take updates the row only
//!   where it is free (its holder's own, or lapsed) and inserts it only
//!   where there is none, so of two takers the second finds the row the
//!   first left (READ COMMITTED re-checks its condition on it, or the
//!   insert meets the first one's row) and gets nothing. A row it cannot
//!   take is not locked. Times are the database's clock (`now_ms!`).
//! - **Endpoint state** read by the workers each round
//!   (`endpoint_disabled`) is one statement on a pooled connection too:
//!   a primary-key read, with no transaction around it.

use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres::Row;

use super::{insert_events, map_err, map_pool_err, PostgresStorage, Transaction};
use crate::storage::{
    ClaimedEvent, EndpointState, EventFilter, NewEvent, OutboxStore, Result, Settlement,
    StorageError,
};

/// `next_at` of a delivery row waiting behind an earlier one of its key.
const NOT_HEAD: i64 = i64::MAX;

/// The database's clock in unix milliseconds, in SQL: endpoint lease times.
macro_rules! now_ms {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// Takes or renews an endpoint's lease (`$1` endpoint, `$2` holder, `$3`
/// its length in ms): the row is updated where it is this holder's or has
/// lapsed, inserted where there is none; answers whether either happened.
const TAKE_LEASE: &str = concat!(
    "WITH now AS MATERIALIZED (SELECT ",
    now_ms!(),
    " AS ms),
     renewed AS (
         UPDATE endpoint_leases l SET holder = $2, lease_until = now.ms + $3 FROM now
         WHERE l.endpoint = $1 AND (l.holder = $2 OR l.lease_until <= now.ms)
         RETURNING 1),
     inserted AS (
         INSERT INTO endpoint_leases (endpoint, holder, lease_until)
         SELECT $1, $2, now.ms + $3 FROM now
         WHERE NOT EXISTS (SELECT 1 FROM renewed)
         ON CONFLICT (endpoint) DO NOTHING
         RETURNING 1)
     SELECT EXISTS (SELECT 1 FROM renewed) OR EXISTS (SELECT 1 FROM inserted)"
);

type PgResult<T> = std::result::Result<T, tokio_postgres::Error>;

async fn endpoint_state_of(t: &Transaction<'_>, name: &str) -> PgResult<Option<EndpointState>> {
    let stmt = t
        .prepare_cached(concat!(
            "SELECT e.name, e.cursor, e.disabled_at, e.disabled_reason, e.failing_since,
                    e.delivered_total, e.last_error, e.skipped_total,
                    (SELECT COUNT(*) FROM deliveries d
                     WHERE d.endpoint = e.name AND d.state = 'pending'),
                    (SELECT COUNT(*) FROM deliveries d
                     WHERE d.endpoint = e.name AND d.state = 'failed'),
                    (SELECT o.created_at FROM deliveries d JOIN outbox o ON o.seq = d.event_seq
                     WHERE d.endpoint = e.name AND d.state = 'pending'
                     ORDER BY d.event_seq LIMIT 1),
                    l.holder, l.lease_until
             FROM endpoints e
             LEFT JOIN endpoint_leases l ON l.endpoint = e.name AND l.lease_until > ",
            now_ms!(),
            "
             WHERE e.name = $1"
        ))
        .await?;
    Ok(t.query_opt(&stmt, &[&name]).await?.map(|r| EndpointState {
        name: r.get(0),
        cursor: r.get(1),
        disabled_at: r.get(2),
        disabled_reason: r.get(3),
        failing_since: r.get(4),
        delivered_total: r.get(5),
        last_error: r.get(6),
        skipped_total: r.get(7),
        pending: r.get(8),
        failed: r.get(9),
        oldest_pending_at: r.get(10),
        lease_holder: r.get(11),
        lease_until: r.get(12),
    }))
}

fn claimed_from_row(r: &Row) -> ClaimedEvent {
    ClaimedEvent {
        seq: r.get(0),
        id: r.get(1),
        event_type: r.get(2),
        order_key: r.get(3),
        created_at: r.get(4),
        data: r.get(5),
        attempts: r.get::<_, i64>(6).try_into().unwrap_or(u32::MAX),
    }
}

/// The part of a settlement that makes the oldest pending row of each key
/// whose head was just settled (`done`, returning the keys) due at `$3`.
/// `$1` endpoint, `$2` the settled seqs, `$4` [`NOT_HEAD`]. The statement
/// sees the rows as they were before it, so the settled ones are left out
/// by seq. `heads` is `MATERIALIZED` and looks each key up on its own: on
/// a young table whose statistics say "one row", an inlined form was planned
/// as a nested loop re-running the whole aggregate per pending row
/// (quadratic; 90 ms per settle at 600 pending). The new heads are then
/// updated through the primary key (`event_seq = ANY(ARRAY(…))`, computed
/// once), and `next_at + 0` keeps the planner from walking `deliveries_due`
/// instead: on young statistics it took that index and filtered every row
/// waiting behind a head (4–12 ms per settle at 20,000 pending).
const PROMOTE: &str = "
    heads AS MATERIALIZED (
        SELECT k.order_key,
               (SELECT MIN(x.event_seq) FROM deliveries x
                WHERE x.endpoint = $1 AND x.order_key = k.order_key AND x.state = 'pending'
                  AND x.event_seq <> ALL($2)) AS seq
        FROM (SELECT DISTINCT order_key FROM done) k),
    promoted AS (
        UPDATE deliveries d SET next_at = $3
        WHERE d.endpoint = $1
          AND d.event_seq = ANY (ARRAY(SELECT seq FROM heads WHERE seq IS NOT NULL))
          AND d.next_at + 0 = $4)";

#[async_trait]
impl OutboxStore for PostgresStorage {
    async fn append_events(&self, events: Vec<NewEvent>) -> Result<()> {
        self.write_urgent(move |t| Box::pin(async move { insert_events(t, &events).await }))
            .await
    }

    async fn endpoint_register(&self, name: &str) -> Result<EndpointState> {
        let name = name.to_string();
        self.write_urgent(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(
                        "INSERT INTO endpoints (name, cursor)
                         SELECT $1, COALESCE(MAX(seq), 0) FROM outbox
                         ON CONFLICT (name) DO NOTHING",
                    )
                    .await?;
                t.execute(&stmt, &[&name]).await?;
                Ok(endpoint_state_of(t, &name).await?.unwrap_or_default())
            })
        })
        .await
    }

    async fn endpoint_fanout(
        &self,
        name: &str,
        accepts: EventFilter,
        limit: usize,
    ) -> Result<usize> {
        let name = name.to_string();
        let considered = self
            .write_urgent(move |t| {
                Box::pin(async move {
                    // The cursor and the events after it in one statement; no
                    // row at all means no such endpoint.
                    let stmt = t
                        .prepare_cached(
                            "SELECT o.seq, o.type, o.order_key FROM endpoints e
                             LEFT JOIN LATERAL (
                                 SELECT seq, type, order_key FROM outbox WHERE seq > e.cursor
                                 ORDER BY seq LIMIT $2) o ON TRUE
                             WHERE e.name = $1 ORDER BY o.seq",
                        )
                        .await?;
                    let rows = t.query(&stmt, &[&name, &(limit as i64)]).await?;
                    if rows.is_empty() {
                        return Ok(None);
                    }
                    let mut last = None;
                    let mut seqs: Vec<i64> = Vec::new();
                    let mut keys: Vec<String> = Vec::new();
                    let mut considered = 0;
                    for r in &rows {
                        let Some(seq) = r.get::<_, Option<i64>>(0) else {
                            continue;
                        };
                        considered += 1;
                        last = Some(seq);
                        if accepts(r.get::<_, &str>(1)) {
                            seqs.push(seq);
                            keys.push(r.get(2));
                        }
                    }
                    let Some(last) = last else {
                        return Ok(Some(0));
                    };
                    // The first row of a key in this step is its head unless
                    // the key already has pending rows (then one of them is).
                    let stmt = t
                        .prepare_cached(
                            "WITH step AS (
                                 SELECT s.seq, s.key,
                                        s.seq = MIN(s.seq) OVER (PARTITION BY s.key) AS first
                                 FROM UNNEST($2::bigint[], $3::text[]) AS s(seq, key)),
                             ins AS (
                                 INSERT INTO deliveries (endpoint, event_seq, order_key, state, next_at)
                                 SELECT $1, s.seq, s.key, 'pending',
                                        CASE WHEN s.first AND NOT EXISTS (
                                                 SELECT 1 FROM deliveries d
                                                 WHERE d.endpoint = $1 AND d.order_key = s.key
                                                   AND d.state = 'pending')
                                             THEN $4::bigint ELSE $5::bigint END
                                 FROM step s ORDER BY s.seq
                                 ON CONFLICT (endpoint, event_seq) DO NOTHING)
                             UPDATE endpoints SET cursor = $6 WHERE name = $1",
                        )
                        .await?;
                    t.execute(
                        &stmt,
                        &[&name, &seqs, &keys, &crate::now_ms(), &NOT_HEAD, &last],
                    )
                    .await?;
                    Ok(Some(considered))
                })
            })
            .await?;
        considered.ok_or_else(|| StorageError::Database("no such webhook endpoint".into()))
    }

    async fn deliveries_claim(
        &self,
        name: &str,
        now: i64,
        limit: usize,
        lease_until: i64,
    ) -> Result<Vec<ClaimedEvent>> {
        let name = name.to_string();
        self.write_urgent(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(
                        "WITH due AS MATERIALIZED (
                             SELECT d.event_seq, d.next_at, o.id, o.type, o.created_at, o.data
                             FROM deliveries d JOIN outbox o ON o.seq = d.event_seq
                             WHERE d.endpoint = $1 AND d.state = 'pending' AND d.next_at <= $2
                             ORDER BY d.next_at, d.event_seq LIMIT $3),
                         leased AS (
                             UPDATE deliveries d SET next_at = $4, leased = TRUE FROM due
                             WHERE d.endpoint = $1 AND d.event_seq = due.event_seq
                             RETURNING d.event_seq, due.id, due.type, d.order_key, due.created_at,
                                       due.data, d.attempts, due.next_at AS was_due)
                         SELECT event_seq, id, type, order_key, created_at, data, attempts
                         FROM leased ORDER BY was_due, event_seq",
                    )
                    .await?;
                let rows = t
                    .query(&stmt, &[&name, &now, &(limit as i64), &lease_until])
                    .await?;
                Ok(rows.iter().map(claimed_from_row).collect())
            })
        })
        .await
    }

    async fn deliveries_next_due(&self, name: &str) -> Result<Option<i64>> {
        let name = name.to_string();
        self.read(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(
                        "SELECT MIN(next_at) FROM deliveries
                         WHERE endpoint = $1 AND state = 'pending' AND next_at < $2",
                    )
                    .await?;
                Ok(t.query_one(&stmt, &[&name, &NOT_HEAD]).await?.get(0))
            })
        })
        .await
    }

    async fn deliveries_settle_all(
        &self,
        name: &str,
        settlements: Vec<(Settlement, Vec<i64>)>,
        now: i64,
    ) -> Result<Option<i64>> {
        let name = name.to_string();
        self.write_urgent(move |t| {
            Box::pin(async move {
                let mut failing_since = None;
                for (outcome, seqs) in &settlements {
                    failing_since = settle_in(t, &name, seqs, outcome, now).await?;
                }
                Ok(failing_since)
            })
        })
        .await
    }

    async fn endpoint_set_disabled(
        &self,
        name: &str,
        reason: Option<String>,
        now: i64,
    ) -> Result<()> {
        let name = name.to_string();
        self.write_urgent(move |t| {
            Box::pin(async move {
                match reason {
                    Some(reason) => {
                        let stmt = t
                            .prepare_cached(
                                "UPDATE endpoints SET disabled_at = $2, disabled_reason = $3
                                 WHERE name = $1 AND disabled_at IS NULL",
                            )
                            .await?;
                        t.execute(&stmt, &[&name, &now, &reason]).await?;
                    }
                    None => {
                        // Re-enabled: heads waiting in backoff become due now.
                        let stmt = t
                            .prepare_cached(
                                "WITH enabled AS (
                                     UPDATE endpoints SET disabled_at = NULL,
                                         disabled_reason = NULL, failing_since = NULL
                                     WHERE name = $1)
                                 UPDATE deliveries SET next_at = $2
                                 WHERE endpoint = $1 AND state = 'pending' AND NOT leased
                                   AND next_at > $2 AND next_at < $3",
                            )
                            .await?;
                        t.execute(&stmt, &[&name, &now, &NOT_HEAD]).await?;
                    }
                }
                Ok(())
            })
        })
        .await
    }

    async fn endpoint_retry_failed(&self, name: &str, now: i64) -> Result<usize> {
        let name = name.to_string();
        self.write_urgent(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(
                        "UPDATE deliveries SET state = 'pending', attempts = 0, next_at = $2
                         WHERE endpoint = $1 AND state = 'failed'",
                    )
                    .await?;
                let n = t.execute(&stmt, &[&name, &NOT_HEAD]).await?;
                // A key with no head (no pending row holding a time) gets its
                // oldest row promoted. A second statement: it must see the
                // rows the first one put back.
                let stmt = t
                    .prepare_cached(
                        "UPDATE deliveries SET next_at = $2
                         WHERE endpoint = $1 AND state = 'pending' AND event_seq IN (
                             SELECT MIN(event_seq) FROM deliveries
                             WHERE endpoint = $1 AND state = 'pending'
                             GROUP BY order_key HAVING COUNT(*) FILTER (WHERE next_at < $3) = 0)",
                    )
                    .await?;
                t.execute(&stmt, &[&name, &now, &NOT_HEAD]).await?;
                Ok(n as usize)
            })
        })
        .await
    }

    async fn endpoint_disabled(&self, name: &str) -> Result<Option<String>> {
        let conn = self.pool.get().await.map_err(map_pool_err)?;
        let stmt = conn
            .prepare_cached("SELECT disabled_reason FROM endpoints WHERE name = $1")
            .await
            .map_err(map_err)?;
        let row = conn.query_opt(&stmt, &[&name]).await.map_err(map_err)?;
        Ok(row.and_then(|r| r.get(0)))
    }

    async fn endpoint_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let conn = self.pool.get().await.map_err(map_pool_err)?;
        let stmt = conn.prepare_cached(TAKE_LEASE).await.map_err(map_err)?;
        let row = conn
            .query_one(&stmt, &[&name, &holder, &ttl_ms])
            .await
            .map_err(map_err)?;
        Ok(row.get(0))
    }

    async fn endpoint_release(&self, name: &str, holder: &str) -> Result<()> {
        let conn = self.pool.get().await.map_err(map_pool_err)?;
        let stmt = conn
            .prepare_cached("DELETE FROM endpoint_leases WHERE endpoint = $1 AND holder = $2")
            .await
            .map_err(map_err)?;
        conn.execute(&stmt, &[&name, &holder])
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn endpoint_state(&self, name: &str) -> Result<Option<EndpointState>> {
        let name = name.to_string();
        self.read(move |t| Box::pin(async move { endpoint_state_of(t, &name).await }))
            .await
    }

    async fn deliveries_outstanding(&self, names: Vec<String>, now: i64) -> Result<i64> {
        self.read(move |t| {
            Box::pin(async move {
                // Per listed name (repeats count again, as on SQLite): its
                // deliveries due or in flight, and the outbox events past its
                // cursor.
                let stmt = t
                    .prepare_cached(
                        "SELECT COALESCE(SUM(
                             (SELECT COUNT(*) FROM deliveries d
                              WHERE d.endpoint = n.name AND d.state = 'pending'
                                AND (d.next_at <= $2 OR d.leased))
                             + COALESCE((SELECT m.top - e.cursor FROM endpoints e
                                         WHERE e.name = n.name), 0)), 0)::bigint
                         FROM UNNEST($1::text[]) AS n(name),
                              (SELECT COALESCE(MAX(seq), 0) AS top FROM outbox) m",
                    )
                    .await?;
                Ok(t.query_one(&stmt, &[&names, &now]).await?.get(0))
            })
        })
        .await
    }

    async fn outbox_depth(&self) -> Result<i64> {
        self.read(|t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'")
                    .await?;
                Ok(t.query_one(&stmt, &[]).await?.get(0))
            })
        })
        .await
    }

    async fn outbox_prune(&self, names: Vec<String>) -> Result<usize> {
        self.write(move |t| {
            Box::pin(async move {
                // The floor: the lowest cursor of the listed endpoints (0 for
                // one not registered); with none listed, the newest event.
                let stmt = t
                    .prepare_cached(
                        "DELETE FROM outbox o WHERE o.seq <= (
                             CASE WHEN cardinality($1::text[]) = 0
                                  THEN (SELECT COALESCE(MAX(seq), 0) FROM outbox)
                                  ELSE (SELECT MIN(COALESCE(e.cursor, 0))
                                        FROM UNNEST($1::text[]) AS n(name)
                                        LEFT JOIN endpoints e ON e.name = n.name)
                             END)
                         AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = o.seq)",
                    )
                    .await?;
                Ok(t.execute(&stmt, &[&names]).await? as usize)
            })
        })
        .await
    }
}

/// Records one outcome for `seqs` of endpoint `name` (see
/// [`OutboxStore::deliveries_settle_all`]); returns `failing_since` after it.
async fn settle_in(
    t: &Transaction<'_>,
    name: &str,
    seqs: &[i64],
    outcome: &Settlement,
    now: i64,
) -> std::result::Result<Option<i64>, tokio_postgres::Error> {
    // One statement each: the rows, the promotion of the next
    // head of their keys, and the endpoint's counters.
    let count = seqs.len() as i64;
    let failing = "UPDATE endpoints SET failing_since = COALESCE(failing_since, $3),
                   last_error = $5 WHERE name = $1 RETURNING failing_since";
    let row = match outcome {
        Settlement::Delivered | Settlement::Skipped => {
            let counter = if matches!(outcome, Settlement::Delivered) {
                "failing_since = NULL, delivered_total = delivered_total + $5"
            } else {
                "skipped_total = skipped_total + $5"
            };
            let stmt = t
                .prepare_cached(&format!(
                    "WITH done AS (
                         DELETE FROM deliveries WHERE endpoint = $1 AND event_seq = ANY($2)
                         RETURNING order_key),
                     {PROMOTE}
                     UPDATE endpoints SET {counter} WHERE name = $1
                     RETURNING failing_since"
                ))
                .await?;
            t.query_opt(&stmt, &[&name, &seqs, &now, &NOT_HEAD, &count])
                .await?
        }
        Settlement::Failed { error } => {
            let stmt = t
                .prepare_cached(&format!(
                    "WITH done AS (
                         UPDATE deliveries SET attempts = attempts + 1, state = 'failed',
                             next_at = $3, leased = FALSE, last_error = $5
                         WHERE endpoint = $1 AND event_seq = ANY($2)
                         RETURNING order_key),
                     {PROMOTE}
                     {failing}"
                ))
                .await?;
            t.query_opt(&stmt, &[&name, &seqs, &now, &NOT_HEAD, error])
                .await?
        }
        Settlement::Retry { next_at, error } => {
            let stmt = t
                .prepare_cached(&format!(
                    "WITH done AS (
                         UPDATE deliveries SET attempts = attempts + 1, next_at = $4,
                             leased = FALSE, last_error = $5
                         WHERE endpoint = $1 AND event_seq = ANY($2))
                     {failing}"
                ))
                .await?;
            t.query_opt(&stmt, &[&name, &seqs, &now, next_at, error])
                .await?
        }
        Settlement::Hold { error } => {
            // Not counted as an attempt: due again at once.
            let stmt = t
                .prepare_cached(
                    "WITH done AS (
                         UPDATE deliveries SET next_at = $3, leased = FALSE,
                             last_error = $4
                         WHERE endpoint = $1 AND event_seq = ANY($2))
                     UPDATE endpoints SET failing_since = COALESCE(failing_since, $3),
                         last_error = $4 WHERE name = $1 RETURNING failing_since",
                )
                .await?;
            t.query_opt(&stmt, &[&name, &seqs, &now, error]).await?
        }
    };
    Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
}
