//! Business control messages on PostgreSQL: the SQLite engine's tables and
//! rules (see `storage::sqlite::controls`). Target rows repeat the
//! control's priority, times and flags so that "what does this user get on
//! connect" and "what expired" are single index range reads.
//!
//! Several processes, one database: every change runs under the write lock
//! and each state move is one `UPDATE … WHERE state IN (<the states it may
//! leave>) RETURNING …`, so of a receipt, a redelivery and the expiry task
//! racing (in one process or several) each move happens once and only the
//! one that made it writes its event. A create inserts its idempotency key
//! with `ON CONFLICT DO NOTHING` (the key is unique) and, when the key is
//! taken, answers what it names.

use std::collections::HashMap;

use async_trait::async_trait;
use tokio_postgres::Row;

use super::{insert_events, PostgresStorage, Transaction};
use crate::storage::controls::{
    ControlStore, Deliverable, Existing, NewControl, Priority, TargetEvents, TargetState,
};
use crate::storage::{NewEvent, Result};

type PgResult<T> = std::result::Result<T, tokio_postgres::Error>;

/// The columns of a [`Deliverable`], from `control_targets t` and `controls c`.
const DELIVERABLE: &str = "t.control_id, t.user_id, c.kind, COALESCE(t.payload, c.payload), \
     t.priority, t.persist, t.receipt, t.created_at, t.expires_at, t.state";

fn deliverable(r: &Row) -> Deliverable {
    Deliverable {
        control_id: r.get(0),
        user_id: r.get(1),
        kind: r.get(2),
        payload: r.get(3),
        priority: Priority::from_code(r.get(4)),
        persist: r.get(5),
        receipt: r.get(6),
        created_at: r.get(7),
        expires_at: r.get(8),
        redelivery: r.get::<_, &str>(9) == TargetState::Delivered.as_str(),
    }
}

async fn existing(t: &Transaction<'_>, key: &str, hash: &str) -> PgResult<Option<Existing>> {
    let stmt = t
        .prepare_cached("SELECT answer, request_hash FROM controls WHERE idempotency_key = $1")
        .await?;
    let row = t.query_opt(&stmt, &[&key]).await?;
    Ok(row.map(|r| {
        match (r.get::<_, Option<String>>(0), r.get::<_, Option<String>>(1)) {
            // A row without a hash counts as the same request (as on SQLite).
            (_, Some(stored)) if stored != hash => Existing::OtherRequest,
            (Some(a), _) => Existing::Answered(a),
            (None, _) => Existing::InProgress,
        }
    }))
}

/// Events for the targets an update moved, in the order the caller listed
/// them (`order`: the listed ids, `by`: which id of a row it matches).
fn events_in_order(
    rows: &[Row],
    order: &[String],
    by: impl Fn(&Deliverable) -> &str,
    moved: impl Fn(&Deliverable) -> bool,
    events: &TargetEvents,
) -> Vec<NewEvent> {
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(order.len());
    for (i, id) in order.iter().enumerate() {
        position.entry(id.as_str()).or_insert(i);
    }
    let mut targets: Vec<Deliverable> = rows.iter().map(deliverable).filter(moved).collect();
    targets.sort_by_key(|d| position.get(by(d)).copied().unwrap_or(usize::MAX));
    targets.iter().map(events).collect()
}

#[async_trait]
impl ControlStore for PostgresStorage {
    async fn control_by_key(&self, key: &str, request_hash: &str) -> Result<Option<Existing>> {
        let key = key.to_string();
        let hash = request_hash.to_string();
        self.read(move |t| Box::pin(async move { existing(t, &key, &hash).await }))
            .await
    }

    async fn control_create(
        &self,
        control: NewControl,
    ) -> Result<std::result::Result<(), Existing>> {
        self.write(move |t| {
            Box::pin(async move {
                let c = &control;
                let users: Vec<&str> = c.targets.iter().map(|t| t.user_id.as_str()).collect();
                let payloads: Vec<Option<&str>> =
                    c.targets.iter().map(|t| t.payload.as_deref()).collect();
                let states: Vec<&str> = c.targets.iter().map(|t| t.state.as_str()).collect();
                let reasons: Vec<Option<&str>> =
                    c.targets.iter().map(|t| t.reason.as_deref()).collect();
                let hash = c.idempotency_key.as_ref().map(|_| c.request_hash.as_str());
                // The control, then its targets only if the control went in
                // (its key was free). A user listed twice keeps its first row.
                let stmt = t
                    .prepare_cached(
                        "WITH c AS (
                             INSERT INTO controls (id, kind, payload, priority, persist, receipt,
                                 expires_at, idempotency_key, request_hash, created_at)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                             ON CONFLICT (idempotency_key) DO NOTHING
                             RETURNING id),
                         targets AS (
                             INSERT INTO control_targets (control_id, user_id, payload, state,
                                 reason, priority, persist, receipt, created_at, expires_at)
                             SELECT c.id, u.user_id, u.payload, u.state, u.reason,
                                    $4, $5, $6, $10, $7
                             FROM c, UNNEST($11::text[], $12::text[], $13::text[], $14::text[])
                                  WITH ORDINALITY AS u(user_id, payload, state, reason, n)
                             ORDER BY u.n
                             ON CONFLICT (control_id, user_id) DO NOTHING)
                         SELECT COUNT(*) FROM c",
                    )
                    .await?;
                let inserted: i64 = t
                    .query_one(
                        &stmt,
                        &[
                            &c.id,
                            &c.kind,
                            &c.payload,
                            &c.priority.code(),
                            &c.persist,
                            &c.receipt,
                            &c.expires_at,
                            &c.idempotency_key,
                            &hash,
                            &c.created_at,
                            &users,
                            &payloads,
                            &states,
                            &reasons,
                        ],
                    )
                    .await?
                    .get(0);
                if inserted > 0 {
                    return Ok(Ok(()));
                }
                let key = c.idempotency_key.as_deref().unwrap_or_default();
                // Under the write lock the row that holds the key is visible;
                // were it not, its request would still be in progress.
                Ok(Err(existing(t, key, &c.request_hash)
                    .await?
                    .unwrap_or(Existing::InProgress)))
            })
        })
        .await
    }

    async fn control_answered(&self, control_id: &str, answer: String) -> Result<()> {
        let id = control_id.to_string();
        self.write(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached("UPDATE controls SET answer = $2 WHERE id = $1")
                    .await?;
                t.execute(&stmt, &[&id, &answer]).await?;
                Ok(())
            })
        })
        .await
    }

    async fn control_delivered(
        &self,
        control_id: &str,
        delivered: Vec<String>,
        unreached: Vec<String>,
        events: TargetEvents,
    ) -> Result<()> {
        let id = control_id.to_string();
        self.write(move |t| {
            Box::pin(async move {
                // Pending targets reached become delivered; pending online-only
                // targets not reached become offline (a user in both lists is
                // delivered, as on SQLite where delivery is marked first).
                let stmt = t
                    .prepare_cached(&format!(
                        "UPDATE control_targets t SET
                             state = CASE WHEN t.user_id = ANY($2) THEN 'delivered' ELSE 'offline' END,
                             delivered_at = CASE WHEN t.user_id = ANY($2) THEN $4 ELSE t.delivered_at END
                         FROM controls c
                         WHERE c.id = t.control_id AND t.control_id = $1 AND t.state = 'pending'
                           AND (t.user_id = ANY($2) OR (t.user_id = ANY($3) AND NOT t.persist))
                         RETURNING {DELIVERABLE}"
                    ))
                    .await?;
                let rows = t
                    .query(&stmt, &[&id, &delivered, &unreached, &crate::now_ms()])
                    .await?;
                let out = events_in_order(
                    &rows,
                    &delivered,
                    |d| d.user_id.as_str(),
                    |d| d.redelivery, // state is now 'delivered'
                    &events,
                );
                insert_events(t, &out).await
            })
        })
        .await
    }

    async fn controls_for_user(&self, user_id: &str, now: i64) -> Result<Vec<Deliverable>> {
        let user = user_id.to_string();
        self.read(move |t| {
            Box::pin(async move {
                // Ids compare byte by byte, as on SQLite, whatever the
                // database's collation.
                let stmt = t
                    .prepare_cached(&format!(
                        "SELECT {DELIVERABLE} FROM control_targets t
                         JOIN controls c ON c.id = t.control_id
                         WHERE t.user_id = $1 AND t.persist
                           AND (t.state = 'pending' OR (t.state = 'delivered' AND t.receipt))
                           AND (t.expires_at IS NULL OR t.expires_at > $2)
                         ORDER BY t.priority, t.created_at, t.control_id COLLATE \"C\""
                    ))
                    .await?;
                Ok(t.query(&stmt, &[&user, &now])
                    .await?
                    .iter()
                    .map(deliverable)
                    .collect())
            })
        })
        .await
    }

    async fn controls_redelivered(
        &self,
        user_id: &str,
        control_ids: Vec<String>,
        events: TargetEvents,
    ) -> Result<()> {
        let user = user_id.to_string();
        self.write(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(&format!(
                        "UPDATE control_targets t SET state = 'delivered', delivered_at = $3
                         FROM controls c
                         WHERE c.id = t.control_id AND t.user_id = $1
                           AND t.control_id = ANY($2) AND t.state = 'pending'
                         RETURNING {DELIVERABLE}"
                    ))
                    .await?;
                let rows = t
                    .query(&stmt, &[&user, &control_ids, &crate::now_ms()])
                    .await?;
                let out = events_in_order(
                    &rows,
                    &control_ids,
                    |d| d.control_id.as_str(),
                    |_| true,
                    &events,
                );
                insert_events(t, &out).await
            })
        })
        .await
    }

    async fn control_ack(
        &self,
        control_id: &str,
        user_id: &str,
        events: TargetEvents,
    ) -> Result<Option<Deliverable>> {
        let (id, user) = (control_id.to_string(), user_id.to_string());
        self.write(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(&format!(
                        "UPDATE control_targets t SET state = 'acked' FROM controls c
                         WHERE c.id = t.control_id AND t.control_id = $1 AND t.user_id = $2
                           AND t.receipt AND t.state IN ('pending', 'delivered')
                         RETURNING {DELIVERABLE}"
                    ))
                    .await?;
                let target = t
                    .query_opt(&stmt, &[&id, &user])
                    .await?
                    .map(|r| deliverable(&r));
                if let Some(d) = &target {
                    insert_events(t, &[events(d)]).await?;
                }
                Ok(target)
            })
        })
        .await
    }

    async fn controls_expire(&self, now: i64, limit: usize, events: TargetEvents) -> Result<usize> {
        self.write(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(&format!(
                        "WITH due AS (
                             SELECT control_id, user_id FROM control_targets
                             WHERE persist AND state = 'pending' AND expires_at <= $1
                             ORDER BY expires_at LIMIT $2)
                         UPDATE control_targets t SET state = 'expired' FROM due, controls c
                         WHERE t.control_id = due.control_id AND t.user_id = due.user_id
                           AND c.id = t.control_id
                         RETURNING {DELIVERABLE}"
                    ))
                    .await?;
                let rows = t.query(&stmt, &[&now, &(limit as i64)]).await?;
                let mut due: Vec<Deliverable> = rows
                    .iter()
                    .map(|r| Deliverable {
                        // Built from the row as it was (pending), as on SQLite.
                        redelivery: false,
                        ..deliverable(r)
                    })
                    .collect();
                due.sort_by(|a, b| {
                    (a.expires_at, &a.control_id, &a.user_id).cmp(&(
                        b.expires_at,
                        &b.control_id,
                        &b.user_id,
                    ))
                });
                let out: Vec<NewEvent> = due.iter().map(&events).collect();
                insert_events(t, &out).await?;
                Ok(due.len())
            })
        })
        .await
    }
}
