//! The admin API (admin token): config reload, live connections, webhook
//! endpoints, plugins and their key-value stores.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use http::Method;
use serde_json::{json, Value};

use super::{ApiBytes, ApiError, ApiPath, ApiQuery, BodyKind, Route};
use crate::cluster::wire::Request;
use crate::config::ConfigError;
use crate::outbox::Enable;
use crate::plugins::PluginError;
use crate::server::App;
use crate::storage::plugins::MAX_PLUGIN_BYTES;
use crate::storage::StorageError;

pub fn routes() -> Vec<Route> {
    let plugin = "/admin/plugins/{name}";
    let kv = "/admin/plugins/{name}/kv/{key}";
    vec![
        Route::new(Method::POST, "/admin/reload", BodyKind::None, reload),
        Route::new(
            Method::GET,
            "/admin/connections",
            BodyKind::None,
            connections,
        ),
        Route::new(Method::GET, "/admin/cluster", BodyKind::None, cluster),
        Route::new(Method::GET, "/admin/webhooks", BodyKind::None, webhooks),
        Route::new(
            Method::POST,
            "/admin/webhooks/{name}/enable",
            BodyKind::None,
            enable,
        ),
        Route::new(
            Method::POST,
            "/admin/webhooks/{name}/disable",
            BodyKind::None,
            disable,
        ),
        Route::new(
            Method::POST,
            "/admin/webhooks/{name}/retry-failed",
            BodyKind::None,
            retry_failed,
        ),
        Route::new(Method::GET, "/admin/plugins", BodyKind::None, plugins),
        Route::new(Method::PUT, plugin, BodyKind::Bytes, upload_plugin)
            .map(|h| h.layer(axum::extract::DefaultBodyLimit::max(MAX_PLUGIN_BYTES))),
        Route::new(Method::DELETE, plugin, BodyKind::None, unload_plugin),
        Route::new(
            Method::POST,
            "/admin/plugins/{name}/reload",
            BodyKind::None,
            reload_plugin,
        ),
        Route::new(Method::GET, kv, BodyKind::None, kv_get),
        Route::new(Method::PUT, kv, BodyKind::Bytes, kv_put),
        Route::new(Method::DELETE, kv, BodyKind::None, kv_delete),
    ]
}

/// Checks that `name` is a configured plugin and `key` a valid store key.
fn kv_target(app: &App, name: &str, key: &str) -> Result<(), ApiError> {
    if !app.config().plugins.iter().any(|p| p.name == name) {
        return Err(ApiError::not_found(format!("no plugin named `{name}`")));
    }
    if key.is_empty() || key.len() > crate::plugins::bindings::KV_MAX_KEY {
        return Err(ApiError::bad_request(format!(
            "a key is 1 to {} bytes",
            crate::plugins::bindings::KV_MAX_KEY
        )));
    }
    Ok(())
}

/// `GET /admin/plugins/{name}/kv/{key}`: the value's bytes.
async fn kv_get(
    State(app): State<Arc<App>>,
    ApiPath((name, key)): ApiPath<(String, String)>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    kv_target(&app, &name, &key)?;
    match app.storage.kv.kv_get(&name, &key).await? {
        Some(value) => Ok((
            [(http::header::CONTENT_TYPE, "application/octet-stream")],
            value,
        )
            .into_response()),
        None => Err(ApiError::not_found(format!(
            "plugin `{name}` has no key `{key}`"
        ))),
    }
}

/// `PUT /admin/plugins/{name}/kv/{key}`: the body is the value.
async fn kv_put(
    State(app): State<Arc<App>>,
    ApiPath((name, key)): ApiPath<(String, String)>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>, ApiError> {
    kv_target(&app, &name, &key)?;
    if body.len() > crate::plugins::bindings::KV_MAX_VALUE {
        return Err(ApiError::new(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "a value is at most {} bytes",
                crate::plugins::bindings::KV_MAX_VALUE
            ),
        ));
    }
    match app.storage.kv.kv_set(&name, &key, body.to_vec()).await {
        Ok(()) => Ok(Json(
            json!({ "plugin": name, "key": key, "bytes": body.len() }),
        )),
        Err(StorageError::Quota(m)) => Err(ApiError::new(
            http::StatusCode::INSUFFICIENT_STORAGE,
            "quota_exceeded",
            m,
        )),
        Err(e) => Err(e.into()),
    }
}

/// `DELETE /admin/plugins/{name}/kv/{key}` (no error when absent).
async fn kv_delete(
    State(app): State<Arc<App>>,
    ApiPath((name, key)): ApiPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    kv_target(&app, &name, &key)?;
    app.storage.kv.kv_delete(&name, &key).await?;
    Ok(Json(json!({ "plugin": name, "key": key, "deleted": true })))
}

async fn reload(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    match app.reload().await {
        Ok(report) => {
            let mut body = serde_json::to_value(report).map_err(ApiError::internal)?;
            // Cluster mode: every other node re-reads its own config file too.
            if let Some(c) = &app.cluster {
                body["node_id"] = json!(c.lease.node_id());
                body["nodes"] = json!(c.delivery.reports(&Request::Reload).await);
            }
            Ok(Json(body))
        }
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => Err(ApiError::new(
            http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            format!("{e:#}"),
        )),
        // Registering a new webhook endpoint needs storage.
        Err(e) => match e.downcast_ref::<StorageError>() {
            Some(s) if s.is_unavailable() => Err(ApiError::storage(s)),
            _ => Err(ApiError::internal(format!("{e:#}"))),
        },
    }
}

async fn connections(
    State(app): State<Arc<App>>,
    ApiQuery(q): ApiQuery<HashMap<String, String>>,
) -> Json<Value> {
    let mut sessions = app
        .delivery
        .online(q.get("user_id").map(String::as_str))
        .await;
    sessions.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
    Json(json!({ "count": sessions.len(), "connections": sessions }))
}

/// Cluster mode: every node the cluster table knows, with its lease.
async fn cluster(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let Some(c) = &app.cluster else {
        return Err(ApiError::new(
            http::StatusCode::NOT_FOUND,
            "not_clustered",
            "this gateway runs as a single node (no [cluster] section)",
        ));
    };
    let nodes = c.lease.nodes().await?;
    Ok(Json(json!({
        "node_id": c.lease.node_id(),
        "fenced": c.lease.is_fenced(),
        "nats": c.delivery.nats_state(),
        "nodes": nodes,
    })))
}

async fn webhooks(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "endpoints": app.outbox.views().await? })))
}

async fn enable(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    match app.outbox.enable(&name).await? {
        Enable::Enabled => Ok(Json(json!({ "name": name, "enabled": true }))),
        Enable::StillDisabledInConfig => Err(ApiError::new(
            http::StatusCode::CONFLICT,
            "disabled_in_config",
            format!("`{name}` has enabled = false in the config; change it there and reload"),
        )),
        Enable::Unknown => Err(ApiError::not_found(format!(
            "no webhook endpoint `{name}` in the config"
        ))),
    }
}

async fn disable(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    if app.outbox.disable(&name).await? {
        Ok(Json(json!({ "name": name, "enabled": false })))
    } else {
        Err(ApiError::not_found(format!(
            "no webhook endpoint `{name}` in the config"
        )))
    }
}

async fn retry_failed(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let n = app.outbox.retry_failed(&name).await?.ok_or_else(|| {
        ApiError::not_found(format!("no webhook endpoint `{name}` in the config"))
    })?;
    Ok(Json(json!({ "name": name, "requeued": n })))
}

fn plugin_error(e: PluginError) -> ApiError {
    match e {
        PluginError::Unknown(_) | PluginError::NoUpload(_) => ApiError::not_found(e.to_string()),
        PluginError::Engine(_) => ApiError::internal(e),
        // Nothing was swapped (or unloaded): storage could not take it.
        PluginError::Storage { ref error, .. } if error.is_unavailable() => {
            ApiError::storage(error)
        }
        PluginError::Storage {
            error: StorageError::Quota(_),
            ..
        } => ApiError::new(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("{e}; the previous version keeps serving"),
        ),
        PluginError::Storage { .. } => {
            tracing::error!(error = %e, "plugin admin request failed in storage");
            ApiError::new(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("{e}; the previous version keeps serving"),
            )
        }
        other => ApiError::new(
            http::StatusCode::UNPROCESSABLE_ENTITY,
            "plugin_refused",
            format!("{other}; the previous version keeps serving"),
        ),
    }
}

async fn plugins(State(app): State<Arc<App>>) -> Json<Value> {
    let chains: serde_json::Map<String, Value> = crate::config::HOOKS
        .iter()
        .map(|h| (h.to_string(), json!(app.plugins.chain(h))))
        .collect();
    let mut body = json!({ "plugins": app.plugins.views(20), "chains": chains });
    // Cluster mode: what every other node has loaded.
    if let Some(c) = &app.cluster {
        body["node_id"] = json!(c.lease.node_id());
        body["nodes"] = json!(c.delivery.reports(&Request::Plugins).await);
    }
    Json(body)
}

/// Cluster mode: asks every other node to apply a plugin change made here
/// (the version is in the database already) and adds their reports.
async fn on_every_node(app: &App, mut body: Value, request: Request) -> Value {
    if let Some(c) = &app.cluster {
        body["node_id"] = json!(c.lease.node_id());
        body["nodes"] = json!(c.delivery.reports(&request).await);
    }
    body
}

async fn upload_plugin(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body must be the component (.wasm)",
        ));
    }
    let report = app
        .plugins
        .install(&name, body.to_vec())
        .await
        .map_err(plugin_error)?;
    let body = serde_json::to_value(report).map_err(ApiError::internal)?;
    Ok(Json(
        on_every_node(&app, body, Request::PluginLoad { name }).await,
    ))
}

async fn reload_plugin(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let report = app.plugins.reload(&name).await.map_err(plugin_error)?;
    let body = serde_json::to_value(report).map_err(ApiError::internal)?;
    Ok(Json(
        on_every_node(&app, body, Request::PluginReload { name }).await,
    ))
}

async fn unload_plugin(
    State(app): State<Arc<App>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let removed = app.plugins.unload(&name).await.map_err(plugin_error)?;
    let body = json!({ "name": name, "loaded": false, "upload_removed": removed });
    Ok(Json(
        on_every_node(&app, body, Request::PluginUnload { name }).await,
    ))
}
