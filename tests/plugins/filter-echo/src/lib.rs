//! Test plugin `filter-echo` (world `filter`): keeps every conversation;
//! with config `redact = "true"` it rewrites each one that has a last
//! message so that the preview reads `***`, and with config
//! `preview = "<text>"` so that it reads `<text>` repeated `preview_repeat`
//! times (default 1), to test what the gateway does with a preview longer
//! than its own limit.
//!
//! Built by `tests/build.rs` (constant `FILTER_ECHO`).

use plugboard_plugin_sdk::{
    export_plugin, host, Conversation, ConversationFilter, HookError, Plugin, Verdict, Viewer,
};

struct FilterEcho;

impl Plugin for FilterEcho {}

impl ConversationFilter for FilterEcho {
    fn filter(
        _viewer: Viewer,
        conversations: Vec<Conversation>,
    ) -> Result<Vec<Verdict>, HookError> {
        let config = host::config();
        let preview = match (config.get("redact"), config.get("preview")) {
            (Some("true"), _) => Some("***".to_owned()),
            (_, Some(text)) => {
                let times = config.get_parsed::<usize>("preview_repeat")?.unwrap_or(1);
                Some(text.repeat(times))
            }
            _ => None,
        };
        Ok(conversations
            .into_iter()
            .map(|mut c| match (c.last_message.as_mut(), &preview) {
                (Some(m), Some(p)) => {
                    m.preview = p.clone();
                    Verdict::Rewrite(c)
                }
                _ => Verdict::Keep,
            })
            .collect())
    }
}

export_plugin!(FilterEcho: filter);
