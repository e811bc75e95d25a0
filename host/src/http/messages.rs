//! The server API for messages and conversation lists (API key): send as a
//! user or as the system, read a user's messages and conversations on the
//! user's behalf, and change a user's conversations (read, hide, delete).
//! The answers have the same shape as the client frames (docs/protocol.md).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{ApiError, ApiJson, ApiQuery};
use crate::messaging::conversations::{self, ListQuery};
use crate::messaging::{self, check_id, SendRequest, SyncQuery};
use crate::server::App;
use crate::storage::messages::RowChange;

pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/messages", post(send))
        .route("/v1/users/{uid}/messages", get(messages))
        .route("/v1/users/{uid}/conversations", get(list))
        .route(
            "/v1/users/{uid}/conversations/{channel_type}/{channel_id}",
            axum::routing::delete(delete),
        )
        .route(
            "/v1/users/{uid}/conversations/{channel_type}/{channel_id}/read",
            post(read),
        )
        .route(
            "/v1/users/{uid}/conversations/{channel_type}/{channel_id}/hide",
            post(hide),
        )
}

/// `POST /v1/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    /// The sending user; the system (`messaging.system_user`) when absent.
    #[serde(default)]
    pub from: Option<String>,
    pub channel_type: String,
    pub channel_id: String,
    pub payload: Box<RawValue>,
    #[serde(default)]
    pub client_msg_id: Option<String>,
}

async fn send(
    State(app): State<Arc<App>>,
    ApiJson(body): ApiJson<SendBody>,
) -> Result<impl IntoResponse, ApiError> {
    let system_user = app.config().messaging.system_user.clone();
    let (sender, system) = match body.from {
        Some(from) => {
            check_id("from", &from)?;
            let system = from == system_user;
            (from, system)
        }
        None => (system_user, true),
    };
    let req = SendRequest {
        sender: sender.clone(),
        system,
        channel_type: &body.channel_type,
        channel_id: &body.channel_id,
        payload: &body.payload,
        client_msg_id: body.client_msg_id.as_deref(),
        origin: None,
    };
    match messaging::send(&app, req).await {
        Ok(ack) => {
            app.metrics
                .message("api", if ack.duplicate { "duplicate" } else { "sent" });
            let mut v = ack.json();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("sender".into(), Value::String(sender));
            }
            let status = if ack.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((status, Json(v)))
        }
        Err(e) => {
            app.metrics.message("api", e.code());
            Err(e.into())
        }
    }
}

async fn messages(
    State(app): State<Arc<App>>,
    Path(uid): Path<String>,
    ApiQuery(q): ApiQuery<SyncQuery>,
) -> Result<Json<Value>, ApiError> {
    check_id("uid", &uid)?;
    Ok(Json(messaging::sync(&app, &uid, &q).await?))
}

async fn list(
    State(app): State<Arc<App>>,
    Path(uid): Path<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    check_id("uid", &uid)?;
    Ok(Json(conversations::list(&app, &uid, None, &q).await?))
}

/// `POST …/read`: the body may name the sequence number read up to.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadBody {
    #[serde(default)]
    pub seq: Option<u64>,
}

async fn change(
    app: &App,
    uid: &str,
    channel_type: &str,
    channel_id: &str,
    change: RowChange,
) -> Result<Json<Value>, ApiError> {
    check_id("uid", uid)?;
    let body =
        conversations::change(app, uid, None, None, channel_type, channel_id, change).await?;
    Ok(Json(body))
}

async fn read(
    State(app): State<Arc<App>>,
    Path((uid, channel_type, channel_id)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    // The body is optional: empty means "up to the last message".
    let seq = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<ReadBody>(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?
            .seq
    };
    change(&app, &uid, &channel_type, &channel_id, RowChange::Read(seq)).await
}

async fn hide(
    State(app): State<Arc<App>>,
    Path((uid, channel_type, channel_id)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    change(&app, &uid, &channel_type, &channel_id, RowChange::Hide).await
}

async fn delete(
    State(app): State<Arc<App>>,
    Path((uid, channel_type, channel_id)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    change(&app, &uid, &channel_type, &channel_id, RowChange::Delete).await
}
