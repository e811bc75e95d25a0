//! The embedded SQLite engine: every storage trait on one database file.
//!
//! One writer thread owns the write connection. Concurrent writes queue up
//! and the thread runs as many as are waiting in one transaction (each inside
//! its own savepoint, so one failing write does not undo the others), commits
//! once, and only then answers them: durability costs one fsync per batch,
//! not per write. Reads use a separate connection (WAL lets them run beside
//! the writer).
//!
//! Delivery queue: a row per (endpoint, event). Only the oldest pending row
//! of each order key is ever due (`next_at` holds a time); the rows behind it
//! hold [`NOT_HEAD`]. Settling the head promotes the next row of its key.
//! This keeps per-user order without scanning the rows that wait.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::kv::{MAX_BYTES, MAX_KEYS};
use super::queue::WriteQueue;
use super::{
    ClaimedEvent, EndpointState, EventFilter, Health, KvStore, NewEvent, OutboxStore, Presence,
    Result, SessionEvents, SessionRecord, SessionStore, Settlement, StorageError,
};
use crate::metrics::Metrics;

mod controls;
mod messages;
mod plugins;

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> StorageError {
        StorageError::Database(e.to_string())
    }
}

/// `next_at` of a delivery row waiting behind an earlier one of its key.
const NOT_HEAD: i64 = i64::MAX;

/// The schema version this binary writes, recorded in `PRAGMA user_version`.
/// The schema is created with `IF NOT EXISTS` statements and brought up to
/// date by [`migrate`] (columns added since the first release); a database
/// recording a higher version was written by a newer gateway and is refused.
///
/// Versions: 1, the first release; 2, `plugin_versions` (uploaded plugin
/// versions, see [`plugins`]), which a version-1 database gets at open. An
/// older gateway refuses a version-2 database rather than start without
/// the uploaded versions it cannot see.
const SCHEMA_VERSION: i64 = 2;

/// Most writes grouped into one transaction.
const MAX_BATCH: usize = 1024;

type Completion = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Completion + Send>;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sessions (
    connection_id TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    node_id       TEXT NOT NULL,
    opened_at     INTEGER NOT NULL,
    remote_addr   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions(user_id);
CREATE INDEX IF NOT EXISTS sessions_by_node ON sessions(node_id);

CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL,
    order_key  TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    data       TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS endpoints (
    name            TEXT PRIMARY KEY,
    cursor          INTEGER NOT NULL,
    disabled_at     INTEGER,
    disabled_reason TEXT,
    failing_since   INTEGER,
    delivered_total INTEGER NOT NULL DEFAULT 0,
    skipped_total   INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT
);

CREATE TABLE IF NOT EXISTS deliveries (
    endpoint   TEXT NOT NULL,
    event_seq  INTEGER NOT NULL,
    order_key  TEXT NOT NULL,
    state      TEXT NOT NULL,            -- 'pending' | 'failed'
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_at    INTEGER NOT NULL,
    leased     INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (endpoint, event_seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(endpoint, state, next_at, event_seq);
CREATE INDEX IF NOT EXISTS deliveries_by_key ON deliveries(endpoint, order_key, state, event_seq);

CREATE TABLE IF NOT EXISTS plugin_kv (
    plugin TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  BLOB NOT NULL,
    PRIMARY KEY (plugin, key)
) WITHOUT ROWID;
"#;

/// SQLite storage: a writer thread plus a read connection.
pub struct SqliteStorage {
    /// The bound on the normal lane of `jobs`.
    queue: WriteQueue,
    jobs: Arc<JobQueue>,
    /// Read connections; WAL lets each read a consistent snapshot beside the writer.
    readers: Arc<Vec<Mutex<Connection>>>,
    /// The last grant of each endpoint's delivery lease: (holder, until).
    /// One process owns the file, so every request is granted; this only
    /// answers who asked last (`EndpointState::lease_holder`).
    leases: Mutex<std::collections::HashMap<String, (String, i64)>>,
}

/// Read connections kept open.
const READERS: usize = 4;

fn open_connection(path: &Path) -> std::result::Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is synced at every commit, so an acknowledged write survives power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Every write runs in a savepoint, whose statement journal is a temp
    // file by default: one 4 KiB pwrite per page touched. Memory is enough.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -32768)?;
    // Every statement of the engine stays prepared: rusqlite's default of 16
    // is fewer than the writer alone uses, so statements were evicted and
    // parsed again on every transaction.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Prepared statements kept per connection: more than the engine has.
const STATEMENT_CACHE: usize = 256;

/// Runs a statement without parameters through the connection's cache of
/// prepared statements (`execute_batch` parses its text every time).
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// How often the checkpoint thread copies the WAL back into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Checkpoints on its own connection and thread, so that the writer seldom
/// pays for them inside a commit. PASSIVE never blocks the writer or readers.
fn checkpoint_loop(conn: Connection, alive: std::sync::Weak<Vec<Mutex<Connection>>>) {
    while alive.upgrade().is_some() {
        std::thread::sleep(CHECKPOINT_EVERY);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

impl SqliteStorage {
    /// Opens (or creates) the database at `path`; the writer's queue is
    /// bounded by `config`'s `max_queued_writes` and `queue_wait`.
    pub fn open(
        path: &Path,
        config: &crate::config::StorageConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<SqliteStorage> {
        let open_err = |e: rusqlite::Error| StorageError::Open {
            target: path.display().to_string(),
            message: e.to_string(),
        };
        let writer = open_connection(path).map_err(open_err)?;
        let found: i64 = writer
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        if found > SCHEMA_VERSION {
            return Err(StorageError::Open {
                target: path.display().to_string(),
                message: format!(
                    "the database schema is at version {found}, newer than this gateway knows ({SCHEMA_VERSION}); run a gateway of that version or newer"
                ),
            });
        }
        writer.execute_batch(SCHEMA).map_err(open_err)?;
        writer.execute_batch(messages::SCHEMA).map_err(open_err)?;
        writer.execute_batch(controls::SCHEMA).map_err(open_err)?;
        writer.execute_batch(plugins::SCHEMA).map_err(open_err)?;
        migrate(&writer).map_err(open_err)?;
        writer
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_err)?;
        // Leases held by a previous process are void: make those deliveries due now.
        writer
            .execute(
                "UPDATE deliveries SET next_at = ?1, leased = 0 WHERE leased = 1",
                params![crate::now_ms()],
            )
            .map_err(open_err)?;
        let readers = (0..READERS)
            .map(|_| open_connection(path).map(Mutex::new))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(open_err)?;
        // Checkpoints mostly run on their own thread (see `checkpoint_loop`),
        // but the WAL file only restarts from its beginning when a checkpoint
        // completes between two of the writer's transactions: under constant
        // writes only the writer's own checkpoint can do that. A high
        // threshold keeps it rare and cheap (the thread has copied most pages).
        writer
            .pragma_update(None, "wal_autocheckpoint", 4000)
            .map_err(open_err)?;
        let bound = WriteQueue::from_config(config, metrics.as_deref());
        let jobs = Arc::new(JobQueue::default());
        let queue = jobs.clone();
        std::thread::Builder::new()
            .name("plugboard-sqlite-writer".into())
            .spawn(move || writer_loop(writer, queue, metrics))
            .map_err(|e| StorageError::Open {
                target: path.display().to_string(),
                message: e.to_string(),
            })?;
        let readers = Arc::new(readers);
        let checkpointer = open_connection(path).map_err(open_err)?;
        let alive = Arc::downgrade(&readers);
        std::thread::Builder::new()
            .name("plugboard-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, alive))
            .map_err(|e| StorageError::Open {
                target: path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(SqliteStorage {
            queue: bound,
            jobs,
            readers,
            leases: Mutex::default(),
        })
    }

    /// Runs `f` in the next write transaction; resolves after the commit.
    pub(super) async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        self.write_hooked(f, |_: &R| {}).await
    }

    /// Like [`Self::write`], in a lane the writer takes before the others:
    /// for small bookkeeping writes (sessions, webhook deliveries) that must
    /// not queue behind a burst of messages.
    pub(super) async fn write_urgent<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        self.submit(f, |_: &R| {}, true).await
    }

    /// Like [`Self::write`], and runs `after` on the writer thread once the
    /// transaction committed, before the future resolves. Jobs are answered
    /// in the order they ran, so `after` sees commits in order.
    pub(super) async fn write_hooked<R, F, H>(&self, f: F, after: H) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
        H: FnOnce(&R) + Send + 'static,
    {
        self.submit(f, after, false).await
    }

    async fn submit<R, F, H>(&self, f: F, after: H, urgent: bool) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
        H: FnOnce(&R) + Send + 'static,
    {
        // The place goes back once the job is answered (or dropped unrun).
        let place = self.queue.admit_lane(urgent).await?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn: &Connection| {
            let result = in_savepoint(conn, f);
            Box::new(move |commit: std::result::Result<(), String>| {
                let _place = place;
                let out = match (result, commit) {
                    (Err(e), _) => Err(StorageError::from(e)),
                    (Ok(_), Err(e)) => Err(StorageError::Commit(e)),
                    (Ok(v), Ok(())) => {
                        after(&v);
                        Ok(v)
                    }
                };
                let _ = tx.send(out);
            })
        });
        if !self.jobs.push(job, urgent) {
            return Err(StorageError::Closed);
        }
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Runs `f` on a read connection off the async runtime.
    pub(super) async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            // The first free connection; else wait for one chosen by rotation.
            let guard = readers
                .iter()
                .find_map(|r| r.try_lock().ok())
                .unwrap_or_else(|| {
                    let i = rand::random::<usize>() % readers.len();
                    readers[i].lock().unwrap_or_else(|p| p.into_inner())
                });
            f(&guard).map_err(StorageError::from)
        })
        .await
        .map_err(|_| StorageError::Closed)?
    }
}

/// Brings a database made by an earlier version up to the current schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_skipped: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('endpoints') WHERE name = 'skipped_total')",
        [],
        |r| r.get(0),
    )?;
    if !has_skipped {
        conn.execute_batch(
            "ALTER TABLE endpoints ADD COLUMN skipped_total INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    controls::migrate(conn)?;
    Ok(())
}

fn in_savepoint<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<R>,
) -> rusqlite::Result<R> {
    exec_cached(conn, "SAVEPOINT job")?;
    match f(conn) {
        Ok(v) => {
            exec_cached(conn, "RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

/// The writer's two lanes. Jobs of one lane run in the order they came.
#[derive(Default)]
struct JobQueue {
    lanes: Mutex<Lanes>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct Lanes {
    urgent: std::collections::VecDeque<Job>,
    normal: std::collections::VecDeque<Job>,
    closed: bool,
}

impl JobQueue {
    fn is_closed(&self) -> bool {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    /// Queues a job; false once the storage is shut down.
    fn push(&self, job: Job, urgent: bool) -> bool {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if lanes.closed {
            return false;
        }
        if urgent {
            lanes.urgent.push_back(job);
        } else {
            lanes.normal.push_back(job);
        }
        drop(lanes);
        self.ready.notify_one();
        true
    }

    /// Waits for work: every urgent job, then normal ones, up to `max`;
    /// with `urgent_alone`, only the urgent jobs when there are any (see
    /// [`writer_loop`]), and then whether it did so. `None` once closed and
    /// drained.
    fn take(&self, max: usize, urgent_alone: bool) -> Option<(Vec<Job>, bool)> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        while lanes.urgent.is_empty() && lanes.normal.is_empty() {
            if lanes.closed {
                return None;
            }
            lanes = self.ready.wait(lanes).unwrap_or_else(|p| p.into_inner());
        }
        let mut batch: Vec<Job> = lanes.urgent.drain(..).collect();
        if urgent_alone && !batch.is_empty() {
            return Some((batch, true));
        }
        let room = max.saturating_sub(batch.len()).max(1);
        let n = room.min(lanes.normal.len());
        batch.extend(lanes.normal.drain(..n));
        Some((batch, false))
    }

    fn close(&self) {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.ready.notify_all();
    }
}

impl Drop for SqliteStorage {
    fn drop(&mut self) {
        // The writer finishes what is queued, then exits.
        self.jobs.close();
    }
}

/// Runs the queued jobs, a batch per transaction. Urgent jobs (sessions,
/// webhook bookkeeping) get a transaction of their own when they are
/// waiting, so that a webhook round under load waits for a commit of a few
/// small writes rather than one of a thousand messages; the batch after an
/// urgent-only one takes normal jobs too, so a stream of urgent jobs cannot
/// starve messages.
fn writer_loop(conn: Connection, queue: Arc<JobQueue>, metrics: Option<Arc<Metrics>>) {
    let mut urgent_alone = true;
    while let Some((batch, alone)) = queue.take(MAX_BATCH, urgent_alone) {
        urgent_alone = !alone;
        let started = Instant::now();
        let size = batch.len();
        let commit = match exec_cached(&conn, "BEGIN IMMEDIATE") {
            Ok(()) => {
                let completions: Vec<Completion> = batch.into_iter().map(|j| j(&conn)).collect();
                let commit = exec_cached(&conn, "COMMIT").map_err(|e| e.to_string());
                if commit.is_err() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                for c in completions {
                    c(commit.clone());
                }
                commit
            }
            Err(e) => {
                // Could not even start: fail every job without running it.
                let msg = e.to_string();
                for job in batch {
                    // Run nothing; answer with the error.
                    drop(job);
                }
                Err(msg)
            }
        };
        if let Err(e) = &commit {
            tracing::error!(error = %e, "storage commit failed");
        }
        if let Some(m) = &metrics {
            m.storage_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            m.storage_batch_size.observe(size as f64);
        }
    }
}

pub(super) fn insert_events(conn: &Connection, events: &[NewEvent]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO outbox (id, type, order_key, created_at, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for e in events {
        stmt.execute(params![
            e.id,
            e.event_type,
            e.order_key,
            e.created_at,
            e.data.get()
        ])?;
    }
    Ok(())
}

fn presence_of(conn: &Connection, user_id: &str) -> rusqlite::Result<Presence> {
    conn.prepare_cached(
        "SELECT COUNT(*), COUNT(DISTINCT device_id) FROM sessions WHERE user_id = ?1",
    )?
    .query_row(params![user_id], |r| {
        Ok(Presence {
            connections: r.get(0)?,
            devices: r.get(1)?,
        })
    })
}

fn session_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        connection_id: r.get(0)?,
        user_id: r.get(1)?,
        device_id: r.get(2)?,
        node_id: r.get(3)?,
        opened_at: r.get(4)?,
        remote_addr: r.get(5)?,
    })
}

const SESSION_COLUMNS: &str = "connection_id, user_id, device_id, node_id, opened_at, remote_addr";

fn close_one(
    conn: &Connection,
    connection_id: &str,
    events: &SessionEvents,
) -> rusqlite::Result<Option<Presence>> {
    let record = conn
        .prepare_cached(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE connection_id = ?1"
        ))?
        .query_row(params![connection_id], session_from_row)
        .optional()?;
    let Some(record) = record else {
        return Ok(None);
    };
    conn.prepare_cached("DELETE FROM sessions WHERE connection_id = ?1")?
        .execute(params![connection_id])?;
    let presence = presence_of(conn, &record.user_id)?;
    insert_events(conn, &events(&record, presence))?;
    Ok(Some(presence))
}

/// Makes the oldest pending delivery of `key` due at `now` (after its predecessor settled).
fn promote_head(conn: &Connection, name: &str, key: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE deliveries SET next_at = ?3
         WHERE endpoint = ?1 AND event_seq = (
             SELECT MIN(event_seq) FROM deliveries
             WHERE endpoint = ?1 AND order_key = ?2 AND state = 'pending')
           AND next_at = ?4",
    )?
    .execute(params![name, key, now, NOT_HEAD])?;
    Ok(())
}

/// Records one outcome for `seqs` of endpoint `name` (see
/// [`OutboxStore::deliveries_settle_all`]).
fn settle_in(
    conn: &Connection,
    name: &str,
    seqs: &[i64],
    outcome: &Settlement,
    now: i64,
) -> rusqlite::Result<()> {
    let mut key_of = conn.prepare_cached(
        "SELECT order_key FROM deliveries WHERE endpoint = ?1 AND event_seq = ?2",
    )?;
    for seq in seqs {
        let key: Option<String> = key_of
            .query_row(params![name, seq], |r| r.get(0))
            .optional()?;
        let Some(key) = key else { continue };
        match outcome {
            Settlement::Delivered | Settlement::Skipped => {
                conn.prepare_cached(
                    "DELETE FROM deliveries WHERE endpoint = ?1 AND event_seq = ?2",
                )?
                .execute(params![name, seq])?;
                promote_head(conn, name, &key, now)?;
            }
            Settlement::Retry { next_at, error } => {
                conn.prepare_cached(
                    "UPDATE deliveries SET attempts = attempts + 1, next_at = ?3, leased = 0,
                     last_error = ?4 WHERE endpoint = ?1 AND event_seq = ?2",
                )?
                .execute(params![name, seq, next_at, error])?;
            }
            Settlement::Hold { error } => {
                conn.prepare_cached(
                    "UPDATE deliveries SET next_at = ?3, leased = 0, last_error = ?4
                     WHERE endpoint = ?1 AND event_seq = ?2",
                )?
                .execute(params![name, seq, now, error])?;
            }
            Settlement::Failed { error } => {
                conn.prepare_cached(
                    "UPDATE deliveries SET attempts = attempts + 1, state = 'failed',
                     next_at = ?3, leased = 0, last_error = ?4
                     WHERE endpoint = ?1 AND event_seq = ?2",
                )?
                .execute(params![name, seq, now, error])?;
                promote_head(conn, name, &key, now)?;
            }
        }
    }
    match outcome {
        Settlement::Skipped => {
            conn.prepare_cached(
                "UPDATE endpoints SET skipped_total = skipped_total + ?2 WHERE name = ?1",
            )?
            .execute(params![name, seqs.len() as i64])?;
        }
        Settlement::Delivered => {
            conn.prepare_cached(
                "UPDATE endpoints SET failing_since = NULL,
                 delivered_total = delivered_total + ?2 WHERE name = ?1",
            )?
            .execute(params![name, seqs.len() as i64])?;
        }
        Settlement::Retry { error, .. }
        | Settlement::Failed { error }
        | Settlement::Hold { error } => {
            conn.prepare_cached(
                "UPDATE endpoints SET failing_since = COALESCE(failing_since, ?2),
                 last_error = ?3 WHERE name = ?1",
            )?
            .execute(params![name, now, error])?;
        }
    }
    Ok(())
}

fn endpoint_state_of(conn: &Connection, name: &str) -> rusqlite::Result<Option<EndpointState>> {
    let state = conn
        .prepare_cached(
            "SELECT name, cursor, disabled_at, disabled_reason, failing_since, delivered_total, last_error, skipped_total
             FROM endpoints WHERE name = ?1",
        )?
        .query_row(params![name], |r| {
            Ok(EndpointState {
                name: r.get(0)?,
                cursor: r.get(1)?,
                disabled_at: r.get(2)?,
                disabled_reason: r.get(3)?,
                failing_since: r.get(4)?,
                delivered_total: r.get(5)?,
                last_error: r.get(6)?,
                skipped_total: r.get(7)?,
                ..Default::default()
            })
        })
        .optional()?;
    let Some(mut state) = state else {
        return Ok(None);
    };
    let (pending, failed): (i64, i64) = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(state = 'pending'), 0), COALESCE(SUM(state = 'failed'), 0)
             FROM deliveries WHERE endpoint = ?1",
        )?
        .query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?)))?;
    state.pending = pending;
    state.failed = failed;
    state.oldest_pending_at = conn
        .prepare_cached(
            "SELECT o.created_at FROM deliveries d JOIN outbox o ON o.seq = d.event_seq
             WHERE d.endpoint = ?1 AND d.state = 'pending' ORDER BY d.event_seq LIMIT 1",
        )?
        .query_row(params![name], |r| r.get(0))
        .optional()?;
    Ok(Some(state))
}

#[async_trait]
impl SessionStore for SqliteStorage {
    async fn open_session(&self, record: SessionRecord, events: SessionEvents) -> Result<Presence> {
        self.write_urgent(move |conn| {
            conn.prepare_cached(&format!(
                "INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))?
            .execute(params![
                record.connection_id,
                record.user_id,
                record.device_id,
                record.node_id,
                record.opened_at,
                record.remote_addr
            ])?;
            let presence = presence_of(conn, &record.user_id)?;
            insert_events(conn, &events(&record, presence))?;
            Ok(presence)
        })
        .await
    }

    async fn close_session(
        &self,
        connection_id: &str,
        events: SessionEvents,
    ) -> Result<Option<Presence>> {
        let id = connection_id.to_string();
        self.write_urgent(move |conn| close_one(conn, &id, &events))
            .await
    }

    async fn close_node_sessions(&self, node_id: &str, events: SessionEvents) -> Result<usize> {
        let node = node_id.to_string();
        self.write(move |conn| {
            let ids: Vec<String> = conn
                .prepare(
                    "SELECT connection_id FROM sessions WHERE node_id = ?1 ORDER BY opened_at",
                )?
                .query_map(params![node], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut closed = 0;
            for id in ids {
                if close_one(conn, &id, &events)?.is_some() {
                    closed += 1;
                }
            }
            Ok(closed)
        })
        .await
    }

    async fn presence(&self, user_id: &str) -> Result<(Presence, Vec<SessionRecord>)> {
        let user = user_id.to_string();
        self.read(move |conn| {
            let sessions: Vec<SessionRecord> = conn
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = ?1 ORDER BY opened_at"
                ))?
                .query_map(params![user], session_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            let presence = presence_of(conn, &user)?;
            Ok((presence, sessions))
        })
        .await
    }
}

#[async_trait]
impl OutboxStore for SqliteStorage {
    async fn append_events(&self, events: Vec<NewEvent>) -> Result<()> {
        self.write_urgent(move |conn| insert_events(conn, &events))
            .await
    }

    async fn endpoint_register(&self, name: &str) -> Result<EndpointState> {
        let name = name.to_string();
        self.write_urgent(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO endpoints (name, cursor)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) FROM outbox))",
                params![name],
            )?;
            Ok(endpoint_state_of(conn, &name)?.unwrap_or_default())
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
        self.write_urgent(move |conn| {
            let cursor: i64 = conn
                .prepare_cached("SELECT cursor FROM endpoints WHERE name = ?1")?
                .query_row(params![name], |r| r.get(0))?;
            let rows: Vec<(i64, String, String)> = conn
                .prepare_cached(
                    "SELECT seq, type, order_key FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )?
                .query_map(params![cursor, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let Some(last) = rows.last().map(|r| r.0) else {
                return Ok(0);
            };
            let now = crate::now_ms();
            let mut has_pending = conn.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM deliveries
                 WHERE endpoint = ?1 AND order_key = ?2 AND state = 'pending')",
            )?;
            let mut insert = conn.prepare_cached(
                "INSERT OR IGNORE INTO deliveries (endpoint, event_seq, order_key, state, next_at)
                 VALUES (?1, ?2, ?3, 'pending', ?4)",
            )?;
            for (seq, event_type, key) in &rows {
                if !accepts(event_type) {
                    continue;
                }
                let behind: bool = has_pending.query_row(params![name, key], |r| r.get(0))?;
                let next_at = if behind { NOT_HEAD } else { now };
                insert.execute(params![name, seq, key, next_at])?;
            }
            conn.prepare_cached("UPDATE endpoints SET cursor = ?2 WHERE name = ?1")?
                .execute(params![name, last])?;
            Ok(rows.len())
        })
        .await
    }

    async fn deliveries_claim(
        &self,
        name: &str,
        now: i64,
        limit: usize,
        lease_until: i64,
    ) -> Result<Vec<ClaimedEvent>> {
        let name = name.to_string();
        self.write_urgent(move |conn| {
            let claimed: Vec<ClaimedEvent> = conn
                .prepare_cached(
                    "SELECT d.event_seq, o.id, o.type, d.order_key, o.created_at, o.data, d.attempts
                     FROM deliveries d JOIN outbox o ON o.seq = d.event_seq
                     WHERE d.endpoint = ?1 AND d.state = 'pending' AND d.next_at <= ?2
                     ORDER BY d.next_at, d.event_seq LIMIT ?3",
                )?
                .query_map(params![name, now, limit as i64], |r| {
                    Ok(ClaimedEvent {
                        seq: r.get(0)?,
                        id: r.get(1)?,
                        event_type: r.get(2)?,
                        order_key: r.get(3)?,
                        created_at: r.get(4)?,
                        data: r.get(5)?,
                        attempts: r.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut lease = conn.prepare_cached(
                "UPDATE deliveries SET next_at = ?3, leased = 1 WHERE endpoint = ?1 AND event_seq = ?2",
            )?;
            for c in &claimed {
                lease.execute(params![name, c.seq, lease_until])?;
            }
            Ok(claimed)
        })
        .await
    }

    async fn deliveries_next_due(&self, name: &str) -> Result<Option<i64>> {
        let name = name.to_string();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT MIN(next_at) FROM deliveries
                 WHERE endpoint = ?1 AND state = 'pending' AND next_at < ?2",
            )?
            .query_row(params![name, NOT_HEAD], |r| r.get(0))
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
        self.write_urgent(move |conn| {
            for (outcome, seqs) in &settlements {
                settle_in(conn, &name, seqs, outcome, now)?;
            }
            conn.prepare_cached("SELECT failing_since FROM endpoints WHERE name = ?1")?
                .query_row(params![name], |r| r.get(0))
                .optional()
                .map(Option::flatten)
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
        self.write_urgent(move |conn| {
            match reason {
                Some(reason) => {
                    conn.execute(
                        "UPDATE endpoints SET disabled_at = ?2, disabled_reason = ?3
                         WHERE name = ?1 AND disabled_at IS NULL",
                        params![name, now, reason],
                    )?;
                }
                None => {
                    conn.execute(
                        "UPDATE endpoints SET disabled_at = NULL, disabled_reason = NULL,
                         failing_since = NULL WHERE name = ?1",
                        params![name],
                    )?;
                    // Heads waiting in backoff become due now.
                    conn.execute(
                        "UPDATE deliveries SET next_at = ?2
                         WHERE endpoint = ?1 AND state = 'pending' AND leased = 0
                           AND next_at > ?2 AND next_at < ?3",
                        params![name, now, NOT_HEAD],
                    )?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn endpoint_retry_failed(&self, name: &str, now: i64) -> Result<usize> {
        let name = name.to_string();
        self.write_urgent(move |conn| {
            let n = conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_at = ?2
                 WHERE endpoint = ?1 AND state = 'failed'",
                params![name, NOT_HEAD],
            )?;
            // A key with no head (no pending row holding a time) gets its oldest row promoted.
            conn.execute(
                "UPDATE deliveries SET next_at = ?2
                 WHERE endpoint = ?1 AND state = 'pending' AND event_seq IN (
                     SELECT MIN(event_seq) FROM deliveries
                     WHERE endpoint = ?1 AND state = 'pending'
                     GROUP BY order_key HAVING SUM(next_at < ?3) = 0)",
                params![name, now, NOT_HEAD],
            )?;
            Ok(n)
        })
        .await
    }

    async fn endpoint_disabled(&self, name: &str) -> Result<Option<String>> {
        let name = name.to_string();
        self.read(move |conn| {
            conn.prepare_cached("SELECT disabled_reason FROM endpoints WHERE name = ?1")?
                .query_row(params![name], |r| r.get(0))
                .optional()
                .map(Option::flatten)
        })
        .await
    }

    /// Always granted: the one process that owns the file has no one to
    /// exclude (its workers are one per endpoint). Remembered for the
    /// endpoint's state.
    async fn endpoint_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let until = crate::now_ms().saturating_add(ttl_ms);
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (holder.to_string(), until));
        Ok(true)
    }

    async fn endpoint_release(&self, name: &str, holder: &str) -> Result<()> {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if leases.get(name).is_some_and(|(h, _)| h == holder) {
            leases.remove(name);
        }
        Ok(())
    }

    async fn endpoint_state(&self, name: &str) -> Result<Option<EndpointState>> {
        let key = name.to_string();
        let mut state = self.read(move |conn| endpoint_state_of(conn, &key)).await?;
        if let Some(state) = &mut state {
            let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((holder, until)) = leases.get(name) {
                if *until > crate::now_ms() {
                    state.lease_holder = Some(holder.clone());
                    state.lease_until = Some(*until);
                }
            }
        }
        Ok(state)
    }

    async fn deliveries_outstanding(&self, names: Vec<String>, now: i64) -> Result<i64> {
        self.read(move |conn| {
            let mut total = 0i64;
            let mut stmt = conn.prepare_cached(
                "SELECT COUNT(*) FROM deliveries
                 WHERE endpoint = ?1 AND state = 'pending' AND (next_at <= ?2 OR leased = 1)",
            )?;
            let mut unfanned = conn.prepare_cached(
                "SELECT (SELECT COALESCE(MAX(seq), 0) FROM outbox) - cursor FROM endpoints WHERE name = ?1",
            )?;
            for name in &names {
                total += stmt.query_row(params![name, now], |r| r.get::<_, i64>(0))?;
                total += unfanned
                    .query_row(params![name], |r| r.get::<_, i64>(0))
                    .optional()?
                    .unwrap_or(0);
            }
            Ok(total)
        })
        .await
    }

    async fn outbox_depth(&self) -> Result<i64> {
        self.read(|conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM deliveries WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn outbox_prune(&self, names: Vec<String>) -> Result<usize> {
        self.write(move |conn| {
            let mut floor = i64::MAX;
            for name in &names {
                let cursor: Option<i64> = conn
                    .query_row(
                        "SELECT cursor FROM endpoints WHERE name = ?1",
                        params![name],
                        |r| r.get(0),
                    )
                    .optional()?;
                floor = floor.min(cursor.unwrap_or(0));
            }
            if names.is_empty() {
                floor =
                    conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM outbox", [], |r| r.get(0))?;
            }
            conn.execute(
                "DELETE FROM outbox WHERE seq <= ?1
                 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = outbox.seq)",
                params![floor],
            )
        })
        .await
    }
}

#[async_trait]
impl KvStore for SqliteStorage {
    async fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let (plugin, key) = (plugin.to_string(), key.to_string());
        self.read(move |conn| {
            conn.prepare_cached("SELECT value FROM plugin_kv WHERE plugin = ?1 AND key = ?2")?
                .query_row(params![plugin, key], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn kv_set(&self, plugin: &str, key: &str, value: Vec<u8>) -> Result<()> {
        let (plugin, key) = (plugin.to_string(), key.to_string());
        let quota = self
            .write_urgent(move |conn| {
                let (keys, bytes): (i64, i64) = conn
                    .prepare_cached(
                        "SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM plugin_kv
                         WHERE plugin = ?1 AND key <> ?2",
                    )?
                    .query_row(params![plugin, key], |r| Ok((r.get(0)?, r.get(1)?)))?;
                if keys >= MAX_KEYS || bytes + value.len() as i64 > MAX_BYTES {
                    return Ok(Some(format!(
                        "a plugin's store holds at most {MAX_KEYS} keys and {MAX_BYTES} bytes"
                    )));
                }
                conn.prepare_cached(
                    "INSERT INTO plugin_kv (plugin, key, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![plugin, key, value])?;
                Ok(None)
            })
            .await?;
        match quota {
            Some(m) => Err(StorageError::Quota(m)),
            None => Ok(()),
        }
    }

    async fn kv_delete(&self, plugin: &str, key: &str) -> Result<()> {
        let (plugin, key) = (plugin.to_string(), key.to_string());
        self.write_urgent(move |conn| {
            conn.prepare_cached("DELETE FROM plugin_kv WHERE plugin = ?1 AND key = ?2")?
                .execute(params![plugin, key])?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl Health for SqliteStorage {
    async fn check(&self) -> Result<()> {
        if self.jobs.is_closed() {
            return Err(StorageError::Closed);
        }
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}
