//! Test plugin `full-defaults` (world `full`): exports every hook and keeps
//! the SDK's defaults for all of them: `init` accepts any config, `format`
//! declines every event, `filter` keeps every conversation and `handle`
//! delivers every control request unchanged.
//!
//! Built by `tests/build.rs` (constant `FULL_DEFAULTS`).

use plugboard_plugin_sdk::{
    export_plugin, ControlHandler, ConversationFilter, Plugin, WebhookFormatter,
};

struct FullDefaults;

impl Plugin for FullDefaults {}
impl WebhookFormatter for FullDefaults {}
impl ConversationFilter for FullDefaults {}
impl ControlHandler for FullDefaults {}

export_plugin!(FullDefaults: full);
