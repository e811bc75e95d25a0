//! Test plugin `sandbox-probe` (world `formatter`): `format` tries what a
//! plugin must not be able to do and answers with a JSON body saying what
//! worked: `{"file": bool, "env": bool, "args": <count>, "socket": bool}`.
//! In the gateway every field should be `false` and `args` 0.
//!
//! Built by `tests/build.rs` (constant `SANDBOX_PROBE`).

use plugboard_plugin_sdk::{
    export_plugin, Event, HookError, OutgoingRequest, Plugin, WebhookFormatter,
};

struct SandboxProbe;

impl Plugin for SandboxProbe {}

impl WebhookFormatter for SandboxProbe {
    fn format(_event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        let file = std::fs::read_to_string("/etc/passwd").is_ok();
        let env = std::env::var("HOME").is_ok();
        let args = std::env::args().count();
        let socket = std::net::TcpStream::connect("127.0.0.1:1").is_ok();
        let body = serde_json::json!({ "file": file, "env": env, "args": args, "socket": socket });
        Ok(Some(OutgoingRequest::json(&body)?))
    }
}

export_plugin!(SandboxProbe: formatter);
