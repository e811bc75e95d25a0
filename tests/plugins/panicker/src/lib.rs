//! Test plugin `panicker` (world `formatter`): `format` panics with
//! "plugin panicked on purpose", which traps the instance.
//!
//! Built by `tests/build.rs` (constant `PANICKER`).

use plugboard_plugin_sdk::{
    export_plugin, Event, HookError, OutgoingRequest, Plugin, WebhookFormatter,
};

struct Panicker;

impl Plugin for Panicker {}

impl WebhookFormatter for Panicker {
    fn format(_event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        panic!("plugin panicked on purpose");
    }
}

export_plugin!(Panicker: formatter);
