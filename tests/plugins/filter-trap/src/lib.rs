//! Test plugin `filter-trap` (world `filter`): `filter` panics with
//! "filter trapped on purpose", which traps the instance.
//!
//! Built by `tests/build.rs` (constant `FILTER_TRAP`).

use plugboard_plugin_sdk::{
    export_plugin, Conversation, ConversationFilter, HookError, Plugin, Verdict, Viewer,
};

struct FilterTrap;

impl Plugin for FilterTrap {}

impl ConversationFilter for FilterTrap {
    fn filter(
        _viewer: Viewer,
        _conversations: Vec<Conversation>,
    ) -> Result<Vec<Verdict>, HookError> {
        panic!("filter trapped on purpose");
    }
}

export_plugin!(FilterTrap: filter);
