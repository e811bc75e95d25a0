//! What the benchmark programs share: machine and process figures, a
//! `/metrics` snapshot and its differences, the in-process webhook
//! receiver, client connections bound to 127.0.0.x sources, and figure
//! formatting. Each program uses part of it.
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

/// Nanoseconds since the clock every task of this process shares.
/// The instant all nanosecond stamps count from.
pub(crate) static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();

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

pub(crate) fn rss_mib(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
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

/// CPU used by the server and by this process over an interval.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CpuMark {
    pub(crate) at: Option<std::time::Instant>,
    pub(crate) server: Option<f64>,
    pub(crate) bench: Option<f64>,
}

impl CpuMark {
    pub(crate) fn take(server_pid: u32) -> CpuMark {
        CpuMark {
            at: Some(std::time::Instant::now()),
            server: cpu_seconds(server_pid),
            bench: cpu_seconds(std::process::id()),
        }
    }

    /// (server, bench) CPU seconds from `self` to `later`.
    pub(crate) fn used(&self, later: &CpuMark) -> (Option<f64>, Option<f64>) {
        let d = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        (d(self.server, later.server), d(self.bench, later.bench))
    }

    /// (server, bench) cores from `self` to `later`.
    pub(crate) fn cores(&self, later: &CpuMark) -> (Option<f64>, Option<f64>) {
        let Some(secs) = later
            .at
            .zip(self.at)
            .map(|(b, a)| b.duration_since(a).as_secs_f64())
            .filter(|s| *s > 0.0)
        else {
            return (None, None);
        };
        let (s, b) = self.used(later);
        (s.map(|x| x / secs), b.map(|x| x / secs))
    }
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
