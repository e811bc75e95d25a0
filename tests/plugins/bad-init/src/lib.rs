//! Test plugin `bad-init` (world `formatter`): `init` always fails with
//! `bad-config("refused on purpose")`, so loading it must fail.
//!
//! Built by `tests/build.rs` (constant `BAD_INIT`).

use plugboard_plugin_sdk::{export_plugin, Config, HookError, Plugin, WebhookFormatter};

struct BadInit;

impl Plugin for BadInit {
    fn init(_config: &Config) -> Result<(), HookError> {
        Err(HookError::bad_config("refused on purpose"))
    }
}

impl WebhookFormatter for BadInit {}

export_plugin!(BadInit: formatter);
