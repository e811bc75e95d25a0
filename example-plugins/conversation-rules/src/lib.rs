//! `conversation-rules`: a plugboard conversation filter that decides, per
//! viewer, which rows of a conversation list are shown and whether their
//! last-message preview is readable. Site-wide rules come from the plugin's
//! config; each user's mutes and blocks come from the plugin's key-value
//! store, so a business server can change them without reloading the plugin.
//!
//! Build (in `example-plugins/`): `cargo build --target wasm32-wasip2 --release`,
//! giving `target/wasm32-wasip2/release/conversation_rules.wasm`. Load it with
//! a `[[plugins]]` entry (`name = "rules"`, `file = "conversation_rules.wasm"`,
//! `config = { hide = "group:ops-*", redact = "group:hr" }`); see README.md.
//!
//! Channel references, in config and in the store, are `person:<id>` or
//! `group:<id>`; a trailing `*` makes the id a prefix (`group:ops-*` is every
//! group whose id starts with `ops-`, `group:*` every group).
//!
//! | source | rule |
//! | --- | --- |
//! | config `hide` (comma-separated references) | matching conversations are dropped for every viewer |
//! | KV `muted:<viewer>` (JSON array of references) | matching conversations are dropped for that viewer |
//! | KV `blocked:<viewer>` (JSON array of user ids) | person conversations with a blocked user are dropped |
//! | config `redact` (comma-separated references) | matching conversations with a last message get their preview replaced |
//! | KV `blocked:<viewer>` | group conversations whose last message a blocked user sent get their preview replaced |
//!
//! A drop wins over a redaction. The replacement preview is config
//! `redacted_text` (default `[hidden]`); nothing else of the row changes.
//! Every other conversation is kept. The answer has one verdict per input
//! conversation, in order.
//!
//! Errors: a malformed `hide` or `redact` makes `init` fail with
//! `bad-config`; a `muted:` or `blocked:` value that is not a JSON array of
//! strings (or, for `muted:`, holds a bad reference) fails the call with
//! `bad-config` naming the key; a failed store read is `host-failure`. An
//! absent key is an empty list.

use std::collections::HashSet;
use std::sync::OnceLock;

use plugboard_plugin_sdk::{
    export_plugin, host, ChannelType, Config, Conversation, ConversationFilter, HookError,
    LogLevel, Plugin, Verdict, Viewer,
};

/// The rules of this instance, parsed once by `init` (which the gateway
/// calls on every new instance before any hook).
static RULES: OnceLock<Rules> = OnceLock::new();

/// The plugin type exported to the gateway.
struct ConversationRules;

impl Plugin for ConversationRules {
    fn init(config: &Config) -> Result<(), HookError> {
        let rules = Rules::from_config(config)?;
        // A second init of the same instance would carry the same config.
        let _ = RULES.set(rules);
        Ok(())
    }
}

impl ConversationFilter for ConversationRules {
    fn filter(viewer: Viewer, conversations: Vec<Conversation>) -> Result<Vec<Verdict>, HookError> {
        let fallback;
        let rules = match RULES.get() {
            Some(rules) => rules,
            None => {
                fallback = Rules::from_config(&host::config())?;
                &fallback
            }
        };
        // Each key is read once per call, whatever the page holds: the store
        // is the slow part, and one read keeps the answer consistent even if
        // the business server writes the key meanwhile.
        let muted_key = muted_key(&viewer.user_id);
        let blocked_key = blocked_key(&viewer.user_id);
        let lists = ViewerLists {
            muted: parse_muted(&muted_key, read(&muted_key)?.as_deref())?,
            blocked: parse_blocked(&blocked_key, read(&blocked_key)?.as_deref())?,
        };
        let verdicts = apply(rules, &lists, conversations);
        let count = |f: fn(&Verdict) -> bool| verdicts.iter().filter(|v| f(v)).count().to_string();
        host::log(
            LogLevel::Debug,
            "filtered a conversation list",
            &[
                ("viewer", &viewer.user_id),
                ("kept", &count(|v| matches!(v, Verdict::Keep))),
                ("dropped", &count(|v| matches!(v, Verdict::Drop))),
                ("rewritten", &count(|v| matches!(v, Verdict::Rewrite(_)))),
            ],
        );
        Ok(verdicts)
    }
}

export_plugin!(ConversationRules: filter);

/// Reads `key` from the store; a failure names the key, so the gateway's
/// log says which read failed.
fn read(key: &str) -> Result<Option<Vec<u8>>, HookError> {
    host::kv_get(key)
        .map_err(|e| HookError::host_failure(format!("key-value store: reading `{key}`: {e}")))
}

/// The preview shown in place of a redacted one when config `redacted_text`
/// is unset.
pub const DEFAULT_REDACTED_TEXT: &str = "[hidden]";

/// The store key holding the channels `user` muted.
pub fn muted_key(user: &str) -> String {
    format!("muted:{user}")
}

/// The store key holding the users `user` blocked.
pub fn blocked_key(user: &str) -> String {
    format!("blocked:{user}")
}

/// A channel reference: `person:<id>` or `group:<id>`, the id ending in `*`
/// for a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRef {
    /// The kind of channel it names.
    pub channel_type: ChannelType,
    /// The channel id, or its prefix (without the `*`).
    pub id: String,
    /// Whether `id` is a prefix rather than the whole id.
    pub prefix: bool,
}

impl ChannelRef {
    /// Parses one reference; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (kind, id) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?} is not person:<id> or group:<id>"))?;
        let channel_type = match kind {
            "person" => ChannelType::Person,
            "group" => ChannelType::Group,
            _ => return Err(format!("{text:?}: the kind must be person or group")),
        };
        let (id, prefix) = match id.strip_suffix('*') {
            Some(stem) => (stem, true),
            None => (id, false),
        };
        // `group:*` (every group) is deliberate; `group:` is a typo.
        if id.is_empty() && !prefix {
            return Err(format!("{text:?} has an empty id"));
        }
        Ok(Self {
            channel_type,
            id: id.to_owned(),
            prefix,
        })
    }

    /// Whether this reference names `conversation`'s channel.
    pub fn matches(&self, conversation: &Conversation) -> bool {
        self.channel_type == conversation.channel_type
            && if self.prefix {
                conversation.channel_id.starts_with(&self.id)
            } else {
                conversation.channel_id == self.id
            }
    }
}

/// What the plugin's config says: the rules that apply to every viewer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Config `hide`: conversations dropped for everyone.
    pub hide: Vec<ChannelRef>,
    /// Config `redact`: conversations whose preview is replaced.
    pub redact: Vec<ChannelRef>,
    /// Config `redacted_text`: the replacement preview.
    pub redacted_text: String,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            hide: Vec::new(),
            redact: Vec::new(),
            redacted_text: DEFAULT_REDACTED_TEXT.to_owned(),
        }
    }
}

impl Rules {
    /// Reads and checks the config; a bad reference is `bad-config`.
    pub fn from_config(config: &Config) -> Result<Self, HookError> {
        Ok(Self {
            hide: config_refs(config, "hide")?,
            redact: config_refs(config, "redact")?,
            redacted_text: config
                .get("redacted_text")
                .unwrap_or(DEFAULT_REDACTED_TEXT)
                .to_owned(),
        })
    }
}

/// The comma-separated references under config `key` (empty entries, as
/// left by a trailing comma, are skipped).
fn config_refs(config: &Config, key: &str) -> Result<Vec<ChannelRef>, HookError> {
    config
        .get(key)
        .unwrap_or("")
        .split(',')
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| {
            ChannelRef::parse(entry)
                .map_err(|why| HookError::bad_config(format!("config key `{key}`: {why}")))
        })
        .collect()
}

/// One viewer's own lists, from the key-value store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewerLists {
    /// `muted:<viewer>`: channels the viewer does not want to see.
    pub muted: Vec<ChannelRef>,
    /// `blocked:<viewer>`: users the viewer blocked.
    pub blocked: HashSet<String>,
}

/// The channels in the value of store key `key` (`muted:<viewer>`); `None`
/// (no such key) is none.
pub fn parse_muted(key: &str, value: Option<&[u8]>) -> Result<Vec<ChannelRef>, HookError> {
    string_array(key, value)?
        .iter()
        .map(|entry| {
            ChannelRef::parse(entry)
                .map_err(|why| HookError::bad_config(format!("key-value key `{key}`: {why}")))
        })
        .collect()
}

/// The user ids in the value of store key `key` (`blocked:<viewer>`);
/// `None` (no such key) is none.
pub fn parse_blocked(key: &str, value: Option<&[u8]>) -> Result<HashSet<String>, HookError> {
    Ok(string_array(key, value)?.into_iter().collect())
}

/// A stored JSON array of strings. Anything else is `bad-config` rather than
/// a panic: a panic would trap the instance, and the value is data written
/// by someone else.
fn string_array(key: &str, value: Option<&[u8]>) -> Result<Vec<String>, HookError> {
    match value {
        None => Ok(Vec::new()),
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
            HookError::bad_config(format!(
                "key-value key `{key}` must hold a JSON array of strings: {e}"
            ))
        }),
    }
}

/// The verdicts for a page of one viewer's conversations: one per
/// conversation, in order.
pub fn apply(rules: &Rules, lists: &ViewerLists, conversations: Vec<Conversation>) -> Vec<Verdict> {
    conversations
        .into_iter()
        .map(|c| verdict(rules, lists, c))
        .collect()
}

/// The verdict for one conversation. Drops are decided first, so a hidden
/// conversation is never shown redacted.
pub fn verdict(rules: &Rules, lists: &ViewerLists, mut conversation: Conversation) -> Verdict {
    let named_by = |refs: &[ChannelRef]| refs.iter().any(|r| r.matches(&conversation));
    let blocked_person = conversation.channel_type == ChannelType::Person
        && lists.blocked.contains(&conversation.channel_id);
    if named_by(&rules.hide) || named_by(&lists.muted) || blocked_person {
        return Verdict::Drop;
    }
    let redact = named_by(&rules.redact)
        || (conversation.channel_type == ChannelType::Group
            && conversation
                .last_message
                .as_ref()
                .is_some_and(|m| lists.blocked.contains(&m.sender)));
    match conversation.last_message.as_mut() {
        Some(message) if redact => {
            // Only the preview changes: the row must still describe the
            // same conversation (channel id and type are checked by the
            // gateway).
            message.preview.clone_from(&rules.redacted_text);
            Verdict::Rewrite(conversation)
        }
        _ => Verdict::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugboard_plugin_sdk::MessageSummary;

    fn conversation(channel: &str, last_sender: Option<&str>) -> Conversation {
        let (kind, id) = channel.split_once(':').unwrap();
        Conversation {
            channel_id: id.into(),
            channel_type: match kind {
                "person" => ChannelType::Person,
                _ => ChannelType::Group,
            },
            unread: 3,
            version: 7,
            updated_at_ms: 1_748_855_643_512,
            last_message: last_sender.map(|sender| MessageSummary {
                message_id: "msg_1".into(),
                seq: 41,
                sender: sender.into(),
                preview: "see you at 5".into(),
            }),
        }
    }

    fn rules(config: &[(&str, &str)]) -> Rules {
        Rules::from_config(&Config::from_pairs(config.iter().copied())).unwrap()
    }

    fn lists(muted: &str, blocked: &str) -> ViewerLists {
        ViewerLists {
            muted: parse_muted("muted:alice", Some(muted.as_bytes())).unwrap(),
            blocked: parse_blocked("blocked:alice", Some(blocked.as_bytes())).unwrap(),
        }
    }

    fn redacted(mut c: Conversation, text: &str) -> Verdict {
        c.last_message.as_mut().unwrap().preview = text.into();
        Verdict::Rewrite(c)
    }

    #[test]
    fn references_parse_exact_and_prefix() {
        assert_eq!(
            ChannelRef::parse(" group:ops-* "),
            Ok(ChannelRef {
                channel_type: ChannelType::Group,
                id: "ops-".into(),
                prefix: true
            })
        );
        assert_eq!(
            ChannelRef::parse("person:a:b"),
            Ok(ChannelRef {
                channel_type: ChannelType::Person,
                id: "a:b".into(),
                prefix: false
            })
        );
        let every_group = ChannelRef::parse("group:*").unwrap();
        assert!(every_group.matches(&conversation("group:anything", None)));
        assert!(!every_group.matches(&conversation("person:anything", None)));
        for bad in ["bob", "user:bob", "person:", "Group:g1", ":x"] {
            assert!(ChannelRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_kind_must_match_as_well_as_the_id() {
        let r = ChannelRef::parse("group:ops").unwrap();
        assert!(r.matches(&conversation("group:ops", None)));
        assert!(!r.matches(&conversation("person:ops", None)));
        assert!(!r.matches(&conversation("group:ops-1", None)));
        let p = ChannelRef::parse("group:ops*").unwrap();
        assert!(p.matches(&conversation("group:ops", None)));
        assert!(p.matches(&conversation("group:ops-1", None)));
        assert!(!p.matches(&conversation("group:dev-ops", None)));
    }

    #[test]
    fn config_lists_and_defaults() {
        let r = rules(&[("hide", "group:ops-*, person:spam,"), ("redact", "")]);
        assert_eq!(r.hide.len(), 2);
        assert!(r.redact.is_empty());
        assert_eq!(r.redacted_text, "[hidden]");
        assert_eq!(Rules::from_config(&Config::default()), Ok(Rules::default()));
        let custom = rules(&[("redacted_text", "…")]);
        assert_eq!(custom.redacted_text, "…");
    }

    #[test]
    fn malformed_config_is_bad_config_naming_the_key() {
        for (key, value) in [("hide", "group:ok,bob"), ("redact", "channel:x")] {
            let e = Rules::from_config(&Config::from_pairs([(key, value)]));
            assert!(
                matches!(&e, Err(HookError::BadConfig(m)) if m.contains(key)),
                "{key}={value}: {e:?}"
            );
        }
    }

    #[test]
    fn hidden_conversations_are_dropped_for_every_viewer() {
        let r = rules(&[("hide", "group:ops-*,person:spam")]);
        let page = vec![
            conversation("group:ops-1", Some("bob")),
            conversation("group:dev", Some("bob")),
            conversation("person:spam", None),
        ];
        for viewer_lists in [ViewerLists::default(), lists(r#"["group:dev"]"#, "[]")] {
            let verdicts = apply(&r, &viewer_lists, page.clone());
            assert_eq!(verdicts[0], Verdict::Drop);
            assert_eq!(verdicts[2], Verdict::Drop);
        }
        assert_eq!(
            apply(&r, &ViewerLists::default(), page),
            vec![Verdict::Drop, Verdict::Keep, Verdict::Drop]
        );
    }

    #[test]
    fn redacted_conversations_get_the_redacted_text() {
        let r = rules(&[("redact", "group:hr,person:boss")]);
        let hr = conversation("group:hr", Some("carol"));
        assert_eq!(
            verdict(&r, &ViewerLists::default(), hr.clone()),
            redacted(hr, "[hidden]")
        );
        // No last message: nothing to redact.
        let empty = conversation("person:boss", None);
        assert_eq!(verdict(&r, &ViewerLists::default(), empty), Verdict::Keep);
        let custom = rules(&[("redact", "person:boss"), ("redacted_text", "(private)")]);
        let boss = conversation("person:boss", Some("boss"));
        assert_eq!(
            verdict(&custom, &ViewerLists::default(), boss.clone()),
            redacted(boss, "(private)")
        );
    }

    #[test]
    fn a_rewrite_changes_only_the_preview() {
        let r = rules(&[("redact", "group:*")]);
        let before = conversation("group:g1", Some("bob"));
        let Verdict::Rewrite(after) = verdict(&r, &ViewerLists::default(), before.clone()) else {
            panic!("not rewritten");
        };
        assert_eq!(after.channel_id, before.channel_id);
        assert_eq!(after.channel_type, before.channel_type);
        assert_eq!(after.unread, before.unread);
        assert_eq!(after.version, before.version);
        assert_eq!(after.updated_at_ms, before.updated_at_ms);
        let (a, b) = (after.last_message.unwrap(), before.last_message.unwrap());
        assert_eq!(
            (a.message_id, a.seq, a.sender),
            (b.message_id, b.seq, b.sender)
        );
        assert_eq!(a.preview, "[hidden]");
    }

    #[test]
    fn muted_conversations_are_dropped_for_that_viewer() {
        let l = lists(r#"["person:bob", "group:news-*"]"#, "[]");
        let page = vec![
            conversation("person:bob", Some("bob")),
            conversation("group:bob", Some("bob")),
            conversation("group:news-eu", None),
            conversation("person:carol", Some("carol")),
        ];
        assert_eq!(
            apply(&Rules::default(), &l, page),
            vec![Verdict::Drop, Verdict::Keep, Verdict::Drop, Verdict::Keep]
        );
    }

    #[test]
    fn blocked_users_lose_their_person_channel_and_their_group_previews() {
        let l = lists("[]", r#"["mallory"]"#);
        let from_mallory = conversation("group:g1", Some("mallory"));
        let page = vec![
            conversation("person:mallory", Some("alice")),
            from_mallory.clone(),
            conversation("group:g2", Some("bob")),
            conversation("group:mallory", Some("bob")),
            conversation("person:bob", Some("mallory")),
        ];
        assert_eq!(
            apply(&Rules::default(), &l, page),
            vec![
                Verdict::Drop,
                redacted(from_mallory, "[hidden]"),
                Verdict::Keep,
                // A group that happens to share the user's id is a group.
                Verdict::Keep,
                // Only group previews are redacted for a blocked sender.
                Verdict::Keep,
            ]
        );
    }

    #[test]
    fn a_drop_wins_over_a_redaction() {
        let r = rules(&[("hide", "group:g1"), ("redact", "group:*,person:*")]);
        let l = lists(r#"["group:g2"]"#, r#"["bob"]"#);
        let page = vec![
            conversation("group:g1", Some("x")),
            conversation("group:g2", Some("x")),
            conversation("person:bob", Some("bob")),
        ];
        assert_eq!(apply(&r, &l, page), vec![Verdict::Drop; 3]);
    }

    #[test]
    fn one_verdict_per_conversation_in_order() {
        let page: Vec<_> = (0..50)
            .map(|i| conversation(&format!("group:g{i}"), Some("bob")))
            .collect();
        let r = rules(&[("hide", "group:g1*")]);
        let verdicts = apply(&r, &ViewerLists::default(), page);
        assert_eq!(verdicts.len(), 50);
        for (i, v) in verdicts.iter().enumerate() {
            let hidden = i.to_string().starts_with('1');
            assert_eq!(*v == Verdict::Drop, hidden, "g{i}");
        }
        assert!(apply(&r, &ViewerLists::default(), Vec::new()).is_empty());
    }

    #[test]
    fn store_keys_are_per_viewer() {
        assert_eq!(muted_key("alice"), "muted:alice");
        assert_eq!(blocked_key("alice"), "blocked:alice");
    }

    #[test]
    fn absent_keys_are_empty_lists() {
        assert_eq!(parse_muted("muted:a", None), Ok(Vec::new()));
        assert_eq!(parse_blocked("blocked:a", None), Ok(HashSet::new()));
    }

    #[test]
    fn malformed_store_values_are_bad_config_naming_the_key() {
        for value in [
            "",
            "not json",
            "null",
            "{}",
            r#""person:bob""#,
            "[1]",
            r#"["a", null]"#,
        ] {
            for e in [
                parse_muted("muted:alice", Some(value.as_bytes())).map(|_| ()),
                parse_blocked("blocked:alice", Some(value.as_bytes())).map(|_| ()),
            ] {
                assert!(
                    matches!(&e, Err(HookError::BadConfig(m)) if m.contains(":alice`")),
                    "{value:?}: {e:?}"
                );
            }
        }
        let e = parse_muted("muted:alice", Some(br#"["person:bob", "bob"]"#));
        assert!(
            matches!(&e, Err(HookError::BadConfig(m)) if m.contains("`muted:alice`")),
            "{e:?}"
        );
        let e = parse_muted("muted:alice", Some(b"\xff"));
        assert!(matches!(e, Err(HookError::BadConfig(_))), "{e:?}");
    }
}
