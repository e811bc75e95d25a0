//! The server API for messages and conversation lists (API key): send as a
//! user or as the system, read a user's messages and conversations on the
//! user's behalf, and change a user's conversations (read, hide, delete).
//! The answers have the same shape as the client frames (docs/protocol.md).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{ApiError, ApiJson, ApiPath, ApiQuery, BodyKind, OptionalJson, Route};
use crate::gateway::protocol;
use crate::messaging::conversations::ListQuery;
use crate::messaging::{check_id, SendRequest, SyncQuery};
use crate::server::App;
use crate::storage::messages::RowChange;

pub fn routes() -> Vec<Route> {
    const ROW: &str = "/v1/users/{uid}/conversations/{channel_type}/{channel_id}";
    vec![
        Route::new(Method::POST, "/v1/messages", BodyKind::Json, send),
        Route::new(
            Method::GET,
            "/v1/users/{uid}/messages",
            BodyKind::None,
            messages,
        ),
        Route::new(
            Method::GET,
            "/v1/users/{uid}/conversations",
            BodyKind::None,
            list,
        ),
        Route::new(Method::DELETE, ROW, BodyKind::None, delete),
        Route::new(
            Method::POST,
            "/v1/users/{uid}/conversations/{channel_type}/{channel_id}/read",
            BodyKind::OptionalJson,
            read,
        ),
        Route::new(
            Method::POST,
            "/v1/users/{uid}/conversations/{channel_type}/{channel_id}/hide",
            BodyKind::None,
            hide,
        ),
    ]
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
    match app.messaging.send(req).await {
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
    ApiPath(uid): ApiPath<String>,
    ApiQuery(q): ApiQuery<SyncQuery>,
) -> Result<Json<Value>, ApiError> {
    check_id("uid", &uid)?;
    let page = app.messaging.sync_page(&uid, &q, page_budget(&app)).await?;
    Ok(Json(page.json()?))
}

/// The bytes of items an answer's page may hold: as much as a client
/// connection's page (the API answers in pages of the same size).
fn page_budget(app: &App) -> usize {
    protocol::page_budget(protocol::frame_limit(&app.config()), None)
}

async fn list(
    State(app): State<Arc<App>>,
    ApiPath(uid): ApiPath<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    check_id("uid", &uid)?;
    let page = app
        .messaging
        .list_page(&uid, None, &q, page_budget(&app))
        .await?;
    Ok(Json(page.json()?))
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
    let body = app
        .messaging
        .change(uid, None, None, channel_type, channel_id, change)
        .await?;
    Ok(Json(body))
}

async fn read(
    State(app): State<Arc<App>>,
    ApiPath((uid, channel_type, channel_id)): ApiPath<(String, String, String)>,
    OptionalJson(body): OptionalJson<ReadBody>,
) -> Result<Json<Value>, ApiError> {
    // The body is optional: none means "up to the last message".
    let seq = body.and_then(|b| b.seq);
    change(&app, &uid, &channel_type, &channel_id, RowChange::Read(seq)).await
}

async fn hide(
    State(app): State<Arc<App>>,
    ApiPath((uid, channel_type, channel_id)): ApiPath<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    change(&app, &uid, &channel_type, &channel_id, RowChange::Hide).await
}

async fn delete(
    State(app): State<Arc<App>>,
    ApiPath((uid, channel_type, channel_id)): ApiPath<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    change(&app, &uid, &channel_type, &channel_id, RowChange::Delete).await
}
