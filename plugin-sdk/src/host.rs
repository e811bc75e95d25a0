//! What the gateway offers a plugin: its log, its config, its own key-value
//! store and the clock. Nothing else is reachable from a plugin (no files,
//! network or environment), whatever `std` seems to offer.
//!
//! These functions call into the gateway, so they only work inside a plugin
//! built for `wasm32-wasip2` and loaded by plugboard. On any other target
//! (e.g. native `cargo test`) they panic: keep a plugin's logic in plain
//! functions and test those.

use crate::bindings::base::plugboard::plugin::{host as raw, types as wit};
use crate::{Config, KvError, LogLevel};

/// Panics with a clear message when a host function is called outside the
/// gateway, rather than wit-bindgen's bare `unreachable!()`.
#[inline(always)]
fn in_gateway(what: &str) {
    if cfg!(not(target_arch = "wasm32")) {
        panic!(
            "plugboard_plugin_sdk::host::{what} calls the gateway: it only works in a plugin \
             built for wasm32-wasip2 and loaded by plugboard (test plain functions natively)"
        );
    }
}

/// Writes a line into the gateway's structured log, tagged with the plugin's
/// name, with extra `fields` as name and value. The last lines are also
/// shown by the admin API.
pub fn log(level: LogLevel, message: &str, fields: &[(&str, &str)]) {
    in_gateway("log");
    let fields: Vec<wit::Pair> = fields
        .iter()
        .map(|(key, value)| wit::Pair {
            key: (*key).to_owned(),
            value: (*value).to_owned(),
        })
        .collect();
    raw::log(level.into(), message, &fields);
}

/// Logs `message` at [`LogLevel::Trace`] without fields.
pub fn trace(message: &str) {
    log(LogLevel::Trace, message, &[]);
}

/// Logs `message` at [`LogLevel::Debug`] without fields.
pub fn debug(message: &str) {
    log(LogLevel::Debug, message, &[]);
}

/// Logs `message` at [`LogLevel::Info`] without fields.
pub fn info(message: &str) {
    log(LogLevel::Info, message, &[]);
}

/// Logs `message` at [`LogLevel::Warn`] without fields.
pub fn warn(message: &str) {
    log(LogLevel::Warn, message, &[]);
}

/// Logs `message` at [`LogLevel::Error`] without fields.
pub fn error(message: &str) {
    log(LogLevel::Error, message, &[]);
}

/// The plugin's config map, as written in the gateway's config file (the
/// same map [`Plugin::init`](crate::Plugin::init) received).
pub fn config() -> Config {
    in_gateway("config");
    raw::config()
        .into_iter()
        .map(|p| (p.key, p.value))
        .collect()
}

/// Reads `key` from the plugin's own key-value store: `None` if absent.
pub fn kv_get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    in_gateway("kv_get");
    raw::kv_get(key).map_err(KvError::from)
}

/// Writes `value` under `key` in the plugin's own key-value store. Keys are
/// 1 to 512 bytes; values at most 1 MiB.
pub fn kv_set(key: &str, value: &[u8]) -> Result<(), KvError> {
    in_gateway("kv_set");
    raw::kv_set(key, value).map_err(KvError::from)
}

/// Deletes `key` from the plugin's own key-value store (no error if absent).
pub fn kv_delete(key: &str) -> Result<(), KvError> {
    in_gateway("kv_delete");
    raw::kv_delete(key).map_err(KvError::from)
}

/// The current wall-clock time, in milliseconds since the Unix epoch (the
/// only clock a plugin has).
pub fn now_ms() -> i64 {
    in_gateway("now_ms");
    raw::now_ms()
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "only works in a plugin")]
    fn host_calls_panic_natively() {
        super::info("hello");
    }
}
