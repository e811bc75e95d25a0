//! `GET /v1/ws`: checks the upgrade request and the token, applies the
//! multi-device policy, answers `101 Switching Protocols` and hands the
//! upgraded socket to a tracked session task.
//!
//! The upgrade is done here on hyper's upgrade mechanism with
//! tokio-tungstenite directly, so the session sees tungstenite's own errors
//! (size limits, invalid UTF-8, protocol violations) and can map each to its
//! close code. A request refused here never opened: it gets an HTTP error,
//! a log line and a `handshake_failures` count, and no lifecycle event.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::session;
use crate::auth::{verify_token, TokenError};
use crate::http::ApiError;
use crate::server::App;

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The token from `Authorization: Bearer …` or `?token=…`, and `?device=…`.
fn credentials(req: &Request) -> (Option<String>, Option<String>) {
    let bearer = crate::auth::bearer_token(req.headers()).map(str::to_string);
    let mut token = None;
    let mut device = None;
    if let Some(q) = req.uri().query() {
        for (k, v) in url_pairs(q) {
            match k.as_str() {
                "token" => token = Some(v),
                "device" => device = Some(v),
                _ => {}
            }
        }
    }
    (
        bearer.or(token),
        device.filter(|d| crate::auth::valid_id(d)),
    )
}

fn url_pairs(q: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://query.invalid/?{q}"))
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

pub async fn handler(
    State(app): State<Arc<App>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let remote = remote.to_string();
    let fail = |status: StatusCode, reason: &'static str, message: String| -> Response {
        app.metrics.handshake_failed(reason);
        tracing::info!(remote = %remote, reason, detail = %message, "connection attempt refused before open");
        ApiError::new(status, reason, message).into_response()
    };

    if let Some(why) = app.not_accepting_reason() {
        let mut resp = fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            why.to_string(),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return resp;
    }
    let headers = req.headers();
    let is_upgrade = req.method() == Method::GET
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    if !is_upgrade {
        return fail(
            StatusCode::UPGRADE_REQUIRED,
            "bad_upgrade",
            "this endpoint only accepts a WebSocket upgrade (GET with Connection: upgrade, Upgrade: websocket)".into(),
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut resp = fail(
            StatusCode::UPGRADE_REQUIRED,
            "bad_upgrade",
            "unsupported Sec-WebSocket-Version; use 13".into(),
        );
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return resp;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return fail(
            StatusCode::BAD_REQUEST,
            "bad_upgrade",
            "missing Sec-WebSocket-Key".into(),
        );
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return fail(
            StatusCode::UPGRADE_REQUIRED,
            "bad_upgrade",
            "this connection cannot be upgraded".into(),
        );
    };
    let (token, query_device) = credentials(&req);
    let cfg = app.config();
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(cfg.gateway.max_message_size))
        .max_frame_size(Some(cfg.gateway.max_frame_size))
        // tungstenite's default 128 KiB read buffer is zero-filled on the first
        // read and stays resident: idle connections would cost ~130 KiB each.
        .read_buffer_size(4096)
        .write_buffer_size(0)
        // Room for the largest frame the server builds (pages are cut to
        // fit it), so a write never fails for want of buffer.
        .max_write_buffer_size(super::protocol::write_buffer_size(&cfg));

    let admitted = match token {
        None => None,
        Some(token) => {
            let secrets = app.secrets();
            let claims =
                match verify_token(&token, secrets.jwt_secret.as_bytes(), cfg.auth.token_leeway) {
                    Ok(c) => c,
                    Err(TokenError::Expired) => {
                        return fail(
                            StatusCode::UNAUTHORIZED,
                            "token_expired",
                            "the token has expired".into(),
                        )
                    }
                    Err(e) => return fail(StatusCode::UNAUTHORIZED, "bad_token", e.to_string()),
                };
            if claims.sub == cfg.messaging.system_user {
                return fail(
                    StatusCode::UNAUTHORIZED,
                    "bad_token",
                    system_user_refused(&claims.sub),
                );
            }
            let device = claims
                .device
                .clone()
                .or(query_device.clone())
                .unwrap_or_else(|| "default".into());
            match app.admit(&claims.sub, &device, &remote, claims.exp) {
                Ok(adm) => Some(adm),
                Err(rejected) => return fail(StatusCode::CONFLICT, "device_policy", rejected.0),
            }
        }
    };

    let task_app = app.clone();
    let task_remote = remote.clone();
    app.sessions.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                if let Some(adm) = &admitted {
                    task_app.registry.remove(&adm.live);
                }
                task_app.metrics.handshake_failed("upgrade_failed");
                tracing::info!(remote = %task_remote, error = %e, "upgrade failed before open");
                return;
            }
        };
        let socket = super::wire::Tap::new(TokioIo::new(upgraded));
        let ws = WebSocketStream::from_raw_socket(socket, Role::Server, Some(ws_config)).await;
        match admitted {
            Some(adm) => session::run(task_app, ws, adm).await,
            None => session::authenticate_then_run(task_app, ws, task_remote, query_device).await,
        }
    });

    let accept = derive_accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .expect("static response parts are valid")
}

/// Why a token naming the system user is refused.
pub fn system_user_refused(user: &str) -> String {
    format!("`{user}` is the system user (messaging.system_user); clients cannot connect as it")
}
