//! Test plugin `echo-formatter` (world `formatter`): formats any event as
//! `{"plugin":"echo","version":<config version>,"event":<type>,"id":<id>,"data":<data>}`,
//! logs one info line per call, counts calls in its key-value store under
//! `calls` (decimal text), and declines the event types listed in config
//! `decline` (comma separated). Every call is logged and counted, declined
//! or not.
//!
//! Built twice by `tests/build.rs`: `ECHO_FORMATTER` and, with the `v2`
//! feature (crate `echo-formatter-v2`), `ECHO_FORMATTER_V2`, whose only
//! difference is `"plugin": "echo-v2"`. By hand:
//! `cargo build --release --target wasm32-wasip2` in `tests/plugins`.

use plugboard_plugin_sdk::{
    export_plugin, host, Event, HookError, LogLevel, OutgoingRequest, Plugin, WebhookFormatter,
};

struct Echo;

/// `echo`, or `echo-v2` for the second version used by hot-swap tests.
const LABEL: &str = if cfg!(feature = "v2") {
    "echo-v2"
} else {
    "echo"
};

impl Plugin for Echo {}

impl WebhookFormatter for Echo {
    fn format(event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        let config = host::config();
        let calls = count_call()?;
        host::log(
            LogLevel::Info,
            "echo formatted an event",
            &[
                ("event", &event.event_type),
                ("id", &event.id),
                ("calls", &calls.to_string()),
            ],
        );
        if declined(config.get("decline").unwrap_or(""), &event.event_type) {
            return Ok(None);
        }
        let body = serde_json::json!({
            "plugin": LABEL,
            "version": config.get("version"),
            "event": event.event_type,
            "id": event.id,
            "data": event.data_json()?,
        });
        Ok(Some(OutgoingRequest::json(&body)?))
    }
}

/// Adds one to the `calls` counter and returns the new count.
fn count_call() -> Result<u64, HookError> {
    let previous = match host::kv_get("calls")? {
        Some(bytes) => String::from_utf8_lossy(&bytes).parse::<u64>().unwrap_or(0),
        None => 0,
    };
    let calls = previous + 1;
    host::kv_set("calls", calls.to_string().as_bytes())?;
    Ok(calls)
}

fn declined(list: &str, event_type: &str) -> bool {
    list.split(',').map(str::trim).any(|t| t == event_type)
}

export_plugin!(Echo: formatter);
