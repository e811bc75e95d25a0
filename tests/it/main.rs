//! Integration tests: a real gateway process, real WebSocket clients over
//! real sockets, a real webhook receiver. One binary, one module per area.

mod bench_cli;
mod catchup;
mod churn;
mod cluster;
mod codes;
mod config;
mod control;
mod conversations;
mod drain;
mod frames;
mod lifecycle;
mod limits;
mod messaging;
mod nats_harness;
mod onebot;
mod ops;
mod pg_harness;
mod plugins;
mod routes;
mod security;
mod storage;
mod webhooks;
mod webhooks_nodes;

use plugboard_tests::{Gateway, GatewayOptions, Receiver};

/// A gateway with a webhook receiver, and optional extra TOML.
pub async fn setup(extra: &str) -> (Gateway, Receiver) {
    let rx = Receiver::start().await;
    let gw = Gateway::start(GatewayOptions::with_receiver(&rx.url).extra(extra)).await;
    (gw, rx)
}
