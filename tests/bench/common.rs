//! What the benchmark programs share: machine and process figures, a
//! `/metrics` snapshot and its differences, the in-process webhook
//! receiver, client connections bound to 127.0.0.x sources, the storage
//! engines of a run (`--storage`, with the private PostgreSQL server),
//! tables and figure formatting. Each program uses part of it.
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Router;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use plugboard_tests::{Engine, Gateway, GatewayOptions, PgOptions, PgServer};

use crate::cli::StorageArg;

/// The gateway config of the benchmarks that measure through a gateway,
/// merged over the harness's test defaults: production heartbeat and auth
/// deadline, quiet logs (the harness logs at debug, a line per frame).
pub(crate) const GATEWAY_TOML: &str = r#"
[gateway]
ping_interval = "25s"
pong_timeout = "10s"
auth_timeout = "10s"
[log]
level = "warn"
"#;

/// Runs `main` to its end on a multi-threaded runtime. A runtime that cannot
/// start, or an error `main` returns, is printed as `program: …` and exits
/// with failure.
pub(crate) fn run_program(
    program: &str,
    main: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Nanoseconds since the clock every task of this process shares.
/// The instant all nanosecond stamps count from.
pub(crate) static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();

/// An instant as nanoseconds on the clock of [`now_ns`].
pub(crate) fn ns_at(at: Instant) -> u64 {
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    at.into_std()
        .checked_duration_since(epoch)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub(crate) fn now_ns() -> u64 {
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// CPU time (user + system) a process has used so far, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    #[allow(unsafe_code)]
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((utime + stime) / if hz > 0 { hz as f64 } else { 100.0 })
}

/// The process's resident memory now (`VmRSS`).
pub(crate) fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// The most resident memory the process ever had (`VmHWM`).
pub(crate) fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

pub(crate) fn open_files_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            let l = t.lines().find(|l| l.starts_with("Max open files"))?;
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(format!("{} (hard {})", f.get(3)?, f.get(4)?))
        })
        .unwrap_or_else(|| "?".into())
}

pub(crate) fn machine() -> String {
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
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "{cores} cores ({cpu}), {mem_gib:.1} GiB RAM, open-files limit {}",
        open_files_limit()
    )
}

/// One reading of `GET /metrics`: every series, by its full name with labels.
#[derive(Clone, Debug, Default)]
pub(crate) struct Snapshot(pub(crate) BTreeMap<String, f64>);

impl Snapshot {
    pub(crate) fn parse(text: &str) -> Snapshot {
        let mut map = BTreeMap::new();
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((series, v)) = l.rsplit_once(' ') {
                if let Ok(v) = v.parse::<f64>() {
                    map.insert(series.to_string(), v);
                }
            }
        }
        Snapshot(map)
    }

    /// The sum over the series of metric `name` (any labels).
    pub(crate) fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// Cumulative bucket counts of histogram `name`, by upper bound.
    pub(crate) fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{");
        let mut out: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let labels = k.strip_prefix(&prefix)?;
                let le = labels.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// What a histogram did between two readings.
pub(crate) struct HistDelta {
    pub(crate) count: f64,
    pub(crate) sum: f64,
    /// Cumulative counts by upper bound.
    pub(crate) buckets: Vec<(f64, f64)>,
}

impl HistDelta {
    pub(crate) fn of(before: &Snapshot, after: &Snapshot, name: &str) -> HistDelta {
        let b = before.buckets(name);
        let buckets = after
            .buckets(name)
            .into_iter()
            .map(|(le, v)| {
                let was = b.iter().find(|(l, _)| *l == le).map_or(0.0, |x| x.1);
                (le, v - was)
            })
            .collect();
        HistDelta {
            count: after.sum(&format!("{name}_count")) - before.sum(&format!("{name}_count")),
            sum: after.sum(&format!("{name}_sum")) - before.sum(&format!("{name}_sum")),
            buckets,
        }
    }

    pub(crate) fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The upper bound of the bucket holding quantile `q`.
    pub(crate) fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let want = q * self.count;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= want)
            .map(|(le, _)| *le)
    }
}

pub(crate) async fn snapshot(http: &reqwest::Client, base: &str) -> Option<Snapshot> {
    let resp = http
        .get(format!("{base}/metrics"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .ok()?;
    Some(Snapshot::parse(&resp.text().await.ok()?))
}

pub(crate) fn occurrences(hay: &[u8], needle: &[u8]) -> u64 {
    hay.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

/// Waits until `check` holds, or `limit` passes; whether it held.
pub(crate) async fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Client connections are not what is measured: a small read buffer keeps
/// 10,000 of them cheap.
pub(crate) fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

pub(crate) type ClientWs = WebSocketStream<TcpStream>;

/// One connection: TCP connect from `source`, WebSocket upgrade, then the
/// first frame, which must be `meta` / `connect`.
pub(crate) async fn connect_one(
    server: SocketAddr,
    source: Ipv4Addr,
    url: &str,
    deadline: Instant,
) -> Result<ClientWs, String> {
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
        Ok(Err(e)) => return Err(format!("WebSocket upgrade: {e}")),
        Ok(Ok((ws, _))) => ws,
    };
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("timed out waiting for the connect frame".into()),
            Ok(None) => return Err("closed before the connect frame".into()),
            Ok(Some(Err(e))) => return Err(format!("error before the connect frame: {e}")),
            Ok(Some(Ok(Message::Text(text)))) => {
                let v: Value = serde_json::from_str(text.as_str())
                    .map_err(|_| "first frame is not JSON".to_string())?;
                if v["type"] == "meta" && v["event"] == "connect" {
                    return Ok(ws);
                }
                return Err(format!("first frame is not meta/connect: {v}"));
            }
            Ok(Some(Ok(Message::Close(f)))) => {
                return Err(format!(
                    "close frame {} before the connect frame",
                    f.map(|f| u16::from(f.code)).unwrap_or(1005)
                ))
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Opens one connection per URL, at most `concurrency` attempts in flight,
/// sources 127.0.0.2.. in turn. Results in the order of `urls`.
pub(crate) async fn connect_many(
    server: SocketAddr,
    urls: Vec<String>,
    concurrency: usize,
    sources: usize,
    first_source: usize,
) -> (Vec<Option<ClientWs>>, BTreeMap<String, usize>, Duration) {
    let started = Instant::now();
    let semaphore = Arc::new(Semaphore::new(concurrency));
    let mut handles: Vec<JoinHandle<Result<ClientWs, String>>> = Vec::with_capacity(urls.len());
    for (i, url) in urls.into_iter().enumerate() {
        let Ok(permit) = semaphore.clone().acquire_owned().await else {
            break;
        };
        let source = Ipv4Addr::new(127, 0, 0, 2 + ((first_source + i) % sources) as u8);
        handles.push(tokio::spawn(async move {
            let r = connect_one(
                server,
                source,
                &url,
                Instant::now() + Duration::from_secs(30),
            )
            .await;
            drop(permit);
            r
        }));
    }
    let mut out = Vec::with_capacity(handles.len());
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for h in handles {
        match h.await {
            Ok(Ok(ws)) => out.push(Some(ws)),
            Ok(Err(why)) => {
                *failures.entry(why).or_default() += 1;
                out.push(None);
            }
            Err(e) => {
                *failures.entry(format!("task failed: {e}")).or_default() += 1;
                out.push(None);
            }
        }
    }
    (out, failures, started.elapsed())
}

pub(crate) fn ended_by(
    msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> String {
    match msg {
        None => "connection ended".into(),
        Some(Err(e)) => format!("connection error: {e}"),
        Some(Ok(Message::Close(f))) => format!(
            "close frame {}",
            f.map(|f| format!("{} {}", u16::from(f.code), f.reason))
                .unwrap_or_else(|| "1005".into())
        ),
        Some(Ok(_)) => "unexpected frame".into(),
    }
}

/// The number after `"rep":` in a message frame, without parsing the JSON.
pub(crate) fn rep_of(text: &str) -> Option<usize> {
    let at = text.find("\"rep\":")? + 6;
    let digits: &str = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// The disk's commit latency, as SQLite pays it with `synchronous = FULL`:
/// 200 appends of 4 KiB to a file in the temp folder, each followed by
/// fsync. Returns "p50 … / p99 …".
pub(crate) async fn fsync_probe() -> String {
    let probe = tokio::task::spawn_blocking(|| -> std::io::Result<Vec<u64>> {
        let dir = tempfile::tempdir()?;
        let mut f = std::fs::File::create(dir.path().join("probe"))?;
        let page = [0x5au8; 4096];
        let mut times = Vec::with_capacity(200);
        for _ in 0..200 {
            let t = std::time::Instant::now();
            f.write_all(&page)?;
            f.sync_all()?;
            times.push(t.elapsed().as_nanos() as u64);
        }
        times.sort_unstable();
        Ok(times)
    })
    .await;
    match probe {
        Ok(Ok(t)) => format!(
            "p50 {} / p99 {}",
            ms_ns(pct(&t, 50.0)),
            ms_ns(pct(&t, 99.0))
        ),
        Ok(Err(e)) => format!("failed: {e}"),
        Err(e) => format!("failed: {e}"),
    }
}

pub(crate) fn pct(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub(crate) fn ms_ns(ns: Option<u64>) -> String {
    ns.map_or("-".into(), |n| format!("{:.2} ms", n as f64 / 1e6))
}

pub(crate) fn ms_d(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

pub(crate) fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// CPU used by the server, by this process and (on PostgreSQL) by the
/// database server over an interval.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CpuMark {
    pub(crate) at: Option<std::time::Instant>,
    pub(crate) server: Option<f64>,
    pub(crate) bench: Option<f64>,
    /// Every process of the PostgreSQL server, when there is one.
    pub(crate) db: Option<f64>,
}

impl CpuMark {
    pub(crate) fn take(server_pid: u32) -> CpuMark {
        CpuMark::take_with_db(server_pid, None)
    }

    /// With the CPU of the PostgreSQL server whose postmaster is `db_pid`.
    pub(crate) fn take_with_db(server_pid: u32, db_pid: Option<u32>) -> CpuMark {
        CpuMark {
            at: Some(std::time::Instant::now()),
            server: cpu_seconds(server_pid),
            bench: cpu_seconds(std::process::id()),
            db: db_pid.and_then(server_tree_cpu_seconds),
        }
    }

    /// (server, bench) CPU seconds from `self` to `later`.
    pub(crate) fn used(&self, later: &CpuMark) -> (Option<f64>, Option<f64>) {
        let d = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        (d(self.server, later.server), d(self.bench, later.bench))
    }

    /// The database server's CPU seconds from `self` to `later`.
    pub(crate) fn db_used(&self, later: &CpuMark) -> Option<f64> {
        Some(later.db? - self.db?)
    }

    fn secs(&self, later: &CpuMark) -> Option<f64> {
        later
            .at
            .zip(self.at)
            .map(|(b, a)| b.duration_since(a).as_secs_f64())
            .filter(|s| *s > 0.0)
    }

    /// (server, bench) cores from `self` to `later`.
    pub(crate) fn cores(&self, later: &CpuMark) -> (Option<f64>, Option<f64>) {
        let Some(secs) = self.secs(later) else {
            return (None, None);
        };
        let (s, b) = self.used(later);
        (s.map(|x| x / secs), b.map(|x| x / secs))
    }

    /// The database server's cores from `self` to `later`.
    pub(crate) fn db_cores(&self, later: &CpuMark) -> Option<f64> {
        Some(self.db_used(later)? / self.secs(later)?)
    }
}

/// utime, stime, cutime and cstime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<(String, [f64; 4])> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, ppid 4, utime 14 … cstime 17.
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    Some((f.get(1)?.to_string(), [t(11)?, t(12)?, t(13)?, t(14)?]))
}

/// CPU seconds of a server and its children: the parent's own time and
/// that of the children it has reaped (a backend that ended), plus the
/// time of the children alive now (PostgreSQL's backends, its WAL writer,
/// checkpointer and the rest).
pub(crate) fn server_tree_cpu_seconds(parent: u32) -> Option<f64> {
    let (_, [u, s, cu, cs]) = cpu_ticks(parent)?;
    let mut ticks = u + s + cu + cs;
    let wanted = parent.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, [u, s, _, _])) = cpu_ticks(pid) {
            if ppid == wanted {
                ticks += u + s;
            }
        }
    }
    #[allow(unsafe_code)]
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Counts what reaches the webhook endpoint; every request is answered 204.
#[derive(Default)]
pub(crate) struct Hooks {
    pub(crate) requests: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) messages: AtomicU64,
    pub(crate) opened: AtomicU64,
    pub(crate) online: AtomicU64,
    pub(crate) other: AtomicU64,
}

impl Hooks {
    pub(crate) fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }
    pub(crate) fn messages(&self) -> u64 {
        self.messages.load(Ordering::SeqCst)
    }
    pub(crate) fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }
    pub(crate) fn online(&self) -> u64 {
        self.online.load(Ordering::SeqCst)
    }
}

pub(crate) async fn hook(State(h): State<Arc<Hooks>>, body: Bytes) -> StatusCode {
    h.requests.fetch_add(1, Ordering::Relaxed);
    // Envelopes read `{"id":…,"type":"control.delivered",…}`; a batch holds several.
    let all = occurrences(&body, b"{\"id\":");
    let delivered = occurrences(&body, b"\"type\":\"control.delivered\"");
    let messages = occurrences(&body, b"\"type\":\"message.created\"");
    let opened = occurrences(&body, b"\"type\":\"connection.opened\"");
    let online = occurrences(&body, b"\"type\":\"user.online\"");
    let batch = u64::from(occurrences(&body, b"\"type\":\"batch\"") > 0);
    h.delivered.fetch_add(delivered, Ordering::SeqCst);
    h.messages.fetch_add(messages, Ordering::SeqCst);
    h.opened.fetch_add(opened, Ordering::SeqCst);
    h.online.fetch_add(online, Ordering::SeqCst);
    h.other.fetch_add(
        all.saturating_sub(delivered + messages + opened + online + batch),
        Ordering::Relaxed,
    );
    StatusCode::NO_CONTENT
}

pub(crate) async fn start_hooks() -> anyhow::Result<(Arc<Hooks>, String)> {
    let hooks = Arc::new(Hooks::default());
    let app = Router::new().fallback(hook).with_state(hooks.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("the benchmark's webhook receiver stopped: {e}");
        }
    });
    Ok((hooks, format!("http://{addr}/hooks")))
}

// ---------------------------------------------------------------------------
// Tables

/// A column label on one line (the lines of a multi-line label joined).
pub(crate) fn flat(label: &str) -> String {
    label.replace('\n', ", ")
}

/// Prints a table: column labels, then rows of (name, cells, target). A
/// label may have several lines (`\n`, e.g. the engine above the run);
/// labels are aligned on their last line. Each column is as wide as its
/// widest label line or cell. With `target_heading`, the last column holds
/// each row's target.
pub(crate) fn print_table(
    labels: &[String],
    rows: &[(String, Vec<String>, String)],
    target_heading: Option<&str>,
) {
    let name_w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let lines: Vec<Vec<&str>> = labels.iter().map(|l| l.split('\n').collect()).collect();
    let depth = lines.iter().map(Vec::len).max().unwrap_or(1);
    let widths: Vec<usize> = (0..labels.len())
        .map(|c| {
            lines[c]
                .iter()
                .map(|l| l.chars().count())
                .chain(
                    rows.iter()
                        .filter_map(|r| r.1.get(c).map(|x| x.chars().count())),
                )
                .max()
                .unwrap_or(8)
        })
        .collect();
    let mut width = 0;
    for d in 0..depth {
        let mut header = format!("{:name_w$}", "");
        for (c, l) in lines.iter().enumerate() {
            // Aligned on the last line: shorter labels start lower.
            let text = (d + l.len()).checked_sub(depth).map_or("", |i| l[i]);
            header.push_str(&format!("  {text:>w$}", w = widths[c]));
        }
        if d + 1 == depth {
            if let Some(t) = target_heading {
                header.push_str(&format!("  {t}"));
            }
        }
        width = width.max(header.chars().count());
        println!("{}", header.trim_end());
    }
    println!("{}", "-".repeat(width));
    for (name, cells, target) in rows {
        let mut line = format!("{name:name_w$}");
        for (c, cell) in cells.iter().enumerate() {
            let w = widths.get(c).copied().unwrap_or(8);
            line.push_str(&format!("  {cell:>w$}"));
        }
        if target_heading.is_some() {
            line.push_str(&format!("  {target}"));
        }
        println!("{}", line.trim_end());
    }
}

// ---------------------------------------------------------------------------
// Storage engines

/// An engine's name in reports.
pub(crate) fn engine_name(engine: Engine) -> &'static str {
    match engine {
        Engine::Sqlite => "SQLite",
        Engine::Postgres => "PostgreSQL",
    }
}

/// The private PostgreSQL server of a run, and what it runs with.
pub(crate) struct PgBench {
    pub(crate) server: PgServer,
    /// The postmaster's process id, for the server's CPU.
    pub(crate) postmaster: Option<u32>,
    /// `server_version`.
    pub(crate) version: String,
    /// The settings the report names, as the server shows them.
    pub(crate) settings: Vec<(&'static str, String)>,
}

/// The settings of the PostgreSQL server printed in the report.
const PG_SETTINGS: [&str; 7] = [
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
    "max_wal_size",
    "max_connections",
];

/// Cumulative counters of the PostgreSQL server (`pg_stat_wal`) and of one
/// database (`pg_stat_database`). The server publishes them about once a
/// second, so a difference over a few seconds is approximate.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PgStats {
    pub(crate) wal_records: f64,
    pub(crate) wal_bytes: f64,
    pub(crate) wal_writes: f64,
    pub(crate) wal_syncs: f64,
    pub(crate) commits: f64,
    pub(crate) rollbacks: f64,
    /// Rows inserted, updated and deleted in the database.
    pub(crate) inserted: f64,
    pub(crate) updated: f64,
    pub(crate) deleted: f64,
}

impl PgStats {
    /// What the server did from `self` to `later`, over `secs` seconds, as
    /// one report line.
    pub(crate) fn line(&self, later: &PgStats, secs: f64) -> String {
        let commits = later.commits - self.commits;
        let syncs = later.wal_syncs - self.wal_syncs;
        let bytes = later.wal_bytes - self.wal_bytes;
        let per_s = |x: f64| thousands(x / secs.max(1e-9));
        format!(
            "PostgreSQL (pg_stat_*, published about once a second): {} commits ({}/s), {} rollbacks; rows {} inserted, {} updated, {} deleted; WAL {} records, {:.1} MiB ({:.1} MiB/s), {} writes, {} fsyncs ({}/s, {:.2} per commit)",
            thousands(commits),
            per_s(commits),
            thousands(later.rollbacks - self.rollbacks),
            thousands(later.inserted - self.inserted),
            thousands(later.updated - self.updated),
            thousands(later.deleted - self.deleted),
            thousands(later.wal_records - self.wal_records),
            bytes / 1048576.0,
            bytes / 1048576.0 / secs.max(1e-9),
            thousands(later.wal_writes - self.wal_writes),
            thousands(syncs),
            per_s(syncs),
            if commits > 0.0 { syncs / commits } else { 0.0 }
        )
    }
}

/// The storage engines of a run (`--storage`), with the PostgreSQL server
/// when one of them is PostgreSQL.
pub(crate) struct Storage {
    pub(crate) engines: Vec<Engine>,
    pub(crate) pg: Option<Arc<PgBench>>,
}

/// Runs `f` on a blocking thread; a panic (the harness's way of failing)
/// becomes an error (its message is printed by the panic hook).
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("{what} failed: {e}"))
}

impl Storage {
    /// The engines of `arg`; for PostgreSQL, a private server started with
    /// PostgreSQL's durable defaults (`PgOptions::durable`).
    pub(crate) async fn start(arg: StorageArg) -> anyhow::Result<Storage> {
        let engines = arg.engines();
        let mut pg = None;
        if engines.contains(&Engine::Postgres) {
            eprintln!("starting a private PostgreSQL server (durable settings)");
            let sql = format!(
                "SELECT current_setting('server_version'), {}",
                PG_SETTINGS
                    .iter()
                    .map(|n| format!("current_setting('{n}')"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let bench = blocking("starting PostgreSQL", move || {
                let server = PgServer::start(PgOptions::durable());
                let postmaster = std::fs::read_to_string(server.data_dir().join("postmaster.pid"))
                    .ok()
                    .and_then(|t| t.lines().next()?.trim().parse::<u32>().ok());
                let row = server.psql("postgres", &sql);
                let mut values = row.trim().split('|').map(str::to_string);
                let version = values.next().unwrap_or_default();
                let settings = PG_SETTINGS.iter().copied().zip(values).collect();
                PgBench {
                    server,
                    postmaster,
                    version,
                    settings,
                }
            })
            .await?;
            pg = Some(Arc::new(bench));
        }
        Ok(Storage { engines, pg })
    }

    /// Whether the run compares engines (`--storage both`).
    pub(crate) fn both(&self) -> bool {
        self.engines.len() > 1
    }

    /// The postmaster of the PostgreSQL server, on `engine` PostgreSQL.
    pub(crate) fn db_pid(&self, engine: Engine) -> Option<u32> {
        match engine {
            Engine::Postgres => self.pg.as_ref()?.postmaster,
            Engine::Sqlite => None,
        }
    }

    /// A PostgreSQL setting as the server showed it.
    pub(crate) fn pg_setting(&self, name: &str) -> Option<&str> {
        let pg = self.pg.as_ref()?;
        pg.settings
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// One line per engine, for the report's header.
    pub(crate) fn header_lines(&self) -> Vec<String> {
        self.engines
            .iter()
            .map(|&e| match (e, &self.pg) {
                (Engine::Sqlite, _) => "storage, SQLite: the gateway's default engine, one file (data/plugboard.db) in each gateway's temp folder, WAL, synchronous=FULL".to_string(),
                (Engine::Postgres, Some(pg)) => format!(
                    "storage, PostgreSQL {}: a private server this benchmark started (initdb in {}, TCP on 127.0.0.1:{}), {}; a fresh database per gateway, dropped after it; the gateway's [storage] defaults (pool_size 16, statement_timeout 10s)",
                    pg.version,
                    pg.server
                        .data_dir()
                        .parent()
                        .map_or("?".into(), |p| p.display().to_string()),
                    pg.server.port(),
                    pg.settings
                        .iter()
                        .map(|(n, v)| format!("{n}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (Engine::Postgres, None) => "storage, PostgreSQL: no server".to_string(),
            })
            .collect()
    }

    /// `opts` for a gateway on `engine`: SQLite in its folder, or a fresh
    /// database on the private server.
    pub(crate) async fn options(
        &self,
        engine: Engine,
        opts: GatewayOptions,
    ) -> anyhow::Result<GatewayOptions> {
        match engine {
            // Set, so that TEST_STORAGE in the environment does
            // not move the gateway to the harness's non-durable server.
            Engine::Sqlite => Ok(opts.engine(Engine::Sqlite)),
            Engine::Postgres => {
                let url = self.create_database().await?;
                Ok(opts.postgres_database(&url))
            }
        }
    }

    /// Starts a gateway with `opts` on `engine`. `Gateway::start` panics
    /// when the gateway does not come up, which becomes an error.
    pub(crate) async fn start_gateway(
        &self,
        engine: Engine,
        opts: GatewayOptions,
    ) -> anyhow::Result<Gateway> {
        let opts = self.options(engine, opts).await?;
        let url = opts.database_url.clone();
        match tokio::spawn(Gateway::start(opts)).await {
            Ok(gw) => Ok(gw),
            Err(e) => {
                if let Some(url) = url {
                    self.drop_database(url).await;
                }
                Err(anyhow::anyhow!(
                    "the gateway on {} did not start: {e}",
                    engine_name(engine)
                ))
            }
        }
    }

    /// A fresh database on the private server (for a cluster's nodes).
    pub(crate) async fn create_database(&self) -> anyhow::Result<String> {
        let pg = self
            .pg
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no PostgreSQL server"))?;
        blocking("creating a database", move || pg.server.create_database()).await
    }

    /// Drops a database of the private server; a failure is printed.
    pub(crate) async fn drop_database(&self, url: String) {
        if let Some(pg) = self.pg.clone() {
            let dropped = blocking("dropping a database", move || {
                pg.server.try_drop_database(&url)
            })
            .await;
            match dropped {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("dropping the gateway's database: {e}"),
                Err(e) => eprintln!("{e:#}"),
            }
        }
    }

    /// Kills a gateway and drops its PostgreSQL database, if it has one.
    pub(crate) async fn finish(&self, gw: Gateway) {
        let url = gw.database_url().map(str::to_string);
        gw.kill().await;
        if let Some(url) = url {
            self.drop_database(url).await;
        }
    }

    /// `psql` on the gateway's database: its tuples-only output.
    async fn psql(&self, gw: &Gateway, sql: &'static str) -> Option<String> {
        let pg = self.pg.clone()?;
        let url = gw.database_url()?.to_string();
        blocking("psql", move || pg.server.psql(&url, sql))
            .await
            .ok()
    }

    /// `pg_database_size` of the gateway's database (`None` on SQLite).
    pub(crate) async fn database_size(&self, gw: &Gateway) -> Option<u64> {
        self.psql(gw, "SELECT pg_database_size(current_database())")
            .await?
            .trim()
            .parse()
            .ok()
    }

    /// The server's WAL counters and the gateway's database's transaction
    /// counters (`None` on SQLite).
    pub(crate) async fn pg_stats(&self, gw: &Gateway) -> Option<PgStats> {
        let row = self
            .psql(
                gw,
                "SELECT w.wal_records, w.wal_bytes, w.wal_write, w.wal_sync, d.xact_commit, d.xact_rollback, \
                 d.tup_inserted, d.tup_updated, d.tup_deleted \
                 FROM pg_stat_wal w, pg_stat_database d WHERE d.datname = current_database()",
            )
            .await?;
        let v: Vec<f64> = row
            .trim()
            .split('|')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .ok()?;
        (v.len() == 9).then(|| PgStats {
            wal_records: v[0],
            wal_bytes: v[1],
            wal_writes: v[2],
            wal_syncs: v[3],
            commits: v[4],
            rollbacks: v[5],
            inserted: v[6],
            updated: v[7],
            deleted: v[8],
        })
    }
}
