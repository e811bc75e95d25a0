//! Connections upgraded without a token: the `auth` frame path.
//!
//! The connection waits, within `gateway.auth_timeout`, for its first text
//! frame, which must be an `auth` frame with a valid token; then it is
//! admitted and runs as a session ([`super::session::run`]). An attempt that
//! fails here never opened: it is counted under its reason, told why (an
//! `error` frame and a close code) and has no lifecycle event. While it
//! waits, the connection is listed in the registry, so a drain reaches it.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

use super::lifecycle::CloseReason;
use super::protocol::{self, ClientFrame};
use super::session::{close_message, drain, map_error, run, send, End, WsStream};
use super::Gateway;
use crate::auth::verify_token;

/// For a connection upgraded without a token: waits for an `auth` frame
/// within `gateway.auth_timeout`, then admits and runs the session. An
/// attempt that fails here never opened: it is logged and counted, and no
/// lifecycle event is written. While it waits, the connection is listed in
/// the registry, so a drain (shutdown, or a reload that disables the
/// service) tells it and closes it like every other connection.
pub async fn authenticate_then_run(
    gw: Arc<Gateway>,
    mut ws: WsStream,
    remote: String,
    query_device: Option<String>,
) {
    let cfg = gw.config();
    let mut pending = gw.registry.add_pending();
    // A drain that looked at the registry before this connection was listed
    // had already set its state: looking here catches it.
    if let Some((reason, message)) = gw.drain_reason() {
        return refuse_drained(&gw, &mut ws, &remote, reason, message.into()).await;
    }
    let waited = timeout(cfg.gateway.auth_timeout, async {
        tokio::select! {
            biased;
            cmd = &mut pending.close => Err(cmd),
            first = first_auth_frame(&mut ws) => Ok(first),
        }
    })
    .await;
    let token = match waited {
        Err(_) => {
            return refuse(
                &gw,
                &mut ws,
                &remote,
                1008,
                "auth_timeout",
                "no auth frame before the deadline".into(),
            )
            .await
        }
        Ok(Err(cmd)) => {
            let (reason, message) = match cmd {
                Ok(c) => (c.reason, c.message),
                Err(_) => (
                    CloseReason::ServerError,
                    "the registry dropped this connection".into(),
                ),
            };
            return refuse_drained(&gw, &mut ws, &remote, reason, message).await;
        }
        Ok(Ok(Err(("closed_before_auth", _, message)))) => {
            gw.metrics.handshake_failed("closed_before_auth");
            tracing::info!(remote = %remote, detail = %message, "connection attempt ended before auth");
            return;
        }
        Ok(Ok(Err((reason, code, message)))) => {
            return refuse(&gw, &mut ws, &remote, code, reason, message).await
        }
        Ok(Ok(Ok(token))) => token,
    };
    if let Some((reason, message)) = gw.drain_reason() {
        return refuse_drained(&gw, &mut ws, &remote, reason, message.into()).await;
    }
    let secrets = gw.secrets();
    let claims = match verify_token(&token, secrets.jwt_secret.as_bytes(), cfg.auth.token_leeway) {
        Ok(c) => c,
        Err(e @ crate::auth::TokenError::Expired) => {
            return refuse(&gw, &mut ws, &remote, 1008, "token_expired", e.to_string()).await
        }
        Err(e) => return refuse(&gw, &mut ws, &remote, 1008, "bad_token", e.to_string()).await,
    };
    if claims.sub == cfg.messaging.system_user {
        let message = super::upgrade::system_user_refused(&claims.sub);
        return refuse(&gw, &mut ws, &remote, 1008, "bad_token", message).await;
    }
    let device = claims
        .device
        .clone()
        .or(query_device)
        .unwrap_or_else(|| "default".into());
    // From here the registry knows it as a session (`admit` re-checks the drain).
    drop(pending);
    match gw.admit(&claims.sub, &device, &remote, claims.exp).await {
        Ok(adm) => run(gw, ws, adm).await,
        Err(rejected) => refuse(&gw, &mut ws, &remote, 1008, "device_policy", rejected.0).await,
    }
}

/// Why waiting for the `auth` frame failed: the reason (for the metric and
/// the `error` frame), the close code and the message.
type AuthFailure = (&'static str, u16, String);

/// Reads until the first text frame and returns the token of the `auth`
/// frame it must be.
async fn first_auth_frame(ws: &mut WsStream) -> Result<String, AuthFailure> {
    let left = || {
        (
            "closed_before_auth",
            1006,
            "the client left before authenticating".to_string(),
        )
    };
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                return match protocol::parse_client_frame(text.as_str()) {
                    Ok(ClientFrame::Auth { token, .. }) => Ok(token),
                    Ok(_) => Err((
                        "auth_required",
                        1008,
                        "the first frame must be an `auth` frame".to_string(),
                    )),
                    Err(e) => Err(("malformed_auth", 1008, e.message)),
                };
            }
            Some(Ok(Message::Binary(_))) => {
                return Err((
                    "malformed_auth",
                    1008,
                    "binary frames are not supported".to_string(),
                ))
            }
            Some(Err(e)) => {
                return Err(match map_error(e) {
                    End::Violation { reason, message } => (reason.as_str(), reason.code(), message),
                    _ => left(),
                })
            }
            Some(Ok(Message::Close(_))) | None => return Err(left()),
            Some(Ok(_)) => continue,
        }
    }
}

/// Refuses a connection that was waiting for its `auth` frame when a drain
/// began: the `meta` frame an open connection gets for the same drain
/// (`disable` or `shutdown`), the `error` frame `service_unavailable` that
/// answers an `auth` frame, and the drain's close code (1012 or 1001).
async fn refuse_drained(
    gw: &Gateway,
    ws: &mut WsStream,
    remote: &str,
    reason: CloseReason,
    message: String,
) {
    let code = reason.code();
    if let Some(event) = reason.meta_event() {
        let frame = protocol::closing_frame(event, reason.as_str(), code, &message);
        let _ = send(ws, Message::text(frame), gw.config().gateway.write_timeout).await;
    }
    refuse(gw, ws, remote, code, "service_unavailable", message).await;
}

/// Refuses a connection that never opened: counted, logged, told why, closed.
async fn refuse(
    gw: &Gateway,
    ws: &mut WsStream,
    remote: &str,
    code: u16,
    reason: &'static str,
    message: String,
) {
    gw.metrics.handshake_failed(reason);
    tracing::info!(remote = %remote, reason, detail = %message, "connection attempt refused before open");
    let g = gw.config().gateway.clone();
    let frame = protocol::error_frame(reason, &message, None);
    let _ = send(ws, Message::text(frame), g.write_timeout).await;
    let _ = send(ws, close_message(code, &message), g.write_timeout).await;
    drain(ws, g.close_timeout).await;
}
