//! The integration-test harness: a real gateway process on port 0, real
//! WebSocket clients, raw TCP clients for protocol abuse, a real webhook
//! receiver that verifies every signature with an independent implementation,
//! PostgreSQL servers of the test process's own for the gateway's
//! PostgreSQL storage (`postgres`), NATS servers of its own (`nats`), and
//! clusters of gateways on one database and one NATS server (`cluster`).
//!
//! Nothing here sleeps to wait for an outcome: helpers wait for the event
//! they expect, with a timeout, and fail with what they saw instead.

pub mod callgrind;
pub mod client;
pub mod cluster;
pub mod gateway;
pub mod nats;
pub mod plugins;
pub mod postgres;
pub mod raw;
pub mod receiver;

pub use client::{Closed, WsClient};
pub use cluster::{Cluster, ClusterOptions};
pub use gateway::{Engine, Gateway, GatewayOptions};
pub use nats::NatsServer;
pub use postgres::{PgOptions, PgServer};
pub use raw::RawClient;
pub use receiver::{Delivered, Receiver, Reply};

use std::time::Duration;

/// The default timeout for waiting on something that should happen quickly.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Raises the soft open-files limit to the hard limit, for tests that hold
/// many connections (the gateway's own routine). Children inherit it.
pub fn raise_fd_limit() {
    plugboard::cli::raise_nofile_limit();
}

/// Connects as `user` once the gateway accepts connections again (after a
/// reload that re-enables the service takes effect).
pub async fn wait_until_async_connect(gw: &Gateway, user: &str) -> WsClient {
    let url = format!("{}?token={}", gw.ws_url(), gw.token(user, None, None));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match WsClient::try_connect(gw, &url, None).await {
            Ok(c) => return c,
            Err(r) if r.status == Some(503) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(r) => panic!("connection refused: {r:?}"),
        }
    }
}

/// Polls `GET /admin/webhooks` until `check` accepts the answer.
pub async fn wait_until_admin(
    gw: &Gateway,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, view) = gw
            .admin(reqwest::Method::GET, "/admin/webhooks", None)
            .await;
        if check(&view) {
            return view;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("admin view never matched; last: {view}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the async `check` until it returns `Some`, or panics after `timeout`.
pub async fn wait_until_async<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} (async condition)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
