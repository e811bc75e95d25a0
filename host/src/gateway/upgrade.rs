//! After the `101 Switching Protocols`: the upgraded socket becomes a
//! tungstenite stream with this connection's limits, wrapped in its
//! [`Tap`](super::wire::Tap), and gets its tracked session task.
//!
//! The HTTP side of `GET /v1/ws` (request checks, the token, admission,
//! refusals, the 101) is `http::ws`. The upgrade is done on hyper's upgrade
//! mechanism with tokio-tungstenite directly, so the session sees
//! tungstenite's own errors (size limits, invalid UTF-8, protocol
//! violations) and can map each to its close code.

use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::auth_frame;
use super::session::{self, Admitted};
use super::Gateway;
use crate::config::Config;

/// The WebSocket limits of a connection upgraded under `cfg`.
pub fn ws_config(cfg: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(cfg.gateway.max_message_size))
        .max_frame_size(Some(cfg.gateway.max_frame_size))
        // tungstenite's default 128 KiB read buffer is zero-filled on the first
        // read and stays resident: idle connections would cost ~130 KiB each.
        .read_buffer_size(4096)
        .write_buffer_size(0)
        // Room for the largest frame the server builds (pages are cut to
        // fit it), so a write never fails for want of buffer.
        .max_write_buffer_size(super::protocol::write_buffer_size(cfg))
}

impl Gateway {
    /// Takes over a connection once the 101 is answered: a session task,
    /// tracked for shutdown, that runs `admitted` (authenticated by the
    /// upgrade's token) or waits for an `auth` frame first. An upgrade that
    /// fails never opened: counted, logged, its admission undone.
    pub fn serve_upgraded(
        self: &Arc<Self>,
        on_upgrade: OnUpgrade,
        ws_config: WebSocketConfig,
        admitted: Option<Admitted>,
        remote: String,
        query_device: Option<String>,
    ) {
        let gw = self.clone();
        self.sessions.spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    if let Some(adm) = &admitted {
                        gw.registry.remove(&adm.live);
                    }
                    gw.metrics.handshake_failed("upgrade_failed");
                    tracing::info!(remote = %remote, error = %e, "upgrade failed before open");
                    return;
                }
            };
            let socket = super::wire::Tap::new(TokioIo::new(upgraded));
            let ws = WebSocketStream::from_raw_socket(socket, Role::Server, Some(ws_config)).await;
            match admitted {
                Some(adm) => session::run(gw, ws, adm).await,
                None => auth_frame::authenticate_then_run(gw, ws, remote, query_device).await,
            }
        });
    }
}

/// Why a token naming the system user is refused.
pub fn system_user_refused(user: &str) -> String {
    format!("`{user}` is the system user (messaging.system_user); clients cannot connect as it")
}
