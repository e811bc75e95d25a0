//! Every route of the HTTP surface, walked from the gateway's own route
//! table (`plugboard::http::endpoints`, the list the router is built from),
//! so a new route cannot be missed: a wrong method, a malformed body, an
//! unknown field, a body nested too deep, a body without a JSON content
//! type, a path parameter that does not decode, and a bad user id each get
//! the status api.md documents and the `{"error": {"code", "message"}}`
//! shape. Then the edges of single routes: kick bodies, group names and
//! roles, and a request body that never arrives.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use plugboard::http::{endpoints, Access, BodyKind, Endpoint};
use plugboard_tests::gateway::{ADMIN_TOKEN, API_KEY};
use plugboard_tests::{Gateway, GatewayOptions, WsClient};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::setup;

/// The path with every `{param}` filled in; `first` replaces the first one.
fn concrete(path: &str, first: Option<&str>) -> String {
    let mut out = String::new();
    let mut rest = path;
    let mut replaced = false;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').expect("closed parameter") + open;
        let name = &rest[open + 1..close];
        let value = match (first, replaced) {
            (Some(v), false) => v,
            _ => match name {
                "uid" => "alice",
                "gid" => "team",
                "channel_type" => "person",
                "channel_id" => "bob",
                "name" => "no-such-plugin",
                "key" => "k",
                other => panic!("a value for {{{other}}}"),
            },
        };
        replaced = true;
        out.push_str(value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

fn credential(access: Access) -> Option<&'static str> {
    match access {
        Access::ApiKey => Some(API_KEY),
        Access::Admin => Some(ADMIN_TOKEN),
        Access::Public | Access::WebSocket => None,
    }
}

/// An answer: status, headers and the parsed body.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    /// Asserts the documented error shape with `status` and `code`.
    #[track_caller]
    fn error(&self, status: u16, code: &str, what: &str) {
        assert_eq!(self.status, status, "{what}: {}", self.body);
        let content_type = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "{what}: content type {content_type:?}"
        );
        assert_eq!(self.body["error"]["code"], code, "{what}: {}", self.body);
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: a message: {}",
            self.body
        );
        assert_eq!(
            self.body.as_object().map(|o| o.len()),
            Some(1),
            "{what}: only `error`: {}",
            self.body
        );
    }
}

async fn send(
    http: &reqwest::Client,
    gw: &Gateway,
    method: Method,
    path: &str,
    access: Access,
    content_type: Option<&str>,
    body: impl Into<String>,
) -> Answer {
    let body: String = body.into();
    let mut req = http.request(method, gw.url(path));
    if let Some(key) = credential(access) {
        req = req.bearer_auth(key);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if !body.is_empty() {
        req = req.body(body);
    }
    let resp = req.send().await.expect("gateway answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// A method the path does not serve.
fn wrong_method(served: &BTreeSet<String>) -> Method {
    [
        Method::PUT,
        Method::PATCH,
        Method::POST,
        Method::DELETE,
        Method::GET,
    ]
    .into_iter()
    .find(|m| !served.contains(m.as_str()))
    .expect("no path serves every method")
}

#[tokio::test]
async fn every_route_answers_refusals_in_the_documented_shape() {
    let (gw, _rx) = setup("").await;
    let http = reqwest::Client::new();
    let all = endpoints();
    // Everything api.md documents is in the table (and so walked below).
    for (method, path) in [
        ("POST", "/v1/messages"),
        ("GET", "/v1/users/{uid}/presence"),
        ("POST", "/v1/users/{uid}/kick"),
        ("POST", "/v1/control"),
        ("PATCH", "/v1/groups/{gid}"),
        ("PUT", "/admin/plugins/{name}/kv/{key}"),
        ("GET", "/metrics"),
        ("GET", "/v1/ws"),
    ] {
        assert!(
            all.iter()
                .any(|e| e.method.as_str() == method && e.path == path),
            "{method} {path} is routed"
        );
    }

    let mut by_path: BTreeMap<&str, Vec<&Endpoint>> = BTreeMap::new();
    for e in &all {
        by_path.entry(e.path).or_default().push(e);
    }

    // A wrong method: 405 `method_not_allowed` with `Allow` naming exactly
    // the methods served; `/v1/ws` answers `426 bad_upgrade` to anything
    // but a GET upgrade (protocol.md).
    for (path, eps) in &by_path {
        let served: BTreeSet<String> = eps.iter().map(|e| e.method.to_string()).collect();
        let method = wrong_method(&served);
        let what = format!("{method} {path}");
        let access = eps[0].access;
        if access == Access::WebSocket {
            for method in [Method::POST, Method::PUT] {
                let resp = http
                    .request(method.clone(), gw.url(path))
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-version", "13")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap();
                assert_eq!(status, 426, "{method} {path}: {body}");
                assert_eq!(body["error"]["code"], "bad_upgrade", "{method} {path}");
            }
            continue;
        }
        let a = send(&http, &gw, method, &concrete(path, None), access, None, "").await;
        a.error(405, "method_not_allowed", &what);
        let mut allow: BTreeSet<String> = a
            .headers
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        allow.remove("HEAD");
        assert_eq!(allow, served, "{what}: Allow");
    }

    // A path parameter that does not decode to UTF-8.
    for (path, eps) in &by_path {
        if !path.contains('{') {
            continue;
        }
        let e = eps[0];
        let body = if e.body == BodyKind::Json { "{}" } else { "" };
        let ct = (e.body == BodyKind::Json).then_some("application/json");
        let a = send(
            &http,
            &gw,
            e.method.clone(),
            &concrete(path, Some("%FF")),
            e.access,
            ct,
            body,
        )
        .await;
        a.error(400, "bad_request", &format!("{} {path} with %FF", e.method));
    }

    let deep = format!(
        "{{\"zz\": {}{}}}",
        "[".repeat(plugboard::json::MAX_DEPTH),
        "]".repeat(plugboard::json::MAX_DEPTH)
    );
    for e in &all {
        let path = concrete(e.path, None);
        let what = |case: &str| format!("{} {}: {case}", e.method, e.path);
        let go = |ct: Option<&'static str>, body: String| {
            send(&http, &gw, e.method.clone(), &path, e.access, ct, body)
        };
        let json = Some("application/json");
        match e.body {
            BodyKind::Json | BodyKind::OptionalJson => {
                go(json, "{,}".into())
                    .await
                    .error(400, "bad_request", &what("malformed JSON"));
                go(json, "{\"zz_unknown_field\": 1}".into()).await.error(
                    422,
                    "bad_request",
                    &what("unknown field"),
                );
                go(json, deep.clone())
                    .await
                    .error(422, "too_deep", &what("nested too deep"));
                go(Some("text/plain"), "{}".into()).await.error(
                    415,
                    "unsupported_media_type",
                    &what("text/plain"),
                );
                go(None, "{}".into()).await.error(
                    415,
                    "unsupported_media_type",
                    &what("no content type"),
                );
                if e.body == BodyKind::Json {
                    go(json, String::new())
                        .await
                        .error(400, "bad_request", &what("empty body"));
                }
            }
            BodyKind::None | BodyKind::Bytes => {}
        }
        // User ids in the path are checked like everywhere else.
        if e.path.starts_with("/v1/users/{uid}") {
            for bad in ["a".repeat(129), "a%0Ab".to_string()] {
                let a = send(
                    &http,
                    &gw,
                    e.method.clone(),
                    &concrete(e.path, Some(&bad)),
                    e.access,
                    None,
                    "",
                )
                .await;
                a.error(400, "bad_request", &what("bad user id"));
            }
        }
    }

    // The member id of a member's own route is checked too.
    for bad in ["a".repeat(129), "a%0Ab".to_string()] {
        send(
            &http,
            &gw,
            Method::DELETE,
            &format!("/v1/groups/team/members/{bad}"),
            Access::ApiKey,
            None,
            "",
        )
        .await
        .error(400, "bad_request", "DELETE a member with a bad user id");
    }

    // Query parameters of the wrong type.
    for path in [
        "/v1/users/alice/messages?channel_type=person&channel_id=bob&limit=many",
        "/v1/users/alice/conversations?limit=many",
        "/v1/groups/team/members?limit=many",
    ] {
        send(&http, &gw, Method::GET, path, Access::ApiKey, None, "")
            .await
            .error(400, "bad_request", path);
    }

    // Mistyped and missing fields are 422, as the conventions say.
    for (path, body, case) in [
        (
            "/v1/control",
            json!({"kind": "k", "payload": {}}),
            "no targets",
        ),
        (
            "/v1/control",
            json!({"kind": "k", "payload": {}, "targets": {"users": ["a"]}, "zz": 1}),
            "unknown field",
        ),
        (
            "/v1/users/alice/conversations/person/bob/read",
            json!({"seq": "forty"}),
            "mistyped seq",
        ),
        (
            "/v1/messages",
            json!({"channel_type": "person"}),
            "missing fields",
        ),
    ] {
        send(
            &http,
            &gw,
            Method::POST,
            path,
            Access::ApiKey,
            Some("application/json"),
            &body.to_string(),
        )
        .await
        .error(422, "bad_request", &format!("{path}: {case}"));
    }
}

#[tokio::test]
async fn kick_bodies_are_optional_but_never_ignored() {
    let (gw, _rx) = setup("").await;
    let http = reqwest::Client::new();
    let mut phone = WsClient::connect_device(&gw, "kim", "phone").await;
    let kick = |ct: Option<&'static str>, body: &'static str| {
        send(
            &http,
            &gw,
            Method::POST,
            "/v1/users/kim/kick",
            Access::ApiKey,
            ct,
            body,
        )
    };
    // A body meant for one device, without a JSON content type, is refused,
    // not read as "kick every device".
    kick(None, r#"{"device_id": "tablet"}"#).await.error(
        415,
        "unsupported_media_type",
        "kick body without content type",
    );
    kick(
        Some("application/json"),
        r#"{"device_id": "phone", "zz": 1}"#,
    )
    .await
    .error(422, "bad_request", "kick with an unknown field");
    let a = kick(Some("application/json"), r#"{"device_id": "tablet"}"#).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["kicked"], json!([]), "no tablet connected");
    // The phone was never kicked by any of these.
    let beat = phone.request(json!({"type": "ping"})).await;
    assert_eq!(beat["event"], "heartbeat", "{beat}");

    // An empty body, with or without a JSON content type, kicks every device.
    let a = kick(Some("application/json"), "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["kicked"], json!([phone.connection_id]));
    let (_, closed) = phone.closed().await;
    assert_eq!(closed.code, Some(4002), "{closed:?}");
}

#[tokio::test]
async fn group_names_and_roles_are_bounded() {
    let (gw, _rx) = setup("").await;
    let long_name = "n".repeat(257);
    let long_role = "r".repeat(65);
    for (method, path, body, code) in [
        (
            Method::POST,
            "/v1/groups",
            json!({"group_id": "g1", "name": long_name}),
            "invalid_name",
        ),
        (
            Method::POST,
            "/v1/groups",
            json!({"group_id": "g1", "name": "line\nbreak"}),
            "invalid_name",
        ),
        (
            Method::POST,
            "/v1/groups",
            json!({"group_id": "g1", "members": [{"user_id": "a", "role": long_role}]}),
            "invalid_role",
        ),
        (
            Method::POST,
            "/v1/groups",
            json!({"group_id": "g1", "members": [{"user_id": "a", "role": "ad\u{7}min"}]}),
            "invalid_role",
        ),
    ] {
        let (status, answer) = gw.api(method, path, Some(body.clone())).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
    // Nothing was created by the refusals; limits are inclusive.
    let (status, _) = gw.api(Method::GET, "/v1/groups/g1", None).await;
    assert_eq!(status, 404);
    let body = json!({"group_id": "g1", "name": "n".repeat(256),
                      "members": [{"user_id": "a", "role": "r".repeat(64)}]});
    let (status, answer) = gw.api(Method::POST, "/v1/groups", Some(body)).await;
    assert_eq!(status, 201, "{answer}");
    for (method, path, body, code) in [
        (
            Method::PATCH,
            "/v1/groups/g1",
            json!({"name": "tab\there"}),
            "invalid_name",
        ),
        (
            Method::POST,
            "/v1/groups/g1/members",
            json!({"members": ["b"], "role": ""}),
            "invalid_role",
        ),
        (
            Method::POST,
            "/v1/groups/g1/members",
            json!({"members": ["b"], "role": long_role}),
            "invalid_role",
        ),
    ] {
        let (status, answer) = gw.api(method, path, Some(body.clone())).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
}

/// Reads one HTTP answer's status line and headers from a raw socket.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut chunk))
            .await
            .expect("the gateway answers a stalled body")
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn a_request_body_that_never_arrives_is_answered_408() {
    let gw =
        Gateway::start(GatewayOptions::default().extra("[server]\nbody_timeout = \"1s\"")).await;
    for (path, key) in [
        ("/v1/messages", API_KEY),
        ("/admin/plugins/p/kv/k", ADMIN_TOKEN),
    ] {
        let method = if path.starts_with("/admin") {
            "PUT"
        } else {
            "POST"
        };
        let mut tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"channel"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        // The rest of the body never comes.
        let head = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 408 "), "{path}: {head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: application/json"), "{head}");
        assert!(lower.contains("connection: close"), "{head}");
        // The connection ends after the answer: reading reaches its end.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut rest))
            .await
            .expect("the gateway closes the connection")
            .unwrap();
        let answer = format!("{head}{}", String::from_utf8_lossy(&rest));
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{answer}: {e}"));
        assert_eq!(body["error"]["code"], "request_timeout", "{answer}");
    }
}
