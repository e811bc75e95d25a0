//! Test plugin `bad-output` (world `formatter`): returns requests the
//! gateway must refuse. By default the request sets the forbidden header
//! `webhook-signature`; with config `mode = "bad-header-value"` it instead
//! sets an allowed header (`x-bad-value`) whose value contains a newline.
//!
//! Built by `tests/build.rs` (constant `BAD_OUTPUT`).

use plugboard_plugin_sdk::{
    export_plugin, host, Event, HookError, OutgoingRequest, Plugin, WebhookFormatter,
};

struct BadOutput;

impl Plugin for BadOutput {}

impl WebhookFormatter for BadOutput {
    fn format(event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        let request = OutgoingRequest::new("text/plain", event.id);
        Ok(Some(match host::config().get("mode") {
            Some("bad-header-value") => request.with_header("x-bad-value", "one\ninjected: two"),
            _ => request.with_header("webhook-signature", "v1,forged"),
        }))
    }
}

export_plugin!(BadOutput: formatter);
