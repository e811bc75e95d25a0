//! Test plugin `sandbox-probe` (world `formatter`): `format` tries what a
//! plugin must not be able to do and answers with a JSON body saying what
//! worked: `{"file": bool, "env": bool, "args": <count>, "socket": bool,
//! "socket_addr": <address tried>}`. In the gateway every field should be
//! `false` and `args` 0.
//!
//! The socket probe connects to config `socket_addr` (`host:port`), where
//! the test listens, so a refused connection shows the sandbox at work
//! rather than a port nobody listens on. Without that key the call fails,
//! so a test cannot pass by forgetting it.
//!
//! Built by `tests/build.rs` (constant `SANDBOX_PROBE`).

use plugboard_plugin_sdk::{
    export_plugin, host, Event, HookError, OutgoingRequest, Plugin, WebhookFormatter,
};

struct SandboxProbe;

impl Plugin for SandboxProbe {}

impl WebhookFormatter for SandboxProbe {
    fn format(_event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        let config = host::config();
        let Some(addr) = config.get("socket_addr").map(str::to_string) else {
            return Err(HookError::BadConfig(
                "config `socket_addr` (host:port to probe) is missing".into(),
            ));
        };
        let file = std::fs::read_to_string("/etc/passwd").is_ok();
        let env = std::env::var("HOME").is_ok();
        let args = std::env::args().count();
        let socket = std::net::TcpStream::connect(addr.as_str()).is_ok();
        let body = serde_json::json!({
            "file": file, "env": env, "args": args, "socket": socket, "socket_addr": addr,
        });
        Ok(Some(OutgoingRequest::json(&body)?))
    }
}

export_plugin!(SandboxProbe: formatter);
