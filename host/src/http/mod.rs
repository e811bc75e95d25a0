//! The HTTP surfaces: the client WebSocket route, the server API (API key),
//! the admin API (admin token) and operations (health, readiness, metrics).
//!
//! Each surface is a `fn router() -> Router<Arc<App>>`, merged in
//! [`router`]. [`ApiError`] is the one error type at the edge: every error
//! answers `{"error": {"code", "message"}}` with a stable `code`.

pub mod admin;
pub mod api;
pub mod control;
pub mod groups;
pub mod messages;
pub mod ops;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use serde_json::json;

use crate::server::App;

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn internal(err: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %err, "internal error answering an API request");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the gateway log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// A JSON body whose rejection answers in the [`ApiError`] shape.
pub struct ApiJson<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                let status = rejection.status();
                let code = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                    _ => "bad_request",
                };
                Err(ApiError::new(status, code, rejection.body_text()))
            }
        }
    }
}

/// Query parameters whose rejection answers in the [`ApiError`] shape.
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

fn bearer(req: &Request) -> Option<&str> {
    crate::auth::bearer_token(req.headers())
}

/// Requires a server API key.
async fn require_api_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match bearer(&req) {
        Some(key) if app.secrets().api_key_ok(key) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API key")
            .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing API key: send `Authorization: Bearer <key>`",
        )
        .into_response(),
    }
}

/// Requires the admin token.
async fn require_admin(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match bearer(&req) {
        Some(token) if app.secrets().admin_ok(token) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid admin token",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing admin token: send `Authorization: Bearer <token>`",
        )
        .into_response(),
    }
}

/// The whole HTTP surface of one gateway.
pub fn router(app: Arc<App>) -> Router {
    let max_body = app.config().server.max_body_size;
    let api = api::router()
        .merge(messages::router())
        .merge(groups::router())
        .merge(control::router())
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_api_key,
        ));
    let admin = admin::router().route_layer(axum::middleware::from_fn_with_state(
        app.clone(),
        require_admin,
    ));
    Router::new()
        .route("/v1/ws", get(crate::gateway::upgrade::handler))
        .merge(api)
        .merge(admin)
        .merge(ops::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(app)
}
