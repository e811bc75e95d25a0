//! plugboard: an IM gateway.
//!
//! The host holds clients' WebSocket connections, records their lifecycle
//! exactly once, delivers events to the business server as signed webhooks
//! from a durable outbox, and takes orders through an HTTP API.
//!
//! Layout, from the bottom up (a module uses only those above it in this
//! list, save `gateway`, which implements `delivery` and calls the domains):
//! - [`config`]: compiled-in defaults, TOML file, environment; validation.
//! - [`auth`]: client tokens (HS256 JWT), API keys, admin token, development secrets.
//! - [`storage`]: the durable contract (a trait per concern) and its engines.
//! - [`json`]: limits on JSON from outside (nesting depth), checked at the door.
//! - [`metrics`]: the Prometheus registry of one gateway instance.
//! - [`unavailable`]: what storage being unavailable means for requests and
//!   for background work (the `storage_unavailable` code, backoff).
//! - [`plugins`]: the WebAssembly plugin runtime (engine, sandbox, registry, hot swap).
//! - [`outbox`]: the per-endpoint webhook delivery worker, signing.
//! - [`delivery`]: the one door to live sessions (the `Delivery` trait) and
//!   the domain values pushed through it.
//! - [`events`]: the webhook event catalogue: every type, its order key,
//!   its `data` builder.
//! - [`messaging`]: sending, message sync, conversation lists and the
//!   conversation-filter chain (the `Messaging` service).
//! - [`control`]: business control messages: targets, the control-handler
//!   chain, delivery by priority, persisted controls, receipts, expiry (the
//!   `Control` service).
//! - [`gateway`]: the session task, the frame protocol, the live-session
//!   registry and the single-node `Delivery`, the lifecycle state machine
//!   (the `Gateway` service).
//! - [`http`]: routers for the client upgrade, the server API, admin API and
//!   operations, and the one error type at the HTTP edge.
//! - [`server`]: wiring: builds the services, reloads config, shuts down in order.
//! - [`cli`]: the `plugboard` command line.

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod delivery;
pub mod events;
pub mod gateway;
pub mod http;
pub mod json;
pub mod messaging;
pub mod metrics;
pub mod outbox;
pub mod plugins;
pub mod server;
pub mod storage;
pub mod unavailable;

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new typed id such as `conn_01JD…` or `evt_01JD…` (a ULID after the prefix),
/// so a log line tells what an id names and ids sort by creation time.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new())
}

/// Lower-case hex of `bytes` (digests, random secrets).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 timestamp with milliseconds, in UTC, for unix milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The unix milliseconds of an RFC 3339 time (the inverse of [`rfc3339_ms`]).
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(text).ok()?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}
