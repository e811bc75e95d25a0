//! Test plugin `shaped-request` (world `formatter`): formats a
//! `message.created` event as the request its message payload describes,
//! so that one gateway can be handed many request shapes, hostile ones
//! included. The payload's optional keys:
//!
//! - `path_suffix` (string): the request's `path-suffix`;
//! - `query` (string): the request's `query`;
//! - `headers` (array of `[name, value]`): extra headers;
//! - `case` (any): echoed as the body, `{"case": <case>}`.
//!
//! Other event types are declined.
//!
//! Built by `tests/build.rs` (constant `SHAPED_REQUEST`).

use plugboard_plugin_sdk::{
    export_plugin, Event, HookError, OutgoingRequest, Plugin, WebhookFormatter,
};
use serde_json::Value;

struct Shaped;

impl Plugin for Shaped {}

impl WebhookFormatter for Shaped {
    fn format(event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        if event.event_type != "message.created" {
            return Ok(None);
        }
        let data = event.data_json()?;
        let payload = &data["payload"];
        let mut request = OutgoingRequest::json(&serde_json::json!({ "case": payload["case"] }))?;
        if let Some(suffix) = payload["path_suffix"].as_str() {
            request = request.with_path_suffix(suffix);
        }
        if let Some(query) = payload["query"].as_str() {
            request = request.with_query(query);
        }
        for pair in payload["headers"].as_array().into_iter().flatten() {
            let text = |i: usize| pair[i].as_str().map(str::to_string);
            if let (Some(name), Some(value)) = (text(0), text(1)) {
                request = request.with_header(name, value);
            }
        }
        Ok(Some(request))
    }
}

export_plugin!(Shaped: formatter);
