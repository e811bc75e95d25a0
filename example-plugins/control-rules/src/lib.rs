//! `control-rules`: a plugboard control handler that checks business control
//! requests before delivery. It allows only configured kinds, requires
//! fields in the payload of some kinds, limits how many controls each user
//! receives per time window (counts kept in the plugin's key-value store)
//! and can give each target its own payload naming that target.
//!
//! Build (in `example-plugins/`): `cargo build --target wasm32-wasip2 --release`,
//! giving `target/wasm32-wasip2/release/control_rules.wasm`. Load it with a
//! `[[plugins]]` entry (`name = "controls"`, `file = "control_rules.wasm"`,
//! `hooks = ["control-handler"]`, `config = { kinds = "profile.*" }`); see
//! README.md.
//!
//! The rules, in this order; the first that rejects decides:
//!
//! | source | rule |
//! | --- | --- |
//! | config `kinds` (comma-separated, trailing `*` a prefix) | a kind matching none is rejected: ``unknown kind `<kind>` `` |
//! | config `required.<kind>` (comma-separated fields) | the payload must be a JSON object with each field, else it is rejected |
//! | config `max_per_user`, `window_secs`; KV `rate:<user id>` | targets that already had `max_per_user` controls in the window are removed; rejected if none is left |
//! | config `personalize` | each kept target gets the payload object with `"user_id": <target>` |
//!
//! Otherwise the request is delivered: its payload and priority, to the kept
//! targets. Unset keys switch their rule off.
//!
//! Errors: a bad config value makes `init` fail with `bad-config` naming the
//! key; a failed store read or write is `host-failure` naming the key. A
//! `rate:` value that is not the plugin's JSON is a fresh window (logged as
//! a warning): the counts are the plugin's own bookkeeping, and a broken one
//! must not stop deliveries. No input makes the plugin panic.

use std::collections::HashMap;
use std::sync::OnceLock;

use plugboard_plugin_sdk::{
    export_plugin, host, Config, ControlHandler, ControlRequest, Decision, Delivery, HookError,
    LogLevel, Plan, Plugin,
};
use serde_json::{Map, Value};

/// The rules of this instance, parsed once by `init` (which the gateway
/// calls on every new instance before any hook).
static RULES: OnceLock<Rules> = OnceLock::new();

/// The plugin type exported to the gateway.
struct ControlRules;

impl Plugin for ControlRules {
    fn init(config: &Config) -> Result<(), HookError> {
        let rules = Rules::from_config(config)?;
        // A second init of the same instance would carry the same config.
        let _ = RULES.set(rules);
        Ok(())
    }
}

impl ControlHandler for ControlRules {
    fn handle(request: ControlRequest) -> Result<Decision, HookError> {
        let fallback;
        let rules = match RULES.get() {
            Some(rules) => rules,
            None => {
                fallback = Rules::from_config(&host::config())?;
                &fallback
            }
        };
        if let Err(why) = check_kind(rules, &request.kind) {
            return Ok(rejected(&request, why));
        }
        let payload = parse_payload(rules, &request);
        if let Err(why) = check_required(rules, &request.kind, payload.as_ref()) {
            return Ok(rejected(&request, why));
        }
        let targets = match &rules.rate_limit {
            Some(limit) => match rate_limited(limit, &request)? {
                Ok(kept) => kept,
                Err(why) => return Ok(rejected(&request, why)),
            },
            None => request.targets.clone(),
        };
        let plan = plan(rules, &request, payload.as_ref(), targets);
        host::log(
            LogLevel::Debug,
            "delivering a control request",
            &[
                ("id", &request.id),
                ("kind", &request.kind),
                ("targets", &plan.targets.len().to_string()),
            ],
        );
        Ok(Decision::Deliver(plan))
    }
}

export_plugin!(ControlRules: control);

/// A rejection, logged with the request it refuses.
fn rejected(request: &ControlRequest, why: String) -> Decision {
    host::log(
        LogLevel::Debug,
        "rejected a control request",
        &[("id", &request.id), ("kind", &request.kind), ("why", &why)],
    );
    Decision::Reject(why)
}

/// The rate-limit rule against the store: reads each target's window once,
/// decides, and writes back the windows of the targets that are kept. The
/// outer error is a store failure; the inner one the rejection text.
fn rate_limited(
    limit: &RateLimit,
    request: &ControlRequest,
) -> Result<Result<Vec<String>, String>, HookError> {
    let now = host::now_ms();
    let mut stored = HashMap::new();
    for user in &request.targets {
        if stored.contains_key(user) {
            continue;
        }
        let key = rate_key(user);
        let window = match read(&key)? {
            None => None,
            Some(bytes) => match Window::parse(&bytes) {
                Ok(window) => Some(window),
                Err(why) => {
                    host::log(
                        LogLevel::Warn,
                        "a rate-limit value is not {\"start\", \"count\"} JSON; starting a fresh window",
                        &[("key", &key), ("why", &why)],
                    );
                    None
                }
            },
        };
        stored.insert(user.clone(), window);
    }
    let limited = limit.apply(now, &request.targets, &stored);
    if limited.removed > 0 {
        host::log(
            LogLevel::Info,
            &format!(
                "rate limit removed {} of {} targets",
                limited.removed,
                request.targets.len()
            ),
            &[
                ("id", &request.id),
                ("kind", &request.kind),
                ("removed", &limited.removed.to_string()),
                ("max_per_user", &limit.max_per_user.to_string()),
                ("window_secs", &limit.window_secs.to_string()),
            ],
        );
    }
    if limited.kept.is_empty() && limited.removed > 0 {
        // Nothing is written: a rejected request is delivered to no one, so
        // it counts for no one.
        return Ok(Err(limit.rejection()));
    }
    for (user, window) in &limited.windows {
        write(&rate_key(user), window.to_json().as_bytes())?;
    }
    Ok(Ok(limited.kept))
}

/// Reads `key` from the store; a failure names the key, so the gateway's
/// log says which read failed.
fn read(key: &str) -> Result<Option<Vec<u8>>, HookError> {
    host::kv_get(key)
        .map_err(|e| HookError::host_failure(format!("key-value store: reading `{key}`: {e}")))
}

/// Writes `value` under `key`; a failure names the key.
fn write(key: &str, value: &[u8]) -> Result<(), HookError> {
    host::kv_set(key, value)
        .map_err(|e| HookError::host_failure(format!("key-value store: writing `{key}`: {e}")))
}

/// The window length when config `window_secs` is unset.
pub const DEFAULT_WINDOW_SECS: u32 = 60;

/// The store key holding `user`'s rate-limit window.
pub fn rate_key(user: &str) -> String {
    format!("rate:{user}")
}

/// An allowed kind: the whole kind, or its prefix (config `profile.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindPattern {
    /// The kind, or its prefix (without the `*`).
    pub text: String,
    /// Whether `text` is a prefix rather than the whole kind.
    pub prefix: bool,
}

impl KindPattern {
    /// One pattern; only a trailing `*` is special (`*` alone is every kind).
    pub fn parse(text: &str) -> Self {
        let text = text.trim();
        match text.strip_suffix('*') {
            Some(prefix) => Self {
                text: prefix.to_owned(),
                prefix: true,
            },
            None => Self {
                text: text.to_owned(),
                prefix: false,
            },
        }
    }

    /// Whether `kind` is allowed by this pattern.
    pub fn matches(&self, kind: &str) -> bool {
        if self.prefix {
            kind.starts_with(&self.text)
        } else {
            kind == self.text
        }
    }
}

/// Config `max_per_user` and `window_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// How many controls a user receives per window.
    pub max_per_user: u32,
    /// How long a window lasts, in seconds.
    pub window_secs: u32,
}

/// One user's window, as stored under `rate:<user id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// When the window started, in milliseconds since the Unix epoch.
    pub start: i64,
    /// How many controls the user was sent in it.
    pub count: u64,
}

impl Window {
    /// A stored value, `{"start": <ms>, "count": <n>}`; the error says what
    /// is wrong with it (other fields are ignored).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let object = value.as_object().ok_or("not a JSON object")?;
        let start = object
            .get("start")
            .and_then(Value::as_i64)
            .ok_or("`start` is not an integer")?;
        let count = object
            .get("count")
            .and_then(Value::as_u64)
            .ok_or("`count` is not a non-negative integer")?;
        Ok(Self { start, count })
    }

    /// The value stored for this window.
    pub fn to_json(&self) -> String {
        format!(r#"{{"start":{},"count":{}}}"#, self.start, self.count)
    }
}

/// What the rate limit did to a request's targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// The targets kept, in the request's order.
    pub kept: Vec<String>,
    /// How many targets were removed.
    pub removed: usize,
    /// The windows to store for the users kept at least once, in the order
    /// first kept.
    pub windows: Vec<(String, Window)>,
}

impl RateLimit {
    /// The window length in milliseconds.
    pub fn window_ms(&self) -> i64 {
        i64::from(self.window_secs) * 1000
    }

    /// `stored` if it is still running at `now`, else a fresh window. A
    /// start in the future is a clock that moved back: a fresh window, so
    /// that a bad clock cannot silence a user for long.
    pub fn current(&self, stored: Option<Window>, now: i64) -> Window {
        match stored {
            Some(w) if w.start <= now && now.saturating_sub(w.start) < self.window_ms() => w,
            _ => Window {
                start: now,
                count: 0,
            },
        }
    }

    /// Keeps each target that had fewer than `max_per_user` controls in its
    /// current window, counting this one. `stored` holds each target's
    /// stored window (absent or `None`: none). A user named twice counts
    /// twice, as the gateway would deliver twice.
    pub fn apply(
        &self,
        now: i64,
        targets: &[String],
        stored: &HashMap<String, Option<Window>>,
    ) -> Limited {
        // Each user's window as counted so far, and its place in `windows`
        // once kept: a group can have many members, so no linear lookups.
        let mut current: HashMap<&str, Window> = HashMap::new();
        let mut position: HashMap<&str, usize> = HashMap::new();
        let mut windows: Vec<(String, Window)> = Vec::new();
        let mut kept = Vec::new();
        let mut removed = 0;
        for user in targets {
            let window = current
                .entry(user)
                .or_insert_with(|| self.current(stored.get(user).copied().flatten(), now));
            if window.count >= u64::from(self.max_per_user) {
                removed += 1;
                continue;
            }
            window.count = window.count.saturating_add(1);
            let window = *window;
            match position.get(user.as_str()) {
                Some(&i) => windows[i].1 = window,
                None => {
                    position.insert(user, windows.len());
                    windows.push((user.clone(), window));
                }
            }
            kept.push(user.clone());
        }
        Limited {
            kept,
            removed,
            windows,
        }
    }

    /// The rejection when every target was removed.
    pub fn rejection(&self) -> String {
        format!(
            "rate limit: every target already had {} controls in the last {}s",
            self.max_per_user, self.window_secs
        )
    }
}

/// What the plugin's config says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Config `kinds`: the allowed kinds; `None` allows every kind.
    pub kinds: Option<Vec<KindPattern>>,
    /// Config `required.<kind>`: the fields the payload of `<kind>` must have.
    pub required: HashMap<String, Vec<String>>,
    /// Config `max_per_user` and `window_secs`; `None` without `max_per_user`.
    pub rate_limit: Option<RateLimit>,
    /// Config `personalize`.
    pub personalize: bool,
}

impl Rules {
    /// Reads and checks the config; a bad value is `bad-config` naming its
    /// key. Keys the plugin does not know are ignored.
    pub fn from_config(config: &Config) -> Result<Self, HookError> {
        let kinds = match config.get("kinds") {
            None => None,
            Some(raw) => {
                let patterns: Vec<KindPattern> =
                    list(raw).into_iter().map(KindPattern::parse).collect();
                if patterns.is_empty() {
                    // An empty list would reject everything: more likely a mistake.
                    return Err(HookError::bad_config("config key `kinds` lists no kind"));
                }
                Some(patterns)
            }
        };
        let mut required = HashMap::new();
        for (key, raw) in config.iter() {
            let Some(kind) = key.strip_prefix("required.") else {
                continue;
            };
            if kind.is_empty() {
                return Err(HookError::bad_config(format!(
                    "config key `{key}` names no kind"
                )));
            }
            let fields: Vec<String> = list(raw).into_iter().map(str::to_owned).collect();
            if fields.is_empty() {
                return Err(HookError::bad_config(format!(
                    "config key `{key}` lists no field"
                )));
            }
            // A later duplicate wins, as in `Config::get`.
            required.insert(kind.to_owned(), fields);
        }
        let max_per_user = config.get_parsed::<u32>("max_per_user")?;
        let window_secs = config
            .get_parsed::<u32>("window_secs")?
            .unwrap_or(DEFAULT_WINDOW_SECS);
        if max_per_user == Some(0) {
            // Zero would reject every request: `kinds` says that more plainly.
            return Err(HookError::bad_config(
                "config key `max_per_user` must be at least 1",
            ));
        }
        if window_secs == 0 {
            return Err(HookError::bad_config(
                "config key `window_secs` must be at least 1",
            ));
        }
        let personalize = match config.get("personalize").map(str::trim) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(HookError::bad_config(format!(
                    "config key `personalize` = {other:?}: expected true or false"
                )))
            }
        };
        Ok(Self {
            kinds,
            required,
            rate_limit: max_per_user.map(|max_per_user| RateLimit {
                max_per_user,
                window_secs,
            }),
            personalize,
        })
    }
}

/// The non-empty, trimmed entries of a comma-separated config value (a
/// trailing comma leaves an empty one).
fn list(raw: &str) -> Vec<&str> {
    raw.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect()
}

/// The request's payload as JSON, when a rule looks into it; `None` also
/// when it is not JSON (then it is not an object either).
pub fn parse_payload(rules: &Rules, request: &ControlRequest) -> Option<Value> {
    if rules.personalize || rules.required.contains_key(&request.kind) {
        serde_json::from_str(&request.payload).ok()
    } else {
        None
    }
}

/// Rule `kinds`: the rejection text for a kind that is not allowed.
pub fn check_kind(rules: &Rules, kind: &str) -> Result<(), String> {
    match &rules.kinds {
        Some(patterns) if !patterns.iter().any(|p| p.matches(kind)) => {
            Err(format!("unknown kind `{kind}`"))
        }
        _ => Ok(()),
    }
}

/// Rule `required.<kind>`: the rejection text for a payload without a
/// required field. Only the exact kind is looked up.
pub fn check_required(rules: &Rules, kind: &str, payload: Option<&Value>) -> Result<(), String> {
    let Some(fields) = rules.required.get(kind) else {
        return Ok(());
    };
    let Some(object) = payload.and_then(Value::as_object) else {
        return Err(format!("payload of `{kind}` must be a JSON object"));
    };
    match fields
        .iter()
        .find(|field| !object.contains_key(field.as_str()))
    {
        Some(missing) => Err(format!("payload of `{kind}` lacks `{missing}`")),
        None => Ok(()),
    }
}

/// The plan delivering `request` to `targets`: its payload and priority,
/// and with `personalize` (and an object payload) a payload per target.
pub fn plan(
    rules: &Rules,
    request: &ControlRequest,
    payload: Option<&Value>,
    targets: Vec<String>,
) -> Plan {
    let personal = payload
        .and_then(Value::as_object)
        .filter(|_| rules.personalize);
    Plan {
        payload: request.payload.clone(),
        priority: request.priority,
        targets: targets
            .into_iter()
            .map(|user_id| Delivery {
                payload: personal.map(|object| personalized(object, &user_id)),
                user_id,
            })
            .collect(),
    }
}

/// `object` with `"user_id": <user>` (replacing any `user_id` it had), as
/// JSON text.
fn personalized(object: &Map<String, Value>, user: &str) -> String {
    let mut object = object.clone();
    object.insert("user_id".to_owned(), Value::String(user.to_owned()));
    Value::Object(object).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugboard_plugin_sdk::Priority;

    fn rules(config: &[(&str, &str)]) -> Rules {
        Rules::from_config(&Config::from_pairs(config.iter().copied())).unwrap()
    }

    fn request(kind: &str, payload: &str, targets: &[&str]) -> ControlRequest {
        ControlRequest {
            id: "ctl_1".into(),
            kind: kind.into(),
            payload: payload.into(),
            priority: Priority::High,
            targets: targets.iter().map(|t| (*t).to_owned()).collect(),
            group_id: None,
            persist: true,
            ttl_ms: Some(86_400_000),
            receipt: false,
        }
    }

    /// The decision without the rate limit (which needs the store).
    fn decide(rules: &Rules, request: &ControlRequest) -> Decision {
        if let Err(why) = check_kind(rules, &request.kind) {
            return Decision::Reject(why);
        }
        let payload = parse_payload(rules, request);
        if let Err(why) = check_required(rules, &request.kind, payload.as_ref()) {
            return Decision::Reject(why);
        }
        Decision::Deliver(plan(
            rules,
            request,
            payload.as_ref(),
            request.targets.clone(),
        ))
    }

    fn targets(users: &[&str]) -> Vec<String> {
        users.iter().map(|u| (*u).to_owned()).collect()
    }

    fn stored(entries: &[(&str, Option<Window>)]) -> HashMap<String, Option<Window>> {
        entries
            .iter()
            .map(|(user, window)| ((*user).to_owned(), *window))
            .collect()
    }

    const LIMIT: RateLimit = RateLimit {
        max_per_user: 2,
        window_secs: 60,
    };
    const NOW: i64 = 1_748_855_643_512;

    #[test]
    fn without_config_every_request_is_delivered_unchanged() {
        let r = Rules::from_config(&Config::default()).unwrap();
        assert_eq!(r, Rules::default());
        for payload in ["{}", "not json", "[1]", ""] {
            let req = request("anything.at-all", payload, &["bob", "carol"]);
            assert_eq!(decide(&r, &req), Decision::deliver_unchanged(&req));
        }
    }

    #[test]
    fn kinds_are_exact_or_prefixes() {
        let r = rules(&[("kinds", " profile.*, order.paid ,")]);
        for kind in ["profile.changed", "profile.", "order.paid"] {
            assert_eq!(check_kind(&r, kind), Ok(()), "{kind}");
        }
        for kind in ["profile", "order.paid.late", "order", "", "Profile.changed"] {
            assert_eq!(
                check_kind(&r, kind),
                Err(format!("unknown kind `{kind}`")),
                "{kind}"
            );
        }
        let every = rules(&[("kinds", "*")]);
        assert_eq!(check_kind(&every, "x"), Ok(()));
        // Only a trailing `*` is special.
        let literal = rules(&[("kinds", "a*b")]);
        assert_eq!(check_kind(&literal, "a*b"), Ok(()));
        assert!(check_kind(&literal, "axb").is_err());
    }

    #[test]
    fn an_unknown_kind_is_rejected_with_its_name() {
        let r = rules(&[("kinds", "profile.*")]);
        let req = request("billing.due", "{}", &["bob"]);
        assert_eq!(
            decide(&r, &req),
            Decision::Reject("unknown kind `billing.due`".into())
        );
    }

    #[test]
    fn required_fields_are_checked_for_the_exact_kind() {
        let r = rules(&[("required.profile.changed", "user_id, fields")]);
        let ok = request(
            "profile.changed",
            r#"{"user_id":"a","fields":[]}"#,
            &["bob"],
        );
        assert_eq!(decide(&r, &ok), Decision::deliver_unchanged(&ok));
        let lacking = request("profile.changed", r#"{"user_id":"a"}"#, &["bob"]);
        assert_eq!(
            decide(&r, &lacking),
            Decision::Reject("payload of `profile.changed` lacks `fields`".into())
        );
        // The first missing field, in config order.
        let empty = request("profile.changed", "{}", &["bob"]);
        assert_eq!(
            decide(&r, &empty),
            Decision::Reject("payload of `profile.changed` lacks `user_id`".into())
        );
        for payload in ["[]", "\"x\"", "null", "not json", "", "{\"user_id\":"] {
            let req = request("profile.changed", payload, &["bob"]);
            assert_eq!(
                decide(&r, &req),
                Decision::Reject("payload of `profile.changed` must be a JSON object".into()),
                "{payload:?}"
            );
        }
        // No prefix match: other kinds need nothing.
        let other = request("profile.changed.v2", "not json", &["bob"]);
        assert_eq!(decide(&r, &other), Decision::deliver_unchanged(&other));
    }

    #[test]
    fn the_kind_rule_comes_before_the_required_rule() {
        let r = rules(&[("kinds", "order.*"), ("required.profile.changed", "x")]);
        let req = request("profile.changed", "[]", &["bob"]);
        assert_eq!(
            decide(&r, &req),
            Decision::Reject("unknown kind `profile.changed`".into())
        );
    }

    #[test]
    fn personalize_adds_each_target_to_an_object_payload() {
        let r = rules(&[("personalize", "true")]);
        let req = request("profile.changed", r#"{"nickname":"Al"}"#, &["bob", "carol"]);
        let Decision::Deliver(plan) = decide(&r, &req) else {
            panic!("not delivered");
        };
        assert_eq!(plan.payload, req.payload);
        assert_eq!(plan.priority, Priority::High);
        let personal: Vec<(String, Value)> = plan
            .targets
            .iter()
            .map(|d| {
                let payload = d.payload.as_deref().unwrap();
                (d.user_id.clone(), serde_json::from_str(payload).unwrap())
            })
            .collect();
        assert_eq!(
            personal,
            vec![
                (
                    "bob".into(),
                    serde_json::json!({"nickname": "Al", "user_id": "bob"})
                ),
                (
                    "carol".into(),
                    serde_json::json!({"nickname": "Al", "user_id": "carol"})
                ),
            ]
        );
        // A `user_id` already there is replaced by the target.
        let named = request("x", r#"{"user_id":"alice"}"#, &["bob"]);
        let Decision::Deliver(plan) = decide(&r, &named) else {
            panic!("not delivered");
        };
        assert_eq!(
            plan.targets[0].payload.as_deref(),
            Some(r#"{"user_id":"bob"}"#)
        );
    }

    #[test]
    fn personalize_leaves_other_payloads_shared() {
        let r = rules(&[("personalize", "true")]);
        for payload in ["[1,2]", "\"x\"", "not json", ""] {
            let req = request("x", payload, &["bob"]);
            assert_eq!(decide(&r, &req), Decision::deliver_unchanged(&req));
        }
        let off = rules(&[("personalize", "false")]);
        let req = request("x", "{}", &["bob"]);
        assert_eq!(decide(&off, &req), Decision::deliver_unchanged(&req));
    }

    #[test]
    fn priority_and_payload_are_kept() {
        let r = rules(&[("kinds", "*")]);
        for priority in [Priority::High, Priority::Normal, Priority::Low] {
            let mut req = request("x", r#"{"a":1}"#, &["bob"]);
            req.priority = priority;
            let Decision::Deliver(plan) = decide(&r, &req) else {
                panic!("not delivered");
            };
            assert_eq!(plan.priority, priority);
            assert_eq!(plan.payload, r#"{"a":1}"#);
        }
    }

    #[test]
    fn config_values_and_defaults() {
        let r = rules(&[
            ("kinds", "a,b*"),
            ("required.a", "x,,y"),
            ("max_per_user", " 5 "),
            ("personalize", "true"),
            ("unrelated", "whatever"),
        ]);
        assert_eq!(r.kinds.as_ref().map(Vec::len), Some(2));
        assert_eq!(r.required["a"], vec!["x".to_owned(), "y".to_owned()]);
        assert_eq!(
            r.rate_limit,
            Some(RateLimit {
                max_per_user: 5,
                window_secs: DEFAULT_WINDOW_SECS
            })
        );
        assert!(r.personalize);
        // `window_secs` alone switches nothing on, but is still checked.
        let w = rules(&[("window_secs", "10")]);
        assert_eq!(w.rate_limit, None);
        let both = rules(&[("max_per_user", "1"), ("window_secs", "10")]);
        assert_eq!(
            both.rate_limit,
            Some(RateLimit {
                max_per_user: 1,
                window_secs: 10
            })
        );
    }

    #[test]
    fn bad_config_is_bad_config_naming_the_key() {
        for (key, value) in [
            ("max_per_user", "x"),
            ("max_per_user", "-1"),
            ("max_per_user", "0"),
            ("max_per_user", "99999999999"),
            ("window_secs", "soon"),
            ("window_secs", "0"),
            ("personalize", "yes"),
            ("kinds", " , "),
            ("required.profile.changed", ""),
            ("required.", "x"),
        ] {
            let e = Rules::from_config(&Config::from_pairs([(key, value)]));
            assert!(
                matches!(&e, Err(HookError::BadConfig(m)) if m.contains(&format!("`{key}`"))),
                "{key}={value}: {e:?}"
            );
        }
    }

    #[test]
    fn store_keys_are_per_user() {
        assert_eq!(rate_key("alice"), "rate:alice");
    }

    #[test]
    fn windows_round_trip_and_bad_values_are_refused() {
        let w = Window {
            start: NOW,
            count: 3,
        };
        assert_eq!(w.to_json(), r#"{"start":1748855643512,"count":3}"#);
        assert_eq!(Window::parse(w.to_json().as_bytes()), Ok(w));
        assert_eq!(
            Window::parse(br#"{"count": 1, "start": 5, "extra": true}"#),
            Ok(Window { start: 5, count: 1 })
        );
        for bad in [
            &b""[..],
            b"not json",
            b"null",
            b"[]",
            b"{}",
            br#"{"start": 5}"#,
            br#"{"start": "5", "count": 1}"#,
            br#"{"start": 5, "count": -1}"#,
            br#"{"start": 5.5, "count": 1}"#,
            b"\xff",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_window_runs_for_window_secs() {
        let w = |start| Some(Window { start, count: 2 });
        let fresh = Window {
            start: NOW,
            count: 0,
        };
        assert_eq!(LIMIT.current(None, NOW), fresh);
        assert_eq!(LIMIT.current(w(NOW), NOW), w(NOW).unwrap());
        assert_eq!(
            LIMIT.current(w(NOW - 59_999), NOW),
            w(NOW - 59_999).unwrap()
        );
        assert_eq!(LIMIT.current(w(NOW - 60_000), NOW), fresh);
        assert_eq!(LIMIT.current(w(i64::MIN), NOW), fresh);
        // A start in the future (the clock moved back) is a fresh window.
        assert_eq!(LIMIT.current(w(NOW + 1), NOW), fresh);
    }

    #[test]
    fn targets_at_the_limit_are_removed_and_the_others_counted() {
        let s = stored(&[
            (
                "bob",
                Some(Window {
                    start: NOW - 1_000,
                    count: 2,
                }),
            ),
            (
                "carol",
                Some(Window {
                    start: NOW - 1_000,
                    count: 1,
                }),
            ),
            // An old window: a fresh one.
            (
                "dave",
                Some(Window {
                    start: NOW - 61_000,
                    count: 9,
                }),
            ),
            ("erin", None),
        ]);
        let limited = LIMIT.apply(
            NOW,
            &targets(&["bob", "carol", "dave", "erin", "frank"]),
            &s,
        );
        assert_eq!(limited.kept, targets(&["carol", "dave", "erin", "frank"]));
        assert_eq!(limited.removed, 1);
        assert_eq!(
            limited.windows,
            vec![
                (
                    "carol".into(),
                    Window {
                        start: NOW - 1_000,
                        count: 2
                    }
                ),
                (
                    "dave".into(),
                    Window {
                        start: NOW,
                        count: 1
                    }
                ),
                (
                    "erin".into(),
                    Window {
                        start: NOW,
                        count: 1
                    }
                ),
                (
                    "frank".into(),
                    Window {
                        start: NOW,
                        count: 1
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_user_named_twice_counts_twice() {
        let limited = LIMIT.apply(NOW, &targets(&["bob", "bob", "bob"]), &stored(&[]));
        assert_eq!(limited.kept, targets(&["bob", "bob"]));
        assert_eq!(limited.removed, 1);
        assert_eq!(
            limited.windows,
            vec![(
                "bob".into(),
                Window {
                    start: NOW,
                    count: 2
                }
            )]
        );
    }

    #[test]
    fn every_target_removed_and_no_target_at_all() {
        let full = Some(Window {
            start: NOW,
            count: 2,
        });
        let limited = LIMIT.apply(
            NOW,
            &targets(&["bob", "carol"]),
            &stored(&[("bob", full), ("carol", full)]),
        );
        assert!(limited.kept.is_empty());
        assert_eq!(limited.removed, 2);
        assert!(limited.windows.is_empty());
        assert_eq!(
            LIMIT.rejection(),
            "rate limit: every target already had 2 controls in the last 60s"
        );
        // No target to begin with: nothing removed, nothing to reject.
        let none = LIMIT.apply(NOW, &[], &stored(&[]));
        assert_eq!((none.kept.len(), none.removed), (0, 0));
    }

    #[test]
    fn counts_saturate_rather_than_overflow() {
        let huge = RateLimit {
            max_per_user: u32::MAX,
            window_secs: u32::MAX,
        };
        let s = stored(&[(
            "bob",
            Some(Window {
                start: NOW,
                count: u64::MAX,
            }),
        )]);
        let limited = huge.apply(NOW, &targets(&["bob"]), &s);
        assert_eq!(limited.removed, 1);
        assert_eq!(huge.window_ms(), 4_294_967_295_000);
    }
}
