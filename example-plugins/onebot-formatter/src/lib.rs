//! `onebot-formatter`: a plugboard webhook formatter that posts gateway
//! events to a OneBot v11 application over HTTP POST, signed as OneBot signs
//! them, so the application hears when the gateway's service is enabled and
//! disabled and who comes online.
//!
//! Build (in `example-plugins/`): `cargo build --target wasm32-wasip2 --release`,
//! giving `target/wasm32-wasip2/release/onebot_formatter.wasm`. Load it with a
//! `[[plugins]]` entry (`name = "onebot"`, `file = "onebot_formatter.wasm"`,
//! `config = { self_id = "10001", secret = "…" }`) and name it from a webhook
//! endpoint with `formatter = "onebot"`; see README.md.
//!
//! | gateway event | OneBot post |
//! | --- | --- |
//! | `service.enabled` | `meta_event` / `lifecycle` / `enable` |
//! | `service.disabled` | `meta_event` / `lifecycle` / `disable` |
//! | `user.online` | `notice` / `client_status`, `online: true` |
//! | `user.offline` | `notice` / `client_status`, `online: false` |
//! | anything else (`connection.*` included) | declined (not sent to this endpoint) |
//!
//! OneBot's `lifecycle` meta event is about the implementation itself (here:
//! the gateway's WebSocket service), so end users' connections never map to
//! it: the per-user presence becomes a `client_status` notice instead.
//!
//! Every post has `time` (unix seconds of the event) and `self_id` (config),
//! is sent as `application/json` with an `X-Self-ID` header and, with a
//! `secret`, an `X-Signature: sha1=<hex HMAC-SHA1 of the body>` header, as
//! OneBot's HTTP POST convention has it. OneBot user ids are int64: a user
//! id in canonical decimal form is sent as a number; any other id is sent as
//! a string, as a number derived from its hash, or not at all, as
//! `non_numeric_ids` says.
//!
//! Config: `self_id` (required, integer), `secret` (optional: the OneBot
//! app's `secret`), `app_id` (optional integer, default 0: `client.app_id`
//! in `client_status` notices), `non_numeric_ids` (`string`, the default;
//! `hash`; or `decline`). A bad value fails `init` with `bad-config`.

use std::sync::OnceLock;

use hmac::{Hmac, Mac};
use plugboard_plugin_sdk::{
    event_type, export_plugin, host, Config, Event, HookError, OutgoingRequest, Plugin,
    ServiceChange, UserOffline, UserOnline, WebhookFormatter,
};
use serde_json::{json, Value};
use sha1::{Digest, Sha1};

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

/// What to send as `user_id` for a user id that is not a decimal int64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonNumericIds {
    /// The id as a JSON string (apps with dynamic typing accept it).
    String,
    /// A positive int64 from the id's SHA-1, with the id itself in
    /// `plugboard_user_id` (for apps that insist on integers).
    Hash,
    /// Nothing: the notice is declined.
    Decline,
}

/// What the plugin's config says.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    /// The bot account id sent as `self_id` and `X-Self-ID`.
    pub self_id: i64,
    /// `client.app_id` in `client_status` notices.
    pub app_id: i64,
    /// The OneBot app's `secret`: signs each body (`X-Signature`) when set.
    pub secret: Option<String>,
    /// How user ids that are not int64 are sent.
    pub non_numeric_ids: NonNumericIds,
}

/// The secret stays out of debug output (and so out of logs).
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("self_id", &self.self_id)
            .field("app_id", &self.app_id)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("non_numeric_ids", &self.non_numeric_ids)
            .finish()
    }
}

impl Settings {
    /// Reads and checks the config: `self_id` must be an integer.
    pub fn from_config(config: &Config) -> Result<Self, HookError> {
        // Not `get_parsed`: its error would quote the value, the secret.
        let secret = match config.get("secret") {
            None => None,
            Some("") => {
                return Err(HookError::BadConfig(
                    "config key `secret` is empty (leave it out to send unsigned posts)".into(),
                ))
            }
            Some(s) => Some(s.to_string()),
        };
        let non_numeric_ids = match config.get("non_numeric_ids").map(str::trim) {
            None | Some("string") => NonNumericIds::String,
            Some("hash") => NonNumericIds::Hash,
            Some("decline") => NonNumericIds::Decline,
            Some(other) => {
                return Err(HookError::BadConfig(format!(
                    "config key `non_numeric_ids` = {other:?}: use `string`, `hash` or `decline`"
                )))
            }
        };
        Ok(Self {
            self_id: config.require_parsed("self_id")?,
            app_id: config.get_parsed("app_id")?.unwrap_or(0),
            secret,
            non_numeric_ids,
        })
    }
}

/// The OneBot post for `event`, or `None` for an event it does not map.
pub fn format_event(
    settings: &Settings,
    event: &Event,
) -> Result<Option<OutgoingRequest>, HookError> {
    let time = event.timestamp_secs();
    let body = match event.event_type.as_str() {
        event_type::SERVICE_ENABLED => lifecycle(settings, time, "enable", &event.data_as()?),
        event_type::SERVICE_DISABLED => lifecycle(settings, time, "disable", &event.data_as()?),
        event_type::USER_ONLINE => {
            let p: UserOnline = event.data_as()?;
            match client_status(settings, time, &p.user_id, &p.device_id, true) {
                Some(body) => body,
                None => return Ok(None),
            }
        }
        event_type::USER_OFFLINE => {
            let p: UserOffline = event.data_as()?;
            match client_status(settings, time, &p.user_id, &p.device_id, false) {
                Some(body) => body,
                None => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    let mut request =
        OutgoingRequest::json(&body)?.with_header("X-Self-ID", settings.self_id.to_string());
    if let Some(secret) = &settings.secret {
        let signature = format!("sha1={}", hex(&hmac_sha1(secret.as_bytes(), &request.body)));
        request = request.with_header("X-Signature", signature);
    }
    Ok(Some(request))
}

/// A OneBot `lifecycle` meta event: the implementation (the gateway's
/// WebSocket service on `node`) was enabled or disabled.
fn lifecycle(settings: &Settings, time: i64, sub_type: &str, change: &ServiceChange) -> Value {
    json!({
        "time": time,
        "self_id": settings.self_id,
        "post_type": "meta_event",
        "meta_event_type": "lifecycle",
        "sub_type": sub_type,
        "node_id": change.node,
        "reason": change.reason,
    })
}

/// A go-cqhttp `client_status` notice: one of the users the gateway serves
/// came online or went offline. `None` when the user id is declined.
fn client_status(
    settings: &Settings,
    time: i64,
    user: &str,
    device: &str,
    online: bool,
) -> Option<Value> {
    let mut body = json!({
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
    });
    let fields = body.as_object_mut().expect("a JSON object");
    match (numeric_id(user), settings.non_numeric_ids) {
        (Some(n), _) => {
            fields.insert("user_id".into(), n.into());
        }
        (None, NonNumericIds::String) => {
            fields.insert("user_id".into(), user.into());
        }
        (None, NonNumericIds::Hash) => {
            fields.insert("user_id".into(), hashed_id(user).into());
            fields.insert("plugboard_user_id".into(), user.into());
        }
        (None, NonNumericIds::Decline) => return None,
    }
    Some(body)
}

/// A user id that OneBot can take as it is: the canonical decimal form of
/// an int64 (no sign, no leading zeros), so the number maps back to exactly
/// that id.
fn numeric_id(user: &str) -> Option<i64> {
    let n: i64 = user.parse().ok()?;
    (n.to_string() == user).then_some(n)
}

/// A positive int64 for a non-numeric id: the first 8 bytes of its SHA-1,
/// top bit cleared. Stable across gateways and versions; two ids collide
/// with a chance of about 2^-63 per pair.
fn hashed_id(user: &str) -> i64 {
    let digest = Sha1::digest(user.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 1) as i64
}

/// HMAC-SHA1 of `body` under `key`, as OneBot's `X-Signature` has it.
fn hmac_sha1(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_with(pairs: &[(&str, &str)]) -> Settings {
        let mut all = vec![("self_id", "10001")];
        all.extend_from_slice(pairs);
        Settings::from_config(&Config::from_pairs(all)).unwrap()
    }

    fn settings() -> Settings {
        settings_with(&[])
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
    fn check_with(settings: &Settings, event_type: &str, data: Value, expect: Value) {
        let request = format_event(settings, &event(event_type, data))
            .unwrap()
            .expect("not declined");
        assert_eq!(request.content_type, "application/json");
        assert_eq!(request.header("X-Self-ID"), Some("10001"));
        assert_eq!(request.body_json().unwrap(), expect);
    }

    #[track_caller]
    fn check(event_type: &str, data: Value, expect: Value) {
        check_with(&settings(), event_type, data, expect)
    }

    #[test]
    fn service_events_are_the_lifecycle_enable_and_disable() {
        check(
            "service.enabled",
            json!({"node": "edge-1", "reason": "start"}),
            json!({"time": 1_748_855_643, "self_id": 10001, "post_type": "meta_event",
                   "meta_event_type": "lifecycle", "sub_type": "enable",
                   "node_id": "edge-1", "reason": "start"}),
        );
        check(
            "service.disabled",
            json!({"node": "edge-1", "reason": "shutdown"}),
            json!({"time": 1_748_855_643, "self_id": 10001, "post_type": "meta_event",
                   "meta_event_type": "lifecycle", "sub_type": "disable",
                   "node_id": "edge-1", "reason": "shutdown"}),
        );
    }

    #[test]
    fn connections_never_impersonate_the_lifecycle() {
        for t in ["connection.opened", "connection.closed", "message.created"] {
            let declined = format_event(&settings(), &event(t, json!({}))).unwrap();
            assert_eq!(declined, None, "{t}");
        }
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
    fn only_canonical_int64_ids_become_numbers() {
        for (id, numeric) in [
            ("42", Some(42)),
            ("0", Some(0)),
            ("-7", Some(-7)),
            ("007", None),
            ("+7", None),
            ("9223372036854775808", None),
            ("bob", None),
        ] {
            assert_eq!(numeric_id(id), numeric, "{id}");
        }
    }

    #[test]
    fn non_numeric_ids_are_strings_hashes_or_declined() {
        let offline = |user: &str| {
            event(
                "user.offline",
                json!({"connection_id": "conn_1", "connections": 0, "device_id": "web",
                       "devices": 0, "reason": "kicked", "user_id": user}),
            )
        };
        let hash = settings_with(&[("non_numeric_ids", "hash")]);
        let body = format_event(&hash, &offline("bob"))
            .unwrap()
            .unwrap()
            .body_json()
            .unwrap();
        let n = body["user_id"].as_i64().expect("an integer");
        assert!(n >= 0);
        assert_eq!(n, hashed_id("bob"), "stable");
        assert_ne!(n, hashed_id("alice"));
        assert_eq!(body["plugboard_user_id"], "bob");
        // Numeric ids pass through whatever the setting.
        let body = format_event(&hash, &offline("42"))
            .unwrap()
            .unwrap()
            .body_json()
            .unwrap();
        assert_eq!(
            (body["user_id"].as_i64(), body.get("plugboard_user_id")),
            (Some(42), None)
        );

        let decline = settings_with(&[("non_numeric_ids", "decline")]);
        assert_eq!(format_event(&decline, &offline("bob")).unwrap(), None);
        assert!(format_event(&decline, &offline("42")).unwrap().is_some());
    }

    #[test]
    fn a_secret_signs_the_body_as_onebot_does() {
        let signed = settings_with(&[("secret", "key")]);
        let request = format_event(
            &signed,
            &event("service.enabled", json!({"node": "n", "reason": "start"})),
        )
        .unwrap()
        .unwrap();
        let expect = format!("sha1={}", hex(&hmac_sha1(b"key", &request.body)));
        assert_eq!(request.header("X-Signature"), Some(expect.as_str()));
        // RFC 2202 test case 2, the HMAC-SHA1 itself.
        assert_eq!(
            hex(&hmac_sha1(b"Jefe", b"what do ya want for nothing?")),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
        let unsigned = format_event(
            &settings(),
            &event("service.enabled", json!({"node": "n", "reason": "start"})),
        )
        .unwrap()
        .unwrap();
        assert_eq!(unsigned.header("X-Signature"), None);
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
        let e = format_event(&settings(), &event("service.enabled", json!({"node": 1})));
        assert!(matches!(e, Err(HookError::InvalidInput(_))), "{e:?}");
    }

    #[test]
    fn config_is_checked_and_the_secret_never_shown() {
        for config in [
            vec![],
            vec![("self_id", "bot")],
            vec![("self_id", "1.5")],
            vec![("self_id", "1"), ("secret", "")],
            vec![("self_id", "1"), ("non_numeric_ids", "drop")],
        ] {
            let e = Settings::from_config(&Config::from_pairs(config));
            assert!(matches!(e, Err(HookError::BadConfig(_))), "{e:?}");
        }
        let s = Settings::from_config(&Config::from_pairs([
            ("self_id", "7"),
            ("app_id", "9"),
            ("secret", "hunter2"),
        ]))
        .unwrap();
        assert_eq!(
            (s.self_id, s.app_id, s.non_numeric_ids),
            (7, 9, NonNumericIds::String)
        );
        assert_eq!(s.secret.as_deref(), Some("hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
