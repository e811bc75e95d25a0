//! Test plugin `log-flood` (world `formatter`): on every event, logs as
//! much as its config asks for, then declines the event. Config (all
//! optional, numbers in decimal):
//!
//! - `lines` (default 1): `host.log` lines written per call;
//! - `fields` (default 0): fields per line, named `f0`, `f1`, …;
//! - `value_bytes` (default 0): bytes of `v` after `text` in each value;
//! - `message_bytes` (default 0): bytes of `m` after `text` in each message;
//! - `stdout_lines` (default 0): lines printed to standard output per call;
//! - `text` (default empty): put at the start of every message, value and
//!   printed line (for control characters).
//!
//! Built by `tests/build.rs` (constant `LOG_FLOOD`).

use plugboard_plugin_sdk::{
    export_plugin, host, Event, HookError, LogLevel, OutgoingRequest, Plugin, WebhookFormatter,
};

struct Flood;

impl Plugin for Flood {}

fn number(key: &str, default: usize) -> Result<usize, HookError> {
    match host::config().get(key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| HookError::bad_config(format!("`{key}` is not a number"))),
    }
}

impl WebhookFormatter for Flood {
    fn format(_event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        let text = host::config().get("text").unwrap_or_default().to_string();
        let message = format!("{text}{}", "m".repeat(number("message_bytes", 0)?));
        let value = format!("{text}{}", "v".repeat(number("value_bytes", 0)?));
        let names: Vec<String> = (0..number("fields", 0)?).map(|i| format!("f{i}")).collect();
        let fields: Vec<(&str, &str)> =
            names.iter().map(|n| (n.as_str(), value.as_str())).collect();
        for _ in 0..number("lines", 1)? {
            host::log(LogLevel::Info, &message, &fields);
        }
        for i in 0..number("stdout_lines", 0)? {
            println!("{text}stdout line {i}");
        }
        Ok(None)
    }
}

export_plugin!(Flood: formatter);
