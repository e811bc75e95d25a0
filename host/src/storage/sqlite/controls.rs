//! The SQLite implementation of [`ControlStore`]. Target rows repeat the
//! control's priority, times and flags so that "what does this user get on
//! connect" and "what expired" are single index range reads.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{insert_events, SqliteStorage};
use crate::storage::controls::{
    ControlStore, Deliverable, Existing, NewControl, Priority, TargetEvents, TargetState,
};
use crate::storage::{NewEvent, Result};

// `controls` is a rowid table on purpose: answers can be large, and in a
// WITHOUT ROWID table they would sit in the key's B-tree, where every key
// search passing them copies them.
pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS controls (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    persist         INTEGER NOT NULL,
    receipt         INTEGER NOT NULL,
    expires_at      INTEGER,
    idempotency_key TEXT UNIQUE,
    request_hash    TEXT,
    answer          TEXT,
    created_at      INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS control_targets (
    control_id   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    payload      TEXT,
    state        TEXT NOT NULL,
    reason       TEXT,
    priority     INTEGER NOT NULL,
    persist      INTEGER NOT NULL,
    receipt      INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    delivered_at INTEGER,
    PRIMARY KEY (control_id, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS control_targets_by_user
    ON control_targets(user_id, state, priority, created_at);
CREATE INDEX IF NOT EXISTS control_targets_expiry
    ON control_targets(state, expires_at) WHERE persist = 1;
"#;

const DELIVERABLE: &str = "t.control_id, t.user_id, c.kind, COALESCE(t.payload, c.payload), \
     t.priority, t.persist, t.receipt, t.created_at, t.expires_at, t.state";

fn deliverable(r: &rusqlite::Row<'_>) -> rusqlite::Result<Deliverable> {
    Ok(Deliverable {
        control_id: r.get(0)?,
        user_id: r.get(1)?,
        kind: r.get(2)?,
        payload: r.get(3)?,
        priority: Priority::from_code(r.get(4)?),
        persist: r.get(5)?,
        receipt: r.get(6)?,
        created_at: r.get(7)?,
        expires_at: r.get(8)?,
        redelivery: r.get::<_, String>(9)? == TargetState::Delivered.as_str(),
    })
}

/// Adds what an earlier version's `controls` table lacks.
pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_hash: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('controls') WHERE name = 'request_hash')",
        [],
        |r| r.get(0),
    )?;
    if !has_hash {
        conn.execute_batch("ALTER TABLE controls ADD COLUMN request_hash TEXT")?;
    }
    Ok(())
}

fn existing(conn: &Connection, key: &str, hash: &str) -> rusqlite::Result<Option<Existing>> {
    let row: Option<(Option<String>, Option<String>)> = conn
        .prepare_cached("SELECT answer, request_hash FROM controls WHERE idempotency_key = ?1")?
        .query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map(|(answer, stored)| match (answer, stored) {
        // A row from before hashes were kept counts as the same request.
        (_, Some(stored)) if stored != hash => Existing::OtherRequest,
        (Some(a), _) => Existing::Answered(a),
        (None, _) => Existing::InProgress,
    }))
}

fn target(
    conn: &Connection,
    control_id: &str,
    user_id: &str,
) -> rusqlite::Result<Option<Deliverable>> {
    conn.prepare_cached(&format!(
        "SELECT {DELIVERABLE} FROM control_targets t JOIN controls c ON c.id = t.control_id
         WHERE t.control_id = ?1 AND t.user_id = ?2"
    ))?
    .query_row(params![control_id, user_id], deliverable)
    .optional()
}

#[async_trait]
impl ControlStore for SqliteStorage {
    async fn control_by_key(&self, key: &str, request_hash: &str) -> Result<Option<Existing>> {
        let key = key.to_string();
        let hash = request_hash.to_string();
        self.read(move |conn| existing(conn, &key, &hash)).await
    }

    async fn control_create(
        &self,
        control: NewControl,
    ) -> Result<std::result::Result<(), Existing>> {
        self.write(move |conn| {
            if let Some(key) = &control.idempotency_key {
                if let Some(e) = existing(conn, key, &control.request_hash)? {
                    return Ok(Err(e));
                }
            }
            conn.prepare_cached(
                "INSERT INTO controls (id, kind, payload, priority, persist, receipt, expires_at,
                     idempotency_key, request_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                control.id,
                control.kind,
                control.payload,
                control.priority.code(),
                control.persist,
                control.receipt,
                control.expires_at,
                control.idempotency_key,
                control
                    .idempotency_key
                    .as_ref()
                    .map(|_| &control.request_hash),
                control.created_at
            ])?;
            let mut insert = conn.prepare_cached(
                "INSERT OR IGNORE INTO control_targets (control_id, user_id, payload, state, reason,
                     priority, persist, receipt, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for t in &control.targets {
                insert.execute(params![
                    control.id,
                    t.user_id,
                    t.payload,
                    t.state.as_str(),
                    t.reason,
                    control.priority.code(),
                    control.persist,
                    control.receipt,
                    control.created_at,
                    control.expires_at
                ])?;
            }
            Ok(Ok(()))
        })
        .await
    }

    async fn control_answered(&self, control_id: &str, answer: String) -> Result<()> {
        let id = control_id.to_string();
        self.write(move |conn| {
            conn.prepare_cached("UPDATE controls SET answer = ?2 WHERE id = ?1")?
                .execute(params![id, answer])?;
            Ok(())
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
        self.write(move |conn| {
            let out = mark_delivered(
                conn,
                delivered.iter().map(|u| (id.as_str(), u.as_str())),
                &events,
            )?;
            let mut offline = conn.prepare_cached(
                "UPDATE control_targets SET state = 'offline'
                 WHERE control_id = ?1 AND user_id = ?2 AND state = 'pending' AND persist = 0",
            )?;
            for user in &unreached {
                offline.execute(params![id, user])?;
            }
            insert_events(conn, &out)
        })
        .await
    }

    async fn controls_for_user(&self, user_id: &str, now: i64) -> Result<Vec<Deliverable>> {
        let user = user_id.to_string();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {DELIVERABLE} FROM control_targets t JOIN controls c ON c.id = t.control_id
                 WHERE t.user_id = ?1 AND t.persist = 1
                   AND (t.state = 'pending' OR (t.state = 'delivered' AND t.receipt = 1))
                   AND (t.expires_at IS NULL OR t.expires_at > ?2)
                 ORDER BY t.priority, t.created_at, t.control_id"
            ))?
            .query_map(params![user, now], deliverable)?
            .collect()
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
        self.write(move |conn| {
            let out = mark_delivered(
                conn,
                control_ids.iter().map(|id| (id.as_str(), user.as_str())),
                &events,
            )?;
            insert_events(conn, &out)
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
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE control_targets SET state = 'acked'
                     WHERE control_id = ?1 AND user_id = ?2 AND receipt = 1
                       AND state IN ('pending', 'delivered')",
                )?
                .execute(params![id, user])?;
            if n == 0 {
                return Ok(None);
            }
            let t = target(conn, &id, &user)?;
            if let Some(t) = &t {
                insert_events(conn, &[events(t)])?;
            }
            Ok(t)
        })
        .await
    }

    async fn controls_expire(&self, now: i64, limit: usize, events: TargetEvents) -> Result<usize> {
        self.write(move |conn| {
            let due: Vec<Deliverable> = conn
                .prepare_cached(&format!(
                    "SELECT {DELIVERABLE} FROM control_targets t JOIN controls c ON c.id = t.control_id
                     WHERE t.persist = 1 AND t.state = 'pending' AND t.expires_at <= ?1
                     LIMIT ?2"
                ))?
                .query_map(params![now, limit as i64], deliverable)?
                .collect::<rusqlite::Result<_>>()?;
            let mut mark = conn.prepare_cached(
                "UPDATE control_targets SET state = 'expired' WHERE control_id = ?1 AND user_id = ?2",
            )?;
            let mut out = Vec::with_capacity(due.len());
            for t in &due {
                mark.execute(params![t.control_id, t.user_id])?;
                out.push(events(t));
            }
            insert_events(conn, &out)?;
            Ok(due.len())
        })
        .await
    }
}

/// Marks pending targets delivered; returns an event for each one that was pending.
fn mark_delivered<'a>(
    conn: &Connection,
    targets: impl Iterator<Item = (&'a str, &'a str)>,
    events: &TargetEvents,
) -> rusqlite::Result<Vec<NewEvent>> {
    let now = crate::now_ms();
    let mut mark = conn.prepare_cached(
        "UPDATE control_targets SET state = 'delivered', delivered_at = ?3
         WHERE control_id = ?1 AND user_id = ?2 AND state = 'pending'",
    )?;
    let mut out = Vec::new();
    for (control_id, user) in targets {
        if mark.execute(params![control_id, user, now])? > 0 {
            if let Some(t) = target(conn, control_id, user)? {
                out.push(events(&t));
            }
        }
    }
    Ok(out)
}
