//! `bench-connections`: how many idle, authenticated WebSocket connections
//! one gateway holds, what each costs in resident memory, and how fast they
//! open, beside a bare tokio-tungstenite server measured the same way in the
//! same run (DESIGN.md §7: 50,000 idle authenticated connections on one
//! node, ≤ 20 KiB RSS each).
//!
//! ```text
//! cargo run --release -p plugboard-tests --bin bench-connections -- \
//!     [--connections N] [--concurrency C]
//! ```
//!
//! `--help` lists every option.
//!
//! For each server (the real gateway binary started through the test
//! harness, then the baseline) it:
//! 1. reads the server's RSS (`VmRSS` in `/proc/<pid>/status`) after a short settle;
//! 2. opens N WebSocket connections, at most C in flight, each with its own
//!    user's token in `?token=`, each waiting for the `meta` `connect` frame;
//!    client sockets are bound to 127.0.0.2…127.0.0.9 in turn, because one
//!    loopback source address has only ~28k ephemeral ports;
//! 3. keeps every connection open and idle (a task per connection keeps
//!    reading, so server pings are answered), waits a few seconds, and reads
//!    the RSS again;
//! 4. closes everything: SIGTERM to the gateway (its graceful shutdown),
//!    SIGKILL to the baseline.
//!
//! The baseline is this same executable run with a hidden `--baseline-server`
//! argument: accept, `tokio_tungstenite::accept_async`, one small text frame,
//! then read until the peer goes. No storage, no auth, no webhooks.
//!
//! Every wait is bounded. Fewer than N connections is reported, with the
//! reasons, and is not a crash: a benchmark prints figures, it asserts nothing.
//! All traffic stays on 127.0.0.x.

mod cli;
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use plugboard_tests::{Gateway, GatewayOptions};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// DESIGN.md §7.
const TARGET_CONNECTIONS: usize = 50_000;
const TARGET_KIB_PER_CONNECTION: f64 = 20.0;

/// Open-files limit asked for (client sockets and server sockets each need N).
const NOFILE_WANTED: u64 = 300_000;

/// The hidden argument that turns this executable into the baseline server.
const BASELINE_FLAG: &str = "--baseline-server";
const BASELINE_READY: &str = "baseline: listening on ";

/// How many idle, authenticated WebSocket connections one gateway holds,
/// what each costs in resident memory, and how fast they open, beside a bare
/// tokio-tungstenite server measured the same way in the same run
#[derive(Debug, Parser)]
#[command(name = "bench-connections", args_override_self = true)]
struct Cli {
    /// Connections to open and hold per server
    #[arg(long, value_name = "N", default_value_t = 50_000, value_parser = cli::whole)]
    connections: usize,
    /// Connection attempts in flight at once (at least 1)
    #[arg(long, value_name = "C", default_value_t = 500, value_parser = cli::clamped(1, usize::MAX))]
    concurrency: usize,
    /// Wait before each RSS reading
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = cli::seconds(0))]
    settle: Duration,
    /// Limit for one attempt: TCP connect to connect frame (at least 1)
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = cli::seconds(1))]
    attempt_timeout: Duration,
    /// Limit for opening all N connections (at least 1)
    #[arg(long, value_name = "SECS", default_value = "600", value_parser = cli::seconds(1))]
    ramp_timeout: Duration,
    /// After the RSS reading, keep holding this long and read again, e.g.
    /// past a ping interval (0: no extra hold)
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = cli::seconds(0))]
    hold: Duration,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(K+1) (1 to 250)
    #[arg(long, value_name = "K", default_value_t = 8, value_parser = cli::clamped(1, 250))]
    sources: usize,
    /// One baseline run per entry: `default` (tokio-tungstenite's defaults,
    /// i.e. plain accept_async) or a read buffer size in bytes, e.g.
    /// `default,4096`
    #[arg(
        long,
        value_name = "LIST",
        default_value = "default",
        value_parser = baseline_list,
        overrides_with = "no_baseline"
    )]
    baseline_read_buffers: Baselines,
    /// Measure the gateway only (the later of this and
    /// --baseline-read-buffers counts)
    #[arg(long, overrides_with = "baseline_read_buffers")]
    no_baseline: bool,
    /// Measure the baseline(s) only
    #[arg(long)]
    no_gateway: bool,
}

/// The baselines of `--baseline-read-buffers`; `None` is tokio-tungstenite's
/// default config.
#[derive(Clone, Debug)]
struct Baselines(Vec<Option<usize>>);

/// `--baseline-read-buffers`: a comma-separated list of `default` or sizes
/// in bytes (at least 1).
fn baseline_list(s: &str) -> Result<Baselines, String> {
    s.split(',')
        .map(|entry| match entry.trim() {
            "default" => Ok(None),
            n => cli::whole(n).map(|n| Some(n.max(1))),
        })
        .collect::<Result<_, _>>()
        .map(Baselines)
}

#[derive(Clone, Debug)]
struct Options {
    connections: usize,
    concurrency: usize,
    settle: Duration,
    attempt_timeout: Duration,
    ramp_timeout: Duration,
    hold: Duration,
    sources: usize,
    /// One baseline per entry; `None` is tokio-tungstenite's default config.
    baselines: Vec<Option<usize>>,
    gateway: bool,
    /// Most client sockets this process may have at once (from the open-files limit).
    socket_budget: usize,
}

impl From<Cli> for Options {
    fn from(cli: Cli) -> Self {
        Options {
            connections: cli.connections,
            concurrency: cli.concurrency,
            settle: cli.settle,
            attempt_timeout: cli.attempt_timeout,
            ramp_timeout: cli.ramp_timeout,
            hold: cli.hold,
            sources: cli.sources,
            baselines: if cli.no_baseline {
                Vec::new()
            } else {
                cli.baseline_read_buffers.0
            },
            gateway: !cli.no_gateway,
            socket_budget: usize::MAX,
        }
    }
}

fn main() -> ExitCode {
    // Checked before the options, which do not list it: the benchmark starts
    // this executable with it as the baseline server.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == BASELINE_FLAG)
    {
        let args: Vec<String> = std::env::args().skip(2).collect();
        return baseline_server(&args);
    }
    let opts = Options::from(Cli::parse());
    // Before anything starts: the gateway and the baseline inherit the limit.
    let nofile = raise_nofile(NOFILE_WANTED);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-connections: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts, nofile)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-connections: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Process facts

/// The open-files limit after [`raise_nofile`].
#[derive(Clone, Debug)]
struct Nofile {
    soft: u64,
    hard: u64,
    /// Why the wanted limit could not be set, if it could not.
    refused: Option<String>,
}

/// Raises RLIMIT_NOFILE to `wanted` (soft and hard; needs CAP_SYS_RESOURCE
/// to go past the hard limit), falling back to soft = hard.
fn raise_nofile(wanted: u64) -> Nofile {
    let mut refused = None;
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < wanted {
            let want = libc::rlimit {
                rlim_cur: wanted as libc::rlim_t,
                rlim_max: lim.rlim_max.max(wanted),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                refused = Some(format!(
                    "setrlimit(RLIMIT_NOFILE, {wanted}) failed: {}",
                    std::io::Error::last_os_error()
                ));
                if lim.rlim_cur < lim.rlim_max {
                    lim.rlim_cur = lim.rlim_max;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
            }
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        Nofile {
            soft: lim.rlim_cur,
            hard: lim.rlim_max,
            refused,
        }
    }
}

/// Descriptors kept free in this process (runtime, pipes to the servers,
/// the HTTP client reading the gateway's metrics).
const FD_RESERVE: u64 = 128;

/// Memory facts of a process, from `/proc/<pid>/status` (kB there, KiB here).
#[derive(Clone, Copy, Debug, Default)]
struct ProcMem {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    threads: u64,
}

fn proc_status(pid: u32) -> Option<ProcMem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(ProcMem {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:").unwrap_or(0),
        anon_kib: field("RssAnon:").unwrap_or(0),
        threads: field("Threads:").unwrap_or(0),
    })
}

/// Whether the process has exited (gone, or a zombie waiting to be reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Err(_) => true,
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .is_some_and(|s| s.trim_start().starts_with('Z') || s.trim_start().starts_with('X')),
    }
}

async fn wait_exited(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if exited(pid) {
            return true;
        }
        sleep(Duration::from_millis(100)).await;
    }
    exited(pid)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join("-"))
        .unwrap_or_else(|_| "?".into());
    format!("{cores} cores, {mem_gib:.1} GiB RAM, ephemeral ports {ports}")
}

// ---------------------------------------------------------------------------
// The client side, the same for every server

/// Client connections are not what is measured: a small read buffer keeps
/// the benchmark's own memory down (tungstenite's default is 128 KiB each).
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

type ClientWs = WebSocketStream<TcpStream>;

/// What the client tasks of one run share.
#[derive(Default)]
struct Shared {
    opened: AtomicUsize,
    failed: AtomicUsize,
    /// Connections currently open on the client side.
    alive: AtomicUsize,
    /// Client sockets in use: attempts in flight and open connections.
    sockets: AtomicUsize,
    /// Set before the server is stopped: ends after it are expected.
    teardown: AtomicBool,
    latencies: Mutex<Vec<Duration>>,
    /// Why attempts failed, with counts.
    failures: Mutex<BTreeMap<String, usize>>,
    /// Open connections that ended before the teardown, by how.
    ended_early: Mutex<BTreeMap<String, usize>>,
    /// How connections ended during the teardown.
    ended_at_teardown: Mutex<BTreeMap<String, usize>>,
}

fn bump(map: &Mutex<BTreeMap<String, usize>>, key: String) {
    *map.lock().unwrap().entry(key).or_default() += 1;
}

/// One attempt: TCP connect from `source`, WebSocket upgrade, then the
/// first text frame, which must be `meta` / `connect`. Returns the stream and
/// the time from the start of the TCP connect to that frame.
async fn connect_one(
    server: SocketAddr,
    source: Ipv4Addr,
    url: &str,
    deadline: Instant,
) -> Result<(ClientWs, Duration), String> {
    let started = Instant::now();
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket(): {e}"))?;
    socket
        .bind(SocketAddr::new(source.into(), 0))
        .map_err(|e| format!("bind to a 127.0.0.x source: {e}"))?;
    let tcp = match timeout_at(deadline, socket.connect(server)).await {
        Err(_) => return Err("timed out in the TCP connect".into()),
        Ok(Err(e)) => return Err(format!("TCP connect: {e}")),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let request = url
        .into_client_request()
        .map_err(|e| format!("bad request: {e}"))?;
    let handshake =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(client_config()));
    let mut ws = match timeout_at(deadline, handshake).await {
        Err(_) => return Err("timed out in the WebSocket upgrade".into()),
        Ok(Err(WsError::Http(resp))) => {
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                .chars()
                .take(120)
                .collect::<String>();
            return Err(format!(
                "upgrade refused: HTTP {} {body}",
                resp.status().as_u16()
            ));
        }
        Ok(Err(e)) => return Err(format!("WebSocket upgrade: {e}")),
        Ok(Ok((ws, _))) => ws,
    };
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("timed out waiting for the connect frame".into()),
            Ok(None) => return Err("closed (no close frame) before the connect frame".into()),
            Ok(Some(Err(e))) => return Err(format!("error before the connect frame: {e}")),
            Ok(Some(Ok(Message::Close(f)))) => {
                return Err(format!(
                    "close frame {} before the connect frame",
                    f.map(|f| u16::from(f.code)).unwrap_or(1005)
                ))
            }
            Ok(Some(Ok(Message::Text(text)))) => {
                let v: serde_json::Value = serde_json::from_str(text.as_str())
                    .map_err(|_| "first frame is not JSON".to_string())?;
                if v["type"] == "meta" && v["event"] == "connect" {
                    return Ok((ws, started.elapsed()));
                }
                return Err(format!(
                    "first frame is not meta/connect (type {}, event {})",
                    v["type"], v["event"]
                ));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Holds an open connection: keeps reading (tungstenite answers pings and
/// close frames while reading) until the server ends it.
async fn hold(mut ws: ClientWs, shared: Arc<Shared>) {
    let mut close_code: Option<u16> = None;
    let how = loop {
        match ws.next().await {
            Some(Ok(Message::Close(f))) => {
                close_code = Some(f.map(|f| u16::from(f.code)).unwrap_or(1005));
            }
            Some(Ok(_)) => {}
            None
            | Some(Err(WsError::ConnectionClosed))
            | Some(Err(WsError::AlreadyClosed))
            | Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                break match close_code {
                    Some(c) => format!("close frame {c}, close handshake completed"),
                    None => "EOF without a close frame".to_string(),
                };
            }
            Some(Err(e)) => {
                break match close_code {
                    Some(c) => format!("close frame {c}, then: {e}"),
                    None => format!("error without a close frame: {e}"),
                };
            }
        }
    };
    shared.alive.fetch_sub(1, Ordering::SeqCst);
    drop(ws);
    shared.sockets.fetch_sub(1, Ordering::SeqCst);
    if shared.teardown.load(Ordering::SeqCst) {
        bump(&shared.ended_at_teardown, how);
    } else {
        bump(&shared.ended_early, how);
    }
}

/// Figures for one server.
#[derive(Default)]
struct Run {
    label: String,
    requested: usize,
    launched: usize,
    opened: usize,
    failed: usize,
    /// Open on the client side when the second RSS reading was taken.
    held: usize,
    ramp: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
    before: Option<ProcMem>,
    after: Option<ProcMem>,
    /// With `--hold`: the reading at its end, and connections still open then.
    after_hold: Option<(Option<ProcMem>, usize)>,
    failures: BTreeMap<String, usize>,
    ended_early: BTreeMap<String, usize>,
    ended_at_teardown: BTreeMap<String, usize>,
    /// Time from the stop signal to the server process exiting.
    teardown: Option<Duration>,
    notes: Vec<String>,
}

impl Run {
    fn rate(&self) -> f64 {
        if self.ramp.is_zero() {
            0.0
        } else {
            self.opened as f64 / self.ramp.as_secs_f64()
        }
    }

    fn percentile(&self, p: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        Some(self.latencies[rank.clamp(1, self.latencies.len()) - 1])
    }

    /// (after − before) / held, in KiB.
    fn kib_per_connection(&self) -> Option<f64> {
        let (b, a) = (self.before?, self.after?);
        (self.held > 0).then(|| (a.rss_kib as f64 - b.rss_kib as f64) / self.held as f64)
    }
}

/// Opens the connections to `server` (process `pid`), waits, and takes
/// both RSS readings. The connections stay open: the caller stops the
/// server, then calls [`finish`].
async fn ramp_and_measure(
    label: &str,
    server: SocketAddr,
    pid: u32,
    tokens: &Arc<Vec<String>>,
    opts: &Options,
) -> (Run, Arc<Shared>, Vec<JoinHandle<()>>) {
    let mut run = Run {
        label: label.to_string(),
        requested: opts.connections,
        ..Run::default()
    };
    sleep(opts.settle.min(Duration::from_secs(3))).await;
    run.before = proc_status(pid);
    eprintln!(
        "[{label}] pid {pid} at {server}; RSS before: {} KiB; opening {} connections, {} in flight",
        run.before.map(|m| m.rss_kib).unwrap_or(0),
        opts.connections,
        opts.concurrency
    );

    let shared = Arc::new(Shared::default());
    let semaphore = Arc::new(Semaphore::new(opts.concurrency));
    let started = Instant::now();
    let ramp_deadline = started + opts.ramp_timeout;
    let progress = {
        let shared = shared.clone();
        let label = label.to_string();
        tokio::spawn(async move {
            loop {
                sleep(Duration::from_secs(5)).await;
                eprintln!(
                    "[{label}] {:>6.1} s: {} open, {} failed, server RSS {} KiB",
                    started.elapsed().as_secs_f64(),
                    shared.alive.load(Ordering::Relaxed),
                    shared.failed.load(Ordering::Relaxed),
                    proc_status(pid).map(|m| m.rss_kib).unwrap_or(0)
                );
            }
        })
    };
    let mut handles = Vec::with_capacity(opts.connections);
    for i in 0..opts.connections {
        // Stay within this process's open-files limit: a socket that cannot
        // be created is not a measurement of the server.
        let mut out_of_sockets = false;
        while shared.sockets.load(Ordering::SeqCst) >= opts.socket_budget {
            let in_flight = opts.concurrency - semaphore.available_permits();
            if in_flight == 0 || Instant::now() >= ramp_deadline {
                out_of_sockets = true;
                break;
            }
            sleep(Duration::from_millis(10)).await;
        }
        if out_of_sockets {
            run.notes.push(format!(
                "stopped launching after {i} attempts: {} client sockets open, the most this \
                 process's open-files limit allows (limit minus {FD_RESERVE} kept free)",
                opts.socket_budget
            ));
            break;
        }
        let permit = match timeout_at(ramp_deadline, semaphore.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                run.notes.push(format!(
                    "stopped launching after {i} attempts: ramp timeout of {:?} reached",
                    opts.ramp_timeout
                ));
                break;
            }
        };
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % opts.sources) as u8);
        let url = format!("ws://{server}/v1/ws?token={}", tokens[i]);
        let deadline = Instant::now() + opts.attempt_timeout;
        let shared = shared.clone();
        shared.sockets.fetch_add(1, Ordering::SeqCst);
        handles.push(tokio::spawn(async move {
            match connect_one(server, source, &url, deadline).await {
                Ok((ws, latency)) => {
                    shared.alive.fetch_add(1, Ordering::SeqCst);
                    shared.opened.fetch_add(1, Ordering::SeqCst);
                    shared.latencies.lock().unwrap().push(latency);
                    drop(permit);
                    hold(ws, shared).await;
                }
                Err(why) => {
                    shared.sockets.fetch_sub(1, Ordering::SeqCst);
                    shared.failed.fetch_add(1, Ordering::SeqCst);
                    bump(&shared.failures, why);
                    drop(permit);
                }
            }
        }));
        run.launched += 1;
    }
    // Every attempt in flight ends within its own timeout.
    let all = u32::try_from(opts.concurrency).unwrap_or(u32::MAX);
    if timeout(
        opts.attempt_timeout + Duration::from_secs(5),
        semaphore.acquire_many(all),
    )
    .await
    .is_err()
    {
        run.notes
            .push("some attempts were still in flight after their timeout".into());
    }
    run.ramp = started.elapsed();
    progress.abort();
    run.opened = shared.opened.load(Ordering::SeqCst);
    run.failed = shared.failed.load(Ordering::SeqCst);
    eprintln!(
        "[{label}] ramp done in {:.1} s: {} opened, {} failed; settling {:?}",
        run.ramp.as_secs_f64(),
        run.opened,
        run.failed,
        opts.settle
    );

    sleep(opts.settle).await;
    run.after = proc_status(pid);
    run.held = shared.alive.load(Ordering::SeqCst);
    if run.after.is_none() {
        run.notes
            .push("the server process was gone at the second RSS reading".into());
    }
    if !opts.hold.is_zero() {
        eprintln!("[{label}] holding them {:?} more", opts.hold);
        sleep(opts.hold).await;
        run.after_hold = Some((proc_status(pid), shared.alive.load(Ordering::SeqCst)));
    }
    let mut latencies = shared.latencies.lock().unwrap().clone();
    latencies.sort_unstable();
    run.latencies = latencies;
    run.failures = shared.failures.lock().unwrap().clone();
    eprintln!(
        "[{label}] holding {} connections; RSS after: {} KiB",
        run.held,
        run.after.map(|m| m.rss_kib).unwrap_or(0)
    );
    (run, shared, handles)
}

/// After the server was told to stop: waits for the client tasks to see
/// their connections end, then ends whatever is left.
async fn finish(run: &mut Run, shared: &Shared, handles: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.alive.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        sleep(Duration::from_millis(100)).await;
    }
    let left = shared.alive.load(Ordering::SeqCst);
    if left > 0 {
        run.notes.push(format!(
            "{left} client connections were still open 30 s after the server stopped; dropped"
        ));
    }
    for h in &handles {
        h.abort();
    }
    for h in handles {
        let _ = h.await;
    }
    run.ended_early = shared.ended_early.lock().unwrap().clone();
    run.ended_at_teardown = shared.ended_at_teardown.lock().unwrap().clone();
}

// ---------------------------------------------------------------------------
// The two servers

struct GatewayExtras {
    metrics: Vec<String>,
    log_total: usize,
    log_problems: Vec<String>,
}

async fn bench_gateway(
    tokens: &Arc<Vec<String>>,
    opts: &Options,
) -> anyhow::Result<(Run, GatewayExtras)> {
    // No webhook endpoint here: connections only.
    let gw = Gateway::start(GatewayOptions::default().extra(common::GATEWAY_TOML)).await;
    let pid = gw.pid();
    let server: SocketAddr = gw.addr.parse()?;
    let (mut run, shared, handles) = ramp_and_measure("gateway", server, pid, tokens, opts).await;

    // The gateway's own view, while everything is still open.
    let metrics = match fetch_metrics(&gw.url("/metrics")).await {
        Ok(text) => text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let l = l.strip_prefix("plugboard_").unwrap_or(l);
                [
                    "connections_open",
                    "handshake_failures",
                    "lifecycle_events",
                    "connection_open_seconds_sum",
                    "connection_open_seconds_count",
                    "storage_batch_size_sum",
                    "storage_batch_size_count",
                    "outbox_depth",
                ]
                .iter()
                .any(|m| l.starts_with(m))
            })
            .map(str::to_string)
            .collect(),
        Err(e) => vec![format!("GET /metrics failed: {e}")],
    };

    // Graceful shutdown: every connection is told why and closed (1001).
    shared.teardown.store(true, Ordering::SeqCst);
    let stop = Instant::now();
    gw.signal(libc::SIGTERM);
    if wait_exited(pid, Duration::from_secs(120)).await {
        run.teardown = Some(stop.elapsed());
    } else {
        run.notes
            .push("the gateway had not exited 120 s after SIGTERM; it was killed (SIGKILL)".into());
    }
    let log = gw.log();
    drop(gw); // kills it if it is still running, and reaps it
    finish(&mut run, &shared, handles).await;

    let lines: Vec<&str> = log.lines().collect();
    let mut problems: Vec<String> = Vec::new();
    for l in &lines {
        if l.contains("WARN") || l.contains("ERROR") || l.contains("panicked") {
            let l: String = l.chars().take(300).collect();
            if problems.len() < 12 && !problems.contains(&l) {
                problems.push(l);
            }
        }
    }
    let problem_count = lines
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
        .count();
    if problem_count > problems.len() {
        problems.push(format!("… {} warning/error lines in all", problem_count));
    }
    Ok((
        run,
        GatewayExtras {
            metrics,
            log_total: lines.len(),
            log_problems: problems,
        },
    ))
}

async fn fetch_metrics(url: &str) -> anyhow::Result<String> {
    let resp = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(20))
        .send()
        .await?;
    Ok(resp.text().await?)
}

async fn bench_baseline(
    read_buffer: Option<usize>,
    tokens: &Arc<Vec<String>>,
    opts: &Options,
) -> anyhow::Result<Run> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg(BASELINE_FLAG);
    if let Some(n) = read_buffer {
        cmd.arg(n.to_string());
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
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
        .map_err(|_| anyhow::anyhow!("the baseline server did not report its address"));
    let addr = match addr {
        Ok(a) => a,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let server: SocketAddr = addr.parse()?;
    let label = match read_buffer {
        None => "baseline".to_string(),
        Some(n) => format!("baseline {n} B buf"),
    };
    let (mut run, shared, handles) = ramp_and_measure(&label, server, pid, tokens, opts).await;
    shared.teardown.store(true, Ordering::SeqCst);
    let stop = Instant::now();
    let _ = child.kill();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    run.teardown = Some(stop.elapsed());
    finish(&mut run, &shared, handles).await;
    Ok(run)
}

/// The baseline server: a bare tokio-tungstenite server. Binds 127.0.0.1:0,
/// prints its address, then for each connection: upgrade, one small text
/// frame, read until the peer goes. An optional argument sets the read
/// buffer size; without it `accept_async`'s defaults are used.
fn baseline_server(args: &[String]) -> ExitCode {
    let read_buffer: Option<usize> = args.first().and_then(|a| a.parse().ok());
    let config = read_buffer.map(|n| WebSocketConfig::default().read_buffer_size(n));
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
        let mut accept_errors = 0usize;
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(async move {
                        let Ok(mut ws) =
                            tokio_tungstenite::accept_async_with_config(tcp, config).await
                        else {
                            return;
                        };
                        let hello = Message::text(r#"{"type":"meta","event":"connect"}"#);
                        if ws.send(hello).await.is_err() {
                            return;
                        }
                        while let Some(Ok(_)) = ws.next().await {}
                    });
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

// ---------------------------------------------------------------------------
// The whole run and the report

async fn run(mut opts: Options, nofile: Nofile) -> anyhow::Result<()> {
    let cpus = machine();
    eprintln!(
        "bench-connections: {} connections, {} in flight, {} source addresses; {cpus}; open-files limit {} (hard {})",
        opts.connections, opts.concurrency, opts.sources, nofile.soft, nofile.hard
    );
    if let Some(why) = &nofile.refused {
        eprintln!("bench-connections: {why}");
    }
    opts.socket_budget =
        usize::try_from(nofile.soft.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    if opts.socket_budget < opts.connections {
        eprintln!(
            "bench-connections: warning: the open-files limit ({}) caps each process, the servers included, \
             at fewer than {} connections; at most {} will be attempted at a time",
            nofile.soft, opts.connections, opts.socket_budget
        );
    }
    let tokens: Arc<Vec<String>> = Arc::new(
        tokio::task::spawn_blocking({
            let n = opts.connections;
            move || {
                (0..n)
                    .map(|i| {
                        plugboard::auth::mint_token(
                            &format!("bench-user-{i}"),
                            None,
                            None,
                            plugboard_tests::gateway::JWT_SECRET.as_bytes(),
                        )
                    })
                    .collect::<Vec<_>>()
            }
        })
        .await?,
    );

    let mut runs: Vec<Run> = Vec::new();
    let mut extras = None;
    if opts.gateway {
        let (run, ex) = bench_gateway(&tokens, &opts).await?;
        runs.push(run);
        extras = Some(ex);
        sleep(Duration::from_secs(2)).await;
    }
    for &rb in &opts.baselines {
        match bench_baseline(rb, &tokens, &opts).await {
            Ok(run) => runs.push(run),
            Err(e) => eprintln!("bench-connections: baseline {rb:?} failed to run: {e:#}"),
        }
        sleep(Duration::from_secs(2)).await;
    }

    report(&opts, &nofile, &cpus, &runs, extras.as_ref());
    Ok(())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ms(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.1} ms", d.as_secs_f64() * 1000.0),
        None => "-".into(),
    }
}

fn report(
    opts: &Options,
    nofile: &Nofile,
    machine: &str,
    runs: &[Run],
    extras: Option<&GatewayExtras>,
) {
    let mut rows: Vec<(String, Vec<String>, String)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&Run) -> String, target: &str| {
        rows.push((
            name.to_string(),
            runs.iter().map(f).collect(),
            target.to_string(),
        ));
    };
    row("connections requested", &|r| r.requested.to_string(), "");
    row(
        "connections opened",
        &|r| r.opened.to_string(),
        "50,000 on one node",
    );
    row("failed attempts", &|r| r.failed.to_string(), "");
    row(
        "held at RSS reading",
        &|r| r.held.to_string(),
        "50,000 on one node",
    );
    row(
        "ramp time",
        &|r| format!("{:.1} s", r.ramp.as_secs_f64()),
        "",
    );
    row(
        "connect rate",
        &|r| format!("{:.0} conn/s", r.rate()),
        "(reported)",
    );
    row("connect latency p50", &|r| ms(r.percentile(50.0)), "");
    row("connect latency p99", &|r| ms(r.percentile(99.0)), "");
    row(
        "connect latency max",
        &|r| ms(r.latencies.last().copied()),
        "",
    );
    row(
        "RSS before",
        &|r| r.before.map(|m| mib(m.rss_kib)).unwrap_or("-".into()),
        "",
    );
    row(
        "RSS after",
        &|r| r.after.map(|m| mib(m.rss_kib)).unwrap_or("-".into()),
        "",
    );
    row(
        "RSS peak (VmHWM)",
        &|r| r.after.map(|m| mib(m.hwm_kib)).unwrap_or("-".into()),
        "",
    );
    row(
        "anonymous RSS after",
        &|r| r.after.map(|m| mib(m.anon_kib)).unwrap_or("-".into()),
        "",
    );
    row(
        "RSS per connection",
        &|r| {
            r.kib_per_connection()
                .map(|k| format!("{k:.1} KiB"))
                .unwrap_or("-".into())
        },
        "<= 20 KiB",
    );
    if opts.hold > Duration::ZERO {
        let hold = format!("after {} s more", opts.hold.as_secs());
        row(
            &format!("held {hold}"),
            &|r| {
                r.after_hold
                    .map(|(_, n)| n.to_string())
                    .unwrap_or("-".into())
            },
            "",
        );
        row(
            &format!("RSS {hold}"),
            &|r| {
                r.after_hold
                    .and_then(|(m, _)| m)
                    .map(|m| mib(m.rss_kib))
                    .unwrap_or("-".into())
            },
            "",
        );
    }
    row(
        "server threads",
        &|r| r.after.map(|m| m.threads.to_string()).unwrap_or("-".into()),
        "",
    );
    row(
        "shutdown time",
        &|r| {
            r.teardown
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or("-".into())
        },
        "",
    );

    let name_w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
    let col_w = runs
        .iter()
        .map(|r| r.label.len())
        .chain(
            rows.iter()
                .flat_map(|r| r.1.iter().map(|c| c.chars().count())),
        )
        .max()
        .unwrap_or(8)
        + 2;
    println!();
    println!("== bench-connections: idle authenticated WebSocket connections ==");
    println!(
        "machine: {machine}; open-files limit {} (hard {}), inherited by the servers",
        nofile.soft, nofile.hard
    );
    if let Some(why) = &nofile.refused {
        println!(
            "open-files limit: {why}; every process here, the gateway included, can hold at most about {} sockets",
            nofile.soft
        );
    }
    println!(
        "{} connections per server, {} attempts in flight, client sources 127.0.0.2-127.0.0.{}",
        opts.connections,
        opts.concurrency,
        1 + opts.sources
    );
    println!(
        "gateway: ping_interval 25s, pong_timeout 10s, auth_timeout 10s, log warn, no webhooks, SQLite in a temp folder"
    );
    println!(
        "baseline: tokio-tungstenite accept_async (read buffer: `default` = its 128 KiB default), one text frame, then read; no storage, auth or webhooks"
    );
    println!("connect latency: TCP connect start to the first (connect) frame; RSS per connection: (after - before) / held");
    println!();
    let mut header = format!("{:name_w$}", "");
    for r in runs {
        header.push_str(&format!("  {:>col_w$}", r.label));
    }
    header.push_str("  target (DESIGN.md §7)");
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));
    for (name, cells, target) in &rows {
        let mut line = format!("{name:name_w$}");
        for c in cells {
            line.push_str(&format!("  {c:>col_w$}"));
        }
        line.push_str(&format!("  {target}"));
        println!("{}", line.trim_end());
    }
    println!();

    for r in runs {
        let held_ok = r.held >= TARGET_CONNECTIONS;
        let kib = r.kib_per_connection();
        let mem_ok = kib.is_some_and(|k| k <= TARGET_KIB_PER_CONNECTION);
        println!(
            "{}: held {} of {} requested ({}); {} per connection ({}); {:.0} conn/s",
            r.label,
            r.held,
            r.requested,
            if held_ok {
                "50,000 target met".to_string()
            } else {
                format!("below the {TARGET_CONNECTIONS} target")
            },
            kib.map(|k| format!("{k:.1} KiB")).unwrap_or("-".into()),
            if mem_ok {
                "within 20 KiB".to_string()
            } else {
                "over the 20 KiB target".to_string()
            },
            r.rate()
        );
        for n in &r.notes {
            println!("  note: {n}");
        }
        if r.opened < r.requested {
            println!(
                "  not opened: {} ({} failed, {} never attempted)",
                r.requested - r.opened,
                r.failed,
                r.requested - r.launched
            );
        }
        for (why, n) in &r.failures {
            println!("  failed x{n}: {why}");
        }
        for (how, n) in &r.ended_early {
            println!("  dropped while held x{n}: {how}");
        }
        for (how, n) in &r.ended_at_teardown {
            println!("  at shutdown x{n}: {how}");
        }
    }
    if let Some(ex) = extras {
        println!();
        println!("gateway /metrics while holding the connections:");
        for l in &ex.metrics {
            println!("  {l}");
        }
        println!(
            "gateway log: {} lines, {} shown as warnings/errors",
            ex.log_total,
            ex.log_problems.len()
        );
        for l in &ex.log_problems {
            println!("  {l}");
        }
    }
}
