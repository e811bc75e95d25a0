//! `bench-cluster`: the gateway as a cluster (several nodes on one
//! PostgreSQL database, routed through NATS) beside one node measured the
//! same way in the same run (DESIGN.md §7: "three nodes deliver cross-node
//! 1:1 and group traffic; figures beside one node"; 50,000 idle
//! connections across three nodes, ≤ 10 KiB RSS each; one message to a
//! 10,000-member group in ≤ 100 ms).
//!
//! ```text
//! cargo build --release -p plugboard-tests --bin bench-cluster --bin gateway-under-test
//! ./target/release/bench-cluster [--quick] [--nodes N] [--pairs P] [--idle C] ...
//! ```
//!
//! `--help` lists every option. The defaults take about four minutes on a
//! 2-core machine; `--quick` is a smoke run with small sizes.
//!
//! Everything runs on one private PostgreSQL server that this program
//! starts (`PgOptions::durable()`: `fsync` and `synchronous_commit` on), a
//! fresh database per setup, and for each cluster a private NATS server
//! (the test harness's [`Cluster`]). Every gateway is the real binary with
//! one webhook endpoint answered 204 by a receiver in this process, log
//! level warn, production heartbeat, and in a cluster the default lease
//! timing (10 s, renewed every 2 s). The setups compared are:
//!
//! - **1 node**: one gateway with no `[cluster]` section, on PostgreSQL
//!   (the baseline: what a cluster is measured against);
//! - **N nodes, same node**: a cluster of N, each pair's sender and
//!   receiver on one node (what clustering costs a message that stays);
//! - **N nodes, cross-node**: the same cluster, every receiver on the next
//!   node after its sender's (every message crosses NATS).
//!
//! The measurements:
//!
//! 1. **1:1 throughput.** P sender connections each message their own
//!    receiver (person channels), W sends in flight each. After a warm-up,
//!    for D seconds: acknowledged and delivered msg/s, send→deliver
//!    latency (the send instant, on a clock shared by the process, travels
//!    in the payload). Every message carries its sender's counter, so the
//!    receivers count what was lost, duplicated or out of order.
//! 2. **Latency** at a paced rate (`--paced-rate`, 300 msg/s by default,
//!    below every setup's maximum here): p50, p99 and p99.9 send→deliver.
//! 3. **Group fan-out.** A group of G members (10,000), every one connected,
//!    spread over the nodes in turn; one message through `POST /v1/messages`
//!    on the first node, repeated; the time from the request until the last
//!    member had it, and for a cluster the last member on the first node
//!    and on the others.
//! 4. **Idle connections.** C authenticated connections (50,000) held by
//!    the N nodes together, opened by several client processes (this
//!    executable with a hidden `--hold-connections`, each process being
//!    capped at 20,000 open files here); each node's RSS before and after,
//!    per connection it holds. Beside it, one node without `[cluster]`
//!    holding one node's share (C / N).
//!
//! Every wait is bounded. A failure is reported, with what was seen, and is
//! not a crash: a benchmark prints figures, it asserts nothing. All traffic
//! stays on 127.0.0.x. The clients, the webhook receiver, PostgreSQL, NATS
//! and every node share the machine's cores, so every rate is a figure for
//! the whole system.

mod cli;
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use plugboard_tests::gateway::{API_KEY, JWT_SECRET};
use plugboard_tests::{Cluster, ClusterOptions, Engine, Gateway, GatewayOptions};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use cli::{clamped, seconds, StorageArg};
use common::*;

/// DESIGN.md §7.
const TARGET_FANOUT_MS: f64 = 100.0;
const TARGET_IDLE: usize = 50_000;
const TARGET_KIB_PER_CONNECTION: f64 = 10.0;

/// The hidden argument that turns this executable into a holder of idle
/// connections (see [`hold_connections`]).
const HOLD_FLAG: &str = "--hold-connections";
/// The line a holder prints once its connections are open.
const HELD: &str = "held ";

/// Longest wait for outstanding sendacks after the load stops, and for the
/// receivers to get what was acknowledged.
const GRACE: Duration = Duration::from_secs(10);

/// A cluster's figures beside one node's, measured in the same run
#[derive(Debug, Parser)]
#[command(
    name = "bench-cluster",
    args_override_self = true,
    after_help = "An option left out takes its default, or with --quick its smoke-run size."
)]
struct Cli {
    /// Smoke run: small sizes, a few seconds per measurement
    #[arg(long)]
    quick: bool,
    /// Nodes in the cluster [default: 3]
    #[arg(long, value_name = "N", value_parser = clamped(2, 8))]
    nodes: Option<usize>,
    /// 1:1 sender/receiver pairs [default: 200; --quick: 8]
    #[arg(long, value_name = "P", value_parser = clamped(1, 2000))]
    pairs: Option<usize>,
    /// Sends in flight per sender [default: 8]
    #[arg(long, value_name = "W", value_parser = clamped(1, 256))]
    window: Option<usize>,
    /// Seconds measured per 1:1 run, after a 2 s warm-up [default: 10; --quick: 3]
    #[arg(long, value_name = "SECS", value_parser = seconds(1))]
    duration: Option<Duration>,
    /// Messages per second, all pairs together, of the latency runs [default: 300]
    #[arg(long, value_name = "RATE", value_parser = clamped(1, 100_000))]
    paced_rate: Option<usize>,
    /// Members of the fan-out group, all connected (0 skips it) [default: 10000; --quick: 1000]
    #[arg(long, value_name = "G", value_parser = clamped(0, 15_000))]
    group: Option<usize>,
    /// Messages sent to the group [default: 5; --quick: 3]
    #[arg(long, value_name = "K", value_parser = clamped(1, 100))]
    fanout_runs: Option<usize>,
    /// Idle connections held by the cluster's nodes together (0 skips it) [default: 50000; --quick: 3000]
    #[arg(long, value_name = "C", value_parser = clamped(0, 150_000))]
    idle: Option<usize>,
    /// Client processes holding the idle connections [default: the fewest
    /// that keep each under 15,000]
    #[arg(long, value_name = "H", value_parser = clamped(1, 16))]
    holders: Option<usize>,
    /// Connection attempts in flight, per client process [default: 256]
    #[arg(long, value_name = "N", value_parser = clamped(1, 4096))]
    concurrency: Option<usize>,
}

#[derive(Clone, Debug)]
struct Options {
    quick: bool,
    nodes: usize,
    pairs: usize,
    window: usize,
    warmup: Duration,
    duration: Duration,
    paced_rate: f64,
    group: usize,
    fanout_runs: usize,
    idle: usize,
    holders: usize,
    concurrency: usize,
}

impl From<Cli> for Options {
    fn from(c: Cli) -> Options {
        let q = c.quick;
        let nodes = c.nodes.unwrap_or(3);
        let idle = c.idle.unwrap_or(if q { 3000 } else { TARGET_IDLE });
        Options {
            quick: q,
            nodes,
            pairs: c.pairs.unwrap_or(if q { 8 } else { 200 }),
            window: c.window.unwrap_or(8),
            warmup: Duration::from_secs(2),
            duration: c
                .duration
                .unwrap_or(Duration::from_secs(if q { 3 } else { 10 })),
            paced_rate: c.paced_rate.unwrap_or(300) as f64,
            group: c.group.unwrap_or(if q { 1000 } else { 10_000 }),
            fanout_runs: c.fanout_runs.unwrap_or(if q { 3 } else { 5 }),
            idle,
            holders: c.holders.unwrap_or_else(|| idle.div_ceil(15_000).max(1)),
            concurrency: c.concurrency.unwrap_or(256),
        }
    }
}

fn main() -> ExitCode {
    // Checked before the options, which do not list it: the benchmark
    // starts this executable with it to hold idle connections.
    if std::env::args_os().nth(1).is_some_and(|a| a == HOLD_FLAG) {
        return hold_connections(std::env::args().skip(2).collect());
    }
    let opts = Options::from(Cli::parse());
    // Before anything starts: the gateways and the holders inherit it.
    plugboard_tests::raise_fd_limit();
    let _ = now_ns();
    run_program("bench-cluster", run(opts))
}

// ---------------------------------------------------------------------------
// Setups

/// The gateways of one setup: one node without `[cluster]`, or a cluster;
/// with the database they run on.
enum Nodes {
    Single(Gateway),
    Cluster { cluster: Cluster, database: String },
}

impl Nodes {
    fn len(&self) -> usize {
        match self {
            Nodes::Single(_) => 1,
            Nodes::Cluster { cluster, .. } => cluster.len(),
        }
    }

    fn node(&self, i: usize) -> &Gateway {
        match self {
            Nodes::Single(gw) => gw,
            Nodes::Cluster { cluster, .. } => cluster.node(i),
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.node(i)
            .addr
            .parse()
            .expect("the harness gives a gateway an IP address")
    }

    fn pids(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.node(i).pid()).collect()
    }

    /// A token for `user`, good on every node (they share the secret).
    fn url(&self, i: usize, user: &str) -> String {
        format!(
            "ws://{}/v1/ws?token={}",
            self.addr(i),
            plugboard::auth::mint_token(user, None, None, JWT_SECRET.as_bytes())
        )
    }

    /// Kills the gateways (and the cluster's NATS), then drops the database.
    async fn finish(self, storage: &Storage) {
        match self {
            Nodes::Single(gw) => storage.finish(gw).await,
            Nodes::Cluster { cluster, database } => {
                let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
                storage.drop_database(database).await;
            }
        }
    }
}

/// One gateway with no `[cluster]` section.
async fn start_single(storage: &Storage, hook_url: &str) -> anyhow::Result<Nodes> {
    let opts = GatewayOptions::with_receiver(hook_url).extra(GATEWAY_TOML);
    Ok(Nodes::Single(
        storage.start_gateway(Engine::Postgres, opts).await?,
    ))
}

/// A cluster of `n` nodes on a fresh database of the run's server.
async fn start_cluster(storage: &Storage, n: usize, hook_url: &str) -> anyhow::Result<Nodes> {
    let database = storage.create_database().await?;
    let opts = ClusterOptions::nodes(n)
        .lease(Duration::from_secs(10), Duration::from_secs(2))
        .with_receiver(hook_url)
        .database(&database)
        .extra(GATEWAY_TOML);
    // Cluster::start panics when a node does not come up.
    match tokio::spawn(Cluster::start(opts)).await {
        Ok(cluster) => Ok(Nodes::Cluster { cluster, database }),
        Err(e) => {
            storage.drop_database(database).await;
            Err(anyhow::anyhow!("the cluster of {n} did not start: {e}"))
        }
    }
}

/// A cluster of `opts.nodes`, or one node without `[cluster]`.
async fn start_nodes(
    cluster: bool,
    storage: &Storage,
    opts: &Options,
    hook_url: &str,
) -> anyhow::Result<Nodes> {
    if cluster {
        start_cluster(storage, opts.nodes, hook_url).await
    } else {
        start_single(storage, hook_url).await
    }
}

/// Where each pair's receiver is, given its sender's node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// On the sender's node.
    Same,
    /// On the next node.
    Cross,
}

/// A column of the 1:1 tables.
struct Setup {
    label: String,
    cluster: bool,
    placement: Placement,
}

fn setups(opts: &Options) -> Vec<Setup> {
    vec![
        Setup {
            label: "1 node".into(),
            cluster: false,
            placement: Placement::Same,
        },
        Setup {
            label: format!("{} nodes, same node", opts.nodes),
            cluster: true,
            placement: Placement::Same,
        },
        Setup {
            label: format!("{} nodes, cross-node", opts.nodes),
            cluster: true,
            placement: Placement::Cross,
        },
    ]
}

// ---------------------------------------------------------------------------
// CPU of a setup

/// CPU seconds used so far by every node, this process and PostgreSQL.
#[derive(Clone, Copy, Default)]
struct Cpu {
    at: Option<std::time::Instant>,
    nodes: Option<f64>,
    bench: Option<f64>,
    db: Option<f64>,
}

impl Cpu {
    fn take(pids: &[u32], db: Option<u32>) -> Cpu {
        Cpu {
            at: Some(std::time::Instant::now()),
            nodes: pids.iter().map(|&p| cpu_seconds(p)).sum(),
            bench: cpu_seconds(std::process::id()),
            db: db.and_then(server_tree_cpu_seconds),
        }
    }

    /// Cores used from `self` to `later`: (nodes, bench, PostgreSQL).
    fn cores(&self, later: &Cpu) -> [Option<f64>; 3] {
        let secs = later
            .at
            .zip(self.at)
            .map(|(b, a)| b.duration_since(a).as_secs_f64())
            .filter(|s| *s > 0.0);
        let d = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / secs?);
        [
            d(self.nodes, later.nodes),
            d(self.bench, later.bench),
            d(self.db, later.db),
        ]
    }
}

fn cores_text(c: Option<f64>) -> String {
    c.map_or("-".into(), |c| format!("{c:.2}"))
}

// ---------------------------------------------------------------------------
// 1:1 load

/// What the senders and receivers of one run share.
struct LoadCtx {
    window: usize,
    /// Per sender: the time between sends (paced runs only).
    interval: Option<Duration>,
    pairs: usize,
    start: Instant,
    from_ns: u64,
    stop: Instant,
    stop_ns: u64,
    /// Per pair: sends acknowledged so far.
    acked: Vec<AtomicU64>,
}

#[derive(Default)]
struct SendOut {
    acked_in_window: u64,
    errors: BTreeMap<String, usize>,
    unacked: u64,
    ended: Option<String>,
}

/// Sends `{"t": <send instant>, "k": <counter>}` to `peer`, at most
/// `window` unanswered, paced or as fast as the acks come.
async fn sender(mut ws: ClientWs, peer: String, index: usize, ctx: Arc<LoadCtx>) -> SendOut {
    let mut out = SendOut::default();
    let mut pending = 0usize;
    let mut k = 0u64;
    let mut next_due = ctx.start
        + ctx
            .interval
            .map(|i| i.mul_f64(index as f64 / ctx.pairs as f64))
            .unwrap_or_default();
    let give_up = ctx.stop + GRACE;
    sleep_until(ctx.start).await;
    loop {
        let now = Instant::now();
        let sending = now < ctx.stop;
        if !sending && pending == 0 {
            break;
        }
        if now >= give_up {
            out.unacked = pending as u64;
            break;
        }
        let mut wrote = false;
        while sending && pending < ctx.window && Instant::now() >= next_due {
            let frame = format!(
                r#"{{"type":"send","id":{k},"channel_type":"person","channel_id":"{peer}","payload":{{"t":{},"k":{k}}}}}"#,
                now_ns()
            );
            if let Err(e) = ws.feed(Message::text(frame)).await {
                out.ended = Some(format!("send failed: {e}"));
                out.unacked = pending as u64;
                return out;
            }
            pending += 1;
            k += 1;
            if let Some(i) = ctx.interval {
                next_due += i;
            }
            wrote = true;
        }
        if wrote {
            if let Err(e) = ws.flush().await {
                out.ended = Some(format!("send failed: {e}"));
                out.unacked = pending as u64;
                return out;
            }
        }
        let wake = match (sending, ctx.interval) {
            (true, Some(_)) if pending < ctx.window => next_due.min(ctx.stop),
            (true, _) => ctx.stop,
            (false, _) => give_up,
        };
        tokio::select! {
            msg = ws.next() => {
                let text = match &msg {
                    Some(Ok(Message::Text(t))) => t.as_str(),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        out.ended = Some(ended_by(msg));
                        out.unacked = pending as u64;
                        return out;
                    }
                    Some(Ok(_)) => continue,
                };
                let Ok(frame) = serde_json::from_str::<Value>(text) else { continue };
                match frame["type"].as_str() {
                    Some("sendack") => {
                        pending = pending.saturating_sub(1);
                        ctx.acked[index].fetch_add(1, Ordering::SeqCst);
                        if (ctx.from_ns..ctx.stop_ns).contains(&now_ns()) {
                            out.acked_in_window += 1;
                        }
                    }
                    Some("error") => {
                        pending = pending.saturating_sub(1);
                        let code = frame["code"].as_str().unwrap_or("?").to_string();
                        *out.errors.entry(code).or_default() += 1;
                    }
                    _ => {}
                }
            }
            _ = sleep_until(wake) => {}
        }
    }
    out
}

#[derive(Default)]
struct RecvOut {
    /// Distinct messages received (by the sender's counter).
    delivered: u64,
    delivered_in_window: u64,
    duplicates: u64,
    out_of_order: u64,
    /// Send to delivery, for sends made in the window, ns.
    lat: Vec<u64>,
    ended: Option<String>,
}

/// Reads messages until told to stop; checks the sender's counter goes up
/// by one each time.
async fn receiver(
    mut ws: ClientWs,
    ctx: Arc<LoadCtx>,
    delivered: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> RecvOut {
    let mut out = RecvOut::default();
    let mut next_k = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws.next() => {
                let now = now_ns();
                let text = match &msg {
                    Some(Ok(Message::Text(t))) => t.as_str(),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        out.ended = Some(ended_by(msg));
                        return out;
                    }
                    Some(Ok(_)) => continue,
                };
                let Ok(frame) = serde_json::from_str::<Value>(text) else { continue };
                if frame["type"] != "message" {
                    continue;
                }
                let (Some(t), Some(k)) = (frame["payload"]["t"].as_u64(), frame["payload"]["k"].as_u64()) else {
                    continue;
                };
                if k < next_k {
                    out.duplicates += 1;
                    continue;
                }
                if k > next_k {
                    out.out_of_order += 1;
                }
                next_k = k + 1;
                out.delivered += 1;
                delivered.fetch_add(1, Ordering::SeqCst);
                if (ctx.from_ns..ctx.stop_ns).contains(&now) {
                    out.delivered_in_window += 1;
                }
                if (ctx.from_ns..ctx.stop_ns).contains(&t) {
                    out.lat.push(now.saturating_sub(t));
                }
            }
        }
    }
    out
}

/// One 1:1 run's figures.
#[derive(Default)]
struct LoadResult {
    secs: f64,
    connected_pairs: usize,
    acked_in_window: u64,
    delivered_in_window: u64,
    acked_total: u64,
    delivered_total: u64,
    lost: u64,
    duplicates: u64,
    out_of_order: u64,
    unacked: u64,
    errors: BTreeMap<String, usize>,
    ended: BTreeMap<String, usize>,
    /// Sorted, ns.
    lat: Vec<u64>,
    /// Nodes, bench, PostgreSQL.
    cores: [Option<f64>; 3],
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
}

fn ms(ns: Option<u64>) -> String {
    ns.map_or("-".into(), |n| format!("{:.2} ms", n as f64 / 1e6))
}

/// One 1:1 run on `nodes`: P pairs placed by `placement`, at the maximum
/// rate (`rate` None) or paced at `rate` msg/s in all. `run` keeps the
/// users of each run apart.
async fn load_run(
    nodes: &Nodes,
    storage: &Storage,
    opts: &Options,
    placement: Placement,
    rate: Option<f64>,
    run: &str,
) -> LoadResult {
    let mut r = LoadResult::default();
    let n = nodes.len();
    let p = opts.pairs;
    let receiver_node = |i: usize| match placement {
        Placement::Same => i % n,
        Placement::Cross => (i + 1) % n,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pairs = Vec::with_capacity(p);
    for i in 0..p {
        let (s, rcv) = (format!("{run}s{i}"), format!("{run}r{i}"));
        let source = |k: usize| Ipv4Addr::new(127, 0, 0, 2 + (k % 8) as u8);
        let (s_url, r_url) = (nodes.url(i % n, &s), nodes.url(receiver_node(i), &rcv));
        let (a, b) = tokio::join!(
            connect_one(nodes.addr(i % n), source(2 * i), &s_url, deadline),
            connect_one(
                nodes.addr(receiver_node(i)),
                source(2 * i + 1),
                &r_url,
                deadline
            ),
        );
        match (a, b) {
            (Ok(a), Ok(b)) => pairs.push((a, b, rcv)),
            (Err(e), _) | (_, Err(e)) => {
                r.notes.push(format!("pair {i} could not connect: {e}"));
            }
        }
    }
    r.connected_pairs = pairs.len();
    if pairs.is_empty() {
        return r;
    }
    let start = Instant::now() + Duration::from_millis(300);
    let measure_from = start + opts.warmup;
    let stop = measure_from + opts.duration;
    let ctx = Arc::new(LoadCtx {
        window: opts.window,
        interval: rate.map(|rate| Duration::from_secs_f64(pairs.len() as f64 / rate)),
        pairs: pairs.len(),
        start,
        from_ns: ns_at(measure_from),
        stop,
        stop_ns: ns_at(stop),
        acked: (0..pairs.len()).map(|_| AtomicU64::new(0)).collect(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut delivered = Vec::new();
    for (i, (s, rcv, peer)) in pairs.into_iter().enumerate() {
        let count = Arc::new(AtomicU64::new(0));
        delivered.push(count.clone());
        receivers.push(tokio::spawn(receiver(
            rcv,
            ctx.clone(),
            count,
            stop_rx.clone(),
        )));
        senders.push(tokio::spawn(sender(s, peer, i, ctx.clone())));
    }
    sleep_until(measure_from).await;
    let pids = nodes.pids();
    let db = storage.db_pid(Engine::Postgres);
    let cpu_a = Cpu::take(&pids, db);
    sleep_until(stop).await;
    let cpu_b = Cpu::take(&pids, db);
    r.cores = cpu_a.cores(&cpu_b);
    r.secs = opts.duration.as_secs_f64();
    for s in senders {
        match s.await {
            Ok(out) => {
                r.acked_in_window += out.acked_in_window;
                r.unacked += out.unacked;
                for (k, v) in out.errors {
                    *r.errors.entry(k).or_default() += v;
                }
                if let Some(e) = out.ended {
                    *r.ended.entry(format!("sender: {e}")).or_default() += 1;
                }
            }
            Err(e) => r.notes.push(format!("a sender failed: {e}")),
        }
    }
    // Every acknowledged message must arrive; wait for it, bounded.
    let ctx2 = ctx.clone();
    let all_in = {
        let delivered = delivered.clone();
        move || {
            delivered
                .iter()
                .zip(&ctx2.acked)
                .all(|(d, a)| d.load(Ordering::SeqCst) >= a.load(Ordering::SeqCst))
        }
    };
    if !wait_for(GRACE, all_in).await {
        r.notes.push(format!(
            "not every acknowledged message had arrived {} s after the load stopped",
            GRACE.as_secs()
        ));
    }
    let _ = stop_tx.send(true);
    let mut lat = Vec::new();
    for (i, h) in receivers.into_iter().enumerate() {
        match h.await {
            Ok(out) => {
                let acked = ctx.acked[i].load(Ordering::SeqCst);
                r.acked_total += acked;
                r.delivered_total += out.delivered;
                r.lost += acked.saturating_sub(out.delivered);
                r.delivered_in_window += out.delivered_in_window;
                r.duplicates += out.duplicates;
                r.out_of_order += out.out_of_order;
                lat.extend(out.lat);
                if let Some(e) = out.ended {
                    *r.ended.entry(format!("receiver: {e}")).or_default() += 1;
                }
            }
            Err(e) => r.notes.push(format!("a receiver failed: {e}")),
        }
    }
    lat.sort_unstable();
    r.lat = lat;
    r
}

/// Both 1:1 runs of one setup, on a fresh setup of its own.
async fn one_to_one(
    setup: &Setup,
    storage: &Storage,
    opts: &Options,
    hook_url: &str,
) -> (LoadResult, LoadResult) {
    let nodes = match start_nodes(setup.cluster, storage, opts, hook_url).await {
        Ok(n) => n,
        Err(e) => {
            let failed = || LoadResult {
                notes: vec![format!("{e:#}")],
                ..LoadResult::default()
            };
            return (failed(), failed());
        }
    };
    eprintln!("[{}] 1:1 at the maximum rate", setup.label);
    let max = load_run(&nodes, storage, opts, setup.placement, None, "m").await;
    eprintln!(
        "[{}] {} msg/s acknowledged; paced at {} msg/s",
        setup.label,
        thousands(max.rate(max.acked_in_window)),
        thousands(opts.paced_rate)
    );
    let paced = load_run(
        &nodes,
        storage,
        opts,
        setup.placement,
        Some(opts.paced_rate),
        "p",
    )
    .await;
    nodes.finish(storage).await;
    (max, paced)
}

// ---------------------------------------------------------------------------
// Group fan-out

/// For one message: (node, receive ns) of every member that had it.
type Seen = Mutex<Vec<(usize, u64)>>;

struct FanoutResult {
    label: String,
    members: usize,
    connected: usize,
    connect_time: Duration,
    /// Per message: from the request, the first, median and last member;
    /// the last on the first node, the last on the others.
    reps: Vec<[Option<Duration>; 5]>,
    /// Nodes, bench, PostgreSQL, from the first request to the last member.
    cores: [Option<f64>; 3],
    notes: Vec<String>,
}

async fn fanout(nodes: &Nodes, storage: &Storage, opts: &Options, label: &str) -> FanoutResult {
    let g = opts.group;
    let n = nodes.len();
    let mut r = FanoutResult {
        label: label.to_string(),
        members: g,
        connected: 0,
        connect_time: Duration::ZERO,
        reps: Vec::new(),
        cores: [None; 3],
        notes: Vec::new(),
    };
    let http = reqwest::Client::new();
    let base = format!("http://{}", nodes.node(0).addr);
    let members: Vec<String> = (0..g).map(|i| format!("gm{i:05}")).collect();
    let created = http
        .post(format!("{base}/v1/groups"))
        .bearer_auth(API_KEY)
        .timeout(Duration::from_secs(60))
        .json(&json!({"group_id": "fanout", "members": members}))
        .send()
        .await;
    match created {
        Ok(resp) if resp.status().as_u16() == 201 => {}
        Ok(resp) => {
            r.notes
                .push(format!("creating the group: HTTP {}", resp.status()));
            return r;
        }
        Err(e) => {
            r.notes.push(format!("creating the group: {e}"));
            return r;
        }
    }
    eprintln!("[{label}] opening {g} member connections over {n} node(s)");
    let started = Instant::now();
    // One batch per node: member i is on node i % n.
    let batches = (0..n).map(|node| {
        let urls: Vec<String> = (node..g)
            .step_by(n)
            .map(|i| nodes.url(node, &members[i]))
            .collect();
        connect_many(nodes.addr(node), urls, opts.concurrency, 8, node)
    });
    let batches = futures_util::future::join_all(batches).await;
    r.connect_time = started.elapsed();
    let seen: Arc<Vec<Seen>> = Arc::new(
        (0..opts.fanout_runs)
            .map(|_| Mutex::new(Vec::with_capacity(g)))
            .collect(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for (node, (conns, failed, _)) in batches.into_iter().enumerate() {
        for (why, c) in failed {
            *failures.entry(why).or_default() += c;
        }
        for mut ws in conns.into_iter().flatten() {
            r.connected += 1;
            let seen = seen.clone();
            let mut stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => break,
                        msg = ws.next() => {
                            let now = now_ns();
                            let text = match &msg {
                                Some(Ok(Message::Text(t))) => t,
                                Some(Ok(_)) => continue,
                                _ => return Some(ended_by(msg)),
                            };
                            if !text.as_str().starts_with("{\"type\":\"message\"") {
                                continue;
                            }
                            if let Some(slot) = rep_of(text.as_str()).and_then(|k| seen.get(k)) {
                                slot.lock().unwrap().push((node, now));
                            }
                        }
                    }
                }
                drop(ws);
                None
            }));
        }
    }
    for (why, c) in failures {
        r.notes
            .push(format!("{c} members could not connect: {why}"));
    }
    eprintln!(
        "[{label}] {} connected in {:.1} s",
        r.connected,
        r.connect_time.as_secs_f64()
    );
    // Let the connection.opened webhooks of the members drain first.
    sleep(Duration::from_secs(if opts.quick { 1 } else { 5 })).await;
    let pids = nodes.pids();
    let db = storage.db_pid(Engine::Postgres);
    let mut busy = [0.0f64; 3];
    let mut busy_secs = 0.0;
    for k in 0..opts.fanout_runs {
        let cpu_a = Cpu::take(&pids, db);
        let t0 = now_ns();
        let answer = http
            .post(format!("{base}/v1/messages"))
            .bearer_auth(API_KEY)
            .timeout(Duration::from_secs(30))
            .json(&json!({"channel_type": "group", "channel_id": "fanout",
                          "payload": {"text": format!("fan-out {k}"), "rep": k}}))
            .send()
            .await;
        match answer {
            Ok(resp) if resp.status().as_u16() == 201 => {}
            Ok(resp) => r.notes.push(format!("message {k}: HTTP {}", resp.status())),
            Err(e) => r.notes.push(format!("message {k}: {e}")),
        }
        let all = r.connected;
        let slot = &seen[k];
        let reached = wait_for(Duration::from_secs(10), || {
            slot.lock().unwrap().len() >= all
        })
        .await;
        let cpu_b = Cpu::take(&pids, db);
        if let Some(secs) = cpu_b
            .at
            .zip(cpu_a.at)
            .map(|(b, a)| b.duration_since(a).as_secs_f64())
        {
            for (sum, c) in busy.iter_mut().zip(cpu_a.cores(&cpu_b)) {
                *sum += c.unwrap_or(0.0) * secs;
            }
            busy_secs += secs;
        }
        let got = slot.lock().unwrap().clone();
        let since = |ns: Option<u64>| ns.map(|ns| Duration::from_nanos(ns.saturating_sub(t0)));
        let mut times: Vec<u64> = got.iter().map(|x| x.1).collect();
        times.sort_unstable();
        let last_on = |first: bool| {
            since(
                got.iter()
                    .filter(|(node, _)| (*node == 0) == first)
                    .map(|x| x.1)
                    .max(),
            )
        };
        let last = if reached {
            since(times.last().copied())
        } else {
            r.notes.push(format!(
                "message {k}: {} of {all} members had it 10 s after the request",
                times.len()
            ));
            None
        };
        let rep = [
            since(times.first().copied()),
            since(pct(&times, 50.0)),
            last,
            last_on(true).filter(|_| reached),
            last_on(false).filter(|_| reached && n > 1),
        ];
        eprintln!("[{label}] message {k}: last member after {}", ms_d(rep[2]));
        r.reps.push(rep);
        sleep(Duration::from_millis(700)).await;
    }
    if busy_secs > 0.0 {
        r.cores = busy.map(|b| Some(b / busy_secs));
    }
    let _ = stop_tx.send(true);
    let mut ended: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        if let Ok(Ok(Some(why))) = timeout(Duration::from_secs(5), t).await {
            *ended.entry(why).or_default() += 1;
        }
    }
    for (why, c) in ended {
        r.notes
            .push(format!("{c} member connections ended early: {why}"));
    }
    r
}

async fn fanout_setup(
    cluster: bool,
    storage: &Storage,
    opts: &Options,
    hook_url: &str,
) -> FanoutResult {
    let label = if cluster {
        format!("{} nodes", opts.nodes)
    } else {
        "1 node".to_string()
    };
    match start_nodes(cluster, storage, opts, hook_url).await {
        Ok(nodes) => {
            let r = fanout(&nodes, storage, opts, &label).await;
            nodes.finish(storage).await;
            r
        }
        Err(e) => FanoutResult {
            label,
            members: opts.group,
            connected: 0,
            connect_time: Duration::ZERO,
            reps: Vec::new(),
            cores: [None; 3],
            notes: vec![format!("{e:#}")],
        },
    }
}

// ---------------------------------------------------------------------------
// Idle connections

/// The holder: `--hold-connections ADDR[,ADDR…] FIRST COUNT`. Opens COUNT
/// connections as users `idle<FIRST>…`, the i-th to ADDR number
/// (FIRST + i) mod the number of addresses, keeps each reading (so pings
/// are answered), prints `held <open> <failed>[ <first reason>]`, and holds
/// them until its standard input closes.
fn hold_connections(args: Vec<String>) -> ExitCode {
    let usage = || {
        eprintln!("usage: bench-cluster {HOLD_FLAG} ADDR[,ADDR...] FIRST COUNT");
        ExitCode::from(2)
    };
    let [addrs, first, count] = args.as_slice() else {
        return usage();
    };
    let (Ok(addrs), Ok(first), Ok(count)) = (
        addrs
            .split(',')
            .map(str::parse::<SocketAddr>)
            .collect::<Result<Vec<_>, _>>(),
        first.parse::<usize>(),
        count.parse::<usize>(),
    ) else {
        return usage();
    };
    if addrs.is_empty() {
        return usage();
    }
    plugboard_tests::raise_fd_limit();
    run_program(&format!("bench-cluster {HOLD_FLAG}"), async move {
        let n = addrs.len();
        let batches = (0..n).map(|node| {
            let urls: Vec<String> = (first..first + count)
                .filter(|i| i % n == node)
                .map(|i| {
                    format!(
                        "ws://{}/v1/ws?token={}",
                        addrs[node],
                        plugboard::auth::mint_token(
                            &format!("idle{i:06}"),
                            None,
                            None,
                            JWT_SECRET.as_bytes()
                        )
                    )
                })
                .collect();
            connect_many(addrs[node], urls, 256, 8, first + node)
        });
        let batches = futures_util::future::join_all(batches).await;
        let alive = Arc::new(AtomicUsize::new(0));
        let (mut open, mut failed) = (0usize, 0usize);
        let mut reason = None;
        for (conns, failures, _) in batches {
            for (why, c) in failures {
                failed += c;
                reason.get_or_insert(why);
            }
            for mut ws in conns.into_iter().flatten() {
                open += 1;
                alive.fetch_add(1, Ordering::SeqCst);
                let alive = alive.clone();
                tokio::spawn(async move {
                    while let Some(Ok(_)) = ws.next().await {}
                    alive.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
        println!(
            "{HELD}{open} {failed}{}",
            reason.map(|r| format!(" {r}")).unwrap_or_default()
        );
        // Held until the benchmark closes our standard input.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
        eprintln!(
            "holder: {} of {open} connections still open at the end",
            alive.load(Ordering::SeqCst)
        );
        Ok(())
    })
}

/// A running holder and what it reported.
struct Holder {
    child: Child,
    open: usize,
    failed: usize,
    reason: Option<String>,
}

/// Starts a holder for `count` connections from user `first`, and waits
/// (bounded) for its report.
async fn start_holder(addrs: &[SocketAddr], first: usize, count: usize) -> anyhow::Result<Holder> {
    let exe = std::env::current_exe()?;
    let list = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut child = Command::new(exe)
        .arg(HOLD_FLAG)
        .arg(list)
        .arg(first.to_string())
        .arg(count.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        line
    });
    let line = match timeout(Duration::from_secs(300), line).await {
        Ok(Ok(line)) => line,
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("a holder did not report within 300 s");
        }
    };
    let Some(rest) = line.trim().strip_prefix(HELD) else {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("a holder reported {:?}", line.trim());
    };
    let mut parts = rest.splitn(3, ' ');
    let num = |s: Option<&str>| s.and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(Holder {
        open: num(parts.next()),
        failed: num(parts.next()),
        reason: parts.next().map(str::to_string),
        child,
    })
}

/// One node's idle figures.
struct NodeIdle {
    id: String,
    /// `plugboard_connections_open`.
    open: Option<f64>,
    rss_before_mib: Option<f64>,
    rss_after_mib: Option<f64>,
}

impl NodeIdle {
    fn kib_per_connection(&self) -> Option<f64> {
        let (a, b, open) = (self.rss_before_mib?, self.rss_after_mib?, self.open?);
        (open > 0.0).then(|| (b - a) * 1024.0 / open)
    }
}

struct IdleResult {
    label: String,
    wanted: usize,
    holders: usize,
    open: usize,
    failed: usize,
    reasons: Vec<String>,
    open_time: Duration,
    nodes: Vec<NodeIdle>,
    notes: Vec<String>,
}

async fn open_gauge(http: &reqwest::Client, gw: &Gateway) -> Option<f64> {
    let snap = snapshot(http, &format!("http://{}", gw.addr)).await?;
    Some(snap.sum("plugboard_connections_open"))
}

/// `count` idle connections over `nodes`, by `holders` client processes.
async fn idle(nodes: &Nodes, count: usize, holders: usize, label: &str) -> IdleResult {
    let n = nodes.len();
    let http = reqwest::Client::new();
    let mut r = IdleResult {
        label: label.to_string(),
        wanted: count,
        holders,
        open: 0,
        failed: 0,
        reasons: Vec::new(),
        open_time: Duration::ZERO,
        nodes: Vec::new(),
        notes: Vec::new(),
    };
    sleep(Duration::from_secs(2)).await;
    let before: Vec<Option<f64>> = (0..n).map(|i| rss_mib(nodes.node(i).pid())).collect();
    let addrs: Vec<SocketAddr> = (0..n).map(|i| nodes.addr(i)).collect();
    eprintln!("[{label}] opening {count} idle connections from {holders} client process(es)");
    let started = Instant::now();
    let share = count.div_ceil(holders);
    let starts = (0..holders).map(|h| {
        let first = h * share;
        let this = share.min(count.saturating_sub(first));
        start_holder(&addrs, first, this)
    });
    let mut running = Vec::new();
    for h in futures_util::future::join_all(starts).await {
        match h {
            Ok(h) => {
                r.open += h.open;
                r.failed += h.failed;
                r.reasons.extend(h.reason.clone());
                running.push(h);
            }
            Err(e) => r.notes.push(format!("{e:#}")),
        }
    }
    r.open_time = started.elapsed();
    eprintln!(
        "[{label}] {} open, {} failed, in {:.1} s",
        r.open,
        r.failed,
        r.open_time.as_secs_f64()
    );
    // The gateways' gauges settle once every open is recorded.
    let settle = Instant::now() + Duration::from_secs(60);
    let mut opens = vec![None; n];
    loop {
        for (i, o) in opens.iter_mut().enumerate() {
            *o = open_gauge(&http, nodes.node(i)).await;
        }
        let total: f64 = opens.iter().flatten().sum();
        if total as usize >= r.open || Instant::now() >= settle {
            break;
        }
        sleep(Duration::from_millis(500)).await;
    }
    sleep(Duration::from_secs(3)).await;
    for (i, open) in opens.into_iter().enumerate() {
        r.nodes.push(NodeIdle {
            id: match nodes {
                Nodes::Single(_) => "node".to_string(),
                Nodes::Cluster { cluster, .. } => cluster.node_id(i).to_string(),
            },
            open,
            rss_before_mib: before[i],
            rss_after_mib: rss_mib(nodes.node(i).pid()),
        });
    }
    for mut h in running {
        drop(h.child.stdin.take());
        let _ = tokio::task::spawn_blocking(move || {
            let _ = h.child.wait();
        })
        .await;
    }
    r
}

async fn idle_setup(
    cluster: bool,
    storage: &Storage,
    opts: &Options,
    hook_url: &str,
) -> IdleResult {
    let (label, count) = if cluster {
        (format!("{} nodes", opts.nodes), opts.idle)
    } else {
        ("1 node".to_string(), opts.idle.div_ceil(opts.nodes))
    };
    let holders = opts.holders.min(count.max(1));
    match start_nodes(cluster, storage, opts, hook_url).await {
        Ok(nodes) => {
            let r = idle(&nodes, count, holders, &label).await;
            nodes.finish(storage).await;
            r
        }
        Err(e) => IdleResult {
            label,
            wanted: count,
            holders,
            open: 0,
            failed: 0,
            reasons: Vec::new(),
            open_time: Duration::ZERO,
            nodes: Vec::new(),
            notes: vec![format!("{e:#}")],
        },
    }
}

// ---------------------------------------------------------------------------
// The run and its report

async fn run(opts: Options) -> anyhow::Result<()> {
    let machine = machine();
    let load_start = load_average();
    eprintln!(
        "bench-cluster{}: {machine}; load average {load_start}",
        if opts.quick { " --quick" } else { "" }
    );
    let storage = Storage::start(StorageArg::Postgres).await?;
    let (hooks, hook_url) = start_hooks().await?;
    let started = Instant::now();

    let setups = setups(&opts);
    let mut loads = Vec::new();
    for s in &setups {
        loads.push(one_to_one(s, &storage, &opts, &hook_url).await);
    }
    let mut fans = Vec::new();
    if opts.group > 0 {
        for cluster in [false, true] {
            fans.push(fanout_setup(cluster, &storage, &opts, &hook_url).await);
        }
    }
    let mut idles = Vec::new();
    if opts.idle > 0 {
        for cluster in [false, true] {
            idles.push(idle_setup(cluster, &storage, &opts, &hook_url).await);
        }
    }

    println!();
    println!(
        "== bench-cluster: a cluster of {} nodes beside one node ==",
        opts.nodes
    );
    println!("machine: {machine}");
    println!(
        "load average at start {load_start}, at end {}; whole run {:.0} s",
        load_average(),
        started.elapsed().as_secs_f64()
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("command: bench-cluster {}", args.join(" "));
    println!("gateways: the real binary, log warn, one webhook endpoint answered 204 by a receiver in this process ({} message.created events received in all); a fresh setup for each measurement", thousands(hooks.messages() as f64));
    println!("cluster: one private NATS server per cluster (nats-server from tests/nats), lease_ttl 10s, lease_renew 2s; 1 node: the same gateway with no [cluster] section");
    for line in storage.header_lines() {
        println!("{line}");
    }
    report_one_to_one(&opts, &setups, &loads);
    if !fans.is_empty() {
        report_fanout(&fans);
    }
    if !idles.is_empty() {
        report_idle(&opts, &idles);
    }
    Ok(())
}

fn report_one_to_one(opts: &Options, setups: &[Setup], loads: &[(LoadResult, LoadResult)]) {
    println!();
    println!(
        "-- 1:1 messages: {} pairs, {} in flight per sender, {:.0} s measured after a {:.0} s warm-up --",
        opts.pairs,
        opts.window,
        opts.duration.as_secs_f64(),
        opts.warmup.as_secs_f64()
    );
    let labels: Vec<String> = setups.iter().map(|s| s.label.clone()).collect();
    let row = |name: &str, f: &dyn Fn(&LoadResult) -> String, which: usize| {
        (
            name.to_string(),
            loads
                .iter()
                .map(|l| f(if which == 0 { &l.0 } else { &l.1 }))
                .collect::<Vec<_>>(),
            String::new(),
        )
    };
    let max_rows = vec![
        row(
            "acknowledged msg/s",
            &|r| thousands(r.rate(r.acked_in_window)),
            0,
        ),
        row(
            "delivered msg/s",
            &|r| thousands(r.rate(r.delivered_in_window)),
            0,
        ),
        row("send→deliver p50", &|r| ms(pct(&r.lat, 50.0)), 0),
        row("send→deliver p99", &|r| ms(pct(&r.lat, 99.0)), 0),
        row(
            "acknowledged / delivered, all",
            &|r| {
                format!(
                    "{} / {}",
                    thousands(r.acked_total as f64),
                    thousands(r.delivered_total as f64)
                )
            },
            0,
        ),
        row(
            "lost / duplicated / out of order",
            &|r| format!("{} / {} / {}", r.lost, r.duplicates, r.out_of_order),
            0,
        ),
        row("cores: nodes", &|r| cores_text(r.cores[0]), 0),
        row("cores: PostgreSQL", &|r| cores_text(r.cores[2]), 0),
        row("cores: clients", &|r| cores_text(r.cores[1]), 0),
    ];
    println!("at the maximum rate:");
    print_table(&labels, &max_rows, None);
    println!();
    println!("paced at {} msg/s in all:", thousands(opts.paced_rate));
    let paced_rows = vec![
        row(
            "delivered msg/s",
            &|r| thousands(r.rate(r.delivered_in_window)),
            1,
        ),
        row("send→deliver p50", &|r| ms(pct(&r.lat, 50.0)), 1),
        row("send→deliver p99", &|r| ms(pct(&r.lat, 99.0)), 1),
        row("send→deliver p99.9", &|r| ms(pct(&r.lat, 99.9)), 1),
        row(
            "lost / duplicated / out of order",
            &|r| format!("{} / {} / {}", r.lost, r.duplicates, r.out_of_order),
            1,
        ),
        row("cores: nodes", &|r| cores_text(r.cores[0]), 1),
        row("cores: PostgreSQL", &|r| cores_text(r.cores[2]), 1),
    ];
    print_table(&labels, &paced_rows, None);
    for (setup, (max, paced)) in setups.iter().zip(loads) {
        for (kind, r) in [("maximum", max), ("paced", paced)] {
            let mut lines = r.notes.clone();
            if r.connected_pairs < opts.pairs {
                lines.push(format!(
                    "{} of {} pairs connected",
                    r.connected_pairs, opts.pairs
                ));
            }
            if r.unacked > 0 {
                lines.push(format!("{} sends unanswered at the end", r.unacked));
            }
            for (code, c) in &r.errors {
                lines.push(format!("{c} sends answered with error {code}"));
            }
            for (why, c) in &r.ended {
                lines.push(format!("{c} connections ended early: {why}"));
            }
            for l in lines {
                println!("note ({}, {kind}): {l}", setup.label);
            }
        }
    }
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort_unstable();
    (!v.is_empty()).then(|| v[(v.len() - 1) / 2])
}

fn report_fanout(fans: &[FanoutResult]) {
    println!();
    let members = fans.first().map_or(0, |f| f.members);
    println!(
        "-- group fan-out: one message through POST /v1/messages on the first node to a group of {} members, all connected, spread over the nodes in turn; median over the messages (target: last member ≤ {TARGET_FANOUT_MS:.0} ms) --",
        thousands(members as f64)
    );
    let labels: Vec<String> = fans.iter().map(|f| f.label.clone()).collect();
    let col = |i: usize| -> Vec<String> {
        fans.iter()
            .map(|f| ms_d(median(f.reps.iter().filter_map(|r| r[i]).collect())))
            .collect()
    };
    let rows = vec![
        (
            "members connected".to_string(),
            fans.iter()
                .map(|f| {
                    format!(
                        "{} in {:.1} s",
                        thousands(f.connected as f64),
                        f.connect_time.as_secs_f64()
                    )
                })
                .collect(),
            String::new(),
        ),
        ("first member".to_string(), col(0), String::new()),
        ("median member".to_string(), col(1), String::new()),
        (
            "last member".to_string(),
            col(2),
            format!("≤ {TARGET_FANOUT_MS:.0} ms"),
        ),
        ("last on the first node".to_string(), col(3), String::new()),
        ("last on the other nodes".to_string(), col(4), String::new()),
        (
            "last member, each message".to_string(),
            fans.iter()
                .map(|f| {
                    f.reps
                        .iter()
                        .map(|r| {
                            r[2].map_or("-".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e3))
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                        + " ms"
                })
                .collect(),
            String::new(),
        ),
        (
            "cores: nodes / PostgreSQL / clients".to_string(),
            fans.iter()
                .map(|f| {
                    format!(
                        "{} / {} / {}",
                        cores_text(f.cores[0]),
                        cores_text(f.cores[2]),
                        cores_text(f.cores[1])
                    )
                })
                .collect(),
            String::new(),
        ),
    ];
    print_table(&labels, &rows, Some("target"));
    for f in fans {
        for n in &f.notes {
            println!("note ({}): {n}", f.label);
        }
    }
}

fn report_idle(opts: &Options, idles: &[IdleResult]) {
    println!();
    println!(
        "-- idle connections: authenticated, reading, production heartbeat (ping every 25 s); RSS growth per connection each node holds (target: {} across {} nodes, ≤ {TARGET_KIB_PER_CONNECTION:.0} KiB each) --",
        thousands(TARGET_IDLE as f64),
        opts.nodes
    );
    for r in idles {
        println!(
            "{}: {} of {} open ({} failed) from {} client process(es) in {:.1} s",
            r.label,
            thousands(r.open as f64),
            thousands(r.wanted as f64),
            r.failed,
            r.holders,
            r.open_time.as_secs_f64()
        );
        for why in &r.reasons {
            println!("  a failure: {why}");
        }
        for n in &r.notes {
            println!("  note: {n}");
        }
    }
    let labels = vec![
        "open".to_string(),
        "RSS before".to_string(),
        "RSS after".to_string(),
        "KiB per connection".to_string(),
    ];
    let mut rows = Vec::new();
    for r in idles {
        for n in &r.nodes {
            let mib = |m: Option<f64>| m.map_or("-".into(), |m| format!("{m:.1} MiB"));
            rows.push((
                format!("{}: {}", r.label, n.id),
                vec![
                    n.open.map_or("-".into(), thousands),
                    mib(n.rss_before_mib),
                    mib(n.rss_after_mib),
                    n.kib_per_connection()
                        .map_or("-".into(), |k| format!("{k:.1}")),
                ],
                format!("≤ {TARGET_KIB_PER_CONNECTION:.0}"),
            ));
        }
    }
    print_table(&labels, &rows, Some("target"));
}
