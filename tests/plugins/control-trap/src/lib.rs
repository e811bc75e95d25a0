//! Test plugin `control-trap` (world `control`): `handle` panics with
//! "control handler trapped on purpose", which traps the instance.
//!
//! Built by `tests/build.rs` (constant `CONTROL_TRAP`).

use plugboard_plugin_sdk::{
    export_plugin, ControlHandler, ControlRequest, Decision, HookError, Plugin,
};

struct ControlTrap;

impl Plugin for ControlTrap {}

impl ControlHandler for ControlTrap {
    fn handle(_request: ControlRequest) -> Result<Decision, HookError> {
        panic!("control handler trapped on purpose");
    }
}

export_plugin!(ControlTrap: control);
