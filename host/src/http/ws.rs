//! `GET /v1/ws`, the HTTP side of a client connection: checks the upgrade
//! request and the token, has the gateway apply the multi-device policy,
//! answers `101 Switching Protocols` and hands the upgraded socket to the
//! gateway ([`crate::gateway::Gateway::serve_upgraded`]).
//!
//! A request refused here never opened: it gets an HTTP error, a log line
//! and a `handshake_failures` count, and no lifecycle event. Nothing is
//! recorded before the 101: the session task records the open afterwards
//! (and, if storage cannot, closes the socket with a close code).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::ApiError;
use crate::auth::{verify_token, TokenError};
use crate::gateway::upgrade::{system_user_refused, ws_config};
use crate::server::App;

/// `Retry-After` of a refusal while the service is not accepting.
const NOT_ACCEPTING_RETRY_SECS: u64 = 5;

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
    let gw = &app.gateway;
    let remote = remote.to_string();
    let fail = |error: ApiError| -> Response {
        gw.metrics().handshake_failed(error.code);
        tracing::info!(remote = %remote, reason = error.code, detail = %error.message, "connection attempt refused before open");
        error.into_response()
    };

    if let Some(why) = gw.not_accepting_reason() {
        let error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", why)
            .retry_after(NOT_ACCEPTING_RETRY_SECS);
        return fail(error);
    }
    let bad_upgrade = |status, message: &str| ApiError::new(status, "bad_upgrade", message);
    let headers = req.headers();
    let is_upgrade = req.method() == Method::GET
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    if !is_upgrade {
        return fail(bad_upgrade(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint only accepts a WebSocket upgrade (GET with Connection: upgrade, Upgrade: websocket)",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut resp = fail(bad_upgrade(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version; use 13",
        ));
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return resp;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return fail(bad_upgrade(
            StatusCode::BAD_REQUEST,
            "missing Sec-WebSocket-Key",
        ));
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return fail(bad_upgrade(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        ));
    };
    let (token, query_device) = credentials(&req);
    let cfg = gw.config();
    let unauthorized =
        |code, message: String| ApiError::new(StatusCode::UNAUTHORIZED, code, message);

    let admitted = match token {
        None => None,
        Some(token) => {
            let secrets = gw.secrets();
            let claims =
                match verify_token(&token, secrets.jwt_secret.as_bytes(), cfg.auth.token_leeway) {
                    Ok(c) => c,
                    Err(TokenError::Expired) => {
                        return fail(unauthorized(
                            "token_expired",
                            "the token has expired".into(),
                        ))
                    }
                    Err(e) => return fail(unauthorized("bad_token", e.to_string())),
                };
            if claims.sub == cfg.messaging.system_user {
                return fail(unauthorized("bad_token", system_user_refused(&claims.sub)));
            }
            let device = claims
                .device
                .clone()
                .or(query_device.clone())
                .unwrap_or_else(|| "default".into());
            match gw.admit(&claims.sub, &device, &remote, claims.exp).await {
                Ok(adm) => Some(adm),
                Err(rejected) => {
                    return fail(ApiError::new(
                        StatusCode::CONFLICT,
                        "device_policy",
                        rejected.0,
                    ))
                }
            }
        }
    };

    gw.serve_upgraded(
        on_upgrade,
        ws_config(&cfg),
        admitted,
        remote.clone(),
        query_device,
    );

    let accept = derive_accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .expect("static response parts are valid")
}
