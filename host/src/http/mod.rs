//! The HTTP surfaces: the client WebSocket route, the server API (API key),
//! the admin API (admin token) and operations (health, readiness, metrics).
//!
//! Each surface lists its routes as [`Route`]s (an [`Endpoint`] — method,
//! path, credentials, body — with its handler); [`router`] mounts them and
//! [`endpoints`] lists the same table, so the route list a test walks is the
//! router itself. [`ApiError`] ([`error`]) is the one error type at the
//! edge: every error, including every extractor rejection, a wrong method
//! (`405` with `Allow`), an unknown route and a body that arrives too
//! slowly (`408`), answers `{"error": {"code", "message"}}` with a stable
//! `code`; the domains' errors become it there and nowhere else.
//!
//! Handlers hold the whole [`App`] as their state, but reach the domains
//! only through its services (`app.messaging`, `app.control`,
//! `app.gateway`, `app.delivery`); nothing below this module knows HTTP.

pub mod admin;
pub mod api;
pub mod control;
pub mod error;
pub mod groups;
pub mod messages;
pub mod ops;
pub mod ws;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::handler::Handler;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;
use futures_util::StreamExt;
use http::{HeaderMap, Method, StatusCode};

pub use error::ApiError;

use crate::server::App;

/// Whether the request says its body is JSON (`application/json` or
/// `application/<something>+json`, any parameters).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", sub)) => sub == "json" || sub.ends_with("+json"),
        _ => false,
    }
}

/// Parses a JSON request body the way every route does: `415` without a
/// JSON content type, `400` for malformed JSON, `422` for JSON nested deeper
/// than [`crate::json::MAX_DEPTH`] (`too_deep`) and for a missing, mistyped
/// or unknown field.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON: send `Content-Type: application/json`",
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("invalid body: the JSON is not UTF-8"))?;
    crate::json::check_depth(text, crate::json::MAX_DEPTH).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_deep",
            format!("invalid body: {e}"),
        )
    })?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::unprocessable(format!("invalid body: {e}")),
        _ => ApiError::bad_request(format!("invalid body: malformed JSON: {e}")),
    })
}

/// The raw request body, read within `server.max_body_size` (or the route's
/// own limit); its rejections answer in the [`ApiError`] shape.
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(ApiBytes(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is larger than this route accepts (server.max_body_size)",
                ))
            }
            Err(rejection) => Err(ApiError::bad_request(format!(
                "could not read the request body: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// A JSON body, required; parsed by [`parse_json`].
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = req.headers().clone();
        let ApiBytes(body) = ApiBytes::from_request(req, state).await?;
        parse_json(&headers, &body).map(ApiJson)
    }
}

/// A JSON body that may be absent: an empty (or all-whitespace) body is
/// `None`. A body that is there needs a JSON content type like any other;
/// it is never ignored.
pub struct OptionalJson<T>(pub Option<T>);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = req.headers().clone();
        let ApiBytes(body) = ApiBytes::from_request(req, state).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        parse_json(&headers, &body).map(|v| OptionalJson(Some(v)))
    }
}

/// Query parameters whose rejection answers in the [`ApiError`] shape.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
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

/// Path parameters whose rejection (such as percent-encoding that does not
/// decode to UTF-8) answers in the [`ApiError`] shape.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials (operations).
    Public,
    /// A server API key.
    ApiKey,
    /// The admin token.
    Admin,
    /// The client WebSocket upgrade (a token of its own).
    WebSocket,
}

/// What a route reads from its request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// Nothing.
    None,
    /// A JSON object ([`ApiJson`]).
    Json,
    /// A JSON object or nothing ([`OptionalJson`]).
    OptionalJson,
    /// Raw bytes (a plugin component, a key-value store value).
    Bytes,
}

/// One method on one path, as docs/api.md lists it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub method: Method,
    /// The route pattern, with `{name}` parameters.
    pub path: &'static str,
    pub access: Access,
    pub body: BodyKind,
}

/// An [`Endpoint`] with the handler that serves it.
pub struct Route {
    endpoint: Endpoint,
    handler: MethodRouter<Arc<App>>,
}

impl Route {
    /// A route answering `method` on `path`; the method router is built
    /// from the same method, so the table cannot disagree with the router.
    pub fn new<H, T>(method: Method, path: &'static str, body: BodyKind, handler: H) -> Route
    where
        H: Handler<T, Arc<App>>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
        Route {
            endpoint: Endpoint {
                method,
                path,
                // Set by the surface that mounts it.
                access: Access::Public,
                body,
            },
            handler: axum::routing::on(filter, handler),
        }
    }

    /// Wraps the handler (a route's own body limit, say).
    pub fn map(
        mut self,
        f: impl FnOnce(MethodRouter<Arc<App>>) -> MethodRouter<Arc<App>>,
    ) -> Route {
        self.handler = f(self.handler);
        self
    }
}

/// Every route, by surface. `/v1/ws` answers every method so that anything
/// but a `GET` upgrade gets `426 bad_upgrade` (protocol.md) rather than 405.
fn surfaces() -> Vec<(Access, Vec<Route>)> {
    let ws = Route {
        endpoint: Endpoint {
            method: Method::GET,
            path: "/v1/ws",
            access: Access::WebSocket,
            body: BodyKind::None,
        },
        handler: axum::routing::any(ws::handler),
    };
    let api = [
        api::routes(),
        messages::routes(),
        groups::routes(),
        control::routes(),
    ]
    .into_iter()
    .flatten()
    .collect();
    vec![
        (Access::WebSocket, vec![ws]),
        (Access::ApiKey, api),
        (Access::Admin, admin::routes()),
        (Access::Public, ops::routes()),
    ]
}

/// Every endpoint the router serves, from the same table as [`router`].
pub fn endpoints() -> Vec<Endpoint> {
    surfaces()
        .into_iter()
        .flat_map(|(access, routes)| {
            routes.into_iter().map(move |r| Endpoint {
                access,
                ..r.endpoint
            })
        })
        .collect()
}

fn mount(routes: Vec<Route>) -> Router<Arc<App>> {
    routes.into_iter().fold(Router::new(), |r, route| {
        r.route(route.endpoint.path, route.handler)
    })
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

/// A request body that did not arrive within `server.body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within server.body_timeout")]
struct BodyTimedOut;

/// `body`, cut off with [`BodyTimedOut`] once `limit` has passed; `flag`
/// records that it was.
fn with_deadline(body: Body, limit: Duration, flag: Arc<AtomicBool>) -> Body {
    let sleep = Box::pin(tokio::time::sleep(limit));
    let stream = futures_util::stream::unfold(
        (body.into_data_stream(), sleep, flag, false),
        |(mut data, mut sleep, flag, ended)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                chunk = data.next() => {
                    let chunk = chunk?.map_err(axum::BoxError::from);
                    Some((chunk, (data, sleep, flag, false)))
                }
                () = &mut sleep => {
                    flag.store(true, Ordering::Relaxed);
                    Some((Err(BodyTimedOut.into()), (data, sleep, flag, true)))
                }
            }
        },
    );
    Body::from_stream(stream)
}

/// Bounds the time a request body may take to arrive, so a client that
/// sends headers and then stalls cannot hold a connection and a handler
/// open: whatever the handler made of the cut-off body, the answer is `408
/// request_timeout`, and the connection closes (its unread rest cannot be
/// skipped).
async fn body_deadline(limit: Duration, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let flag = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts, with_deadline(body, limit, flag.clone()));
    let resp = next.run(req).await;
    if !flag.load(Ordering::Relaxed) {
        return resp;
    }
    let mut resp = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request body did not arrive within {} (server.body_timeout)",
            humantime::format_duration(limit)
        ),
    )
    .into_response();
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

/// A method the route does not serve: `405` in the error shape; the router
/// adds the `Allow` header.
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not answer this method; see the Allow header",
    )
}

/// The whole HTTP surface of one gateway.
pub fn router(app: Arc<App>) -> Router {
    let server = app.config().server.clone();
    let mut router = Router::new();
    for (access, routes) in surfaces() {
        let mounted = mount(routes);
        let mounted = match access {
            Access::ApiKey => mounted.route_layer(axum::middleware::from_fn_with_state(
                app.clone(),
                require_api_key,
            )),
            Access::Admin => mounted.route_layer(axum::middleware::from_fn_with_state(
                app.clone(),
                require_admin,
            )),
            Access::Public | Access::WebSocket => mounted,
        };
        router = router.merge(mounted);
    }
    let limit = server.body_timeout;
    router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(server.max_body_size))
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| body_deadline(limit, req, next),
        ))
        .with_state(app)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_str(content_type).unwrap(),
        );
        h
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct ReadLike {
        seq: u64,
    }

    fn code(r: Result<ReadLike, ApiError>) -> (u16, &'static str) {
        let e = r.unwrap_err();
        (e.status.as_u16(), e.code)
    }

    #[test]
    fn json_bodies_are_refused_by_kind_of_fault() {
        let json = headers("application/json; charset=utf-8");
        assert!(parse_json::<ReadLike>(&json, br#"{"seq": 1}"#).is_ok());
        assert!(
            parse_json::<ReadLike>(&headers("application/merge-patch+json"), br#"{"seq": 1}"#)
                .is_ok()
        );
        assert_eq!(
            code(parse_json(&HeaderMap::new(), b"{}")),
            (415, "unsupported_media_type")
        );
        assert_eq!(
            code(parse_json(&headers("text/plain"), b"{}")),
            (415, "unsupported_media_type")
        );
        assert_eq!(
            code(parse_json(&json, br#"{"seq": "#)),
            (400, "bad_request")
        );
        assert_eq!(code(parse_json(&json, b"")), (400, "bad_request"));
        assert_eq!(
            code(parse_json(&json, br#"{"seq": "x"}"#)),
            (422, "bad_request")
        );
        assert_eq!(code(parse_json(&json, br#"{}"#)), (422, "bad_request"));
        assert_eq!(
            code(parse_json(&json, br#"{"seq": 1, "zz": 2}"#)),
            (422, "bad_request")
        );
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(code(parse_json(&json, deep.as_bytes())), (422, "too_deep"));
    }

    #[test]
    fn the_route_table_names_each_endpoint_once() {
        let eps = endpoints();
        let mut seen = std::collections::HashSet::new();
        for e in &eps {
            assert!(
                seen.insert((e.method.clone(), e.path)),
                "{} {} twice",
                e.method,
                e.path
            );
        }
        assert!(eps
            .iter()
            .any(|e| e.path == "/v1/ws" && e.access == Access::WebSocket));
        assert!(eps
            .iter()
            .any(|e| e.path == "/metrics" && e.access == Access::Public));
    }
}
