//! Test plugin `control-echo` (world `control`): delivers every control
//! request unchanged, except that it rejects requests whose kind equals
//! config `reject_kind` (default `forbidden`) with the text
//! `kind <kind> rejected on purpose`.
//!
//! Three switches make it break the gateway's limits on purpose, for the
//! tests that check the gateway holds them, each for one kind only:
//! - `payload_bytes = "<n>"`: a request of kind `big` gets, as the plan's
//!   payload, a JSON string of `n` bytes;
//! - `payload_depth = "<n>"`: a request of kind `deep` gets, as the plan's
//!   payload, `n` nested arrays;
//! - `add_target = "<user>"`: a request of kind `retarget` gets `user`
//!   added to the plan's targets.
//!
//! Built by `tests/build.rs` (constant `CONTROL_ECHO`).

use plugboard_plugin_sdk::{
    export_plugin, host, ControlHandler, ControlRequest, Decision, Delivery, HookError, Plugin,
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
        let mut plan = request.unchanged_plan();
        match request.kind.as_str() {
            "big" => {
                if let Some(n) = config.get_parsed::<usize>("payload_bytes")? {
                    plan.payload = format!("\"{}\"", "x".repeat(n.saturating_sub(2)));
                }
            }
            "deep" => {
                if let Some(n) = config.get_parsed::<usize>("payload_depth")? {
                    plan.payload = format!("{}{}", "[".repeat(n), "]".repeat(n));
                }
            }
            "retarget" => {
                if let Some(user) = config.get("add_target") {
                    plan.targets.push(Delivery {
                        user_id: user.to_owned(),
                        payload: None,
                    });
                }
            }
            _ => {}
        }
        Ok(Decision::Deliver(plan))
    }
}

export_plugin!(ControlEcho: control);
