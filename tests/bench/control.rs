//! `bench-control`: business control messages (`POST /v1/control`) through
//! the real gateway: the time to deliver one control message to 10,000
//! online users, and how many persisted controls are stored per second,
//! each beside a baseline measured in the same run.
//!
//! ```text
//! cargo build --release -p plugboard-tests --bin bench-control --bin gateway-under-test
//! ./target/release/bench-control [--quick] [--storage sqlite|postgres|both] [--users N] [--repeats R] [--in-flight C] [--duration SECS] ...
//! ```
//!
//! `--help` lists every option. The defaults finish in about two minutes on
//! a 2-core machine (about three with `--storage both`); `--quick` is a
//! smoke run with small sizes.
//!
//! Every gateway is the real binary started through the test harness, log
//! level warn, one webhook endpoint for `control.*` and `message.created`
//! events served by a tiny receiver in this process that answers 204 and
//! counts them (unless `--no-webhooks`). Its `[control]` limiter is opened
//! wide (`rate_limit = 100000.0`, `rate_burst = 100000`), so that the
//! default 50 requests/s do not throttle the measurement. It stores on
//! `--storage`:
//!
//! - `sqlite` (the default): SQLite in the gateway's temporary folder (WAL,
//!   `synchronous = FULL`);
//! - `postgres`: a fresh database per gateway on a private PostgreSQL server
//!   that this program starts first (`PgServer::start` with
//!   `PgOptions::durable()`: PostgreSQL's defaults, `fsync` and
//!   `synchronous_commit` on, a fair match for SQLite's `synchronous = FULL`),
//!   over TCP on 127.0.0.1; the database is dropped after its gateway;
//! - `both`: every measurement on SQLite, then on PostgreSQL, printed side by
//!   side (a column per engine and run in each table).
//!
//! The header names the engines, PostgreSQL's version and the settings
//! used. On PostgreSQL the figures add the server's CPU (all its processes)
//! and, for the rate runs, its WAL and commit counters (`pg_stat_wal`,
//! `pg_stat_database`); the data size at the end of a run is the SQLite
//! database file and its WAL, or `pg_database_size` of the gateway's
//! database (PostgreSQL's WAL is the server's and is not counted).
//!
//! 1. **Control fan-out.** N users (10,000 by default), one connection each
//!    (client sockets bound to 127.0.0.2…127.0.0.9 in turn), all members of
//!    one group. Then, R times, one online-only, normal-priority control to
//!    all N users (`{"targets": {"users": [...]}}`) and, as the baseline,
//!    one message to the group through `POST /v1/messages` (the message
//!    fan-out path on the same connections); then one control with
//!    `"priority": "high"`. For each: the time from the start of the request
//!    until the HTTP answer, and until the first, the median, the 90th
//!    percentile and the last client read the frame. Between two requests
//!    the bench waits until the webhook receiver has every event the last
//!    one caused (one `control.delivered` per target; that time is reported
//!    too), then until the gateway's storage writer is idle, so that each
//!    request starts on an idle gateway.
//! 2. **Persisted controls stored per second.** No client connected, so
//!    every target is offline. C requests in flight (32) for D seconds after
//!    a warm-up, `"reliability": "persisted"`, once with 1 target per
//!    request and once with 100; the baseline is the same loop with
//!    online-only controls (answered `offline`; the gateway records those
//!    target rows too, but nothing waits for the user). A fresh gateway for
//!    each run. Requests/s, target rows/s, request latency, and the
//!    gateway's own view (`/metrics`: storage transactions, writes per
//!    transaction, time per transaction).
//!
//! Every wait is bounded. A failure is reported, with what was seen, and is
//! not a crash: a benchmark prints figures, it asserts nothing. All traffic
//! stays on 127.0.0.x. The clients, the webhook receiver and the server
//! share the machine's cores, so every figure is one for the whole system.

mod cli;
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use clap::Parser;
use futures_util::StreamExt;
use plugboard_tests::gateway::{API_KEY, JWT_SECRET};
use plugboard_tests::{Engine, Gateway, GatewayOptions};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use cli::StorageArg;
use common::*;

/// The limiter settings of every benchmark gateway.
const RATE_LIMIT: &str = "100000.0";
const RATE_BURST: &str = "100000";

/// The gateway's default `control.max_targets`.
const DEFAULT_MAX_TARGETS: usize = 10_000;

/// Longest wait for the clients to read a fan-out frame.
const MEMBERS_WAIT: Duration = Duration::from_secs(20);

/// How long the storage writer must stand still to count as idle, and the
/// longest wait for that.
const IDLE_QUIET: Duration = Duration::from_millis(300);
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// The webhook endpoint's `events`: what the bench counts. Connection and
/// presence events (20,000 for 10,000 connects) are not sent.
const HOOK_EVENTS: &str = r#"["control.*", "message.created"]"#;

/// Timeout of one API request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const FANOUT: &str = "Control fan-out";
const RATE: &str = "Persisted controls stored per second";
const WEBHOOKS: &str = "Webhooks";
const CONNECTIONS: &str = "Connections";
const PHASES: &str = "Phases";

/// Business control messages (POST /v1/control) through the real gateway:
/// the time to deliver one control to many online users, and how many
/// persisted controls are stored per second, each beside a baseline
#[derive(Debug, Parser)]
#[command(
    name = "bench-control",
    args_override_self = true,
    after_help = "An option left out takes its default, or with --quick its smoke-run size."
)]
struct Cli {
    /// Small sizes for a smoke run; options given with it still apply
    #[arg(long)]
    quick: bool,

    #[command(flatten)]
    storage: cli::StorageFlag,

    /// Online users, one connection each, all in one group, 1 to 1000000
    /// [default: 10000; --quick: 500]
    #[arg(long, value_name = "N", value_parser = cli::clamped(1, 1_000_000), help_heading = FANOUT)]
    users: Option<usize>,
    /// Controls (and, as the baseline, group messages) sent to them, one at
    /// a time, at least 1; then one control with priority high [default: 5;
    /// --quick: 3]
    #[arg(long, value_name = "R", value_parser = cli::clamped(1, usize::MAX), help_heading = FANOUT)]
    repeats: Option<usize>,
    /// After each request, wait this long at most for its webhooks (one
    /// control.delivered per target) before the next [default: 60; --quick:
    /// 20]
    #[arg(long, value_name = "SECS", value_parser = cli::seconds(0), help_heading = FANOUT)]
    webhook_wait: Option<Duration>,

    /// Requests in flight, at least 1 [default: 32; --quick: 16]
    #[arg(long, value_name = "C", value_parser = cli::clamped(1, usize::MAX), help_heading = RATE)]
    in_flight: Option<usize>,
    /// Load before measuring [default: 2; --quick: 1]
    #[arg(long, value_name = "SECS", value_parser = cli::seconds(0), help_heading = RATE)]
    warmup: Option<Duration>,
    /// Measured load of each run, at least 1 [default: 6; --quick: 2]
    #[arg(long, value_name = "SECS", value_parser = cli::seconds(1), help_heading = RATE)]
    duration: Option<Duration>,
    /// Targets per request, one pair of runs each: a comma-separated list of
    /// numbers, each 1 to 1000000 [default: 1,100]
    #[arg(long, value_name = "LIST", value_parser = target_list, help_heading = RATE)]
    targets: Option<Targets>,
    /// Distinct offline users the targets cycle through, at least 1
    /// [default: 100000; --quick: 10000]
    #[arg(long, value_name = "U", value_parser = cli::clamped(1, usize::MAX), help_heading = RATE)]
    offline_users: Option<usize>,

    /// batch_max of the webhook endpoint, 1 to 1000 [default: 1, the
    /// production default]
    #[arg(long, value_name = "N", value_parser = cli::clamped(1, 1000), help_heading = WEBHOOKS)]
    webhook_batch: Option<usize>,
    /// Gateways without a webhook endpoint (events are still written to the
    /// outbox; nothing delivers them)
    #[arg(long, help_heading = WEBHOOKS)]
    no_webhooks: bool,

    /// Connection attempts in flight at once, at least 1 [default: 200]
    #[arg(long, value_name = "C", value_parser = cli::clamped(1, usize::MAX), help_heading = CONNECTIONS)]
    concurrency: Option<usize>,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(K+1), 1 to 250
    /// [default: 8]
    #[arg(long, value_name = "K", value_parser = cli::clamped(1, 250), help_heading = CONNECTIONS)]
    sources: Option<usize>,

    /// Skip the control fan-out
    #[arg(long, help_heading = PHASES)]
    no_fanout: bool,
    /// Skip the persisted-controls rate runs
    #[arg(long, help_heading = PHASES)]
    no_rate: bool,
    /// Skip the baselines (group messages, online-only controls)
    #[arg(long, help_heading = PHASES)]
    no_baseline: bool,
}

/// The list of `--targets`.
#[derive(Clone, Debug)]
struct Targets(Vec<usize>);

/// `--targets`: comma-separated whole numbers, each clamped into
/// 1..=1,000,000; empty entries are skipped, but one number is needed.
fn target_list(s: &str) -> Result<Targets, String> {
    let list = s
        .split(',')
        .filter(|part| !part.trim().is_empty())
        .map(cli::clamped(1, 1_000_000))
        .collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() {
        return Err("at least one number is needed".into());
    }
    Ok(Targets(list))
}

#[derive(Clone, Debug)]
struct Options {
    users: usize,
    repeats: usize,
    webhook_wait: Duration,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
    targets: Vec<usize>,
    offline_users: usize,
    webhook_batch: usize,
    webhooks: bool,
    concurrency: usize,
    sources: usize,
    fanout: bool,
    rate: bool,
    baseline: bool,
    quick: bool,
    storage: StorageArg,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            users: 10_000,
            repeats: 5,
            webhook_wait: Duration::from_secs(60),
            in_flight: 32,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(6),
            targets: vec![1, 100],
            offline_users: 100_000,
            webhook_batch: 1,
            webhooks: true,
            concurrency: 200,
            sources: 8,
            fanout: true,
            rate: true,
            baseline: true,
            quick: false,
            storage: StorageArg::Sqlite,
        }
    }
}

impl Options {
    fn quick() -> Self {
        Options {
            users: 500,
            repeats: 3,
            webhook_wait: Duration::from_secs(20),
            in_flight: 16,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(2),
            offline_users: 10_000,
            quick: true,
            ..Options::default()
        }
    }

    /// `control.max_targets` of the benchmark gateways: the default, or
    /// more when a request here names more users.
    fn max_targets(&self) -> usize {
        let mut m = DEFAULT_MAX_TARGETS;
        if self.fanout {
            m = m.max(self.users);
        }
        if self.rate {
            m = m.max(self.targets.iter().copied().max().unwrap_or(1));
        }
        m.min(1_000_000)
    }
}

impl From<Cli> for Options {
    /// Each option given, else its default (the `--quick` one with `--quick`).
    fn from(cli: Cli) -> Self {
        let base = if cli.quick {
            Options::quick()
        } else {
            Options::default()
        };
        Options {
            users: cli.users.unwrap_or(base.users),
            repeats: cli.repeats.unwrap_or(base.repeats),
            webhook_wait: cli.webhook_wait.unwrap_or(base.webhook_wait),
            in_flight: cli.in_flight.unwrap_or(base.in_flight),
            warmup: cli.warmup.unwrap_or(base.warmup),
            duration: cli.duration.unwrap_or(base.duration),
            targets: cli.targets.map_or(base.targets, |t| t.0),
            offline_users: cli.offline_users.unwrap_or(base.offline_users),
            webhook_batch: cli.webhook_batch.unwrap_or(base.webhook_batch),
            webhooks: base.webhooks && !cli.no_webhooks,
            concurrency: cli.concurrency.unwrap_or(base.concurrency),
            sources: cli.sources.unwrap_or(base.sources),
            fanout: base.fanout && !cli.no_fanout,
            rate: base.rate && !cli.no_rate,
            baseline: base.baseline && !cli.no_baseline,
            quick: base.quick,
            storage: cli.storage.storage,
        }
    }
}

fn main() -> std::process::ExitCode {
    let opts = Options::from(Cli::parse());
    // Before anything starts: the gateways inherit the limit.
    plugboard_tests::raise_fd_limit();
    let _ = now_ns();
    run_program("bench-control", run(opts))
}

// ---------------------------------------------------------------------------
// Clock and process facts

/// Bytes of a gateway's data: on SQLite its database file and its
/// write-ahead log; on PostgreSQL `pg_database_size` of its database (the
/// WAL is the server's, not the database's: `None`).
async fn data_bytes(storage: &Storage, gw: &Gateway) -> (Option<u64>, Option<u64>) {
    match gw.engine() {
        Engine::Sqlite => {
            let data = gw.dir.path().join("data");
            let size = |name: &str| std::fs::metadata(data.join(name)).ok().map(|m| m.len());
            (size("plugboard.db"), size("plugboard.db-wal"))
        }
        Engine::Postgres => (storage.database_size(gw).await, None),
    }
}

/// A column label: the run ("persisted, 1 target") with one engine; the
/// engine above it with `--storage both`.
fn run_label(storage: &Storage, engine: Engine, run: &str) -> String {
    if storage.both() {
        format!("{}\n{run}", engine_name(engine))
    } else {
        run.to_string()
    }
}

/// How a line of the report names an engine's figures: "SQLite: " with
/// `--storage both`, nothing with one engine.
fn engine_prefix(storage: &Storage, engine: Engine) -> String {
    if storage.both() {
        format!("{}: ", engine_name(engine))
    } else {
        String::new()
    }
}

/// The tag of progress lines: "fan-out", or "fan-out, PostgreSQL" with
/// `--storage both`.
fn log_tag(storage: &Storage, engine: Engine, what: &str) -> String {
    if storage.both() {
        format!("{what}, {}", engine_name(engine))
    } else {
        what.to_string()
    }
}

// ---------------------------------------------------------------------------
// The gateway's metrics

fn bound_ms(s: Option<f64>) -> String {
    match s {
        Some(s) if s.is_infinite() => "> largest bucket".to_string(),
        Some(s) => format!("≤ {:.1} ms", s * 1e3),
        None => "-".into(),
    }
}

/// The storage side of an interval: (transactions, writes per transaction,
/// mean time per transaction in s, seconds spent in transactions, bucket
/// bound of the longest).
struct StorageView {
    transactions: f64,
    writes_per_txn: Option<f64>,
    mean_txn: Option<f64>,
    busy_secs: f64,
    longest_bound: Option<f64>,
}

impl StorageView {
    fn of(before: &Snapshot, after: &Snapshot) -> StorageView {
        let batches = HistDelta::of(before, after, "plugboard_storage_batch_size");
        let commits = HistDelta::of(before, after, "plugboard_storage_commit_seconds");
        StorageView {
            transactions: commits.count,
            writes_per_txn: batches.mean(),
            mean_txn: commits.mean(),
            busy_secs: commits.sum,
            longest_bound: commits.quantile_bound(1.0),
        }
    }
}

// ---------------------------------------------------------------------------
// The webhook receiver

/// Waits until the gateway's storage writer has committed nothing for
/// `IDLE_QUIET` (its transaction count, read from `/metrics`, stands still),
/// at most `IDLE_LIMIT`; how long that took.
async fn wait_idle(http: &reqwest::Client, base: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let count = |s: &Snapshot| s.sum("plugboard_storage_commit_seconds_count");
    let mut last = snapshot(http, base).await.map(|s| count(&s));
    let mut still_since = Instant::now();
    loop {
        sleep(Duration::from_millis(50)).await;
        let now = snapshot(http, base).await.map(|s| count(&s));
        if now.is_none() {
            return Err("GET /metrics failed".into());
        }
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= IDLE_QUIET {
            return Ok(started.elapsed().saturating_sub(IDLE_QUIET));
        }
        if started.elapsed() >= IDLE_LIMIT {
            return Err(format!(
                "the storage writer was still busy {} s later",
                IDLE_LIMIT.as_secs()
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// Gateways

/// A gateway on `engine` with production heartbeat and auth deadline, quiet
/// logs, the control limiter opened wide, and the webhook endpoint (unless
/// `--no-webhooks`). `Gateway::start` panics when the gateway does not come
/// up, which is caught and reported.
async fn start_gateway(
    hook_url: &str,
    opts: &Options,
    storage: &Storage,
    engine: Engine,
) -> anyhow::Result<Gateway> {
    let config = format!(
        "[gateway]\nping_interval = \"25s\"\npong_timeout = \"10s\"\nauth_timeout = \"10s\"\n\
         [log]\nlevel = \"warn\"\n\
         [control]\nrate_limit = {RATE_LIMIT}\nrate_burst = {RATE_BURST}\nmax_targets = {}\n",
        opts.max_targets()
    );
    let mut gw_opts = GatewayOptions::default().extra(&config);
    if opts.webhooks {
        let batch = if opts.webhook_batch > 1 {
            format!("batch_max = {}\n", opts.webhook_batch)
        } else {
            String::new()
        };
        gw_opts = gw_opts.extra(&format!(
            "[[webhooks]]\nname = \"rx\"\nurl = {hook_url:?}\nsecret = {:?}\nevents = {HOOK_EVENTS}\n{batch}",
            plugboard_tests::receiver::SECRET
        ));
    }
    storage.start_gateway(engine, gw_opts).await
}

// ---------------------------------------------------------------------------
// Server API calls

/// One API request with a JSON body given as text: (status, body bytes).
async fn post_text(
    http: &reqwest::Client,
    url: &str,
    body: String,
) -> Result<(u16, Bytes), String> {
    let resp = http
        .post(url)
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(body)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer failed: {e}"))?;
    Ok((status, bytes))
}

/// The error code of an API error answer, or the start of the body.
fn why(status: u16, body: &[u8]) -> String {
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    match code {
        Some(c) => format!("HTTP {status} {c}"),
        None => format!(
            "HTTP {status} {}",
            String::from_utf8_lossy(body)
                .chars()
                .take(120)
                .collect::<String>()
        ),
    }
}

/// The `summary` of a control answer.
#[derive(Deserialize, Debug, Default, Clone, Copy)]
struct Summary {
    targets: usize,
    delivered: usize,
    stored: usize,
    offline: usize,
    rejected: usize,
}

#[derive(Deserialize)]
struct Answer {
    summary: Summary,
}

// ---------------------------------------------------------------------------
// Clients

// ---------------------------------------------------------------------------
// 1. Control fan-out

/// What the client connections record for one request.
struct Slot {
    count: AtomicUsize,
    /// Receive instants (ns on the shared clock), one per client.
    times: Mutex<Vec<u64>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RepKind {
    Control { high: bool },
    Message,
}

/// One request to every user; times from the start of the request.
#[derive(Default)]
struct Rep {
    label: String,
    api: Option<Duration>,
    answer_bytes: usize,
    summary: Option<Summary>,
    first: Option<Duration>,
    p50: Option<Duration>,
    p90: Option<Duration>,
    last: Option<Duration>,
    reached: usize,
    /// Until the webhook receiver had every event of the request.
    hooks_done: Option<Duration>,
    /// Storage from the request until the answer and the last client.
    storage: Option<StorageView>,
    /// CPU from the request until the answer and the last client, in ms.
    server_cpu_ms: Option<f64>,
    bench_cpu_ms: Option<f64>,
    /// The PostgreSQL server's, on PostgreSQL.
    db_cpu_ms: Option<f64>,
}

struct FanoutResult {
    engine: Engine,
    users: usize,
    connected: usize,
    connect_failures: BTreeMap<String, usize>,
    connect_time: Duration,
    group_create: Option<Duration>,
    /// From the last connect until the storage writer was idle.
    idle_wait: Option<Duration>,
    controls: Vec<Rep>,
    high: Option<Rep>,
    messages: Vec<Rep>,
    server_rss_mib: Option<f64>,
    notes: Vec<String>,
}

/// Creates group `fanout` with every user: one `POST /v1/groups`, then
/// `POST /v1/groups/fanout/members` in batches of 1,000.
async fn create_group(
    http: &reqwest::Client,
    base: &str,
    users: &[String],
) -> Result<Duration, String> {
    let started = Instant::now();
    let body = json!({"group_id": "fanout", "name": "fanout"}).to_string();
    match post_text(http, &format!("{base}/v1/groups"), body).await? {
        (201, _) => {}
        (s, b) => return Err(format!("creating the group: {}", why(s, &b))),
    }
    for (i, chunk) in users.chunks(1_000).enumerate() {
        let body = json!({ "members": chunk }).to_string();
        match post_text(http, &format!("{base}/v1/groups/fanout/members"), body).await? {
            (200 | 201, _) => {}
            (s, b) => return Err(format!("adding members, batch {i}: {}", why(s, &b))),
        }
    }
    Ok(started.elapsed())
}

struct FanCtx<'a> {
    http: &'a reqwest::Client,
    base: String,
    gw: &'a Gateway,
    /// The PostgreSQL server's postmaster, on PostgreSQL.
    db_pid: Option<u32>,
    /// "fan-out", with the engine when there are two.
    tag: String,
    hooks: &'a Hooks,
    slots: Arc<Vec<Slot>>,
    /// `["cu00000", …]` as JSON text.
    users_json: String,
    connected: usize,
    webhooks: bool,
    webhook_wait: Duration,
}

async fn fan_rep(
    ctx: &FanCtx<'_>,
    kind: RepKind,
    label: String,
    slot_index: usize,
    notes: &mut Vec<String>,
) -> Rep {
    let mut rep = Rep {
        label: label.clone(),
        ..Rep::default()
    };
    // For progress lines and notes, which name the engine already: the run.
    let label = label.rsplit('\n').next().unwrap_or_default().to_string();
    let (url, body) = match kind {
        RepKind::Control { high } => (
            format!("{}/v1/control", ctx.base),
            format!(
                r#"{{"kind":"bench.fanout","payload":{{"rep":{slot_index}}},"targets":{{"users":{}}}{}}}"#,
                ctx.users_json,
                if high { r#","priority":"high""# } else { "" }
            ),
        ),
        RepKind::Message => (
            format!("{}/v1/messages", ctx.base),
            format!(
                r#"{{"channel_type":"group","channel_id":"fanout","payload":{{"text":"fan-out","rep":{slot_index}}}}}"#
            ),
        ),
    };
    if let Err(e) = wait_idle(ctx.http, &ctx.base).await {
        notes.push(format!("before {label}: {e}"));
    }
    let delivered_before = ctx.hooks.delivered();
    let messages_before = ctx.hooks.messages();
    let snap_a = snapshot(ctx.http, &ctx.base).await;
    let cpu_a = CpuMark::take_with_db(ctx.gw.pid(), ctx.db_pid);
    let t0 = now_ns();
    let sent = Instant::now();
    let answer = post_text(ctx.http, &url, body).await;
    let answered = sent.elapsed();
    let mut ok = false;
    match (&answer, kind) {
        (Ok((200, bytes)), RepKind::Control { .. }) => {
            rep.api = Some(answered);
            rep.answer_bytes = bytes.len();
            match serde_json::from_slice::<Answer>(bytes) {
                Ok(a) => {
                    rep.summary = Some(a.summary);
                    ok = true;
                    if a.summary.delivered != ctx.connected {
                        notes.push(format!(
                            "{label}: the answer says {} delivered, {} offline, {} rejected; {} clients are connected",
                            a.summary.delivered, a.summary.offline, a.summary.rejected, ctx.connected
                        ));
                    }
                }
                Err(e) => notes.push(format!("{label}: the answer has no summary: {e}")),
            }
        }
        (Ok((201, bytes)), RepKind::Message) => {
            rep.api = Some(answered);
            rep.answer_bytes = bytes.len();
            ok = true;
        }
        (Ok((s, b)), _) => notes.push(format!("{label}: {}", why(*s, b))),
        (Err(e), _) => notes.push(format!("{label}: {e}")),
    }
    let slot = &ctx.slots[slot_index];
    let all = ctx.connected;
    let reached = if ok {
        wait_for(MEMBERS_WAIT, || slot.count.load(Ordering::SeqCst) >= all).await
    } else {
        false
    };
    let cpu_b = CpuMark::take_with_db(ctx.gw.pid(), ctx.db_pid);
    let snap_b = snapshot(ctx.http, &ctx.base).await;
    let (s, b) = cpu_a.used(&cpu_b);
    rep.server_cpu_ms = s.map(|x| x * 1e3);
    rep.bench_cpu_ms = b.map(|x| x * 1e3);
    rep.db_cpu_ms = cpu_a.db_used(&cpu_b).map(|x| x * 1e3);
    if let (Some(a), Some(b)) = (&snap_a, &snap_b) {
        rep.storage = Some(StorageView::of(a, b));
    }
    let mut times = slot.times.lock().unwrap().clone();
    times.sort_unstable();
    rep.reached = times.len();
    let since = |ns: Option<u64>| ns.map(|ns| Duration::from_nanos(ns.saturating_sub(t0)));
    rep.first = since(times.first().copied());
    rep.p50 = since(pct(&times, 50.0));
    rep.p90 = since(pct(&times, 90.0));
    if reached {
        rep.last = since(times.last().copied());
    } else if ok {
        notes.push(format!(
            "{label}: {} of {all} clients had it {} s after the request",
            rep.reached,
            MEMBERS_WAIT.as_secs()
        ));
    }
    // The request's webhooks, so that the next request starts on an idle gateway.
    if ctx.webhooks && ok {
        let (done, what) = match kind {
            RepKind::Control { .. } => {
                let want = delivered_before + rep.summary.map_or(all, |s| s.delivered) as u64;
                (
                    wait_for(ctx.webhook_wait, || ctx.hooks.delivered() >= want).await,
                    "control.delivered",
                )
            }
            RepKind::Message => (
                wait_for(ctx.webhook_wait, || ctx.hooks.messages() > messages_before).await,
                "message.created",
            ),
        };
        if done {
            rep.hooks_done = Some(sent.elapsed());
        } else {
            notes.push(format!(
                "{label}: its {what} webhooks were not all in {} s after the request ({} control.delivered, {} message.created arrived)",
                ctx.webhook_wait.as_secs(),
                ctx.hooks.delivered() - delivered_before,
                ctx.hooks.messages() - messages_before
            ));
        }
    }
    eprintln!(
        "[{}] {label}: answer after {}, last of {} clients after {}, webhooks after {}",
        ctx.tag,
        ms_d(rep.api),
        rep.reached,
        ms_d(rep.last),
        ms_d(rep.hooks_done)
    );
    rep
}

async fn fanout(
    opts: &Options,
    storage: &Storage,
    engine: Engine,
    hooks: &Hooks,
    hook_url: &str,
    http: &reqwest::Client,
) -> FanoutResult {
    let n = opts.users;
    let mut r = FanoutResult {
        engine,
        users: n,
        connected: 0,
        connect_failures: BTreeMap::new(),
        connect_time: Duration::ZERO,
        group_create: None,
        idle_wait: None,
        controls: Vec::new(),
        high: None,
        messages: Vec::new(),
        server_rss_mib: None,
        notes: Vec::new(),
    };
    let tag = log_tag(storage, engine, "fan-out");
    let gw = match start_gateway(hook_url, opts, storage, engine).await {
        Ok(gw) => gw,
        Err(e) => {
            r.notes.push(format!("{e:#}"));
            return r;
        }
    };
    let base = format!("http://{}", gw.addr);
    let Ok(server) = gw.addr.parse::<SocketAddr>() else {
        r.notes.push(format!("bad gateway address {}", gw.addr));
        storage.finish(gw).await;
        return r;
    };
    let users: Vec<String> = (0..n).map(|i| format!("cu{i:05}")).collect();
    match create_group(http, &base, &users).await {
        Ok(t) => r.group_create = Some(t),
        Err(e) => r.notes.push(format!("{e}; no message baseline")),
    }
    let users_json = serde_json::to_string(&users).unwrap_or_else(|_| "[]".into());
    let urls: Vec<String> = tokio::task::spawn_blocking(move || {
        users
            .iter()
            .map(|u| {
                format!(
                    "ws://{server}/v1/ws?token={}",
                    plugboard::auth::mint_token(u, None, None, JWT_SECRET.as_bytes())
                )
            })
            .collect()
    })
    .await
    .unwrap_or_default();
    eprintln!("[{tag}] opening {n} client connections");
    let (conns, failures, took) =
        connect_many(server, urls, opts.concurrency, opts.sources, 0).await;
    r.connect_failures = failures;
    r.connect_time = took;
    let slot_count = 2 * opts.repeats + 1;
    let slots: Arc<Vec<Slot>> = Arc::new(
        (0..slot_count)
            .map(|_| Slot {
                count: AtomicUsize::new(0),
                times: Mutex::new(Vec::with_capacity(n)),
            })
            .collect(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let ended: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let mut tasks = Vec::new();
    for ws in conns.into_iter().flatten() {
        r.connected += 1;
        let slots = slots.clone();
        let mut stop = stop_rx.clone();
        let ended = ended.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = ws;
            loop {
                tokio::select! {
                    biased;
                    _ = stop.changed() => break,
                    msg = ws.next() => {
                        let now = now_ns();
                        let text = match &msg {
                            Some(Ok(Message::Text(t))) => t,
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                                *ended.lock().unwrap().entry(ended_by(msg)).or_default() += 1;
                                return None;
                            }
                            Some(Ok(_)) => continue,
                        };
                        // Only the benchmark's frames carry `rep`; a cheap look, no JSON parse.
                        let t = text.as_str();
                        if !t.starts_with("{\"type\":\"control\"") && !t.starts_with("{\"type\":\"message\"") {
                            continue;
                        }
                        if let Some(s) = rep_of(t).and_then(|k| slots.get(k)) {
                            s.times.lock().unwrap().push(now);
                            s.count.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
            Some(ws)
        }));
    }
    if r.connected < n {
        r.notes.push(format!(
            "{} of {n} users could not connect; the figures are for the {} connected",
            n - r.connected,
            r.connected
        ));
    }
    // Their opens are written (and their events queued, which the endpoint
    // does not subscribe to): wait until the storage writer is idle.
    let idle = wait_idle(http, &base).await;
    match idle {
        Ok(d) => r.idle_wait = Some(d),
        Err(e) => r.notes.push(format!("after the connects: {e}")),
    }
    eprintln!(
        "[{tag}] {} connected in {:.1} s; the gateway was idle {} later",
        r.connected,
        took.as_secs_f64(),
        ms_d(r.idle_wait)
    );
    sleep(Duration::from_millis(500)).await;
    let ctx = FanCtx {
        http,
        base,
        gw: &gw,
        db_pid: storage.db_pid(engine),
        tag,
        hooks,
        slots,
        users_json,
        connected: r.connected,
        webhooks: opts.webhooks,
        webhook_wait: opts.webhook_wait,
    };
    let group_ok = r.group_create.is_some();
    let mut notes = Vec::new();
    // Controls and messages alternate, so that both see the same conditions.
    for k in 0..opts.repeats {
        let kind = RepKind::Control { high: false };
        let label = run_label(storage, engine, &format!("control {k}"));
        let rep = fan_rep(&ctx, kind, label, 2 * k, &mut notes).await;
        r.controls.push(rep);
        sleep(Duration::from_millis(300)).await;
        if opts.baseline && group_ok {
            let label = run_label(storage, engine, &format!("message {k}"));
            let rep = fan_rep(&ctx, RepKind::Message, label, 2 * k + 1, &mut notes).await;
            r.messages.push(rep);
            sleep(Duration::from_millis(300)).await;
        }
    }
    r.high = Some(
        fan_rep(
            &ctx,
            RepKind::Control { high: true },
            run_label(storage, engine, "control, high"),
            2 * opts.repeats,
            &mut notes,
        )
        .await,
    );
    r.notes.extend(notes);
    r.server_rss_mib = rss_mib(gw.pid());
    let _ = stop_tx.send(true);
    let mut held = Vec::new();
    for t in tasks {
        if let Ok(Ok(Some(ws))) = timeout(Duration::from_secs(5), t).await {
            held.push(ws);
        }
    }
    for (why, c) in ended.lock().unwrap().iter() {
        r.notes
            .push(format!("{c} client connections ended early: {why}"));
    }
    storage.finish(gw).await;
    drop(held);
    r
}

// ---------------------------------------------------------------------------
// 2. Persisted controls stored per second

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reliability {
    Persisted,
    Online,
}

/// What the workers of one run share.
struct RateCtx {
    url: String,
    reliability: Reliability,
    targets: usize,
    offline_users: usize,
    next_user: AtomicU64,
    measure_from: Instant,
    stop: Instant,
}

#[derive(Default)]
struct WorkerOut {
    sent: u64,
    /// Answered 200 with the expected summary, completed inside the window.
    ok_in_window: u64,
    /// Latency of the requests started inside the window and answered 200, in ns.
    lat: Vec<u64>,
    errors: BTreeMap<String, usize>,
    unexpected: u64,
}

fn user_list(ctx: &RateCtx) -> String {
    let first = ctx
        .next_user
        .fetch_add(ctx.targets as u64, Ordering::Relaxed);
    let mut s = String::with_capacity(ctx.targets * 12 + 2);
    s.push('[');
    for j in 0..ctx.targets as u64 {
        if j > 0 {
            s.push(',');
        }
        let _ = write!(s, "\"off{:06}\"", (first + j) % ctx.offline_users as u64);
    }
    s.push(']');
    s
}

async fn rate_worker(ctx: Arc<RateCtx>, http: reqwest::Client, index: usize) -> WorkerOut {
    let mut out = WorkerOut::default();
    let reliability = match ctx.reliability {
        Reliability::Persisted => r#","reliability":"persisted""#,
        Reliability::Online => "",
    };
    let mut n = 0u64;
    loop {
        let started = Instant::now();
        if started >= ctx.stop {
            break;
        }
        let body = format!(
            r#"{{"kind":"bench.rate","payload":{{"w":{index},"n":{n}}},"targets":{{"users":{}}}{reliability}}}"#,
            user_list(&ctx)
        );
        n += 1;
        out.sent += 1;
        let answer = post_text(&http, &ctx.url, body).await;
        let done = Instant::now();
        match answer {
            Ok((200, bytes)) => {
                let expected = serde_json::from_slice::<Answer>(&bytes)
                    .ok()
                    .is_some_and(|a| {
                        let s = a.summary;
                        let want = match ctx.reliability {
                            Reliability::Persisted => s.stored,
                            Reliability::Online => s.offline,
                        };
                        s.targets == ctx.targets && want == ctx.targets
                    });
                if !expected {
                    out.unexpected += 1;
                    continue;
                }
                if done >= ctx.measure_from && done < ctx.stop {
                    out.ok_in_window += 1;
                }
                if started >= ctx.measure_from && started < ctx.stop {
                    out.lat.push(done.duration_since(started).as_nanos() as u64);
                }
            }
            Ok((s, b)) => *out.errors.entry(why(s, &b)).or_default() += 1,
            Err(e) => {
                *out.errors.entry(e).or_default() += 1;
                // Not a tight loop against a gateway that is gone.
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
    out
}

struct RateResult {
    label: String,
    engine: Engine,
    targets: usize,
    reliability: Reliability,
    in_flight: usize,
    measured: Duration,
    ok_in_window: u64,
    sent: u64,
    /// Sorted, ns.
    lat: Vec<u64>,
    errors: BTreeMap<String, usize>,
    unexpected: u64,
    storage: Option<StorageView>,
    controls_counted: Option<f64>,
    server_cores: Option<f64>,
    bench_cores: Option<f64>,
    /// The PostgreSQL server's processes, on PostgreSQL.
    db_cores: Option<f64>,
    /// PostgreSQL's counters over the measured window, on PostgreSQL.
    pg_line: Option<String>,
    /// The database file and its write-ahead log at the end (on
    /// PostgreSQL: `pg_database_size`, no WAL).
    data_bytes: (Option<u64>, Option<u64>),
    /// Controls accepted over the whole run (warm-up included).
    controls_total: Option<u64>,
    notes: Vec<String>,
}

impl RateResult {
    fn requests_per_sec(&self) -> f64 {
        self.ok_in_window as f64 / self.measured.as_secs_f64().max(1e-9)
    }
    fn rows_per_sec(&self) -> f64 {
        self.requests_per_sec() * self.targets as f64
    }
}

async fn rate_run(
    opts: &Options,
    storage: &Storage,
    engine: Engine,
    hook_url: &str,
    http: &reqwest::Client,
    reliability: Reliability,
    targets: usize,
) -> RateResult {
    let run = format!(
        "{}, {targets} target{}",
        match reliability {
            Reliability::Persisted => "persisted",
            Reliability::Online => "online-only",
        },
        if targets == 1 { "" } else { "s" }
    );
    // Side by side, on three lines: the engine, the kind, the targets.
    let label = if storage.both() {
        run_label(storage, engine, &run.replacen(", ", "\n", 1))
    } else {
        run.clone()
    };
    let tag = log_tag(storage, engine, "rate");
    let mut r = RateResult {
        label: label.clone(),
        engine,
        targets,
        reliability,
        in_flight: opts.in_flight,
        measured: opts.duration,
        ok_in_window: 0,
        sent: 0,
        lat: Vec::new(),
        errors: BTreeMap::new(),
        unexpected: 0,
        storage: None,
        controls_counted: None,
        server_cores: None,
        bench_cores: None,
        db_cores: None,
        pg_line: None,
        data_bytes: (None, None),
        controls_total: None,
        notes: Vec::new(),
    };
    let gw = match start_gateway(hook_url, opts, storage, engine).await {
        Ok(gw) => gw,
        Err(e) => {
            r.notes.push(format!("{e:#}"));
            return r;
        }
    };
    let base = format!("http://{}", gw.addr);
    let db_pid = storage.db_pid(engine);
    eprintln!(
        "[{tag}] {run}: {} requests in flight, {} s warm-up, {} s measured",
        opts.in_flight,
        opts.warmup.as_secs(),
        opts.duration.as_secs()
    );
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + opts.warmup;
    let stop = measure_from + opts.duration;
    let ctx = Arc::new(RateCtx {
        url: format!("{base}/v1/control"),
        reliability,
        targets,
        offline_users: opts.offline_users.max(targets),
        next_user: AtomicU64::new(0),
        measure_from,
        stop,
    });
    let workers: Vec<JoinHandle<WorkerOut>> = (0..opts.in_flight)
        .map(|i| {
            let ctx = ctx.clone();
            let http = http.clone();
            tokio::spawn(async move {
                sleep_until(start).await;
                rate_worker(ctx, http, i).await
            })
        })
        .collect();
    sleep_until(measure_from).await;
    let snap_a = snapshot(http, &base).await;
    let pg_a = storage.pg_stats(&gw).await;
    let cpu_a = CpuMark::take_with_db(gw.pid(), db_pid);
    sleep_until(stop).await;
    let cpu_b = CpuMark::take_with_db(gw.pid(), db_pid);
    let snap_b = snapshot(http, &base).await;
    let pg_b = storage.pg_stats(&gw).await;
    (r.server_cores, r.bench_cores) = cpu_a.cores(&cpu_b);
    r.db_cores = cpu_a.db_cores(&cpu_b);
    if let (Some(a), Some(b)) = (&pg_a, &pg_b) {
        r.pg_line = Some(a.line(b, opts.duration.as_secs_f64()));
    }
    if let (Some(a), Some(b)) = (&snap_a, &snap_b) {
        r.storage = Some(StorageView::of(a, b));
        r.controls_counted =
            Some(b.sum("plugboard_controls_total") - a.sum("plugboard_controls_total"));
    } else {
        r.notes
            .push("GET /metrics failed; no storage figures".to_string());
    }
    for w in workers {
        match timeout(REQUEST_TIMEOUT + Duration::from_secs(5), w).await {
            Ok(Ok(out)) => {
                r.ok_in_window += out.ok_in_window;
                r.sent += out.sent;
                r.lat.extend(out.lat);
                r.unexpected += out.unexpected;
                for (k, v) in out.errors {
                    *r.errors.entry(k).or_default() += v;
                }
            }
            Ok(Err(e)) => r.notes.push(format!("a worker failed: {e}")),
            Err(_) => r
                .notes
                .push("a worker did not finish its last request in time".to_string()),
        }
    }
    r.controls_total = snapshot(http, &base)
        .await
        .map(|end| end.sum("plugboard_controls_total") as u64);
    r.lat.sort_unstable();
    r.data_bytes = data_bytes(storage, &gw).await;
    eprintln!(
        "[{tag}] {run}: {} requests/s, {} target rows/s, p50 {}, p99 {}",
        thousands(r.requests_per_sec()),
        thousands(r.rows_per_sec()),
        ms_ns(pct(&r.lat, 50.0)),
        ms_ns(pct(&r.lat, 99.0))
    );
    storage.finish(gw).await;
    r
}

// ---------------------------------------------------------------------------
// Figures

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

/// Prints a table: a header of column labels, rows of (name, cells).
fn table(labels: &[String], rows: &[(String, Vec<String>)]) {
    let rows: Vec<(String, Vec<String>, String)> = rows
        .iter()
        .map(|(name, cells)| (name.clone(), cells.clone(), String::new()))
        .collect();
    print_table(labels, &rows, None);
}

/// "min … / median … / max …" of some durations.
fn spread(mut d: Vec<Duration>) -> String {
    d.sort_unstable();
    if d.is_empty() {
        return "-".into();
    }
    format!(
        "min {} / median {} / max {} (of {})",
        ms_d(d.first().copied()),
        ms_d(Some(d[(d.len() - 1) / 2])),
        ms_d(d.last().copied()),
        d.len()
    )
}

fn rep_table(reps: &[&Rep]) {
    let labels: Vec<String> = reps.iter().map(|r| r.label.clone()).collect();
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&Rep) -> String| {
        rows.push((name.to_string(), reps.iter().map(|r| f(r)).collect()));
    };
    row("HTTP answer", &|r| ms_d(r.api));
    row("first client", &|r| ms_d(r.first));
    row("half the clients", &|r| ms_d(r.p50));
    row("90% of the clients", &|r| ms_d(r.p90));
    row("last client", &|r| ms_d(r.last));
    row("clients reached", &|r| r.reached.to_string());
    row("answer: delivered", &|r| {
        r.summary.map_or("-".into(), |s| s.delivered.to_string())
    });
    row("answer size", &|r| thousands(r.answer_bytes as f64) + " B");
    row("webhooks all in", &|r| {
        r.hooks_done
            .map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()))
    });
    row("storage transactions", &|r| {
        r.storage
            .as_ref()
            .map_or("-".into(), |s| format!("{:.0}", s.transactions))
    });
    row("time in transactions", &|r| {
        r.storage
            .as_ref()
            .map_or("-".into(), |s| format!("{:.1} ms", s.busy_secs * 1e3))
    });
    row("longest transaction", &|r| {
        r.storage
            .as_ref()
            .map_or("-".into(), |s| bound_ms(s.longest_bound))
    });
    row("gateway CPU", &|r| {
        r.server_cpu_ms.map_or("-".into(), |c| format!("{c:.0} ms"))
    });
    if reps.iter().any(|r| r.db_cpu_ms.is_some()) {
        row("PostgreSQL CPU", &|r| {
            r.db_cpu_ms.map_or("-".into(), |c| format!("{c:.0} ms"))
        });
    }
    row("bench CPU", &|r| {
        r.bench_cpu_ms.map_or("-".into(), |c| format!("{c:.0} ms"))
    });
    table(&labels, &rows);
}

fn report_fanout(opts: &Options, storage: &Storage, fans: &[FanoutResult]) {
    let Some(f0) = fans.first() else { return };
    println!();
    println!(
        "-- control fan-out: {} online users (one connection each, {} connected), one POST /v1/control naming all of them --",
        thousands(f0.users as f64),
        fans.iter()
            .map(|f| format!("{}{}", engine_prefix(storage, f.engine), thousands(f.connected as f64)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for f in fans {
        println!(
            "{}connecting them took {:.1} s; the gateway's storage writer was idle {} later; group `fanout` ({} members, POST /v1/groups + members in batches of 1,000) {}",
            engine_prefix(storage, f.engine),
            f.connect_time.as_secs_f64(),
            ms_d(f.idle_wait),
            thousands(f.users as f64),
            f.group_create
                .map_or("not created".into(), |d| format!("created in {}", ms_d(Some(d))))
        );
    }
    println!(
        "controls: online-only, normal priority (the last one: high); baseline: one message to the group through POST /v1/messages, to the same clients"
    );
    println!(
        "times from the start of the request; after each request the bench waits for its webhooks (one control.delivered per target, {}) before the next",
        if opts.webhooks {
            format!("at most {} s", opts.webhook_wait.as_secs())
        } else {
            "no endpoint: not waited for".to_string()
        }
    );
    println!("storage and CPU: from the start of the request until the answer and the last client");
    println!();
    let mut reps: Vec<&Rep> = Vec::new();
    for f in fans {
        reps.extend(f.controls.iter());
        reps.extend(f.high.as_ref());
    }
    if reps.is_empty() {
        println!("(no control was sent)");
    } else {
        rep_table(&reps);
    }
    let messages: Vec<&Rep> = fans.iter().flat_map(|f| f.messages.iter()).collect();
    if !messages.is_empty() {
        println!();
        rep_table(&messages);
    }
    let last = |reps: &[Rep]| reps.iter().filter_map(|r| r.last).collect::<Vec<_>>();
    let api = |reps: &[Rep]| reps.iter().filter_map(|r| r.api).collect::<Vec<_>>();
    for f in fans {
        println!();
        let prefix = engine_prefix(storage, f.engine);
        let pad = " ".repeat(prefix.chars().count());
        println!(
            "{prefix}control, normal priority: last client {}",
            spread(last(&f.controls))
        );
        println!(
            "{pad}                          HTTP answer {}",
            spread(api(&f.controls))
        );
        if let Some(h) = &f.high {
            println!(
                "{pad}control, high priority:   last client {}, HTTP answer {}",
                ms_d(h.last),
                ms_d(h.api)
            );
        }
        if !f.messages.is_empty() {
            println!(
                "{pad}baseline, group message:  last client {}",
                spread(last(&f.messages))
            );
            println!(
                "{pad}                          HTTP answer {}",
                spread(api(&f.messages))
            );
        }
        let hooks: Vec<Duration> = f.controls.iter().filter_map(|r| r.hooks_done).collect();
        if !hooks.is_empty() {
            let mut h = hooks.clone();
            h.sort_unstable();
            let med = h[(h.len() - 1) / 2].as_secs_f64();
            println!(
                "{pad}webhooks: the {} control.delivered events of one control all delivered after {:.2} s (median), {} events/s",
                thousands(f.connected as f64),
                med,
                thousands(f.connected as f64 / med.max(1e-9))
            );
        }
        if let Some(m) = f.server_rss_mib {
            println!("{pad}gateway RSS at the end: {m:.1} MiB");
        }
        for (why, n) in &f.connect_failures {
            println!("  {prefix}connect failed x{n}: {why}");
        }
        for n in &f.notes {
            println!("  {prefix}note: {n}");
        }
    }
}

fn report_rate(opts: &Options, storage: &Storage, runs: &[RateResult]) {
    println!();
    println!(
        "-- controls stored per second: every target offline (no client connected), {} requests in flight, warm-up {} s, measured {} s, a fresh gateway per run --",
        opts.in_flight,
        opts.warmup.as_secs(),
        opts.duration.as_secs()
    );
    println!(
        "persisted: \"reliability\": \"persisted\" (answered `stored`); baseline, online-only: the same requests without it (answered `offline`)"
    );
    println!(
        "targets cycle through {} offline users (off000000 …); latency: request sent → answer read, for requests sent in the window",
        thousands(opts.offline_users as f64)
    );
    println!();
    if runs.is_empty() {
        println!("(no run)");
        return;
    }
    let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&RateResult) -> String| {
        rows.push((name.to_string(), runs.iter().map(f).collect()));
    };
    row("requests in flight", &|r| r.in_flight.to_string());
    row("requests answered", &|r| {
        format!("{} req/s", thousands(r.requests_per_sec()))
    });
    row("target rows stored", &|r| {
        format!("{} rows/s", thousands(r.rows_per_sec()))
    });
    row("latency p50", &|r| ms_ns(pct(&r.lat, 50.0)));
    row("latency p99", &|r| ms_ns(pct(&r.lat, 99.0)));
    row("latency max", &|r| ms_ns(r.lat.last().copied()));
    row("latency samples", &|r| thousands(r.lat.len() as f64));
    row("errors / unexpected answers", &|r| {
        format!("{} / {}", r.errors.values().sum::<usize>(), r.unexpected)
    });
    row("controls counted by gateway", &|r| {
        r.controls_counted.map_or("-".into(), |c| {
            format!("{} /s", thousands(c / r.measured.as_secs_f64().max(1e-9)))
        })
    });
    row("storage transactions", &|r| {
        r.storage.as_ref().map_or("-".into(), |s| {
            format!(
                "{} /s",
                thousands(s.transactions / r.measured.as_secs_f64().max(1e-9))
            )
        })
    });
    row("writes per transaction", &|r| {
        r.storage
            .as_ref()
            .and_then(|s| s.writes_per_txn)
            .map_or("-".into(), |w| format!("{w:.1}"))
    });
    row("time per transaction", &|r| {
        r.storage
            .as_ref()
            .and_then(|s| s.mean_txn)
            .map_or("-".into(), |t| format!("{:.2} ms", t * 1e3))
    });
    row("writer busy", &|r| {
        r.storage.as_ref().map_or("-".into(), |s| {
            format!(
                "{:.0}%",
                100.0 * s.busy_secs / r.measured.as_secs_f64().max(1e-9)
            )
        })
    });
    row("server CPU (cores)", &|r| {
        r.server_cores.map_or("-".into(), |c| format!("{c:.2}"))
    });
    if runs.iter().any(|r| r.db_cores.is_some()) {
        row("PostgreSQL CPU (cores)", &|r| {
            r.db_cores.map_or("-".into(), |c| format!("{c:.2}"))
        });
    }
    row("bench CPU (cores)", &|r| {
        r.bench_cores.map_or("-".into(), |c| format!("{c:.2}"))
    });
    row("controls in the run, in all", &|r| {
        r.controls_total.map_or("-".into(), |c| thousands(c as f64))
    });
    row("database / WAL at the end", &|r| {
        let f = |b: Option<u64>| b.map_or("-".into(), mib);
        format!("{} / {}", f(r.data_bytes.0), f(r.data_bytes.1))
    });
    table(&labels, &rows);
    if storage.pg.is_some() {
        println!(
            "(database on PostgreSQL: pg_database_size of the gateway's database; its WAL is the server's, not counted)"
        );
    }
    println!();
    for &k in &opts.targets {
        for &engine in &storage.engines {
            let find = |rel: Reliability| {
                runs.iter()
                    .find(|r| r.engine == engine && r.targets == k && r.reliability == rel)
            };
            let (p, o) = (find(Reliability::Persisted), find(Reliability::Online));
            let Some(p) = p else { continue };
            print!(
                "{}{k} target{} per request: persisted {} req/s = {} rows/s",
                engine_prefix(storage, engine),
                if k == 1 { "" } else { "s" },
                thousands(p.requests_per_sec()),
                thousands(p.rows_per_sec())
            );
            match o {
                Some(o) if o.requests_per_sec() > 0.0 => println!(
                    "; online-only {} req/s ({:.0}% of it persisted)",
                    thousands(o.requests_per_sec()),
                    100.0 * p.requests_per_sec() / o.requests_per_sec()
                ),
                _ => println!(),
            }
        }
    }
    for r in runs {
        let label = flat(&r.label);
        if let Some(l) = &r.pg_line {
            println!("  {label}: {l}");
        }
        for (why, n) in &r.errors {
            println!("  {label}: {why} x{n}");
        }
        if r.unexpected > 0 {
            println!(
                "  {label}: {} answers whose summary did not count every target as {}",
                r.unexpected,
                match r.reliability {
                    Reliability::Persisted => "stored",
                    Reliability::Online => "offline",
                }
            );
        }
        for n in &r.notes {
            println!("  {label}: note: {n}");
        }
    }
}

// ---------------------------------------------------------------------------
// The whole run

async fn run(opts: Options) -> anyhow::Result<()> {
    let machine = machine();
    let load_start = load_average();
    eprintln!(
        "bench-control{}: {machine}; load average {load_start}",
        if opts.quick { " --quick" } else { "" }
    );
    let storage = Storage::start(opts.storage).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.in_flight.max(64))
        .build()?;
    let (hooks, hook_url) = start_hooks().await?;
    let started = Instant::now();
    let fsync_start = fsync_probe().await;

    let mut fans = Vec::new();
    if opts.fanout {
        for &engine in &storage.engines {
            fans.push(fanout(&opts, &storage, engine, &hooks, &hook_url, &http).await);
            sleep(Duration::from_secs(1)).await;
        }
    }
    let mut rates = Vec::new();
    if opts.rate {
        let mut kinds = vec![Reliability::Persisted];
        if opts.baseline {
            kinds.push(Reliability::Online);
        }
        // Each kind of run on every engine in turn, so that the engines'
        // runs of one kind are made close together.
        for &k in &opts.targets {
            for &reliability in &kinds {
                for &engine in &storage.engines {
                    let r =
                        rate_run(&opts, &storage, engine, &hook_url, &http, reliability, k).await;
                    rates.push(r);
                    sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    let load_end = load_average();
    let fsync_end = fsync_probe().await;

    println!();
    println!("== bench-control: business control messages through the gateway ==");
    println!("machine: {machine}");
    println!(
        "load average at start {load_start}, at end {load_end}; whole run {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "disk: 4 KiB write + fsync in {} (where the gateways{} keep their data): {fsync_start} at the start, {fsync_end} at the end",
        std::env::temp_dir().display(),
        if storage.pg.is_some() { " and the PostgreSQL server" } else { "" }
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("command: {}", {
        let mut c = vec!["bench-control".to_string()];
        c.extend(args);
        c.join(" ")
    });
    println!(
        "gateway: the real binary, log warn, {}; a fresh gateway for each run",
        if opts.webhooks {
            format!(
                "one webhook endpoint (events {HOOK_EVENTS}, batch_max {}) answered 204 by a receiver in this process",
                opts.webhook_batch
            )
        } else {
            "no webhook endpoint (--no-webhooks)".to_string()
        }
    );
    println!(
        "[control] rate_limit = {RATE_LIMIT}, rate_burst = {RATE_BURST} (defaults 50/s and 100: opened so that the limiter does not throttle the measurement), max_targets = {}",
        opts.max_targets()
    );
    for line in storage.header_lines() {
        println!("{line}");
    }
    if !fans.is_empty() {
        report_fanout(&opts, &storage, &fans);
    }
    if opts.rate {
        report_rate(&opts, &storage, &rates);
    }
    let other = hooks.other.load(Ordering::Relaxed);
    if opts.webhooks {
        println!();
        println!(
            "webhook receiver: {} requests; {} control.delivered, {} message.created, {} connection.opened, {} user.online, {} other events",
            thousands(hooks.requests.load(Ordering::Relaxed) as f64),
            thousands(hooks.delivered() as f64),
            thousands(hooks.messages() as f64),
            thousands(hooks.opened() as f64),
            thousands(hooks.online() as f64),
            thousands(other as f64)
        );
    }
    Ok(())
}
