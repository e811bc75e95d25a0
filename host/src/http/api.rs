//! The server API used by the business server (API key): kick and presence.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use http::Method;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiPath, BodyKind, OptionalJson, Route};
use crate::delivery::CloseReason;
use crate::server::App;
use crate::storage::SessionRecord;

pub fn routes() -> Vec<Route> {
    vec![
        Route::new(
            Method::POST,
            "/v1/users/{uid}/kick",
            BodyKind::OptionalJson,
            kick,
        ),
        Route::new(
            Method::GET,
            "/v1/users/{uid}/presence",
            BodyKind::None,
            presence,
        ),
    ]
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KickRequest {
    /// Only this device's connections; all of the user's when absent.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Told to the client in the `meta` frame and the close frame.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct KickResponse {
    pub user_id: String,
    /// Connection ids asked to close (close code 4002).
    pub kicked: Vec<String>,
}

async fn kick(
    State(app): State<Arc<App>>,
    ApiPath(uid): ApiPath<String>,
    OptionalJson(body): OptionalJson<KickRequest>,
) -> Result<Json<KickResponse>, ApiError> {
    crate::messaging::check_id("uid", &uid)?;
    // No body kicks every device of the user.
    let req = body.unwrap_or_default();
    let message = req.reason.unwrap_or_else(|| "kicked by the server".into());
    let device = req.device_id.as_deref();
    let kicked = app
        .delivery
        .kick_user(&uid, device, CloseReason::Kicked, &message)
        .await;
    tracing::info!(user_id = %uid, count = kicked.len(), "kick requested through the API");
    Ok(Json(KickResponse {
        user_id: uid,
        kicked,
    }))
}

#[derive(Debug, Serialize)]
pub struct PresenceResponse {
    pub user_id: String,
    pub online: bool,
    pub devices: u32,
    pub connections: u32,
    pub sessions: Vec<PresenceSession>,
}

#[derive(Debug, Serialize)]
pub struct PresenceSession {
    pub connection_id: String,
    pub device_id: String,
    pub node_id: String,
    pub opened_at: String,
}

impl From<SessionRecord> for PresenceSession {
    fn from(r: SessionRecord) -> Self {
        PresenceSession {
            connection_id: r.connection_id,
            device_id: r.device_id,
            node_id: r.node_id,
            opened_at: crate::rfc3339_ms(r.opened_at),
        }
    }
}

async fn presence(
    State(app): State<Arc<App>>,
    ApiPath(uid): ApiPath<String>,
) -> Result<Json<PresenceResponse>, ApiError> {
    crate::messaging::check_id("uid", &uid)?;
    let (p, sessions) = app.storage.sessions.presence(&uid).await?;
    Ok(Json(PresenceResponse {
        user_id: uid,
        online: p.connections > 0,
        devices: p.devices,
        connections: p.connections,
        sessions: sessions.into_iter().map(Into::into).collect(),
    }))
}
