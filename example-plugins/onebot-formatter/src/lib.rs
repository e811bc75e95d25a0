//! `onebot-formatter`: a plugboard webhook formatter that posts gateway
//! events as OneBot v11 events, in the style of go-cqhttp, so a OneBot
//! application can follow who is connected.
//!
//! Build (in `example-plugins/`): `cargo build --target wasm32-wasip2 --release`,
//! giving `target/wasm32-wasip2/release/onebot_formatter.wasm`. Load it with a
//! `[[plugins]]` entry (`name = "onebot"`, `file = "onebot_formatter.wasm"`,
//! `config = { self_id = "10001" }`) and name it from a webhook endpoint with
//! `formatter = "onebot"`; see README.md.
//!
//! | gateway event | OneBot post |
//! | --- | --- |
//! | `connection.opened` | `meta_event` / `lifecycle` / `connect` |
//! | `connection.closed` | `meta_event` / `lifecycle` / `disable`, with `reason`, `code`, `message` |
//! | `user.online` | `notice` / `client_status`, `online: true` |
//! | `user.offline` | `notice` / `client_status`, `online: false` |
//! | anything else | declined (not sent to this endpoint) |
//!
//! Every post has `time` (unix seconds of the event) and `self_id` (config),
//! is sent as `application/json` with an `X-Self-ID` header, as OneBot's HTTP
//! POST convention has it. User ids made of digits are sent as numbers
//! (OneBot ids are integers), other ids as strings.
//!
//! Config: `self_id` (required, integer: the bot account this gateway posts
//! as; init fails with `bad-config` otherwise) and `app_id` (optional
//! integer, default 0: `client.app_id` in `client_status` notices).

use std::sync::OnceLock;

use plugboard_plugin_sdk::{
    event_type, export_plugin, host, Config, ConnectionClosed, ConnectionOpened, Event, HookError,
    OutgoingRequest, Plugin, UserOffline, UserOnline, WebhookFormatter,
};
use serde_json::{json, Value};

/// The settings of this instance, parsed once by `init` (which the gateway
/// calls on every new instance before any hook).
static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// The plugin type exported to the gateway.
struct OneBot;

impl Plugin for OneBot {
    fn init(config: &Config) -> Result<(), HookError> {
        let settings = Settings::from_config(config)?;
        // A second init of the same instance would carry the same config.
        let _ = SETTINGS.set(settings);
        Ok(())
    }
}

impl WebhookFormatter for OneBot {
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

export_plugin!(OneBot: formatter);

/// What the plugin's config says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The bot account id sent as `self_id` and `X-Self-ID`.
    pub self_id: i64,
    /// `client.app_id` in `client_status` notices.
    pub app_id: i64,
}

impl Settings {
    /// Reads and checks the config: `self_id` must be an integer.
    pub fn from_config(config: &Config) -> Result<Self, HookError> {
        Ok(Self {
            self_id: config.require_parsed("self_id")?,
            app_id: config.get_parsed("app_id")?.unwrap_or(0),
        })
    }
}

/// The OneBot post for `event`, or `None` for an event type it does not map.
pub fn format_event(
    settings: &Settings,
    event: &Event,
) -> Result<Option<OutgoingRequest>, HookError> {
    let time = event.timestamp_secs();
    let body = match event.event_type.as_str() {
        event_type::CONNECTION_OPENED => {
            let p: ConnectionOpened = event.data_as()?;
            json!({
                "time": time,
                "self_id": settings.self_id,
                "post_type": "meta_event",
                "meta_event_type": "lifecycle",
                "sub_type": "connect",
                "user_id": onebot_id(&p.user_id),
                "device_id": p.device_id,
                "connection_id": p.connection_id,
                "node_id": p.node_id,
            })
        }
        event_type::CONNECTION_CLOSED => {
            let p: ConnectionClosed = event.data_as()?;
            json!({
                "time": time,
                "self_id": settings.self_id,
                "post_type": "meta_event",
                "meta_event_type": "lifecycle",
                "sub_type": "disable",
                "user_id": onebot_id(&p.user_id),
                "device_id": p.device_id,
                "connection_id": p.connection_id,
                "node_id": p.node_id,
                "reason": p.reason,
                "code": p.code,
                "message": p.message,
                "duration_ms": p.duration_ms,
            })
        }
        event_type::USER_ONLINE => {
            let p: UserOnline = event.data_as()?;
            client_status(settings, time, &p.user_id, &p.device_id, true)
        }
        event_type::USER_OFFLINE => {
            let p: UserOffline = event.data_as()?;
            client_status(settings, time, &p.user_id, &p.device_id, false)
        }
        _ => return Ok(None),
    };
    let request =
        OutgoingRequest::json(&body)?.with_header("X-Self-ID", settings.self_id.to_string());
    Ok(Some(request))
}

/// A go-cqhttp `client_status` notice: one of the account's clients came
/// online or went offline.
fn client_status(settings: &Settings, time: i64, user: &str, device: &str, online: bool) -> Value {
    json!({
        "time": time,
        "self_id": settings.self_id,
        "post_type": "notice",
        "notice_type": "client_status",
        "online": online,
        "client": {
            "app_id": settings.app_id,
            "device_name": device,
            "device_kind": device,
        },
        "user_id": onebot_id(user),
    })
}

/// OneBot ids are integers: a user id made of digits becomes a number,
/// anything else stays a string.
fn onebot_id(user: &str) -> Value {
    match user.parse::<i64>() {
        Ok(n) if !user.starts_with('+') => Value::from(n),
        _ => Value::from(user),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::from_config(&Config::from_pairs([("self_id", "10001")])).unwrap()
    }

    fn event(event_type: &str, data: Value) -> Event {
        Event {
            id: "evt_01JWQYPQBRSTVDHTAPG00D87G7".into(),
            event_type: event_type.into(),
            timestamp_ms: 1_748_855_643_512,
            data: data.to_string(),
            endpoint: "onebot".into(),
        }
    }

    #[track_caller]
    fn check(event_type: &str, data: Value, expect: Value) {
        let request = format_event(&settings(), &event(event_type, data))
            .unwrap()
            .expect("not declined");
        assert_eq!(request.content_type, "application/json");
        assert_eq!(request.header("X-Self-ID"), Some("10001"));
        assert_eq!(request.body_json().unwrap(), expect);
    }

    #[test]
    fn connection_opened_is_a_lifecycle_connect() {
        check(
            "connection.opened",
            json!({"connection_id": "conn_1", "device_id": "phone", "node_id": "edge-1",
                   "opened_at": "2025-06-02T09:14:03.512Z", "remote_addr": "203.0.113.7:53122",
                   "user_id": "42"}),
            json!({"time": 1_748_855_643, "self_id": 10001, "post_type": "meta_event",
                   "meta_event_type": "lifecycle", "sub_type": "connect", "user_id": 42,
                   "device_id": "phone", "connection_id": "conn_1", "node_id": "edge-1"}),
        );
    }

    #[test]
    fn connection_closed_is_a_lifecycle_disable_with_its_reason() {
        check(
            "connection.closed",
            json!({"closed_at": "2025-06-02T10:14:31.044Z", "code": 4003,
                   "connection_id": "conn_1", "device_id": "phone", "duration_ms": 3_627_532,
                   "message": "replaced", "node_id": "edge-1",
                   "opened_at": "2025-06-02T09:14:03.512Z", "reason": "replaced",
                   "remote_addr": "203.0.113.7:53122", "user_id": "alice"}),
            json!({"time": 1_748_855_643, "self_id": 10001, "post_type": "meta_event",
                   "meta_event_type": "lifecycle", "sub_type": "disable", "user_id": "alice",
                   "device_id": "phone", "connection_id": "conn_1", "node_id": "edge-1",
                   "reason": "replaced", "code": 4003, "message": "replaced",
                   "duration_ms": 3_627_532}),
        );
    }

    #[test]
    fn presence_is_a_client_status_notice() {
        let online = json!({"connection_id": "conn_1", "connections": 1, "device_id": "phone",
                            "devices": 1, "user_id": "42"});
        check(
            "user.online",
            online,
            json!({"time": 1_748_855_643, "self_id": 10001, "post_type": "notice",
                   "notice_type": "client_status", "online": true,
                   "client": {"app_id": 0, "device_name": "phone", "device_kind": "phone"},
                   "user_id": 42}),
        );
        let offline = json!({"connection_id": "conn_1", "connections": 0, "device_id": "web",
                             "devices": 0, "reason": "heartbeat_timeout", "user_id": "bob"});
        check(
            "user.offline",
            offline,
            json!({"time": 1_748_855_643, "self_id": 10001, "post_type": "notice",
                   "notice_type": "client_status", "online": false,
                   "client": {"app_id": 0, "device_name": "web", "device_kind": "web"},
                   "user_id": "bob"}),
        );
    }

    #[test]
    fn unknown_events_are_declined() {
        let declined = format_event(&settings(), &event("message.sent", json!({}))).unwrap();
        assert_eq!(declined, None);
    }

    #[test]
    fn malformed_data_is_invalid_input() {
        let e = format_event(&settings(), &event("user.online", json!({"user_id": "a"})));
        assert!(matches!(e, Err(HookError::InvalidInput(_))), "{e:?}");
    }

    #[test]
    fn self_id_must_be_an_integer() {
        for config in [vec![], vec![("self_id", "bot")], vec![("self_id", "1.5")]] {
            let e = Settings::from_config(&Config::from_pairs(config));
            assert!(matches!(e, Err(HookError::BadConfig(_))), "{e:?}");
        }
        let s = Settings::from_config(&Config::from_pairs([("self_id", "7"), ("app_id", "9")]));
        assert_eq!(
            s,
            Ok(Settings {
                self_id: 7,
                app_id: 9
            })
        );
    }
}
