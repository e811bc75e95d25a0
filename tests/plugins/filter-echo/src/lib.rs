//! Test plugin `filter-echo` (world `filter`): keeps every conversation;
//! with config `redact = "true"` it rewrites each one that has a last
//! message so that the preview reads `***`.
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
        let redact = host::config().get("redact") == Some("true");
        Ok(conversations
            .into_iter()
            .map(|mut c| match c.last_message.as_mut() {
                Some(m) if redact => {
                    m.preview = "***".to_owned();
                    Verdict::Rewrite(c)
                }
                _ => Verdict::Keep,
            })
            .collect())
    }
}

export_plugin!(FilterEcho: filter);
