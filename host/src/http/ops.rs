//! Operations: liveness, readiness and Prometheus metrics (no credentials).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{Method, StatusCode};
use serde_json::json;

use super::{BodyKind, Route};
use crate::server::App;

pub fn routes() -> Vec<Route> {
    vec![
        Route::new(Method::GET, "/healthz", BodyKind::None, healthz),
        Route::new(Method::GET, "/readyz", BodyKind::None, readyz),
        Route::new(Method::GET, "/metrics", BodyKind::None, metrics),
    ]
}

/// The process is up and serving HTTP.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready to take client connections: storage answers and the WebSocket
/// service is accepting (not disabled, not draining).
async fn readyz(State(app): State<Arc<App>>) -> Response {
    let storage_ok = app.storage.health.check().await.is_ok();
    let reason = app.gateway.not_accepting_reason();
    let ready = storage_ok && reason.is_none();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "storage": if storage_ok { "ok" } else { "unavailable" },
        "websocket": reason.unwrap_or("accepting"),
    });
    (status, Json(body)).into_response()
}

/// Every metric, in the format the `Accept` header prefers (OpenMetrics or
/// Prometheus text 0.0.4, see [`crate::metrics::Format::negotiate`]).
async fn metrics(State(app): State<Arc<App>>, headers: http::HeaderMap) -> Response {
    // Refreshes the outbox gauges from storage; while it is unavailable
    // they keep their last values and the rest is served as usual.
    let _ = app.outbox.views().await;
    let accept = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = crate::metrics::Format::negotiate(accept);
    (
        [
            (http::header::CONTENT_TYPE, format.content_type()),
            (http::header::VARY, "accept"),
        ],
        app.metrics.render(format),
    )
        .into_response()
}
