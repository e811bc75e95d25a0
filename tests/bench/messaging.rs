//! `bench-messaging`: messages through the gateway (persisted, delivered,
//! written to the outbox and delivered as webhooks) beside a bare
//! tokio-tungstenite relay measured the same way in the same run
//! (DESIGN.md §7: ≥ 30,000 1:1 msg/s, p99 send→deliver ≤ 20 ms at half that
//! rate; one message to a 10,000-member group, all online, in ≤ 200 ms).
//!
//! ```text
//! cargo build --release -p plugboard-tests --bin bench-messaging --bin gateway-under-test
//! ./target/release/bench-messaging [--quick] [--storage sqlite|postgres|both] [--pairs P] [--window W] [--duration SECS] ...
//! ```
//!
//! `--help` lists every option. The defaults finish in under three minutes
//! on a 2-core machine, `--storage both` included (a PostgreSQL gateway
//! that cannot keep up takes longer, every wait being bounded); `--quick`
//! is a smoke run with small sizes.
//!
//! Four measurements, each on a fresh gateway (the real binary started
//! through the test harness, one webhook endpoint served by a tiny receiver
//! in this process that answers 204 and counts events). The gateways store
//! on `--storage`:
//!
//! - `sqlite` (the default): SQLite in the gateway's temporary folder (WAL,
//!   `synchronous = FULL`);
//! - `postgres`: a fresh database per gateway on a private PostgreSQL server
//!   that this program starts first (`PgServer::start` with
//!   `PgOptions::durable()`: PostgreSQL's defaults, `fsync` and
//!   `synchronous_commit` on, a fair match for SQLite's `synchronous = FULL`),
//!   over TCP on 127.0.0.1; the database is dropped after its gateway;
//! - `both`: every gateway measurement on SQLite, then on PostgreSQL, printed
//!   side by side (a column per engine in each table); the paced runs of
//!   both engines and of the baseline are at one rate, half the lowest
//!   engine maximum.
//!
//! On PostgreSQL the figures add the server's CPU (all its processes) and
//! its WAL and commit counters (`pg_stat_wal`, `pg_stat_database`). The
//! header names the engines, PostgreSQL's version and the settings used.
//!
//! 1. **1:1 throughput and latency.** P sender connections each message
//!    their own receiver connection (person channels), each sender keeping
//!    W sends in flight (the gateway answers one connection's sends in
//!    order). After a warm-up, for D seconds: acknowledged msgs/s, msgs/s
//!    delivered at the receivers, send→deliver latency (the sender puts its
//!    send instant, in nanoseconds since a clock shared by the whole
//!    process, in the payload; the receivers compute the delay) and
//!    send→sendack latency. Then, on a fresh gateway, a paced run at half
//!    the measured maximum (or at DESIGN's 15,000 msg/s when the maximum is
//!    above 30,000; with `--storage both`, of the lowest maximum). Both
//!    report the webhook delivery rate and how far the webhooks were behind
//!    when the load stopped. With `--overload SECS`, one more run per
//!    engine, paced at twice that engine's maximum for SECS seconds, prints
//!    the gateway's peak RSS (`VmHWM`) and the acknowledged messages that
//!    never arrived.
//! 2. **The baseline** for 1:1: this same executable run with a hidden
//!    `--baseline-server` argument, a bare tokio-tungstenite relay. Clients
//!    name themselves with `?user=`; a `send` frame becomes a `message`
//!    frame on the named user's connection (bounded queue of 1,024 frames,
//!    as the gateway's) and is answered with a `sendack`. No storage, no
//!    webhooks. The same client code measures it, at its own maximum and at
//!    the gateway's paced rate.
//! 3. **Group fan-out.** A group of N members (10,000 by default), every
//!    member connected (client sockets bound to 127.0.0.2…127.0.0.9 in
//!    turn), one message sent through `POST /v1/messages`; the time from
//!    the request until the last member received it, repeated.
//! 4. **Conversation sync.** A user with C conversations (C senders each
//!    message the user through the API), then over R runs: one page of 100
//!    through the API, the full list through the API in pages of 100, and
//!    the full list through `sync_conversations` frames with limit 500.
//! 5. **Instructions per message.** One more gateway under valgrind's
//!    callgrind (`plugboard_tests::callgrind`): one sender, one receiver,
//!    8 in flight; after a warm-up of 200 messages the counters are zeroed,
//!    N more are sent (`--instructions`, 2,000), each acknowledged,
//!    delivered and received as a webhook, and the instructions per
//!    message are printed by thread. A figure the machine's load does not
//!    move; without valgrind the phase says so and counts nothing.
//!
//! Every wait is bounded. A failure is reported, with what was seen, and is
//! not a crash: a benchmark prints figures, it asserts nothing. All traffic
//! stays on 127.0.0.x. The clients, the webhook receiver and the server share
//! the machine's cores, so every rate is a figure for the whole system.

mod cli;
mod common;

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use plugboard_tests::gateway::{API_KEY, JWT_SECRET};
use plugboard_tests::{Engine, Gateway, GatewayOptions};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use cli::StorageArg;
use common::*;

/// DESIGN.md §7.
const TARGET_RATE: f64 = 30_000.0;
const TARGET_PACED_P99_MS: f64 = 20.0;
const TARGET_FANOUT_MS: f64 = 200.0;

/// The hidden argument that turns this executable into the baseline relay.
const BASELINE_FLAG: &str = "--baseline-server";
const BASELINE_READY: &str = "baseline: listening on ";

/// Longest wait for a sender's outstanding sendacks after the load stops,
/// and for the receivers to get what was acknowledged.
const ACK_GRACE: Duration = Duration::from_secs(10);

const ONE_TO_ONE: &str = "1:1 throughput and latency";
const GROUP: &str = "Group fan-out";
const SYNC: &str = "Conversation sync";
const CONNECTIONS: &str = "Connections";
const PHASES: &str = "Phases";
const INSTRUCTIONS: &str = "Instructions per message";

/// Messages through the gateway (persisted, delivered, written to the outbox
/// and delivered as webhooks) beside a bare tokio-tungstenite relay measured
/// the same way in the same run
#[derive(Debug, Parser)]
#[command(
    name = "bench-messaging",
    args_override_self = true,
    after_help = "An option left out takes its default, or with --quick its smoke-run size."
)]
struct Cli {
    /// Small sizes for a smoke run; options given with it still apply
    #[arg(long)]
    quick: bool,

    #[command(flatten)]
    storage: cli::StorageFlag,

    /// Sender/receiver connection pairs, at least 1 [default: 200; --quick: 20]
    #[arg(long, value_name = "P", value_parser = cli::clamped(1, usize::MAX), help_heading = ONE_TO_ONE)]
    pairs: Option<usize>,
    /// Sends in flight per sender, at least 1 [default: 8; --quick: 4]
    #[arg(long, value_name = "W", value_parser = cli::clamped(1, usize::MAX), help_heading = ONE_TO_ONE)]
    window: Option<usize>,
    /// Load before measuring [default: 3; --quick: 1]
    #[arg(long, value_name = "SECS", value_parser = cli::seconds(0), help_heading = ONE_TO_ONE)]
    warmup: Option<Duration>,
    /// Measured load at the maximum rate, at least 1 [default: 10; --quick: 3]
    #[arg(long, value_name = "SECS", value_parser = cli::seconds(1), help_heading = ONE_TO_ONE)]
    duration: Option<Duration>,
    /// Measured load of the paced run, at least 1 [default: 10; --quick: 3]
    #[arg(long, value_name = "SECS", value_parser = cli::seconds(1), help_heading = ONE_TO_ONE)]
    paced_duration: Option<Duration>,
    /// Rate of the paced runs in msg/s, at least 1 [default: half the
    /// gateway's maximum, or 15000 when the maximum is above 30000]
    #[arg(long, value_name = "MSGS", value_parser = cli::clamped(1, usize::MAX), help_heading = ONE_TO_ONE)]
    paced_rate: Option<usize>,
    /// After the maximum-rate run, watch the webhook backlog drain this long
    /// at most [default: 15; --quick: 3]
    #[arg(long, value_name = "SECS", value_parser = cli::seconds(0), help_heading = ONE_TO_ONE)]
    webhook_drain: Option<Duration>,
    /// batch_max of the webhook endpoint, 1 to 1000 [default: 1, the
    /// production default]
    #[arg(long, value_name = "N", value_parser = cli::clamped(1, 1000), help_heading = ONE_TO_ONE)]
    webhook_batch: Option<usize>,
    /// Gateways without a webhook endpoint (events are still written to the
    /// outbox; nothing delivers them)
    #[arg(long, help_heading = ONE_TO_ONE)]
    no_webhooks: bool,
    /// After the paced runs, an overload run on a fresh gateway: paced at
    /// twice the maximum for SECS, printing the gateway's peak RSS and the
    /// acknowledged messages not delivered; 0 skips it [default: 0]
    #[arg(long, value_name = "SECS", value_parser = cli::seconds(0), help_heading = ONE_TO_ONE)]
    overload: Option<Duration>,

    /// Members of the group, all connected, at least 1 [default: 10000;
    /// --quick: 500]
    #[arg(long, value_name = "N", value_parser = cli::clamped(1, usize::MAX), help_heading = GROUP)]
    group_members: Option<usize>,
    /// Messages sent to it, one at a time, at least 1 [default: 5; --quick: 3]
    #[arg(long, value_name = "N", value_parser = cli::clamped(1, usize::MAX), help_heading = GROUP)]
    group_repeats: Option<usize>,

    /// Conversations of the syncing user, at least 1 [default: 1000;
    /// --quick: 100]
    #[arg(long, value_name = "N", value_parser = cli::clamped(1, usize::MAX), help_heading = SYNC)]
    conversations: Option<usize>,
    /// Runs of each kind of sync, at least 1 [default: 50; --quick: 10]
    #[arg(long, value_name = "N", value_parser = cli::clamped(1, usize::MAX), help_heading = SYNC)]
    sync_runs: Option<usize>,

    /// Connection attempts in flight at once, at least 1 [default: 200]
    #[arg(long, value_name = "C", value_parser = cli::clamped(1, usize::MAX), help_heading = CONNECTIONS)]
    concurrency: Option<usize>,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(K+1), 1 to 250
    /// [default: 8]
    #[arg(long, value_name = "K", value_parser = cli::clamped(1, 250), help_heading = CONNECTIONS)]
    sources: Option<usize>,

    /// Skip the 1:1 throughput and latency measurement (and so its baseline)
    #[arg(long, help_heading = PHASES)]
    no_one_to_one: bool,
    /// Skip the bare relay baseline of the 1:1 measurement
    #[arg(long, help_heading = PHASES)]
    no_baseline: bool,
    /// Skip the group fan-out
    #[arg(long, help_heading = PHASES)]
    no_group: bool,
    /// Skip the conversation sync
    #[arg(long, help_heading = PHASES)]
    no_sync: bool,

    /// Messages counted under valgrind's callgrind (one sender, one
    /// receiver, 8 in flight), 0 to skip [default: 2000; --quick: 300]
    #[arg(long, value_name = "N", value_parser = cli::clamped(0, 1_000_000), help_heading = INSTRUCTIONS)]
    instructions: Option<usize>,
}

#[derive(Clone, Debug)]
struct Options {
    pairs: usize,
    window: usize,
    warmup: Duration,
    duration: Duration,
    paced_duration: Duration,
    paced_rate: Option<f64>,
    webhook_drain: Duration,
    webhook_batch: usize,
    webhooks: bool,
    /// Measured load of the overload run (zero: no such run).
    overload: Duration,
    group_members: usize,
    group_repeats: usize,
    conversations: usize,
    sync_runs: usize,
    concurrency: usize,
    sources: usize,
    one_to_one: bool,
    baseline: bool,
    group: bool,
    sync: bool,
    quick: bool,
    storage: StorageArg,
    /// Messages counted under callgrind (0: no count).
    instructions: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pairs: 200,
            window: 8,
            warmup: Duration::from_secs(3),
            duration: Duration::from_secs(10),
            paced_duration: Duration::from_secs(10),
            paced_rate: None,
            webhook_drain: Duration::from_secs(15),
            webhook_batch: 1,
            webhooks: true,
            overload: Duration::ZERO,
            group_members: 10_000,
            group_repeats: 5,
            conversations: 1_000,
            sync_runs: 50,
            concurrency: 200,
            sources: 8,
            one_to_one: true,
            baseline: true,
            group: true,
            sync: true,
            quick: false,
            storage: StorageArg::Sqlite,
            instructions: 2000,
        }
    }
}

impl Options {
    fn quick() -> Self {
        Options {
            pairs: 20,
            window: 4,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(3),
            paced_duration: Duration::from_secs(3),
            webhook_drain: Duration::from_secs(3),
            group_members: 500,
            group_repeats: 3,
            conversations: 100,
            sync_runs: 10,
            quick: true,
            instructions: 300,
            ..Options::default()
        }
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
            pairs: cli.pairs.unwrap_or(base.pairs),
            window: cli.window.unwrap_or(base.window),
            warmup: cli.warmup.unwrap_or(base.warmup),
            duration: cli.duration.unwrap_or(base.duration),
            paced_duration: cli.paced_duration.unwrap_or(base.paced_duration),
            paced_rate: cli.paced_rate.map(|n| n as f64).or(base.paced_rate),
            webhook_drain: cli.webhook_drain.unwrap_or(base.webhook_drain),
            webhook_batch: cli.webhook_batch.unwrap_or(base.webhook_batch),
            webhooks: base.webhooks && !cli.no_webhooks,
            overload: cli.overload.unwrap_or(base.overload),
            group_members: cli.group_members.unwrap_or(base.group_members),
            group_repeats: cli.group_repeats.unwrap_or(base.group_repeats),
            conversations: cli.conversations.unwrap_or(base.conversations),
            sync_runs: cli.sync_runs.unwrap_or(base.sync_runs),
            concurrency: cli.concurrency.unwrap_or(base.concurrency),
            sources: cli.sources.unwrap_or(base.sources),
            one_to_one: base.one_to_one && !cli.no_one_to_one,
            baseline: base.baseline && !cli.no_baseline,
            group: base.group && !cli.no_group,
            sync: base.sync && !cli.no_sync,
            quick: base.quick,
            storage: cli.storage.storage,
            instructions: cli.instructions.unwrap_or(base.instructions),
        }
    }
}

fn main() -> ExitCode {
    // Checked before the options, which do not list it: the benchmark starts
    // this executable with it as the baseline relay.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == BASELINE_FLAG)
    {
        return baseline_server();
    }
    let opts = Options::from(Cli::parse());
    // Before anything starts: the gateways and the baseline inherit the limit.
    plugboard_tests::raise_fd_limit();
    let _ = now_ns();
    run_program("bench-messaging", run(opts))
}

// ---------------------------------------------------------------------------
// The gateway's metrics

/// The gateway's own view of an interval, as report lines.
fn metric_lines(before: &Snapshot, after: &Snapshot, secs: f64) -> Vec<String> {
    let d = |name: &str| after.sum(name) - before.sum(name);
    let mut lines = Vec::new();
    let batches = HistDelta::of(before, after, "plugboard_storage_batch_size");
    let commits = HistDelta::of(before, after, "plugboard_storage_commit_seconds");
    let msg = HistDelta::of(before, after, "plugboard_message_commit_seconds");
    let hook = HistDelta::of(before, after, "plugboard_webhook_latency_seconds");
    let lag = HistDelta::of(before, after, "plugboard_webhook_event_lag_seconds");
    let ms = |s: Option<f64>| s.map_or("-".into(), |s| format!("{:.2} ms", s * 1e3));
    let bound = |s: Option<f64>| match s {
        Some(s) if s.is_infinite() => "> largest bucket".to_string(),
        Some(s) => format!("≤ {:.1} ms", s * 1e3),
        None => "-".into(),
    };
    if batches.count > 0.0 && secs > 0.0 {
        lines.push(format!(
            "storage transactions: {:.0} ({:.0}/s), {:.1} writes each on average, {} each on average ({:.0}% of the time busy committing)",
            batches.count,
            batches.count / secs,
            batches.mean().unwrap_or(0.0),
            ms(commits.mean()),
            100.0 * commits.sum / secs
        ));
    }
    if msg.count > 0.0 {
        lines.push(format!(
            "message commit (send request to durable commit): {:.0} messages, mean {}, p50 {}, p99 {}",
            msg.count,
            ms(msg.mean()),
            bound(msg.quantile_bound(0.5)),
            bound(msg.quantile_bound(0.99))
        ));
    }
    lines.push(format!(
        "fan-out frames queued: {:.0}; dropped (queue full or gone): {:.0}",
        d("plugboard_fanout_frames_total"),
        d("plugboard_fanout_dropped_total")
    ));
    if hook.count > 0.0 {
        lines.push(format!(
            "webhook requests: {:.0} ({:.0}/s), mean {}; event creation to delivery: mean {}, p99 {}",
            hook.count,
            hook.count / secs.max(1e-9),
            ms(hook.mean()),
            ms(lag.mean()),
            bound(lag.quantile_bound(0.99))
        ));
    }
    let errors = d("plugboard_frame_errors_total");
    if errors > 0.0 {
        lines.push(format!("frame errors: {errors:.0}"));
    }
    lines
}

// ---------------------------------------------------------------------------
// The webhook receiver

// ---------------------------------------------------------------------------
// Servers

/// A gateway for one phase on `engine`, with the webhook endpoint (unless
/// `--no-webhooks`); `Gateway::start` panics when the gateway does not come
/// up, which is caught and reported.
async fn start_gateway(
    hook_url: &str,
    opts: &Options,
    storage: &Storage,
    engine: Engine,
) -> anyhow::Result<Gateway> {
    storage
        .start_gateway(engine, gateway_options(hook_url, opts))
        .await
}

/// The options of every gateway of the run.
fn gateway_options(hook_url: &str, opts: &Options) -> GatewayOptions {
    let batch = if opts.webhook_batch > 1 {
        format!("batch_max = {}\n", opts.webhook_batch)
    } else {
        String::new()
    };
    let webhooks = format!(
        "[[webhooks]]\nname = \"rx\"\nurl = {hook_url:?}\nsecret = {:?}\n{batch}",
        plugboard_tests::receiver::SECRET
    );
    let mut gw_opts = GatewayOptions::default().extra(GATEWAY_TOML);
    if opts.webhooks {
        gw_opts = gw_opts.extra(&webhooks);
    }
    gw_opts
}

/// A column label: "gateway, max" with one engine; the engine above the
/// run ("SQLite" / "max") with `--storage both`.
fn run_label(storage: &Storage, who: Option<Engine>, kind: &str) -> String {
    match (who, storage.both()) {
        (Some(e), true) => format!("{}\n{kind}", engine_name(e)),
        (Some(_), false) => format!("gateway, {kind}"),
        (None, true) => format!("baseline\n{kind}"),
        (None, false) => format!("baseline, {kind}"),
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

/// How a line of the report names an engine's figures: "SQLite: " with
/// `--storage both`, nothing with one engine.
fn engine_prefix(storage: &Storage, engine: Engine) -> String {
    if storage.both() {
        format!("{}: ", engine_name(engine))
    } else {
        String::new()
    }
}

/// The baseline relay as a child process.
async fn start_baseline() -> anyhow::Result<(Child, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg(BASELINE_FLAG)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix(BASELINE_READY) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        }
    });
    let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
        .await?
        .ok()
        .and_then(|a| a.parse::<SocketAddr>().ok());
    match addr {
        Some(a) => Ok((child, a)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the baseline relay did not report its address")
        }
    }
}

async fn stop_baseline(mut child: Child) {
    let _ = child.kill();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

/// The baseline relay: a bare tokio-tungstenite server. Binds 127.0.0.1:0
/// and prints its address. Each connection names its user with `?user=`,
/// gets a `meta` `connect` frame, and then: a `send` frame to a person
/// becomes a `message` frame queued to that user's connection (a bounded
/// queue of 1,024 frames; a full queue drops the frame, as the gateway
/// does) and is answered with a `sendack`. No storage, no webhooks.
fn baseline_server() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baseline: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("baseline: cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => {
                println!("{BASELINE_READY}{addr}");
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                eprintln!("baseline: {e}");
                return ExitCode::FAILURE;
            }
        }
        let hub: Arc<Mutex<BTreeMap<String, mpsc::Sender<Message>>>> = Arc::default();
        let next_id = Arc::new(AtomicU64::new(1));
        let mut accept_errors = 0usize;
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(relay_connection(tcp, hub.clone(), next_id.clone()));
                }
                Err(e) => {
                    accept_errors += 1;
                    if accept_errors <= 5 {
                        eprintln!("baseline: accept failed: {e}");
                    }
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

#[derive(Deserialize)]
struct RelaySend {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    channel_type: Option<String>,
    #[serde(default)]
    channel_id: Option<String>,
    #[serde(default)]
    payload: Option<Box<serde_json::value::RawValue>>,
}

// The handshake callback's error type is tungstenite's, large by its design.
#[allow(clippy::result_large_err)]
async fn relay_connection(
    tcp: TcpStream,
    hub: Arc<Mutex<BTreeMap<String, mpsc::Sender<Message>>>>,
    next_id: Arc<AtomicU64>,
) {
    let mut user: Option<String> = None;
    let callback = |req: &Request, resp: Response| {
        user = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("user="))
                .map(str::to_string)
        });
        Ok(resp)
    };
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await
    else {
        return;
    };
    let Some(user) = user else {
        let _ = ws.close(None).await;
        return;
    };
    let (tx, mut rx) = mpsc::channel::<Message>(1024);
    hub.lock().unwrap().insert(user.clone(), tx.clone());
    let hello = json!({"type": "meta", "event": "connect", "user_id": user}).to_string();
    if ws.send(Message::text(hello)).await.is_err() {
        return;
    }
    let mut seq = 0u64;
    loop {
        tokio::select! {
            frame = rx.recv() => {
                let Some(frame) = frame else { break };
                if ws.send(frame).await.is_err() {
                    break;
                }
            }
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                let reply = match serde_json::from_str::<RelaySend>(text.as_str()) {
                    Ok(f) if f.kind == "send" && f.channel_type.as_deref() == Some("person") => {
                        let to = f.channel_id.unwrap_or_default();
                        let payload = f.payload.map_or("null".to_string(), |p| p.get().to_string());
                        seq += 1;
                        let n = next_id.fetch_add(1, Ordering::Relaxed);
                        let message_id = format!("msg_{n:026}");
                        let frame = json!({
                            "type": "message",
                            "message_id": message_id,
                            "channel_type": "person",
                            "channel_id": user,
                            "sender": user,
                            "seq": seq,
                            "version": n,
                        });
                        // The payload goes in as raw JSON, as the gateway embeds it.
                        let mut text = frame.to_string();
                        text.pop();
                        text.push_str(",\"payload\":");
                        text.push_str(&payload);
                        text.push('}');
                        let target = hub.lock().unwrap().get(&to).cloned();
                        if let Some(t) = target {
                            let _ = t.try_send(Message::text(text));
                        }
                        let mut ack = json!({
                            "type": "sendack", "message_id": message_id, "channel_type": "person",
                            "channel_id": to, "seq": seq, "version": n, "duplicate": false,
                        });
                        if let Some(id) = f.id {
                            ack["id"] = id;
                        }
                        ack.to_string()
                    }
                    Ok(f) => json!({"type": "error", "code": "unknown_type", "id": f.id}).to_string(),
                    Err(_) => json!({"type": "error", "code": "malformed_frame"}).to_string(),
                };
                if ws.send(Message::text(reply)).await.is_err() {
                    break;
                }
            }
        }
    }
    let mut hub = hub.lock().unwrap();
    if hub.get(&user).is_some_and(|t| t.same_channel(&tx)) {
        hub.remove(&user);
    }
}

// ---------------------------------------------------------------------------
// Clients

/// The fields of a server frame this program reads.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
}

fn frame_of(msg: &Message) -> Option<Frame> {
    match msg {
        Message::Text(t) => serde_json::from_str(t.as_str()).ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// 1:1 load

/// What the senders and receivers of one load run share.
struct LoadCtx {
    window: usize,
    /// Per sender: time between sends (paced runs only).
    interval: Option<Duration>,
    pairs: usize,
    start: Instant,
    measure_from: Instant,
    stop: Instant,
    acked_total: AtomicU64,
    delivered_total: AtomicU64,
}

#[derive(Default)]
struct SendOut {
    sent: u64,
    sent_in_window: u64,
    acked_in_window: u64,
    acked: u64,
    /// Send to sendack, for sends made in the window, in ns.
    ack_lat: Vec<u64>,
    errors: BTreeMap<String, usize>,
    out_of_order: u64,
    unacked: u64,
    ended: Option<String>,
}

async fn sender(
    mut ws: ClientWs,
    peer: String,
    index: usize,
    ctx: Arc<LoadCtx>,
) -> (SendOut, Option<ClientWs>) {
    let mut out = SendOut::default();
    let mut pending: VecDeque<(u64, u64)> = VecDeque::with_capacity(ctx.window);
    let mut next_id = 0u64;
    let (from_ns, stop_ns) = (ns_at(ctx.measure_from), ns_at(ctx.stop));
    // Paced senders start spread over one interval, so they do not send in step.
    let mut next_due = ctx.start
        + ctx
            .interval
            .map(|i| i.mul_f64(index as f64 / ctx.pairs as f64))
            .unwrap_or_default();
    let give_up = ctx.stop + ACK_GRACE;
    sleep_until(ctx.start).await;
    loop {
        let now = Instant::now();
        let sending = now < ctx.stop;
        if !sending && pending.is_empty() {
            break;
        }
        if now >= give_up {
            out.unacked = pending.len() as u64;
            break;
        }
        let mut wrote = false;
        while sending && pending.len() < ctx.window && Instant::now() >= next_due {
            let t = now_ns();
            let frame = format!(
                r#"{{"type":"send","id":{next_id},"channel_type":"person","channel_id":"{peer}","payload":{{"t":{t}}}}}"#
            );
            if let Err(e) = ws.feed(Message::text(frame)).await {
                out.ended = Some(format!("send failed: {e}"));
                out.unacked = pending.len() as u64;
                return (out, None);
            }
            pending.push_back((next_id, t));
            next_id += 1;
            out.sent += 1;
            if (from_ns..stop_ns).contains(&t) {
                out.sent_in_window += 1;
            }
            if let Some(i) = ctx.interval {
                next_due += i;
            }
            wrote = true;
        }
        if wrote {
            if let Err(e) = ws.flush().await {
                out.ended = Some(format!("send failed: {e}"));
                out.unacked = pending.len() as u64;
                return (out, None);
            }
        }
        let wake = if sending {
            if ctx.interval.is_some() && pending.len() < ctx.window {
                next_due.min(ctx.stop)
            } else {
                ctx.stop
            }
        } else {
            give_up
        };
        tokio::select! {
            msg = ws.next() => {
                let Some(Ok(m)) = &msg else {
                    out.ended = Some(ended_by(msg));
                    out.unacked = pending.len() as u64;
                    return (out, None);
                };
                if let Message::Close(_) = m {
                    out.ended = Some(ended_by(msg));
                    out.unacked = pending.len() as u64;
                    return (out, None);
                }
                let Some(f) = frame_of(m) else { continue };
                if f.kind != "sendack" && f.kind != "error" {
                    continue;
                }
                let Some((id, t)) = pending.pop_front() else {
                    *out.errors.entry(format!("unexpected {}", f.kind)).or_default() += 1;
                    continue;
                };
                if f.id.as_ref().and_then(Value::as_u64) != Some(id) {
                    out.out_of_order += 1;
                }
                if f.kind == "error" {
                    let code = f.code.unwrap_or_default();
                    *out.errors.entry(format!("error {code}")).or_default() += 1;
                    continue;
                }
                let now = now_ns();
                out.acked += 1;
                ctx.acked_total.fetch_add(1, Ordering::SeqCst);
                if (from_ns..stop_ns).contains(&now) {
                    out.acked_in_window += 1;
                }
                if (from_ns..stop_ns).contains(&t) {
                    out.ack_lat.push(now.saturating_sub(t));
                }
            }
            _ = sleep_until(wake) => {}
        }
    }
    (out, Some(ws))
}

#[derive(Default)]
struct RecvOut {
    delivered: u64,
    delivered_in_window: u64,
    /// Send to delivery, for sends made in the window, in ns.
    lat: Vec<u64>,
    ended: Option<String>,
}

async fn receiver(
    mut ws: ClientWs,
    ctx: Arc<LoadCtx>,
    mut stop: watch::Receiver<bool>,
) -> (RecvOut, Option<ClientWs>) {
    let mut out = RecvOut::default();
    let (from_ns, stop_ns) = (ns_at(ctx.measure_from), ns_at(ctx.stop));
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws.next() => {
                let Some(Ok(m)) = &msg else {
                    out.ended = Some(ended_by(msg));
                    return (out, None);
                };
                if let Message::Close(_) = m {
                    out.ended = Some(ended_by(msg));
                    return (out, None);
                }
                let now = now_ns();
                let Some(f) = frame_of(m) else { continue };
                if f.kind != "message" {
                    continue;
                }
                let Some(t) = f.payload.as_ref().and_then(|p| p["t"].as_u64()) else {
                    continue;
                };
                out.delivered += 1;
                ctx.delivered_total.fetch_add(1, Ordering::SeqCst);
                if (from_ns..stop_ns).contains(&now) {
                    out.delivered_in_window += 1;
                }
                if (from_ns..stop_ns).contains(&t) {
                    out.lat.push(now.saturating_sub(t));
                }
            }
        }
    }
    (out, Some(ws))
}

/// How the webhooks kept up with a load run (gateway only).
#[derive(Clone, Debug, Default)]
struct HookFigures {
    /// message.created events delivered per second in the measured window.
    rate_in_window: f64,
    /// Messages acknowledged but not yet delivered as webhooks when the load stopped.
    behind_at_stop: u64,
    /// Same, as seconds of load at the acknowledged rate.
    behind_secs: f64,
    /// After the load: how long the drain was watched, and events delivered in it.
    drain_watched: Duration,
    drain_events: u64,
    /// Still undelivered at the end of the watch.
    behind_at_end: u64,
}

#[derive(Default)]
struct LoadResult {
    label: String,
    /// The gateway's engine; `None` for the baseline.
    engine: Option<Engine>,
    pairs: usize,
    window: usize,
    requested_rate: Option<f64>,
    secs: f64,
    connect_failures: BTreeMap<String, usize>,
    connect_time: Duration,
    sent_in_window: u64,
    acked_in_window: u64,
    delivered_in_window: u64,
    acked_total: u64,
    delivered_total: u64,
    unacked: u64,
    out_of_order: u64,
    errors: BTreeMap<String, usize>,
    ended: BTreeMap<String, usize>,
    /// Sorted, ns.
    deliver_lat: Vec<u64>,
    ack_lat: Vec<u64>,
    server_cores: Option<f64>,
    bench_cores: Option<f64>,
    /// The PostgreSQL server's processes, on PostgreSQL.
    db_cores: Option<f64>,
    server_rss_mib: Option<f64>,
    /// The most the gateway ever held resident, read after the run.
    server_peak_rss_mib: Option<f64>,
    /// An overload run (paced at twice the maximum).
    overload: bool,
    hooks: Option<HookFigures>,
    metrics: Vec<String>,
    notes: Vec<String>,
}

impl LoadResult {
    fn rate(&self, n: u64) -> f64 {
        if self.secs > 0.0 {
            n as f64 / self.secs
        } else {
            0.0
        }
    }
    fn acked_rate(&self) -> f64 {
        self.rate(self.acked_in_window)
    }
}

/// Where the servers of a load run are.
struct Target<'a> {
    label: String,
    /// The gateway's engine; `None` for the baseline.
    engine: Option<Engine>,
    server: SocketAddr,
    pid: u32,
    /// The PostgreSQL server's postmaster, on PostgreSQL.
    db_pid: Option<u32>,
    storage: &'a Storage,
    /// Gateway: mint tokens; baseline: `?user=`.
    gateway: Option<&'a Gateway>,
    hooks: Option<&'a Hooks>,
    http: &'a reqwest::Client,
}

impl Target<'_> {
    fn url(&self, user: &str) -> String {
        match self.gateway {
            Some(gw) => format!(
                "ws://{}/v1/ws?token={}",
                self.server,
                gw.token(user, None, None)
            ),
            None => format!("ws://{}/v1/ws?user={user}", self.server),
        }
    }
}

/// One 1:1 load run: P pairs, W in flight per sender, at the maximum rate
/// (`rate` None) or paced at `rate` msg/s in all.
async fn load_run(
    t: &Target<'_>,
    opts: &Options,
    rate: Option<f64>,
    measure: Duration,
    drain: Duration,
) -> LoadResult {
    let p = opts.pairs;
    let mut r = LoadResult {
        label: t.label.clone(),
        engine: t.engine,
        pairs: p,
        window: opts.window,
        requested_rate: rate,
        ..LoadResult::default()
    };
    let senders: Vec<String> = (0..p).map(|i| format!("s{i:05}")).collect();
    let receivers: Vec<String> = (0..p).map(|i| format!("r{i:05}")).collect();
    let urls: Vec<String> = receivers
        .iter()
        .chain(senders.iter())
        .map(|u| t.url(u))
        .collect();
    let opened_before = t.hooks.map_or(0, Hooks::opened);
    let log_label = flat(&t.label);
    eprintln!("[{log_label}] opening {} connections", 2 * p);
    let (mut conns, failures, took) =
        connect_many(t.server, urls, opts.concurrency, opts.sources, 0).await;
    r.connect_failures = failures;
    r.connect_time = took;
    let mut send_ws = conns.split_off(p);
    let mut recv_ws = conns;
    let mut pairs: Vec<(ClientWs, ClientWs, String)> = Vec::new();
    for i in 0..p {
        if let (Some(s), Some(rx)) = (send_ws[i].take(), recv_ws[i].take()) {
            pairs.push((s, rx, receivers[i].clone()));
        }
    }
    if pairs.len() < p {
        r.notes.push(format!(
            "{} of {p} pairs could not connect and are left out",
            p - pairs.len()
        ));
    }
    r.pairs = pairs.len();
    if pairs.is_empty() {
        r.notes.push("no pair connected: nothing measured".into());
        return r;
    }
    if let Some(h) = t.hooks {
        // The opens go out as webhooks too; let them pass before the load.
        let want = opened_before + 2 * pairs.len() as u64;
        if !wait_for(Duration::from_secs(30), || h.opened() >= want).await {
            r.notes.push(format!(
                "only {} of {} connection.opened webhooks had arrived 30 s after the connects; load started anyway",
                h.opened() - opened_before,
                want - opened_before
            ));
        }
    }

    // The receiver counts over the whole program (earlier gateways' events
    // too): this run's message.created events are those after this.
    let hooks_base = t.hooks.map_or(0, Hooks::messages);
    let run_hooks = |h: &Hooks| h.messages().saturating_sub(hooks_base);
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + opts.warmup;
    let ctx = Arc::new(LoadCtx {
        window: opts.window,
        interval: rate.map(|rate| Duration::from_secs_f64(pairs.len() as f64 / rate)),
        pairs: pairs.len(),
        start,
        measure_from,
        stop: measure_from + measure,
        acked_total: AtomicU64::new(0),
        delivered_total: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut recv_tasks = Vec::new();
    let mut send_tasks = Vec::new();
    for (i, (s, rx, peer)) in pairs.into_iter().enumerate() {
        recv_tasks.push(tokio::spawn(receiver(rx, ctx.clone(), stop_rx.clone())));
        send_tasks.push(tokio::spawn(sender(s, peer, i, ctx.clone())));
    }
    eprintln!(
        "[{log_label}] {} pairs, window {}, {}; warm-up {:?}, then {:?} measured",
        ctx.pairs,
        opts.window,
        rate.map_or("maximum rate".to_string(), |r| format!(
            "paced at {r:.0} msg/s"
        )),
        opts.warmup,
        measure
    );

    sleep_until(measure_from).await;
    let cpu_a = CpuMark::take_with_db(t.pid, t.db_pid);
    let hooks_a = t.hooks.map(run_hooks);
    let snap_a = match t.gateway {
        Some(gw) => snapshot(t.http, &format!("http://{}", gw.addr)).await,
        None => None,
    };
    let pg_a = match t.gateway {
        Some(gw) => t.storage.pg_stats(gw).await,
        None => None,
    };
    sleep_until(ctx.stop).await;
    let cpu_b = CpuMark::take_with_db(t.pid, t.db_pid);
    let hooks_b = t.hooks.map(run_hooks);
    let acked_at_stop = ctx.acked_total.load(Ordering::SeqCst);
    r.server_rss_mib = rss_mib(t.pid);
    let snap_b = match t.gateway {
        Some(gw) => snapshot(t.http, &format!("http://{}", gw.addr)).await,
        None => None,
    };
    let pg_b = match t.gateway {
        Some(gw) => t.storage.pg_stats(gw).await,
        None => None,
    };
    r.secs = measure.as_secs_f64();
    (r.server_cores, r.bench_cores) = cpu_a.cores(&cpu_b);
    r.db_cores = cpu_a.db_cores(&cpu_b);
    if let (Some(a), Some(b)) = (&snap_a, &snap_b) {
        r.metrics = metric_lines(a, b, r.secs);
    }
    if let (Some(a), Some(b)) = (&pg_a, &pg_b) {
        r.metrics.push(a.line(b, r.secs));
    }

    // Senders wait for their last acks; then the receivers for what was acknowledged.
    let mut held: Vec<ClientWs> = Vec::new();
    for h in send_tasks {
        match timeout(ACK_GRACE + Duration::from_secs(5), h).await {
            Ok(Ok((o, ws))) => {
                r.sent_in_window += o.sent_in_window;
                r.acked_in_window += o.acked_in_window;
                r.acked_total += o.acked;
                r.unacked += o.unacked;
                r.out_of_order += o.out_of_order;
                r.ack_lat.extend(o.ack_lat);
                for (k, n) in o.errors {
                    *r.errors.entry(k).or_default() += n;
                }
                if let Some(e) = o.ended {
                    *r.ended.entry(format!("sender: {e}")).or_default() += 1;
                }
                held.extend(ws);
            }
            Ok(Err(e)) => r.notes.push(format!("a sender task failed: {e}")),
            Err(_) => r.notes.push("a sender task did not finish in time".into()),
        }
    }
    let acked = ctx.acked_total.load(Ordering::SeqCst);
    if !wait_for(ACK_GRACE, || {
        ctx.delivered_total.load(Ordering::SeqCst) >= acked
    })
    .await
    {
        r.notes.push(format!(
            "{} acknowledged messages had not reached their receiver {:?} after the last ack",
            acked.saturating_sub(ctx.delivered_total.load(Ordering::SeqCst)),
            ACK_GRACE
        ));
    }
    let _ = stop_tx.send(true);
    for h in recv_tasks {
        match timeout(Duration::from_secs(5), h).await {
            Ok(Ok((o, ws))) => {
                r.delivered_in_window += o.delivered_in_window;
                r.delivered_total += o.delivered;
                r.deliver_lat.extend(o.lat);
                if let Some(e) = o.ended {
                    *r.ended.entry(format!("receiver: {e}")).or_default() += 1;
                }
                held.extend(ws);
            }
            Ok(Err(e)) => r.notes.push(format!("a receiver task failed: {e}")),
            Err(_) => r
                .notes
                .push("a receiver task did not finish in time".into()),
        }
    }
    r.deliver_lat.sort_unstable();
    r.ack_lat.sort_unstable();
    r.server_peak_rss_mib = peak_rss_mib(t.pid);

    if let (Some(h), Some(a), Some(b)) = (t.hooks, hooks_a, hooks_b) {
        let mut f = HookFigures {
            rate_in_window: (b - a) as f64 / r.secs,
            behind_at_stop: acked_at_stop.saturating_sub(b),
            ..HookFigures::default()
        };
        f.behind_secs = f.behind_at_stop as f64 / r.acked_rate().max(1e-9);
        let all = r.acked_total;
        let drain_from = Instant::now();
        let at_drain = run_hooks(h);
        if !drain.is_zero() {
            eprintln!(
                "[{log_label}] watching the webhook backlog drain ({} behind), {:?} at most",
                all.saturating_sub(at_drain),
                drain
            );
            wait_for(drain, || run_hooks(h) >= all).await;
        }
        if !drain.is_zero() {
            f.drain_watched = drain_from.elapsed();
        }
        f.drain_events = run_hooks(h) - at_drain;
        f.behind_at_end = all.saturating_sub(run_hooks(h));
        r.hooks = Some(f);
    }
    for mut ws in held {
        let _ = timeout(Duration::from_millis(200), ws.close(None)).await;
    }
    r
}

/// The paced rate after maximum runs of `max` msg/s: half the maximum, or
/// DESIGN's 15,000 when the maximum is above 30,000.
fn paced_after(max: f64) -> f64 {
    if max > TARGET_RATE {
        TARGET_RATE / 2.0
    } else {
        (max / 2.0).max(1.0)
    }
}

/// What a gateway 1:1 run does.
#[derive(Clone, Copy)]
enum RunKind {
    /// The maximum rate for `--duration`, then the webhook drain.
    Max,
    /// Paced at this many msg/s for `--paced-duration`.
    Paced(f64),
    /// Paced at this many msg/s (twice a maximum) for `--overload`.
    Overload(f64),
}

/// One 1:1 run on a fresh gateway on `engine`.
async fn one_to_one_run(
    opts: &Options,
    storage: &Storage,
    engine: Engine,
    run: RunKind,
    hooks: &Hooks,
    hook_url: &str,
    http: &reqwest::Client,
) -> Option<LoadResult> {
    let kind = match run {
        RunKind::Max => "max",
        RunKind::Paced(_) => "paced",
        RunKind::Overload(_) => "overload",
    };
    let gw = match start_gateway(hook_url, opts, storage, engine).await {
        Ok(gw) => gw,
        Err(e) => {
            eprintln!("bench-messaging: 1:1 on the gateway: {e:#}");
            return None;
        }
    };
    let server = match gw.addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-messaging: gateway address {}: {e}", gw.addr);
            storage.finish(gw).await;
            return None;
        }
    };
    let target = Target {
        label: run_label(storage, Some(engine), kind),
        engine: Some(engine),
        server,
        pid: gw.pid(),
        db_pid: storage.db_pid(engine),
        storage,
        gateway: Some(&gw),
        hooks: opts.webhooks.then_some(hooks),
        http,
    };
    let result = match run {
        RunKind::Max => load_run(&target, opts, None, opts.duration, opts.webhook_drain).await,
        RunKind::Paced(rate) => {
            load_run(
                &target,
                opts,
                Some(rate),
                opts.paced_duration,
                Duration::ZERO,
            )
            .await
        }
        RunKind::Overload(rate) => LoadResult {
            overload: true,
            ..load_run(&target, opts, Some(rate), opts.overload, Duration::ZERO).await
        },
    };
    storage.finish(gw).await;
    Some(result)
}

/// The gateway side of the 1:1 runs: maximum rate on each engine, then
/// paced on each, each on a fresh gateway. The paced rate is
/// `--paced-rate`, else [`paced_after`] the lowest maximum. Returns the
/// maximum runs, the paced runs (in the engines' order), the paced rate
/// and, with `--overload`, each engine's run at twice its own maximum.
async fn one_to_one_gateway(
    opts: &Options,
    storage: &Storage,
    hooks: &Hooks,
    hook_url: &str,
    http: &reqwest::Client,
) -> (
    Vec<LoadResult>,
    Vec<LoadResult>,
    Option<f64>,
    Vec<LoadResult>,
) {
    let mut max_runs = Vec::new();
    for &engine in &storage.engines {
        let run = one_to_one_run(opts, storage, engine, RunKind::Max, hooks, hook_url, http);
        if let Some(r) = run.await {
            max_runs.push(r);
        }
        sleep(Duration::from_secs(1)).await;
    }
    let lowest = max_runs
        .iter()
        .map(LoadResult::acked_rate)
        .min_by(f64::total_cmp);
    let paced_rate = opts
        .paced_rate
        .or(lowest.map(paced_after))
        .unwrap_or(TARGET_RATE / 2.0);
    let mut paced_runs = Vec::new();
    for &engine in &storage.engines {
        let kind = RunKind::Paced(paced_rate);
        let run = one_to_one_run(opts, storage, engine, kind, hooks, hook_url, http);
        if let Some(r) = run.await {
            paced_runs.push(r);
        }
        sleep(Duration::from_secs(1)).await;
    }
    let mut overload_runs = Vec::new();
    if !opts.overload.is_zero() {
        for max in &max_runs {
            let (Some(engine), rate) = (max.engine, 2.0 * max.acked_rate().max(1.0)) else {
                continue;
            };
            let kind = RunKind::Overload(rate);
            let run = one_to_one_run(opts, storage, engine, kind, hooks, hook_url, http);
            if let Some(r) = run.await {
                overload_runs.push(r);
            }
            sleep(Duration::from_secs(1)).await;
        }
    }
    (max_runs, paced_runs, Some(paced_rate), overload_runs)
}

async fn one_to_one_baseline(
    opts: &Options,
    storage: &Storage,
    paced_rate: Option<f64>,
    http: &reqwest::Client,
) -> (Option<LoadResult>, Option<LoadResult>) {
    let mut out: [Option<LoadResult>; 2] = [None, None];
    let mut rate = paced_rate;
    for (k, slot) in out.iter_mut().enumerate() {
        let (child, server) = match start_baseline().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("bench-messaging: baseline: {e:#}");
                return (None, None);
            }
        };
        let target = Target {
            label: run_label(storage, None, if k == 0 { "max" } else { "paced" }),
            engine: None,
            server,
            pid: child.id(),
            db_pid: None,
            storage,
            gateway: None,
            hooks: None,
            http,
        };
        let result = if k == 0 {
            load_run(&target, opts, None, opts.duration, Duration::ZERO).await
        } else {
            let r = rate.unwrap_or(TARGET_RATE / 2.0);
            load_run(&target, opts, Some(r), opts.paced_duration, Duration::ZERO).await
        };
        if k == 0 && rate.is_none() {
            rate = Some(paced_after(result.acked_rate()));
        }
        *slot = Some(result);
        stop_baseline(child).await;
    }
    let [a, b] = out;
    (a, b)
}

// ---------------------------------------------------------------------------
// Server API calls

/// One API request: (status, body, bytes of the body).
async fn api(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value, usize), String> {
    let mut req = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(API_KEY)
        .timeout(Duration::from_secs(30));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer failed: {e}"))?;
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, v, bytes.len()))
}

fn short(v: &Value) -> String {
    v.to_string().chars().take(200).collect()
}

// ---------------------------------------------------------------------------
// Group fan-out

/// What the member connections record for one message.
struct RepSlot {
    count: AtomicUsize,
    /// Receive instants (ns on the shared clock), one per member.
    times: Mutex<Vec<u64>>,
}

/// One message to the group; times from the start of the request.
#[derive(Default)]
struct Rep {
    api: Option<Duration>,
    first: Option<Duration>,
    p50: Option<Duration>,
    p90: Option<Duration>,
    last: Option<Duration>,
    reached: usize,
    /// CPU used from the request to the last member, in ms.
    server_cpu_ms: Option<f64>,
    bench_cpu_ms: Option<f64>,
    /// The PostgreSQL server's, on PostgreSQL.
    db_cpu_ms: Option<f64>,
}

struct FanoutResult {
    engine: Engine,
    members: usize,
    connected: usize,
    connect_failures: BTreeMap<String, usize>,
    connect_time: Duration,
    group_create: Option<Duration>,
    reps: Vec<Rep>,
    metrics: Vec<String>,
    server_rss_mib: Option<f64>,
    notes: Vec<String>,
}

async fn fanout(
    opts: &Options,
    storage: &Storage,
    engine: Engine,
    hooks: &Hooks,
    hook_url: &str,
    http: &reqwest::Client,
) -> FanoutResult {
    let n = opts.group_members;
    let mut r = FanoutResult {
        engine,
        members: n,
        connected: 0,
        connect_failures: BTreeMap::new(),
        connect_time: Duration::ZERO,
        group_create: None,
        reps: Vec::new(),
        metrics: Vec::new(),
        server_rss_mib: None,
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
    let Ok(server) = gw.addr.parse::<SocketAddr>() else {
        r.notes.push(format!("bad gateway address {}", gw.addr));
        storage.finish(gw).await;
        return r;
    };
    let db_pid = storage.db_pid(engine);
    let members: Vec<String> = (0..n).map(|i| format!("gm{i:05}")).collect();
    let started = Instant::now();
    match api(
        http,
        &base,
        reqwest::Method::POST,
        "/v1/groups",
        Some(json!({"group_id": "fanout", "members": members})),
    )
    .await
    {
        Ok((201, _, _)) => r.group_create = Some(started.elapsed()),
        Ok((s, body, _)) => {
            r.notes
                .push(format!("creating the group: HTTP {s} {}", short(&body)));
            storage.finish(gw).await;
            return r;
        }
        Err(e) => {
            r.notes.push(format!("creating the group: {e}"));
            storage.finish(gw).await;
            return r;
        }
    }
    let urls: Vec<String> = tokio::task::spawn_blocking(move || {
        members
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
    let opened_before = hooks.opened();
    let tag = log_tag(storage, engine, "fan-out");
    eprintln!("[{tag}] opening {n} member connections");
    let (conns, failures, took) =
        connect_many(server, urls, opts.concurrency, opts.sources, 0).await;
    r.connect_failures = failures;
    r.connect_time = took;
    let slots: Arc<Vec<RepSlot>> = Arc::new(
        (0..opts.group_repeats)
            .map(|_| RepSlot {
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
                        // Only the benchmark's messages carry `rep`; a cheap look, no JSON parse.
                        if !text.as_str().starts_with("{\"type\":\"message\"") {
                            continue;
                        }
                        if let Some(s) = rep_of(text.as_str()).and_then(|k| slots.get(k)) {
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
            "{} of {n} members could not connect; the figures are for the {} connected",
            n - r.connected,
            r.connected
        ));
    }
    let hooks_wait = Instant::now();
    let want = opened_before + r.connected as u64;
    if opts.webhooks && !wait_for(Duration::from_secs(60), || hooks.opened() >= want).await {
        r.notes.push(format!(
            "only {} of {} connection.opened webhooks had arrived 60 s after the connects",
            hooks.opened() - opened_before,
            r.connected
        ));
    }
    eprintln!(
        "[{tag}] {} connected in {:.1} s; their connection.opened webhooks took {:.1} s more",
        r.connected,
        took.as_secs_f64(),
        hooks_wait.elapsed().as_secs_f64()
    );
    sleep(Duration::from_millis(500)).await;
    let snap_a = snapshot(http, &base).await;
    for k in 0..opts.group_repeats {
        let mut rep = Rep::default();
        let cpu_a = CpuMark::take_with_db(gw.pid(), db_pid);
        let t0 = now_ns();
        let sent = Instant::now();
        let answer = api(
            http,
            &base,
            reqwest::Method::POST,
            "/v1/messages",
            Some(json!({"channel_type": "group", "channel_id": "fanout",
                        "payload": {"text": format!("fan-out {k}"), "rep": k}})),
        )
        .await;
        match answer {
            Ok((201, _, _)) => rep.api = Some(sent.elapsed()),
            Ok((s, body, _)) => r
                .notes
                .push(format!("message {k}: HTTP {s} {}", short(&body))),
            Err(e) => r.notes.push(format!("message {k}: {e}")),
        }
        let slot = &slots[k];
        let all = r.connected;
        let reached = wait_for(Duration::from_secs(10), || {
            slot.count.load(Ordering::SeqCst) >= all
        })
        .await;
        let cpu_b = CpuMark::take_with_db(gw.pid(), db_pid);
        if let (Some(a), Some(b)) = (cpu_a.server, cpu_b.server) {
            rep.server_cpu_ms = Some((b - a) * 1e3);
        }
        if let (Some(a), Some(b)) = (cpu_a.bench, cpu_b.bench) {
            rep.bench_cpu_ms = Some((b - a) * 1e3);
        }
        rep.db_cpu_ms = cpu_a.db_used(&cpu_b).map(|x| x * 1e3);
        let mut times = slot.times.lock().unwrap().clone();
        times.sort_unstable();
        rep.reached = times.len();
        let since = |ns: Option<u64>| ns.map(|ns| Duration::from_nanos(ns.saturating_sub(t0)));
        rep.first = since(times.first().copied());
        rep.p50 = since(pct(&times, 50.0));
        rep.p90 = since(pct(&times, 90.0));
        if reached {
            rep.last = since(times.last().copied());
        } else {
            r.notes.push(format!(
                "message {k}: {} of {all} members had it 10 s after the request",
                rep.reached
            ));
        }
        eprintln!(
            "[{tag}] message {k}: last of {} members after {}",
            rep.reached,
            ms_d(rep.last)
        );
        r.reps.push(rep);
        sleep(Duration::from_millis(700)).await;
    }
    let snap_b = snapshot(http, &base).await;
    r.server_rss_mib = rss_mib(gw.pid());
    if let (Some(a), Some(b)) = (&snap_a, &snap_b) {
        r.metrics = metric_lines(a, b, 1.0)
            .into_iter()
            .filter(|l| !l.starts_with("storage transactions") && !l.starts_with("webhook"))
            .collect();
    }
    let _ = stop_tx.send(true);
    let mut held = Vec::new();
    for t in tasks {
        if let Ok(Ok(Some(ws))) = timeout(Duration::from_secs(5), t).await {
            held.push(ws);
        }
    }
    for (why, c) in ended.lock().unwrap().iter() {
        r.notes
            .push(format!("{c} member connections ended early: {why}"));
    }
    storage.finish(gw).await;
    drop(held);
    r
}

// ---------------------------------------------------------------------------
// Conversation sync

#[derive(Default)]
struct SyncKind {
    /// Sorted.
    times: Vec<Duration>,
    pages: usize,
    bytes: usize,
    conversations: usize,
    failures: BTreeMap<String, usize>,
}

impl SyncKind {
    fn fail(&mut self, why: String) {
        *self.failures.entry(why).or_default() += 1;
    }
}

struct SyncResult {
    engine: Engine,
    conversations: usize,
    fill_time: Option<Duration>,
    fill_failures: BTreeMap<String, usize>,
    api_page: SyncKind,
    api_full: SyncKind,
    ws_full: SyncKind,
    metrics: Vec<String>,
    notes: Vec<String>,
}

/// The full list through the API in pages of 100: (pages, conversations, bytes).
async fn api_full_list(
    http: &reqwest::Client,
    base: &str,
    user: &str,
) -> Result<(usize, usize, usize), String> {
    let mut query = "limit=100".to_string();
    let (mut pages, mut convs, mut bytes) = (0, 0, 0);
    loop {
        let (s, body, n) = api(
            http,
            base,
            reqwest::Method::GET,
            &format!("/v1/users/{user}/conversations?{query}"),
            None,
        )
        .await?;
        if s != 200 {
            return Err(format!("HTTP {s} {}", short(&body)));
        }
        pages += 1;
        bytes += n;
        convs += body["conversations"].as_array().map_or(0, Vec::len);
        if body["more"] != true {
            return Ok((pages, convs, bytes));
        }
        let Some(cursor) = body["cursor"].as_str() else {
            return Err("`more` without a `cursor`".into());
        };
        query = format!("cursor={cursor}&limit=100");
        if pages > 10_000 {
            return Err("more than 10,000 pages".into());
        }
    }
}

/// The full list through `sync_conversations` frames with limit 500.
async fn ws_full_list(ws: &mut ClientWs, run: usize) -> Result<(usize, usize, usize), String> {
    let mut frame = json!({"type": "sync_conversations", "limit": 500});
    let (mut pages, mut convs, mut bytes) = (0, 0, 0);
    loop {
        let id = format!("sync-{run}-{pages}");
        frame["id"] = json!(id);
        ws.send(Message::text(frame.to_string()))
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let body = loop {
            match timeout_at(deadline, ws.next()).await {
                Err(_) => return Err("no answer within 30 s".into()),
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if v["id"] == id.as_str() {
                        bytes += t.len();
                        break v;
                    }
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                    return Err("the connection ended".into())
                }
                Ok(Some(Ok(_))) => {}
            }
        };
        if body["type"] != "conversations" {
            return Err(format!("answer: {}", short(&body)));
        }
        pages += 1;
        convs += body["conversations"].as_array().map_or(0, Vec::len);
        if body["more"] != true {
            return Ok((pages, convs, bytes));
        }
        frame = json!({"type": "sync_conversations", "limit": 500, "cursor": body["cursor"]});
        if pages > 10_000 {
            return Err("more than 10,000 pages".into());
        }
    }
}

async fn conversation_sync(
    opts: &Options,
    storage: &Storage,
    engine: Engine,
    hooks: &Hooks,
    hook_url: &str,
    http: &reqwest::Client,
) -> SyncResult {
    let n = opts.conversations;
    let mut r = SyncResult {
        engine,
        conversations: n,
        fill_time: None,
        fill_failures: BTreeMap::new(),
        api_page: SyncKind::default(),
        api_full: SyncKind::default(),
        ws_full: SyncKind::default(),
        metrics: Vec::new(),
        notes: Vec::new(),
    };
    let tag = log_tag(storage, engine, "sync");
    let gw = match start_gateway(hook_url, opts, storage, engine).await {
        Ok(gw) => gw,
        Err(e) => {
            r.notes.push(format!("{e:#}"));
            return r;
        }
    };
    let base = format!("http://{}", gw.addr);
    let user = "inbox";
    eprintln!("[{tag}] {n} senders message `{user}` through the API, 16 at a time");
    let messages_before = hooks.messages();
    let started = Instant::now();
    let semaphore = Arc::new(Semaphore::new(16));
    let mut sends = Vec::new();
    for i in 0..n {
        let Ok(permit) = semaphore.clone().acquire_owned().await else {
            break;
        };
        let (http, base) = (http.clone(), base.clone());
        sends.push(tokio::spawn(async move {
            let r = api(
                &http,
                &base,
                reqwest::Method::POST,
                "/v1/messages",
                Some(json!({"from": format!("cs{i:05}"), "channel_type": "person",
                            "channel_id": user, "payload": {"text": format!("hello from sender {i}")}})),
            )
            .await;
            drop(permit);
            r
        }));
    }
    for s in sends {
        match s.await {
            Ok(Ok((201, _, _))) => {}
            Ok(Ok((st, body, _))) => {
                *r.fill_failures
                    .entry(format!("HTTP {st} {}", short(&body)))
                    .or_default() += 1
            }
            Ok(Err(e)) => *r.fill_failures.entry(e).or_default() += 1,
            Err(e) => *r.fill_failures.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    r.fill_time = Some(started.elapsed());
    let want = messages_before + n as u64;
    if opts.webhooks && !wait_for(Duration::from_secs(30), || hooks.messages() >= want).await {
        r.notes.push(format!(
            "the message.created webhooks had not all arrived 30 s after the sends ({} of {n})",
            hooks.messages() - messages_before
        ));
    }
    let Ok(server) = gw.addr.parse::<SocketAddr>() else {
        r.notes.push(format!("bad gateway address {}", gw.addr));
        storage.finish(gw).await;
        return r;
    };
    let url = format!("ws://{server}/v1/ws?token={}", gw.token(user, None, None));
    let mut ws = match connect_one(
        server,
        Ipv4Addr::new(127, 0, 0, 2),
        &url,
        Instant::now() + Duration::from_secs(30),
    )
    .await
    {
        Ok(ws) => Some(ws),
        Err(e) => {
            r.notes
                .push(format!("the syncing client could not connect: {e}"));
            None
        }
    };
    let snap_a = snapshot(http, &base).await;
    eprintln!(
        "[{tag}] {} runs of each sync, after one unrecorded warm-up run",
        opts.sync_runs
    );
    for run in 0..=opts.sync_runs {
        if run == 1 {
            // Run 0 warmed up the connections and caches: start recording.
            r.api_page = SyncKind::default();
            r.api_full = SyncKind::default();
            r.ws_full = SyncKind::default();
        }
        // One page of 100 through the API.
        let t = Instant::now();
        match api(
            http,
            &base,
            reqwest::Method::GET,
            &format!("/v1/users/{user}/conversations?limit=100"),
            None,
        )
        .await
        {
            Ok((200, body, bytes)) => {
                r.api_page.times.push(t.elapsed());
                r.api_page.pages = 1;
                r.api_page.bytes = bytes;
                r.api_page.conversations = body["conversations"].as_array().map_or(0, Vec::len);
            }
            Ok((s, body, _)) => r.api_page.fail(format!("HTTP {s} {}", short(&body))),
            Err(e) => r.api_page.fail(e),
        }
        // The full list through the API.
        let t = Instant::now();
        match api_full_list(http, &base, user).await {
            Ok((pages, convs, bytes)) => {
                r.api_full.times.push(t.elapsed());
                (r.api_full.pages, r.api_full.conversations, r.api_full.bytes) =
                    (pages, convs, bytes);
            }
            Err(e) => r.api_full.fail(e),
        }
        // The full list through frames.
        if let Some(c) = ws.as_mut() {
            let t = Instant::now();
            match ws_full_list(c, run).await {
                Ok((pages, convs, bytes)) => {
                    r.ws_full.times.push(t.elapsed());
                    (r.ws_full.pages, r.ws_full.conversations, r.ws_full.bytes) =
                        (pages, convs, bytes);
                }
                Err(e) => {
                    r.ws_full.fail(e);
                    ws = None;
                }
            }
        }
    }
    for k in [&mut r.api_page, &mut r.api_full, &mut r.ws_full] {
        k.times.sort_unstable();
    }
    if let (Some(a), Some(b)) = (&snap_a, snapshot(http, &base).await) {
        let h = HistDelta::of(a, &b, "plugboard_conversation_sync_seconds");
        if let Some(mean) = h.mean() {
            r.metrics.push(format!(
                "gateway's conversation_sync_seconds: {:.0} pages, mean {:.2} ms per page (storage read, filter chain, JSON)",
                h.count,
                mean * 1e3
            ));
        }
    }
    if let Some(mut c) = ws {
        let _ = timeout(Duration::from_millis(500), c.close(None)).await;
    }
    storage.finish(gw).await;
    r
}

// ---------------------------------------------------------------------------
// The whole run and the report

async fn run(opts: Options) -> anyhow::Result<()> {
    let machine = machine();
    let load_start = load_average();
    eprintln!(
        "bench-messaging{}: {machine}; load average {load_start}",
        if opts.quick { " --quick" } else { "" }
    );
    let storage = Storage::start(opts.storage).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let (hooks, hook_url) = start_hooks().await?;
    let started = Instant::now();
    let fsync_start = fsync_probe().await;

    let (mut gw_max, mut gw_paced, mut paced_rate) = (Vec::new(), Vec::new(), opts.paced_rate);
    let mut gw_overload = Vec::new();
    if opts.one_to_one {
        (gw_max, gw_paced, paced_rate, gw_overload) =
            one_to_one_gateway(&opts, &storage, &hooks, &hook_url, &http).await;
    }
    let (mut base_max, mut base_paced) = (None, None);
    if opts.one_to_one && opts.baseline {
        (base_max, base_paced) = one_to_one_baseline(&opts, &storage, paced_rate, &http).await;
        sleep(Duration::from_secs(1)).await;
    }
    let mut fans = Vec::new();
    if opts.group {
        for &engine in &storage.engines {
            fans.push(fanout(&opts, &storage, engine, &hooks, &hook_url, &http).await);
            sleep(Duration::from_secs(1)).await;
        }
    }
    let mut syncs = Vec::new();
    if opts.sync {
        for &engine in &storage.engines {
            syncs.push(conversation_sync(&opts, &storage, engine, &hooks, &hook_url, &http).await);
        }
    }
    let mut counts = Vec::new();
    if opts.instructions > 0 {
        for &engine in &storage.engines {
            counts.push(instructions(&opts, &storage, engine, &hooks, &hook_url).await);
        }
    }
    let load_end = load_average();
    let fsync_end = fsync_probe().await;

    println!();
    println!("== bench-messaging: messaging through the gateway ==");
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
        let mut c = vec!["bench-messaging".to_string()];
        c.extend(args);
        c.join(" ")
    });
    println!(
        "gateway: the real binary, log warn, {}; a fresh gateway for each run",
        if opts.webhooks {
            format!(
                "one webhook endpoint (batch_max {}) answered 204 by a receiver in this process",
                opts.webhook_batch
            )
        } else {
            "no webhook endpoint (--no-webhooks)".to_string()
        }
    );
    for line in storage.header_lines() {
        println!("{line}");
    }
    println!(
        "baseline: a bare tokio-tungstenite relay in a child process (`{BASELINE_FLAG}`): no storage, no webhooks"
    );
    if opts.one_to_one {
        let mut runs: Vec<&LoadResult> = gw_max.iter().collect();
        runs.extend(base_max.as_ref());
        runs.extend(gw_paced.iter());
        runs.extend(base_paced.as_ref());
        runs.extend(gw_overload.iter());
        report_one_to_one(&opts, &storage, &runs, paced_rate);
    }
    if !fans.is_empty() {
        report_fanout(&storage, &fans);
    }
    if !syncs.is_empty() {
        report_sync(&storage, &syncs);
    }
    if opts.instructions > 0 {
        report_instructions(&opts, &counts);
    }
    Ok(())
}

fn pct_d(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Prints a table: a header of column labels, rows of (name, cells, target).
fn table(labels: &[String], rows: &[(String, Vec<String>, String)]) {
    print_table(labels, rows, Some("target (DESIGN.md §7)"));
}

fn report_one_to_one(
    opts: &Options,
    storage: &Storage,
    runs: &[&LoadResult],
    paced_rate: Option<f64>,
) {
    println!();
    println!(
        "-- 1:1 messages: {} sender/receiver pairs, {} sends in flight per sender, warm-up {} s, measured {} s (paced {} s) --",
        opts.pairs,
        opts.window,
        opts.warmup.as_secs(),
        opts.duration.as_secs(),
        opts.paced_duration.as_secs()
    );
    println!(
        "paced runs at {} msg/s ({})",
        paced_rate.map_or("-".into(), thousands),
        if opts.paced_rate.is_some() {
            "--paced-rate"
        } else if storage.both() {
            "for both engines and the baseline: half the lower of the engines' maximums, or 15,000 when that is above 30,000"
        } else {
            "half the gateway's maximum, or 15,000 when that is above 30,000"
        }
    );
    println!("latency: send→deliver = the sender's send instant to the receiver reading the frame; send→ack = to the sendack");
    println!();
    let present: Vec<&LoadResult> = runs.to_vec();
    if present.is_empty() {
        println!("(no 1:1 run completed)");
        return;
    }
    let labels: Vec<String> = present.iter().map(|r| r.label.clone()).collect();
    let mut rows: Vec<(String, Vec<String>, String)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&LoadResult) -> String, target: &str| {
        rows.push((
            name.to_string(),
            present.iter().map(|r| f(r)).collect(),
            target.to_string(),
        ));
    };
    row("pairs connected", &|r| r.pairs.to_string(), "");
    row("sends in flight per sender", &|r| r.window.to_string(), "");
    row(
        "connecting them took",
        &|r| format!("{:.1} s", r.connect_time.as_secs_f64()),
        "",
    );
    row(
        "requested rate",
        &|r| {
            r.requested_rate
                .map_or("max".into(), |x| format!("{} msg/s", thousands(x)))
        },
        "",
    );
    row(
        "sent in window",
        &|r| format!("{} msg/s", thousands(r.rate(r.sent_in_window))),
        "",
    );
    row(
        "acknowledged (sendack)",
        &|r| format!("{} msg/s", thousands(r.acked_rate())),
        ">= 30,000 msg/s",
    );
    row(
        "delivered at receivers",
        &|r| format!("{} msg/s", thousands(r.rate(r.delivered_in_window))),
        ">= 30,000 msg/s",
    );
    row(
        "send→deliver p50",
        &|r| ms_ns(pct(&r.deliver_lat, 50.0)),
        "",
    );
    row(
        "send→deliver p99",
        &|r| ms_ns(pct(&r.deliver_lat, 99.0)),
        "<= 20 ms at 15,000 msg/s",
    );
    row(
        "send→deliver p99.9",
        &|r| ms_ns(pct(&r.deliver_lat, 99.9)),
        "",
    );
    row(
        "send→deliver max",
        &|r| ms_ns(r.deliver_lat.last().copied()),
        "",
    );
    row("send→ack p50", &|r| ms_ns(pct(&r.ack_lat, 50.0)), "");
    row("send→ack p99", &|r| ms_ns(pct(&r.ack_lat, 99.0)), "");
    row(
        "latency samples",
        &|r| thousands(r.deliver_lat.len() as f64),
        "",
    );
    row(
        "acked, not delivered",
        &|r| r.acked_total.saturating_sub(r.delivered_total).to_string(),
        "",
    );
    row(
        "errors / unacked",
        &|r| format!("{} / {}", r.errors.values().sum::<usize>(), r.unacked),
        "",
    );
    row(
        "webhooks delivered",
        &|r| {
            r.hooks.as_ref().map_or("-".into(), |h| {
                format!("{} ev/s", thousands(h.rate_in_window))
            })
        },
        "every message (formatted)",
    );
    row(
        "webhooks behind at stop",
        &|r| {
            r.hooks.as_ref().map_or("-".into(), |h| {
                format!(
                    "{} ({:.1} s)",
                    thousands(h.behind_at_stop as f64),
                    h.behind_secs
                )
            })
        },
        "",
    );
    row(
        "server CPU (cores)",
        &|r| r.server_cores.map_or("-".into(), |c| format!("{c:.2}")),
        "",
    );
    if present.iter().any(|r| r.db_cores.is_some()) {
        row(
            "PostgreSQL CPU (cores)",
            &|r| r.db_cores.map_or("-".into(), |c| format!("{c:.2}")),
            "",
        );
    }
    row(
        "bench CPU (cores)",
        &|r| r.bench_cores.map_or("-".into(), |c| format!("{c:.2}")),
        "",
    );
    row(
        "server RSS at stop",
        &|r| {
            r.server_rss_mib
                .map_or("-".into(), |m| format!("{m:.1} MiB"))
        },
        "",
    );
    row(
        "server RSS peak (VmHWM)",
        &|r| {
            r.server_peak_rss_mib
                .map_or("-".into(), |m| format!("{m:.1} MiB"))
        },
        "",
    );
    table(&labels, &rows);
    println!();
    for r in &present {
        let paced_ok = r.requested_rate.is_some();
        let p99 = pct(&r.deliver_lat, 99.0).map(|n| n as f64 / 1e6);
        let label = flat(&r.label);
        if r.engine.is_some() {
            if r.overload {
                let lost = r.acked_total.saturating_sub(r.delivered_total);
                let max_peak = present
                    .iter()
                    .find(|m| m.engine == r.engine && m.requested_rate.is_none())
                    .and_then(|m| m.server_peak_rss_mib);
                println!(
                    "{label}: offered {} msg/s (twice the maximum) for {} s: {} msg/s acknowledged; peak RSS {} (maximum-rate run: {}); {} acknowledged not delivered: {}",
                    r.requested_rate.map_or("-".into(), thousands),
                    r.secs,
                    thousands(r.acked_rate()),
                    r.server_peak_rss_mib.map_or("-".into(), |m| format!("{m:.1} MiB")),
                    max_peak.map_or("-".into(), |m| format!("{m:.1} MiB")),
                    thousands(lost as f64),
                    if lost == 0 && r.unacked == 0 { "none lost" } else { "see the notes" }
                );
            } else if paced_ok {
                println!(
                    "{label}: p99 send→deliver {} at {} msg/s: {}",
                    p99.map_or("-".into(), |p| format!("{p:.2} ms")),
                    thousands(r.acked_rate()),
                    match p99 {
                        Some(p) if p <= TARGET_PACED_P99_MS => "within 20 ms",
                        Some(_) => "over the 20 ms target",
                        None => "not measured",
                    }
                );
            } else {
                println!(
                    "{label}: {} msg/s acknowledged: {}",
                    thousands(r.acked_rate()),
                    if r.acked_rate() >= TARGET_RATE {
                        "30,000 target met"
                    } else {
                        "below the 30,000 target"
                    }
                );
            }
        }
        if let Some(h) = &r.hooks {
            if !h.drain_watched.is_zero() {
                println!(
                    "  webhooks after the load: {} events in {:.1} s ({} ev/s); {} still behind",
                    thousands(h.drain_events as f64),
                    h.drain_watched.as_secs_f64(),
                    thousands(h.drain_events as f64 / h.drain_watched.as_secs_f64().max(1e-9)),
                    thousands(h.behind_at_end as f64)
                );
            }
        }
        if r.connect_failures.values().sum::<usize>() > 0 {
            for (why, n) in &r.connect_failures {
                println!("  connect failed x{n}: {why}");
            }
        }
        for (why, n) in &r.errors {
            println!("  {why} x{n}");
        }
        if r.out_of_order > 0 {
            println!("  answers out of order: {}", r.out_of_order);
        }
        for (why, n) in &r.ended {
            println!("  ended early x{n}: {why}");
        }
        for n in &r.notes {
            println!("  note: {n}");
        }
        if r.engine.is_none()
            && (!r.connect_failures.is_empty()
                || !r.errors.is_empty()
                || r.out_of_order > 0
                || !r.ended.is_empty()
                || !r.notes.is_empty())
        {
            println!("{label}:");
        }
        if !r.metrics.is_empty() {
            if r.engine == Some(Engine::Postgres) {
                println!(
                    "  gateway /metrics and PostgreSQL's statistics over the measured window:"
                );
            } else {
                println!("  gateway /metrics over the measured window:");
            }
            for l in &r.metrics {
                println!("    {l}");
            }
        }
    }
}

fn report_fanout(storage: &Storage, fans: &[FanoutResult]) {
    let Some(f0) = fans.first() else { return };
    println!();
    println!(
        "-- group fan-out: one message through POST /v1/messages to a {}-member group, {} members connected --",
        thousands(f0.members as f64),
        fans.iter()
            .map(|f| format!("{}{}", engine_prefix(storage, f.engine), thousands(f.connected as f64)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for f in fans {
        println!(
            "{}connecting them took {:.1} s; creating the group {}",
            engine_prefix(storage, f.engine),
            f.connect_time.as_secs_f64(),
            ms_d(f.group_create)
        );
    }
    println!(
        "times from the start of the request: the API's answer (after the commit), then members receiving the frame"
    );
    println!();
    // (engine, message number, rep) for every message of every engine.
    let reps: Vec<(&FanoutResult, usize, &Rep)> = fans
        .iter()
        .flat_map(|f| f.reps.iter().enumerate().map(move |(k, r)| (f, k, r)))
        .collect();
    if reps.is_empty() {
        println!("(no message was sent)");
    } else {
        let labels: Vec<String> = reps
            .iter()
            .map(|(f, k, _)| {
                if storage.both() {
                    format!("{}\nmessage {k}", engine_name(f.engine))
                } else {
                    format!("message {k}")
                }
            })
            .collect();
        let mut rows: Vec<(String, Vec<String>, String)> = Vec::new();
        let mut row = |name: &str, g: &dyn Fn(&Rep) -> String, target: &str| {
            rows.push((
                name.to_string(),
                reps.iter().map(|(_, _, r)| g(r)).collect(),
                target.to_string(),
            ));
        };
        row("API answered", &|r| ms_d(r.api), "");
        row("first member", &|r| ms_d(r.first), "");
        row("half the members", &|r| ms_d(r.p50), "");
        row("90% of the members", &|r| ms_d(r.p90), "");
        row("last member", &|r| ms_d(r.last), "<= 200 ms");
        row("members reached", &|r| r.reached.to_string(), "");
        row(
            "gateway CPU in that time",
            &|r| r.server_cpu_ms.map_or("-".into(), |c| format!("{c:.0} ms")),
            "",
        );
        if reps.iter().any(|(_, _, r)| r.db_cpu_ms.is_some()) {
            row(
                "PostgreSQL CPU in that time",
                &|r| r.db_cpu_ms.map_or("-".into(), |c| format!("{c:.0} ms")),
                "",
            );
        }
        row(
            "bench CPU in that time",
            &|r| r.bench_cpu_ms.map_or("-".into(), |c| format!("{c:.0} ms")),
            "",
        );
        table(&labels, &rows);
    }
    println!();
    for f in fans {
        let prefix = engine_prefix(storage, f.engine);
        let mut last: Vec<Duration> = f.reps.iter().filter_map(|r| r.last).collect();
        last.sort_unstable();
        if !last.is_empty() {
            let median = last[(last.len() - 1) / 2];
            let max = *last.last().unwrap();
            println!(
                "{prefix}last member: min {} / median {} / max {} over {} messages: {}",
                ms_d(last.first().copied()),
                ms_d(Some(median)),
                ms_d(Some(max)),
                last.len(),
                if max.as_secs_f64() * 1e3 <= TARGET_FANOUT_MS {
                    "all within 200 ms"
                } else if median.as_secs_f64() * 1e3 <= TARGET_FANOUT_MS {
                    "median within 200 ms, not every message"
                } else {
                    "over the 200 ms target"
                }
            );
        }
        if let Some(m) = f.server_rss_mib {
            println!("{prefix}gateway RSS at the end: {m:.1} MiB");
        }
        for (why, n) in &f.connect_failures {
            println!("  {prefix}connect failed x{n}: {why}");
        }
        for n in &f.notes {
            println!("  {prefix}note: {n}");
        }
        if !f.metrics.is_empty() {
            println!("  {prefix}gateway /metrics over the messages:");
            for l in &f.metrics {
                println!("    {l}");
            }
        }
    }
}

fn report_sync(storage: &Storage, syncs: &[SyncResult]) {
    let Some(s0) = syncs.first() else { return };
    println!();
    println!(
        "-- conversation sync: one user with {} conversations (one message from each of {} senders) --",
        thousands(s0.conversations as f64),
        thousands(s0.conversations as f64)
    );
    for s in syncs {
        let prefix = engine_prefix(storage, s.engine);
        if let Some(t) = s.fill_time {
            println!(
                "{prefix}filling: {} API sends, 16 at a time, took {:.1} s ({} msg/s)",
                s.conversations,
                t.as_secs_f64(),
                thousands(s.conversations as f64 / t.as_secs_f64().max(1e-9))
            );
        }
        for (why, n) in &s.fill_failures {
            println!("  {prefix}send failed x{n}: {why}");
        }
    }
    if storage.both() {
        println!(
            "API, 1 page: one page of 100 through the API; API, all: the full list through the API in pages of 100; frames, all: the full list through sync_conversations frames, limit 500"
        );
    }
    println!();
    // (label, kind) for every kind of every engine.
    let mut kinds: Vec<(String, &SyncKind)> = Vec::new();
    for s in syncs {
        let three = [
            ("API, one page of 100", "API, 1 page", &s.api_page),
            ("API, full list, pages of 100", "API, all", &s.api_full),
            ("sync_conversations, limit 500", "frames, all", &s.ws_full),
        ];
        for (long, short, k) in three {
            kinds.push(if storage.both() {
                (format!("{}\n{short}", engine_name(s.engine)), k)
            } else {
                (long.to_string(), k)
            });
        }
    }
    let labels: Vec<String> = kinds.iter().map(|k| k.0.clone()).collect();
    let mut rows: Vec<(String, Vec<String>, String)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&SyncKind) -> String| {
        rows.push((
            name.to_string(),
            kinds.iter().map(|k| f(k.1)).collect(),
            "(no target)".into(),
        ));
    };
    row("runs", &|k| k.times.len().to_string());
    row("p50", &|k| ms_d(pct_d(&k.times, 50.0)));
    row("p99", &|k| ms_d(pct_d(&k.times, 99.0)));
    row("max", &|k| ms_d(k.times.last().copied()));
    row("pages / requests", &|k| k.pages.to_string());
    row("conversations", &|k| k.conversations.to_string());
    row("bytes", &|k| thousands(k.bytes as f64));
    table(&labels, &rows);
    for (name, k) in &kinds {
        for (why, n) in &k.failures {
            println!("  {}: failed x{n}: {why}", flat(name));
        }
    }
    for s in syncs {
        let prefix = engine_prefix(storage, s.engine);
        for l in &s.metrics {
            println!("  {prefix}{l}");
        }
        for n in &s.notes {
            println!("  {prefix}note: {n}");
        }
    }
}

// ---------------------------------------------------------------------------
// Instructions per message

/// Sends in flight in the counted run, as in the issue's reference figure.
const COUNTED_WINDOW: usize = 8;
/// Messages sent before the counters are zeroed.
const COUNTED_WARMUP: usize = 200;

/// What callgrind counted for one engine.
struct CountResult {
    engine: Engine,
    messages: usize,
    counts: Option<plugboard_tests::callgrind::Counts>,
    /// Wall time of the counted messages under callgrind.
    took: Duration,
    /// The writer's transactions and the writes in them over the counted
    /// messages (`plugboard_storage_batch_size`), on SQLite.
    batches: Option<(f64, f64)>,
    notes: Vec<String>,
}

/// Sends `n` messages from `sender` to `peer`, `COUNTED_WINDOW` in flight,
/// and waits until each is acknowledged and `receiver` has it. Numbered
/// from `first`.
async fn send_counted(
    sender: &mut ClientWs,
    receiver: &mut ClientWs,
    peer: &str,
    first: usize,
    n: usize,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let (mut sent, mut acked, mut got) = (0usize, 0usize, 0usize);
    while acked < n || got < n {
        while sent < n && sent - acked < COUNTED_WINDOW {
            let frame = format!(
                r#"{{"type":"send","id":{},"channel_type":"person","channel_id":"{peer}","payload":{{"text":"message {} of the counted run","t":{}}}}}"#,
                first + sent,
                first + sent,
                now_ns()
            );
            sender
                .feed(Message::text(frame))
                .await
                .map_err(|e| format!("send failed: {e}"))?;
            sent += 1;
        }
        sender
            .flush()
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        tokio::select! {
            msg = sender.next() => match &msg {
                Some(Ok(m @ Message::Text(_))) => match frame_of(m) {
                    Some(f) if f.kind == "sendack" => acked += 1,
                    Some(f) if f.kind == "error" => {
                        return Err(format!("a send was refused: {}", f.code.unwrap_or_default()))
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    return Err(format!("sender: {}", ended_by(msg)))
                }
                Some(Ok(_)) => {}
            },
            msg = receiver.next() => match &msg {
                Some(Ok(m @ Message::Text(_))) => {
                    if frame_of(m).is_some_and(|f| f.kind == "message") {
                        got += 1;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    return Err(format!("receiver: {}", ended_by(msg)))
                }
                Some(Ok(_)) => {}
            },
            _ = sleep_until(deadline) => {
                return Err(format!("{acked} of {n} acknowledged and {got} delivered after {limit:?}"))
            }
        }
    }
    Ok(())
}

/// One gateway on `engine` under callgrind: a warm-up, the counters zeroed,
/// `opts.instructions` messages, each delivered and (with the webhook
/// endpoint) sent as a webhook, then the counts.
async fn instructions(
    opts: &Options,
    storage: &Storage,
    engine: Engine,
    hooks: &Hooks,
    hook_url: &str,
) -> CountResult {
    let n = opts.instructions;
    let mut r = CountResult {
        engine,
        messages: n,
        counts: None,
        took: Duration::ZERO,
        batches: None,
        notes: Vec::new(),
    };
    if let Some(why) = plugboard_tests::callgrind::unavailable() {
        r.notes.push(format!("not counted: {why}"));
        return r;
    }
    let cg = match plugboard_tests::callgrind::Callgrind::new() {
        Ok(cg) => cg,
        Err(e) => {
            r.notes
                .push(format!("not counted: a temporary folder: {e}"));
            return r;
        }
    };
    let launcher = cg.launcher();
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let tag = log_tag(storage, engine, "instructions");
    eprintln!("[{tag}] starting the gateway under callgrind");
    let gw = match storage
        .start_gateway(engine, gateway_options(hook_url, opts).launcher(&launcher))
        .await
    {
        Ok(gw) => gw,
        Err(e) => {
            r.notes.push(format!("{e:#}"));
            return r;
        }
    };
    let outcome = async {
        let server: SocketAddr = gw
            .addr
            .parse()
            .map_err(|e| format!("gateway address: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let url = |u: &str| format!("ws://{server}/v1/ws?token={}", gw.token(u, None, None));
        let source = Ipv4Addr::new(127, 0, 0, 2);
        let mut sender = connect_one(server, source, &url("counted-sender"), deadline).await?;
        let mut receiver = connect_one(server, source, &url("counted-receiver"), deadline).await?;
        // Every message here is slow under callgrind; the limits are generous.
        let limit = |k: usize| Duration::from_secs(60 + k as u64 / 5);
        let hooks_before = hooks.messages();
        send_counted(
            &mut sender,
            &mut receiver,
            "counted-receiver",
            0,
            COUNTED_WARMUP,
            limit(COUNTED_WARMUP),
        )
        .await?;
        let want = hooks_before + COUNTED_WARMUP as u64;
        if opts.webhooks && !wait_for(limit(COUNTED_WARMUP), || hooks.messages() >= want).await {
            return Err("the warm-up's webhooks did not all arrive".to_string());
        }
        sleep(Duration::from_millis(500)).await;
        // Read outside the counted window: a request costs instructions too.
        let http = reqwest::Client::new();
        let base = format!("http://{}", gw.addr);
        let metrics_before = snapshot(&http, &base).await;
        cg.zero(gw.pid())?;
        let started = Instant::now();
        send_counted(
            &mut sender,
            &mut receiver,
            "counted-receiver",
            COUNTED_WARMUP,
            n,
            limit(n),
        )
        .await?;
        let want = want + n as u64;
        if opts.webhooks && !wait_for(limit(n), || hooks.messages() >= want).await {
            return Err(format!(
                "{} of the {n} webhooks arrived",
                hooks.messages().saturating_sub(want - n as u64)
            ));
        }
        let took = started.elapsed();
        let counts = cg.dump(gw.pid())?;
        let batches = match (metrics_before, snapshot(&http, &base).await) {
            (Some(a), Some(b)) => {
                let d = HistDelta::of(&a, &b, "plugboard_storage_batch_size");
                (d.count > 0.0).then_some((d.count, d.sum))
            }
            _ => None,
        };
        Ok::<_, String>((counts, took, batches, sender, receiver))
    }
    .await;
    match outcome {
        Ok((counts, took, batches, _s, _r)) => {
            eprintln!(
                "[{tag}] {n} messages: {:.2} M instructions each",
                counts.total as f64 / n as f64 / 1e6
            );
            r.counts = Some(counts);
            r.took = took;
            r.batches = batches;
        }
        Err(e) => r.notes.push(e),
    }
    storage.finish(gw).await;
    r
}

fn report_instructions(opts: &Options, results: &[CountResult]) {
    println!();
    println!("== {INSTRUCTIONS} ==");
    println!(
        "{} messages from one sender to one receiver, {COUNTED_WINDOW} in flight, each persisted, delivered and {}; counted by {} (--tool=callgrind --separate-threads=yes) over every thread of the gateway, after a warm-up of {COUNTED_WARMUP} messages. The count does not depend on how loaded the machine is, but the writer's batches do (see the transactions per message): repeated runs differ by a few per cent. The lines under \"tokio workers\" are lower bounds (async tasks are polled from many places).",
        thousands(opts.instructions as f64),
        if opts.webhooks {
            format!("sent as a webhook (batch_max {})", opts.webhook_batch)
        } else {
            "written to the outbox (no endpoint)".to_string()
        },
        plugboard_tests::callgrind::version()
    );
    let labels: Vec<String> = results
        .iter()
        .map(|r| engine_name(r.engine).to_string())
        .collect();
    // One row of instructions per message, `count` picking them from a run's counts.
    let row = |name: String, count: &dyn Fn(&plugboard_tests::callgrind::Counts) -> u64| {
        let cells = results
            .iter()
            .map(|r| {
                r.counts.as_ref().map_or("-".into(), |c| {
                    format!("{:.0} k", count(c) as f64 / r.messages.max(1) as f64 / 1e3)
                })
            })
            .collect();
        (name, cells, String::new())
    };
    let mut rows: Vec<(String, Vec<String>, String)> =
        vec![row("instructions per message, in all".into(), &|c| c.total)];
    use plugboard_tests::callgrind::{ThreadKind, TASKS};
    for kind in [
        ThreadKind::Writer,
        ThreadKind::Workers,
        ThreadKind::Blocking,
        ThreadKind::Checkpoint,
        ThreadKind::Other,
    ] {
        rows.push(row(format!("  {}", kind.label()), &|c| {
            c.threads.iter().filter(|t| t.0 == kind).map(|t| t.1).sum()
        }));
        if kind == ThreadKind::Workers {
            for (label, _) in TASKS {
                rows.push(row(format!("    {label}"), &|c| {
                    c.tasks.iter().filter(|t| t.0 == label).map(|t| t.1).sum()
                }));
            }
        }
    }
    rows.push((
        "writer transactions per message".into(),
        results
            .iter()
            .map(|r| {
                r.batches.map_or("-".into(), |(tx, _)| {
                    format!("{:.2}", tx / r.messages.max(1) as f64)
                })
            })
            .collect(),
        String::new(),
    ));
    rows.push((
        "writes per transaction".into(),
        results
            .iter()
            .map(|r| {
                r.batches
                    .map_or("-".into(), |(tx, writes)| format!("{:.1}", writes / tx))
            })
            .collect(),
        String::new(),
    ));
    rows.push((
        "messages per second under callgrind".into(),
        results
            .iter()
            .map(|r| {
                if r.counts.is_some() && r.took > Duration::ZERO {
                    format!("{:.0}", r.messages as f64 / r.took.as_secs_f64())
                } else {
                    "-".into()
                }
            })
            .collect(),
        String::new(),
    ));
    table(&labels, &rows);
    for r in results {
        for n in &r.notes {
            println!("note ({}): {n}", engine_name(r.engine));
        }
    }
}
