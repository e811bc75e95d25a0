//! Benchmark: the webhook-formatter hook per call (p50, p99) for the Rust,
//! JavaScript and Python examples, beside the same OneBot logic written as
//! native Rust in this program, and each plugin's cold load (compile) versus
//! cached load (from the on-disk artifact cache).
//!
//!     cargo run --release -p plugboard-tests --bin bench-plugins [-- --calls N]
//!
//! `--help` lists the options.
//!
//! The plugins are the ones `tests/build.rs` builds from source. Calls run
//! the way the gateway makes them: a pooled instance reused across calls,
//! `call_async` under an epoch deadline and a memory cap.

mod cli;

use std::time::{Duration, Instant};

use clap::Parser;
use plugboard::plugins::bindings::exports::plugboard::plugin::webhook_formatter as wf;
use plugboard::plugins::tool;
use plugboard_tests::plugins;
use serde_json::{json, Value};

/// The webhook-formatter hook per call for the Rust, JavaScript and Python
/// examples, beside the same logic as native Rust, and each plugin's cold
/// and cached load
#[derive(Debug, Parser)]
#[command(name = "bench-plugins", args_override_self = true)]
struct Cli {
    /// Measured calls per plugin, after 1,000 warm-up calls (at least 1)
    #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = cli::clamped(1, usize::MAX))]
    calls: usize,
}

fn event() -> wf::Event {
    wf::Event {
        id: "evt_01JD0000000000000000000000".into(),
        event_type: "connection.opened".into(),
        timestamp_ms: 1_790_000_000_000,
        data: json!({
            "connection_id": "conn_01JD0000000000000000000000",
            "user_id": "alice",
            "device_id": "phone",
            "node_id": "node-1",
            "remote_addr": "127.0.0.1:50000",
            "opened_at": "2026-09-21T00:00:00.000Z"
        })
        .to_string(),
        endpoint: "bench".into(),
    }
}

/// The OneBot example's logic for `connection.opened`, as native Rust.
fn native_onebot(e: &wf::Event, self_id: i64) -> Vec<u8> {
    let data: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
    let body = json!({
        "time": e.timestamp_ms / 1000,
        "self_id": self_id,
        "post_type": "meta_event",
        "meta_event_type": "lifecycle",
        "sub_type": "connect",
        "user_id": data["user_id"],
        "connection_id": data["connection_id"],
        "device_id": data["device_id"],
    });
    serde_json::to_vec(&body).unwrap()
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Loads a plugin on a new engine over `cache`, as the gateway does at start.
async fn load(
    cache: &std::path::Path,
    file: &str,
    config: &[(&str, &str)],
) -> (tool::Loaded, Duration) {
    let started = Instant::now();
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let loaded = tool::load(
        std::path::Path::new(file),
        config,
        Duration::from_secs(1),
        cache,
    )
    .await
    .unwrap_or_else(|e| panic!("{file}: {e}"));
    (loaded, started.elapsed())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let calls = Cli::parse().calls;
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: [Case; 3] = [
        (
            "Rust (onebot-formatter)",
            plugins::ONEBOT_FORMATTER,
            &[("self_id", "10001")],
        ),
        (
            "JavaScript (chatbot-card)",
            plugins::CHATBOT_CARD,
            &[("style", "slack")],
        ),
        ("Python (cloudevents)", plugins::CLOUDEVENTS, &[]),
    ];
    let cache = tempfile::tempdir().unwrap();
    let ev = event();

    println!("plugboard plugin benchmark: {calls} calls per plugin after 1,000 warm-up calls");
    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>14} {:>14}",
        "hook: webhook-formatter", "p50", "p99", "cold load", "cached load"
    );

    // Baseline: the same logic as native Rust.
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..1000 {
        std::hint::black_box(native_onebot(&ev, 10001));
    }
    for _ in 0..calls {
        let t = Instant::now();
        std::hint::black_box(native_onebot(std::hint::black_box(&ev), 10001));
        samples.push(t.elapsed());
    }
    let (p50, p99) = percentiles(samples);
    println!(
        "{:<28} {:>12} {:>12} {:>14} {:>14}",
        "native Rust (baseline)",
        us(p50),
        us(p99),
        "-",
        "-"
    );

    for (label, file, config) in cases {
        // Cold: an empty cache; cached: a new engine over the cache the cold load filled.
        let (cold_load, cold) = load(cache.path(), file, config).await;
        assert!(!cold_load.cached, "the cold load must compile");
        let (loaded, cached) = load(cache.path(), file, config).await;
        assert!(loaded.cached, "the second load must come from the cache");
        let plugin = loaded.plugin;
        for _ in 0..1000 {
            plugin.format(&ev).await.expect("format");
        }
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            let out = plugin.format(&ev).await;
            samples.push(t.elapsed());
            std::hint::black_box(out.expect("format"));
        }
        let (p50, p99) = percentiles(samples);
        println!(
            "{label:<28} {:>12} {:>12} {:>14} {:>14}",
            us(p50),
            us(p99),
            ms(cold),
            ms(cached)
        );
    }
    println!();
    println!("Target (DESIGN.md §7): Rust example, instance reused: p50 ≤ 2 µs, p99 ≤ 10 µs.");
    println!(
        "Cold load compiles the component; cached load deserialises the artifact and runs init."
    );
}
