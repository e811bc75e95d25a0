//! Test plugin `memory-bomb` (world `formatter`): `format` allocates 1 MiB
//! at a time, touching every chunk, until the allocation fails and the
//! instance traps, so the gateway's memory limit must hold.
//!
//! Built by `tests/build.rs` (constant `MEMORY_BOMB`).

use plugboard_plugin_sdk::{
    export_plugin, Event, HookError, OutgoingRequest, Plugin, WebhookFormatter,
};

struct MemoryBomb;

impl Plugin for MemoryBomb {}

impl WebhookFormatter for MemoryBomb {
    fn format(_event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let chunk = vec![0xA5u8; 1 << 20];
            hoard.push(std::hint::black_box(chunk));
        }
    }
}

export_plugin!(MemoryBomb: formatter);
