//! Test plugin `spin-loop` (world `formatter`): `format` never returns, so
//! the gateway's CPU deadline (epoch interruption) must stop it.
//!
//! Built by `tests/build.rs` (constant `SPIN_LOOP`).

use plugboard_plugin_sdk::{
    export_plugin, Event, HookError, OutgoingRequest, Plugin, WebhookFormatter,
};

struct SpinLoop;

impl Plugin for SpinLoop {}

impl WebhookFormatter for SpinLoop {
    fn format(_event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        let mut n: u64 = 0;
        loop {
            // black_box keeps the optimiser from proving the loop pointless.
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export_plugin!(SpinLoop: formatter);
