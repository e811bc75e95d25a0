//! `wukongim-formatter`: a plugboard webhook formatter that reports presence
//! the way WuKongIM's online-status webhook does, so a business server
//! written for WuKongIM can take plugboard's events unchanged.
//!
//! Build (in `example-plugins/`): `cargo build --target wasm32-wasip2 --release`,
//! giving `target/wasm32-wasip2/release/wukongim_formatter.wasm`. Load it with
//! a `[[plugins]]` entry (`name = "wukongim"`, `file = "wukongim_formatter.wasm"`)
//! and name it from a webhook endpoint with `formatter = "wukongim"`; see
//! README.md.
//!
//! For `user.online`, `user.offline`, `connection.opened` and
//! `connection.closed` the request is `POST <endpoint>?event=user.onlinestatus`
//! with a JSON array holding one string:
//!
//! ```text
//! ["<uid>-<deviceFlag>-<status>-<socketID>-<deviceOnlineCount>-<totalOnlineCount>"]
//! ```
//!
//! - `status` is 1 (online: `user.online`, `connection.opened`) or 0.
//! - `deviceFlag` is 0 (app), 1 (web) or 2 (pc), chosen by the longest
//!   device-id prefix in config `device_flags`; 0 when none matches.
//! - `socketID` is the connection id (`conn_…`).
//! - `deviceOnlineCount` and `totalOnlineCount` are the event's `devices`
//!   and `connections`. `connection.*` events carry no counts: they are
//!   written as this connection's own (1 when opened, 0 when closed), so
//!   point the endpoint at `user.*` events when the user's totals matter.
//!
//! Other events are declined.
//!
//! Config: `device_flags` (optional), comma-separated `prefix=flag` pairs
//! where `flag` is `app`, `web`, `pc` or 0, 1, 2, e.g.
//! `"web=web,pc=pc,desktop=pc,ios=app"`. Init fails with `bad-config` on a
//! malformed list.

use std::sync::OnceLock;

use plugboard_plugin_sdk::{
    event_type, export_plugin, host, Config, Event, HookError, OutgoingRequest, Plugin,
    WebhookFormatter,
};
use serde_json::Value;

/// The settings of this instance, parsed once by `init` (which the gateway
/// calls on every new instance before any hook).
static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// The plugin type exported to the gateway.
struct WuKongIm;

impl Plugin for WuKongIm {
    fn init(config: &Config) -> Result<(), HookError> {
        let settings = Settings::from_config(config)?;
        let _ = SETTINGS.set(settings);
        Ok(())
    }
}

impl WebhookFormatter for WuKongIm {
    fn format(event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        let fallback;
        let settings = match SETTINGS.get() {
            Some(settings) => settings,
            None => {
                fallback = Settings::from_config(&host::config())?;
                &fallback
            }
        };
        format_event(settings, &event)
    }
}

export_plugin!(WuKongIm: formatter);

/// WuKongIM's device flags.
pub const APP: u8 = 0;
/// See [`APP`].
pub const WEB: u8 = 1;
/// See [`APP`].
pub const PC: u8 = 2;

/// What the plugin's config says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Device-id prefixes and their flag, longest prefix first.
    pub device_flags: Vec<(String, u8)>,
}

impl Settings {
    /// Reads and checks the config.
    pub fn from_config(config: &Config) -> Result<Self, HookError> {
        let mut device_flags = Vec::new();
        for entry in config.get("device_flags").unwrap_or("").split(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let bad = || {
                HookError::bad_config(format!(
                    "device_flags entry {entry:?}: expected prefix=flag with flag app, web, pc, 0, 1 or 2"
                ))
            };
            let (prefix, flag) = entry.split_once('=').ok_or_else(bad)?;
            let flag = match flag.trim() {
                "app" | "0" => APP,
                "web" | "1" => WEB,
                "pc" | "2" => PC,
                _ => return Err(bad()),
            };
            device_flags.push((prefix.trim().to_owned(), flag));
        }
        device_flags.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(Self { device_flags })
    }

    /// The flag of the longest configured prefix of `device_id`, else [`APP`].
    pub fn device_flag(&self, device_id: &str) -> u8 {
        self.device_flags
            .iter()
            .find(|(prefix, _)| device_id.starts_with(prefix.as_str()))
            .map_or(APP, |(_, flag)| *flag)
    }
}

/// The online-status webhook for `event`, or `None` for other event types.
pub fn format_event(
    settings: &Settings,
    event: &Event,
) -> Result<Option<OutgoingRequest>, HookError> {
    let status: u64 = match event.event_type.as_str() {
        event_type::USER_ONLINE | event_type::CONNECTION_OPENED => 1,
        event_type::USER_OFFLINE | event_type::CONNECTION_CLOSED => 0,
        _ => return Ok(None),
    };
    let data = event.data_json()?;
    let text = |field: &str| {
        data.get(field).and_then(Value::as_str).ok_or_else(|| {
            HookError::invalid_input(format!(
                "{} event {} has no {field}",
                event.event_type, event.id
            ))
        })
    };
    let count = |field: &str| data.get(field).and_then(Value::as_u64).unwrap_or(status);
    let device_id = text("device_id")?;
    let line = format!(
        "{uid}-{flag}-{status}-{socket}-{devices}-{total}",
        uid = text("user_id")?,
        flag = settings.device_flag(device_id),
        socket = text("connection_id")?,
        devices = count("devices"),
        total = count("connections"),
    );
    Ok(Some(
        OutgoingRequest::json(&[line])?.with_query("event=user.onlinestatus"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(event_type: &str, data: Value) -> Event {
        Event {
            id: "evt_1".into(),
            event_type: event_type.into(),
            timestamp_ms: 1_748_855_643_512,
            data: data.to_string(),
            endpoint: "wukongim".into(),
        }
    }

    fn settings(device_flags: &str) -> Settings {
        Settings::from_config(&Config::from_pairs([("device_flags", device_flags)])).unwrap()
    }

    #[track_caller]
    fn check(settings: &Settings, event_type: &str, data: Value, expect: &str) {
        let request = format_event(settings, &event(event_type, data))
            .unwrap()
            .expect("not declined");
        assert_eq!(request.content_type, "application/json");
        assert_eq!(request.query.as_deref(), Some("event=user.onlinestatus"));
        assert_eq!(request.body_json().unwrap(), json!([expect]));
    }

    #[test]
    fn presence_events() {
        let s = settings("web=web, pc=2, desktop=pc");
        check(
            &s,
            "user.online",
            json!({"connection_id": "conn_1", "connections": 1, "device_id": "web-chrome",
                   "devices": 1, "user_id": "alice"}),
            "alice-1-1-conn_1-1-1",
        );
        check(
            &s,
            "user.offline",
            json!({"connection_id": "conn_1", "connections": 0, "device_id": "desktop",
                   "devices": 0, "reason": "client_close", "user_id": "alice"}),
            "alice-2-0-conn_1-0-0",
        );
    }

    #[test]
    fn connection_events_count_only_their_own_connection() {
        let s = settings("");
        let opened = json!({"connection_id": "conn_2", "device_id": "phone", "node_id": "edge-1",
                            "opened_at": "2025-06-02T09:14:03.512Z",
                            "remote_addr": "203.0.113.7:53122", "user_id": "bob"});
        check(&s, "connection.opened", opened, "bob-0-1-conn_2-1-1");
        let closed = json!({"closed_at": "2025-06-02T10:14:31.044Z", "code": 1000,
                            "connection_id": "conn_2", "device_id": "phone",
                            "duration_ms": 5, "message": "", "node_id": "edge-1",
                            "opened_at": "2025-06-02T09:14:03.512Z", "reason": "client_close",
                            "remote_addr": "203.0.113.7:53122", "user_id": "bob"});
        check(&s, "connection.closed", closed, "bob-0-0-conn_2-0-0");
    }

    #[test]
    fn longest_prefix_wins_and_app_is_the_default() {
        let s = settings("w=pc,web=web");
        assert_eq!(s.device_flag("web-1"), WEB);
        assert_eq!(s.device_flag("win"), PC);
        assert_eq!(s.device_flag("phone"), APP);
        assert_eq!(Settings::default().device_flag("web"), APP);
    }

    #[test]
    fn other_events_are_declined() {
        let declined = format_event(&settings(""), &event("message.sent", json!({}))).unwrap();
        assert_eq!(declined, None);
    }

    #[test]
    fn malformed_config_is_bad_config() {
        for flags in ["web", "web=tablet", "=x"] {
            let e = Settings::from_config(&Config::from_pairs([("device_flags", flags)]));
            assert!(matches!(e, Err(HookError::BadConfig(_))), "{flags}: {e:?}");
        }
    }
}
