//! The PostgreSQL engine: every storage trait on one database that several
//! gateway processes may share.
//!
//! **Writes.** Each process has one writer task. Concurrent writes queue up
//! (two lanes: bookkeeping first, like the SQLite engine) and the task runs
//! as many as are waiting in one transaction, each inside its own savepoint
//! so one failing write does not undo the others, commits once, and only
//! then answers them: durability costs one commit per batch, not per write.
//! The savepoint commands between two jobs go out in one message with the
//! next job's first statement (the connection pipelines them; the server
//! runs them in order), so they cost no round trip of their own; a batch
//! whose savepoint bookkeeping fails is rolled back and fails every job,
//! since committing an aborted transaction would roll it back silently.
//!
//! **Order across processes.** Every write transaction first takes one
//! transaction-scoped advisory lock ([`WRITE_LOCK`]), so write transactions
//! of all processes run one after another and commit in the order they took
//! the lock. They run at `READ COMMITTED` whatever the database's default:
//! each statement sees every transaction that committed before the lock
//! was granted (PostgreSQL makes a commit visible before it releases the
//! transaction's locks), where a `REPEATABLE READ` snapshot would be taken
//! by the lock statement itself, before the wait. That single rule gives
//! each contract property:
//! - a channel's sequence numbers and the version counter are read and
//!   advanced under the lock, so they follow commit order;
//! - outbox `seq` values (a `bigserial`) are drawn under the lock, so a
//!   worker's cursor over `seq` never passes an event that commits later;
//! - presence is counted under the lock, from every node's session rows;
//! - a close that finds no session row writes nothing, whichever process
//!   (or path) runs it second;
//! - delivery claims are writes (they take a lease), so two workers never
//!   claim one delivery, and the head-of-key rule holds;
//! - an endpoint's fan-out reads and moves its cursor in one write, so two
//!   processes fanning out one endpoint never copy an event twice (the
//!   deliveries primary key, with `ON CONFLICT DO NOTHING`, backs it up);
//! - idempotency keys and client message ids are checked and inserted under
//!   the lock (unique indexes back them up);
//! - a control target's state moves with `UPDATE … WHERE state IN (…)
//!   RETURNING`, so each move, and its event, happens once.
//!
//! **Outside the lock**: lease bookkeeping (cluster nodes' leases in
//! `cluster.rs`, on a small pool of their own so a renewal never waits for
//! the main pool; webhook endpoints' delivery leases in `outbox.rs`) and
//! the seen signatures of signed control requests are single statements on
//! the database's clock whose row locks order them; a reap, which closes
//! sessions, is a write under the lock.
//!
//! Exactly-once close (`DELETE … RETURNING`), idempotency keys and control
//! moves would hold on row locks and unique indexes alone; sequences, the
//! outbox order, cursors and fan-out, claims and presence need the lock.
//!
//! The lock is held for one batch: a process's writes are batched, so the
//! cost of serialising is one commit per batch per process.
//!
//! **Leases are not voided at start.** The SQLite engine, the only process
//! on its file, makes every leased delivery due when it opens. Here another
//! live process may hold those leases, so none is voided: a lease ends at
//! its `lease_until` (the worker's lease is the request timeout plus 5 s),
//! and then any process's claim takes the delivery, still the head of its
//! key. What a process that died had in flight is sent again at most one
//! lease later instead of at once. Leases and retry times are in the
//! callers' clocks: processes sharing a database need clocks that agree to
//! well within that 5 s margin (NTP), or a process whose clock runs ahead
//! takes over leases early and sends an event a second time (webhook
//! receivers already deduplicate by event id: delivery is at-least-once).
//!
//! **Reads** run on pooled connections beside the writer, each read
//! operation in one `REPEATABLE READ` read-only transaction when it takes
//! more than one statement.
//!
//! **Unavailable.** A connection that cannot be had (server down, refused,
//! restarting, pool exhausted past `storage.connect_timeout`) or that breaks
//! mid-way fails the operation with [`StorageError::Unavailable`]; nothing
//! is retried behind the caller's back. A commit whose answer was lost is
//! reported as [`StorageError::Commit`]: the write may or may not have
//! happened (a client retrying with the same `client_msg_id` or
//! idempotency key gets the first result).
//!
//! **Schema.** Versioned migrations ([`migrations`]) are applied at start
//! under a session advisory lock, recorded in `plugboard_schema`, and a
//! database whose schema is newer than this binary knows is refused.

mod cluster;
mod controls;
mod groups;
mod kv;
mod messages;
mod migrations;
mod outbox;
mod plugins;
mod sessions;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::IsolationLevel;

use super::queue::WriteQueue;
use super::{Health, NewEvent, Result, StorageError};
use crate::config::{redact_url, StorageConfig};
use crate::metrics::Metrics;

pub use deadpool_postgres::Transaction;

/// Key of the advisory lock every write transaction takes first.
pub(crate) const WRITE_LOCK: i64 = 0x706c_7567_626f_6172; // "plugboar"

/// Most writes grouped into one transaction.
const MAX_BATCH: usize = 512;

/// A boxed future borrowing the transaction it runs in.
pub type TxFuture<'a, R> =
    Pin<Box<dyn Future<Output = std::result::Result<R, tokio_postgres::Error>> + Send + 'a>>;

type Completion = Box<dyn FnOnce(std::result::Result<(), StorageError>) + Send>;
/// Runs a job's statements (inside the savepoint the batch opened for it);
/// answers whether they succeeded, and how to answer the job once the
/// batch's fate is known.
type RunJob = Box<
    dyn for<'a> FnOnce(
            &'a Transaction<'a>,
        ) -> Pin<Box<dyn Future<Output = (bool, Completion)> + Send + 'a>>
        + Send,
>;

/// A queued write: `run` it in the batch's transaction, or `fail` it when
/// the batch cannot start.
struct Job {
    run: RunJob,
    fail: Box<dyn FnOnce(StorageError) + Send>,
}

/// PostgreSQL storage: a connection pool and this process's writer task.
pub struct PostgresStorage {
    pool: Pool,
    /// Two connections of their own for cluster leases, so a renewal never
    /// waits for a pool that a burst of reads has taken.
    lease_pool: Pool,
    urgent: mpsc::UnboundedSender<Job>,
    /// Bounded by `queue`: a job takes a place before it is sent here.
    normal: mpsc::UnboundedSender<Job>,
    queue: WriteQueue,
    /// The URL with its secrets removed, for messages.
    shown: String,
}

/// Maps a driver error to the engine-neutral one.
pub(crate) fn map_err(e: tokio_postgres::Error) -> StorageError {
    if is_unavailable(&e) {
        StorageError::Unavailable(db_message(&e))
    } else {
        StorageError::Database(db_message(&e))
    }
}

/// The server's message and detail when there is one (the driver's
/// `Display` says only "db error").
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {detail}", db.message()),
            None => db.message().to_string(),
        },
        None => {
            // "error connecting to server: Connection refused (os error 111)"
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

/// Whether an error means the server cannot be used right now (as opposed
/// to refusing this one statement).
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // Class 08: connection exceptions; 57P0x: the server is shutting
        // down, crashed or starting; 53300: too many connections; 57014 /
        // 55P03: `statement_timeout` / `lock_timeout` passed (the server or
        // the write lock is overloaded); 25006: a read-only server (a
        // standby, during a failover). Each may pass by itself.
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::QUERY_CANCELED
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        }
        // No server code: unavailable only when the cause is the socket
        // (connecting, reading, writing); a client-side error (a missing
        // row, a type that does not convert) is the operation's own.
        None => {
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                if cause.is::<std::io::Error>() {
                    return true;
                }
                source = cause.source();
            }
            false
        }
    }
}

pub(crate) fn map_pool_err(e: PoolError) -> StorageError {
    match e {
        PoolError::Backend(e) => map_err(e),
        PoolError::Closed => StorageError::Closed,
        other => StorageError::Unavailable(other.to_string()),
    }
}

impl PostgresStorage {
    /// Connects to `config.url`, applies pending migrations and starts the
    /// writer. Errors name the host and database, never the password.
    pub async fn open(
        config: &StorageConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<PostgresStorage> {
        let shown = redact_url(&config.url);
        let open_err = |message: String| StorageError::Open {
            target: shown.clone(),
            message,
        };
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| open_err(format!("bad storage.url: {e}")))?;
        pg.application_name("plugboard");
        pg.connect_timeout(config.connect_timeout);
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(30));
        // Every statement is bounded; the lock wait of a write batch too.
        // Options the URL carries (`?options=…`) come after these, so an
        // operator's own setting wins.
        let ours = format!(
            "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
            config.statement_timeout.as_millis(),
            config.statement_timeout.as_millis(),
            (config.statement_timeout * 6).as_millis(),
        );
        let options = match pg.get_options() {
            Some(theirs) if !theirs.trim().is_empty() => format!("{ours} {theirs}"),
            _ => ours,
        };
        pg.options(options);
        let build = |pg: tokio_postgres::Config, size: usize| {
            let manager = Manager::from_config(
                pg,
                tokio_postgres::NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .wait_timeout(Some(config.connect_timeout))
                .create_timeout(Some(config.connect_timeout))
                .recycle_timeout(Some(config.connect_timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| open_err(e.to_string()))
        };
        let pool = build(pg.clone(), config.pool_size)?;
        // Created lazily: a single node never opens them.
        let lease_pool = build(pg, 2)?;
        {
            let mut conn = pool.get().await.map_err(|e| {
                open_err(match e {
                    PoolError::Backend(e) => db_message(&e),
                    other => other.to_string(),
                })
            })?;
            migrations::apply(&mut conn)
                .await
                .map_err(|e| open_err(e.to_string()))?;
        }
        // Unlike SQLite's open, no delivery lease is voided here: another
        // live process may hold it. Leases end at their time (module doc).
        let (urgent, urgent_rx) = mpsc::unbounded_channel();
        let (normal, normal_rx) = mpsc::unbounded_channel();
        let queue = WriteQueue::from_config(config, metrics.as_deref());
        tokio::spawn(writer_loop(pool.clone(), urgent_rx, normal_rx, metrics));
        Ok(PostgresStorage {
            pool,
            lease_pool,
            urgent,
            normal,
            queue,
            shown,
        })
    }

    /// The pool, for statements that need no transaction.
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The cluster lease's own connections (joins, renewals).
    pub(crate) fn lease_pool(&self) -> &Pool {
        &self.lease_pool
    }

    /// The URL this store uses, with its secrets removed.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Runs `f` in the next write transaction (after the write lock); resolves
    /// after the commit.
    pub(crate) async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> FnOnce(&'a Transaction<'a>) -> TxFuture<'a, R> + Send + 'static,
    {
        self.submit(f, |_: &R| {}, false).await
    }

    /// Like [`Self::write`], in the lane the writer takes first: for small
    /// bookkeeping writes (sessions, webhook deliveries) that must not queue
    /// behind a burst of messages.
    pub(crate) async fn write_urgent<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> FnOnce(&'a Transaction<'a>) -> TxFuture<'a, R> + Send + 'static,
    {
        self.submit(f, |_: &R| {}, true).await
    }

    /// Like [`Self::write`], and runs `after` on the writer once the
    /// transaction committed, before the future resolves. Jobs are answered
    /// in the order they ran, so `after` sees this process's commits in order.
    pub(crate) async fn write_hooked<R, F, H>(&self, f: F, after: H) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> FnOnce(&'a Transaction<'a>) -> TxFuture<'a, R> + Send + 'static,
        H: FnOnce(&R) + Send + 'static,
    {
        self.submit(f, after, false).await
    }

    async fn submit<R, F, H>(&self, f: F, after: H, urgent: bool) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> FnOnce(&'a Transaction<'a>) -> TxFuture<'a, R> + Send + 'static,
        H: FnOnce(&R) + Send + 'static,
    {
        // The place goes back with the answer (or when the job is dropped).
        let place = self.queue.admit_lane(urgent).await?;
        let (tx, rx) = oneshot::channel::<Result<R>>();
        let answer = Arc::new(std::sync::Mutex::new(Some((tx, place))));
        let failed = answer.clone();
        let run: RunJob = Box::new(move |t: &Transaction<'_>| {
            Box::pin(async move {
                let result = f(t).await.map_err(map_err);
                let ok = result.is_ok();
                let completion = Box::new(move |commit: std::result::Result<(), StorageError>| {
                    let out = match (result, commit) {
                        (Err(e), _) => Err(e),
                        (Ok(_), Err(e)) => Err(e),
                        (Ok(v), Ok(())) => {
                            after(&v);
                            Ok(v)
                        }
                    };
                    if let Some((tx, _place)) =
                        answer.lock().unwrap_or_else(|p| p.into_inner()).take()
                    {
                        let _ = tx.send(out);
                    }
                }) as Completion;
                (ok, completion)
            })
        });
        let fail = Box::new(move |e: StorageError| {
            if let Some((tx, _place)) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(Err(e));
            }
        });
        let job = Job { run, fail };
        let lane = if urgent { &self.urgent } else { &self.normal };
        if lane.send(job).is_err() {
            return Err(StorageError::Closed);
        }
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Runs `f` on a pooled connection in a read-only `REPEATABLE READ`
    /// transaction (one snapshot for all its statements).
    pub(crate) async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> FnOnce(&'a Transaction<'a>) -> TxFuture<'a, R> + Send + 'static,
    {
        let mut conn = self.pool.get().await.map_err(map_pool_err)?;
        let t = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(map_err)?;
        let out = f(&t).await.map_err(map_err)?;
        t.commit().await.map_err(map_err)?;
        Ok(out)
    }
}

/// Takes up to [`MAX_BATCH`] jobs, urgent ones first; with `urgent_alone`,
/// only urgent ones when there are any (see [`writer_loop`]), and then
/// whether it did so. `None` once both lanes are closed and drained.
async fn next_batch(
    urgent: &mut mpsc::UnboundedReceiver<Job>,
    normal: &mut mpsc::UnboundedReceiver<Job>,
    urgent_alone: bool,
) -> Option<(Vec<Job>, bool)> {
    let (first, is_urgent) = tokio::select! {
        biased;
        Some(job) = urgent.recv() => (job, true),
        Some(job) = normal.recv() => (job, false),
        else => return None,
    };
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match urgent.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    if urgent_alone && is_urgent {
        return Some((batch, true));
    }
    while batch.len() < MAX_BATCH {
        match normal.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some((batch, false))
}

async fn writer_loop(
    pool: Pool,
    mut urgent: mpsc::UnboundedReceiver<Job>,
    mut normal: mpsc::UnboundedReceiver<Job>,
    metrics: Option<Arc<Metrics>>,
) {
    // Urgent jobs (sessions, webhook bookkeeping) get a transaction of their
    // own when they are waiting, so that a webhook round under load waits
    // for a commit of a few small writes rather than one of hundreds of
    // messages; the batch after an urgent-only one takes normal jobs too,
    // so a stream of urgent jobs cannot starve messages.
    let mut urgent_alone = true;
    while let Some((batch, alone)) = next_batch(&mut urgent, &mut normal, urgent_alone).await {
        urgent_alone = !alone;
        let started = Instant::now();
        let size = batch.len();
        let result = run_batch(&pool, batch).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, jobs = size, "storage write batch failed");
        }
        if let Some(m) = &metrics {
            m.storage_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            m.storage_batch_size.observe(size as f64);
        }
    }
}

/// Savepoint commands sent before a job: the first job's, and after a job
/// that succeeded or failed (its writes undone, and the savepoint released
/// either way, so savepoints never nest).
const FIRST_SAVEPOINT: &str = "SAVEPOINT job";
const AFTER_SUCCESS: &str = "RELEASE job; SAVEPOINT job";
const AFTER_FAILURE: &str = "ROLLBACK TO job; RELEASE job; SAVEPOINT job";

/// One transaction: the write lock, every job in its savepoint, one commit,
/// then every job's answer in order.
async fn run_batch(pool: &Pool, batch: Vec<Job>) -> std::result::Result<(), StorageError> {
    let fail_all = |batch: Vec<Job>, e: StorageError| {
        for job in batch {
            (job.fail)(e.clone());
        }
        Err(e)
    };
    let mut conn = match pool.get().await {
        Ok(c) => c,
        Err(e) => return fail_all(batch, map_pool_err(e)),
    };
    let t = match conn
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await
    {
        Ok(t) => t,
        Err(e) => return fail_all(batch, map_err(e)),
    };
    if let Err(e) = t
        .execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
        .await
    {
        return fail_all(batch, map_err(e));
    }
    let mut completions = Vec::with_capacity(batch.len());
    let mut savepoint = FIRST_SAVEPOINT;
    let mut broken = None;
    let mut jobs = batch.into_iter();
    for job in jobs.by_ref() {
        // The savepoint commands and the job's statements in one flight:
        // polled together, the commands are queued first.
        let (bookkeeping, (ok, completion)) =
            futures_util::future::join(t.batch_execute(savepoint), (job.run)(&t)).await;
        completions.push(completion);
        if let Err(e) = bookkeeping {
            broken = Some(e);
            break;
        }
        savepoint = if ok { AFTER_SUCCESS } else { AFTER_FAILURE };
    }
    // The commit releases the last savepoint; a failed last job is undone
    // first.
    if broken.is_none() && savepoint == AFTER_FAILURE {
        if let Err(e) = t.batch_execute("ROLLBACK TO job").await {
            broken = Some(e);
        }
    }
    if let Some(e) = broken {
        // The transaction is aborted: nothing of the batch is kept, and no
        // job may be told otherwise.
        let e = map_err(e);
        let _ = t.rollback().await;
        for c in completions {
            c(Err(e.clone()));
        }
        return fail_all(jobs.collect(), e);
    }
    let commit = t.commit().await.map_err(|e| {
        if is_unavailable(&e) {
            StorageError::Commit(format!(
                "the connection was lost during the commit, which may or may not have happened: {e}"
            ))
        } else {
            StorageError::Commit(db_message(&e))
        }
    });
    for c in completions {
        c(match &commit {
            Ok(()) => Ok(()),
            Err(e) => Err(e.clone()),
        });
    }
    commit
}

/// Appends events to the outbox in one statement. Called under the write
/// lock, so their `seq` values follow commit order.
pub(crate) async fn insert_events(
    t: &Transaction<'_>,
    events: &[NewEvent],
) -> std::result::Result<(), tokio_postgres::Error> {
    match events {
        [] => return Ok(()),
        // The common case (a message, an open, a close) without the array
        // plan: a third cheaper on the server.
        [e] => {
            let stmt = t
                .prepare_cached(
                    "INSERT INTO outbox (id, type, order_key, created_at, data)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .await?;
            t.execute(
                &stmt,
                &[
                    &e.id,
                    &e.event_type,
                    &e.order_key,
                    &e.created_at,
                    &e.data.get(),
                ],
            )
            .await?;
            return Ok(());
        }
        _ => {}
    }
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let keys: Vec<&str> = events.iter().map(|e| e.order_key.as_str()).collect();
    let times: Vec<i64> = events.iter().map(|e| e.created_at).collect();
    let data: Vec<&str> = events.iter().map(|e| e.data.get()).collect();
    let stmt = t
        .prepare_cached(
            "INSERT INTO outbox (id, type, order_key, created_at, data)
             SELECT e.id, e.type, e.order_key, e.created_at, e.data
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])
             WITH ORDINALITY AS e(id, type, order_key, created_at, data, n) ORDER BY e.n",
        )
        .await?;
    t.execute(&stmt, &[&ids, &types, &keys, &times, &data])
        .await?;
    Ok(())
}

#[async_trait::async_trait]
impl Health for PostgresStorage {
    async fn check(&self) -> Result<()> {
        let conn = self.pool.get().await.map_err(map_pool_err)?;
        conn.simple_query("SELECT 1").await.map_err(map_err)?;
        Ok(())
    }
}
