//! Operations: liveness, readiness and Prometheus metrics (no credentials).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use serde_json::json;

use crate::server::App;

pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The process is up and serving HTTP.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready to take client connections: storage answers and the WebSocket
/// service is accepting (not disabled, not draining).
async fn readyz(State(app): State<Arc<App>>) -> Response {
    let storage_ok = app.storage.outbox_depth().await.is_ok();
    let reason = app.not_accepting_reason();
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

async fn metrics(State(app): State<Arc<App>>) -> Response {
    // Refreshes the outbox gauges from storage.
    app.outbox.views().await;
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}
