//! Test plugin `control-echo` (world `control`): delivers every control
//! request unchanged, except that it rejects requests whose kind equals
//! config `reject_kind` (default `forbidden`) with the text
//! `kind <kind> rejected on purpose`.
//!
//! Built by `tests/build.rs` (constant `CONTROL_ECHO`).

use plugboard_plugin_sdk::{
    export_plugin, host, ControlHandler, ControlRequest, Decision, HookError, Plugin,
};

struct ControlEcho;

impl Plugin for ControlEcho {}

impl ControlHandler for ControlEcho {
    fn handle(request: ControlRequest) -> Result<Decision, HookError> {
        let config = host::config();
        let reject_kind = config.get("reject_kind").unwrap_or("forbidden");
        if request.kind == reject_kind {
            return Ok(Decision::Reject(format!(
                "kind {} rejected on purpose",
                request.kind
            )));
        }
        Ok(Decision::deliver_unchanged(&request))
    }
}

export_plugin!(ControlEcho: control);
