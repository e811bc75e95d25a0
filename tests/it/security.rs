//! Security regressions: a formatter's request stays under its endpoint's
//! path, headers and query; plugin logs stay within their limits; nothing
//! from a client, a token or a plugin forges a line of the text log;
//! secrets stay out of every output; plugin uploads write nothing into the
//! plugins folder and leave nothing behind when refused.

use std::sync::{Arc, Mutex};

use plugboard_tests::receiver::SECRET;
use plugboard_tests::{plugins, wait_until, Gateway, GatewayOptions, WsClient, WAIT};
use reqwest::Method;
use serde_json::{json, Value};

/// One request as the [`Recorder`] saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    headers: http::HeaderMap,
    body: Value,
}

/// A plain HTTP receiver that records each request's method, path, query,
/// headers and body as they arrived, and answers 200.
#[derive(Clone)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    addr: String,
}

impl Recorder {
    async fn start() -> Recorder {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().fallback(
            move |method: http::Method,
                  uri: http::Uri,
                  headers: http::HeaderMap,
                  body: bytes::Bytes| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(Seen {
                        method: method.to_string(),
                        path: uri.path().to_string(),
                        query: uri.query().map(str::to_string),
                        headers,
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    });
                    http::StatusCode::OK
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Recorder { seen, addr }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn plugin(name: &str, file: &str, extra: &str) -> String {
    format!("[[plugins]]\nname = \"{name}\"\nfile = {file:?}\n{extra}\n")
}

fn endpoint(name: &str, url: &str, formatter: &str, events: &str) -> String {
    format!(
        "[[webhooks]]\nname = \"{name}\"\nurl = {url:?}\nsecret = \"{SECRET}\"\nformatter = \"{formatter}\"\nevents = {events}\n"
    )
}

/// A gateway whose one endpoint is formatted by the `log-flood` test plugin
/// with `extra` (its entry's settings), and the receiver of that endpoint.
async fn log_flood_gateway(extra: &str) -> (Recorder, Gateway) {
    let rx = Recorder::start().await;
    let url = format!("http://{}/hooks", rx.addr);
    let gw = Gateway::start(
        GatewayOptions::default().extra(
            &[
                plugin("flood", plugins::LOG_FLOOD, extra),
                endpoint("rx", &url, "flood", "[\"message.created\"]"),
            ]
            .concat(),
        ),
    )
    .await;
    (rx, gw)
}

async fn send_message(gw: &Gateway, from: &str, to: &str, payload: Value) {
    let (status, body) = gw
        .api(
            Method::POST,
            "/v1/messages",
            Some(json!({ "from": from, "channel_type": "person", "channel_id": to, "payload": payload })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

async fn plugin_view(gw: &Gateway, name: &str) -> (Value, usize) {
    let (status, body) = gw.admin(Method::GET, "/admin/plugins", None).await;
    assert_eq!(status, 200, "{body}");
    let size = body.to_string().len();
    let view = body["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no plugin {name} in {body}"));
    (view, size)
}

/// The case number a request carries: in the formatted body
/// (`{"case": n}`) or, for the default envelope, in the message payload.
fn case_of(s: &Seen) -> Option<u64> {
    s.body["case"]
        .as_u64()
        .or_else(|| s.body["data"]["payload"]["case"].as_u64())
}

#[tokio::test]
async fn a_formatter_cannot_leave_the_endpoint_path_or_override_its_headers_and_query() {
    let rx = Recorder::start().await;
    let url = format!("http://{}/hooks?token=t0ken", rx.addr);
    let gw = Gateway::start(
        GatewayOptions::default().extra(
            &[
                // Every hostile case is a failure in a row: the breaker must not
                // open and hide the later ones.
                "[plugin_runtime]\nbreaker_failures = 1000\n".to_string(),
                plugin(
                    "shaped",
                    plugins::SHAPED_REQUEST,
                    "on_error = \"fail-open\"",
                ),
                endpoint("rx", &url, "shaped", "[\"message.created\"]"),
            ]
            .concat(),
        ),
    )
    .await;
    let mut hostile: Vec<Value> = [
        "/../../admin/secret",
        "/..",
        "/.",
        "/./x",
        "/a/../../b",
        "/%2e%2e/admin",
        "/%2E%2E/admin",
        "/%2e./admin",
        "/.%2E/admin",
        "/%252e%252e/admin",
        "/a%2f..%2fadmin",
        "/..\\..\\admin",
        "/%5c..%5cadmin",
        "/..;/admin",
        "/...",
        "admin",
        "/x?token=evil",
        "/x#frag",
        "/caf\u{e9}",
        "/bad%zz",
    ]
    .iter()
    .map(|s| json!({ "path_suffix": s }))
    .collect();
    for name in [
        "authorization",
        "Authorization",
        "proxy-authorization",
        "user-agent",
        "expect",
        "te",
        "upgrade",
        "connection",
        "keep-alive",
        "host",
        "content-length",
        "transfer-encoding",
        "trailer",
    ] {
        hostile.push(json!({ "headers": [[name, "evil"]] }));
    }
    for query in [
        "token=evil",
        "TOKEN=evil",
        "tok%65n=evil",
        "a=1&token=evil",
        "token",
    ] {
        hostile.push(json!({ "query": query }));
    }
    let benign =
        json!({ "path_suffix": "/ok/event", "query": "x=1", "headers": [["x-extra", "yes"]] });
    let mut cases = hostile.clone();
    cases.push(benign);
    for (i, case) in cases.iter().enumerate() {
        let mut payload = case.clone();
        payload["case"] = json!(i);
        // One channel per case: no case waits behind another.
        send_message(&gw, &format!("s{i}"), &format!("r{i}"), payload).await;
    }
    let seen = wait_until("one request per case", WAIT, || {
        let seen = rx.seen();
        (0..cases.len() as u64)
            .all(|i| seen.iter().any(|s| case_of(s) == Some(i)))
            .then_some(seen)
    })
    .await;
    for s in &seen {
        let case = case_of(s).expect("every request is one of the cases");
        assert_eq!(s.method, "POST");
        if case as usize == hostile.len() {
            assert_eq!(s.path, "/hooks/ok/event", "{s:?}");
            assert_eq!(s.query.as_deref(), Some("token=t0ken&x=1"), "{s:?}");
            assert_eq!(s.headers["x-extra"], "yes");
            assert_eq!(s.body, json!({ "case": case }), "the formatted body");
            continue;
        }
        // Refused as malformed; fail-open sends the default envelope to the
        // endpoint's own URL, headers and query.
        assert_eq!(s.path, "/hooks", "case {}: {s:?}", cases[case as usize]);
        assert_eq!(
            s.query.as_deref(),
            Some("token=t0ken"),
            "case {}: {s:?}",
            cases[case as usize]
        );
        assert_eq!(
            s.body["type"], "message.created",
            "the default envelope: {s:?}"
        );
        assert!(s.headers.get("authorization").is_none(), "{s:?}");
        assert!(s.headers.get("proxy-authorization").is_none(), "{s:?}");
        assert!(s.headers.get("expect").is_none(), "{s:?}");
        assert!(s.headers.get("upgrade").is_none(), "{s:?}");
        assert!(s.headers.get("trailer").is_none(), "{s:?}");
        assert!(s.headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("plugboard/"));
        assert!(s.headers["host"].to_str().unwrap() == rx.addr, "{s:?}");
    }
    assert_eq!(seen.len(), cases.len(), "one request per case: {seen:#?}");
    assert_eq!(
        gw.metric(
            "plugboard_plugin_calls_total",
            "plugin=\"shaped\",hook=\"webhook-formatter\",outcome=\"malformed\""
        )
        .await,
        hostile.len() as f64,
        "every hostile request counts as malformed"
    );
    assert_eq!(
        gw.metric(
            "plugboard_plugin_calls_total",
            "plugin=\"shaped\",hook=\"webhook-formatter\",outcome=\"ok\""
        )
        .await,
        1.0,
        "only the benign request is a successful call"
    );
}

#[tokio::test]
async fn plugin_logs_are_bounded_per_line_per_call_and_in_the_admin_view() {
    let (_rx, gw) = log_flood_gateway("deadline = \"10s\"\n[plugins.config]\nlines = \"120\"\nfields = \"20\"\nvalue_bytes = \"10000\"\nmessage_bytes = \"100000\"\nstdout_lines = \"60\"").await;
    send_message(&gw, "alice", "bob", json!({ "text": "go" })).await;
    // 120 `host.log` lines and 60 printed ones in one call: 50 are written.
    let dropped = plugboard_tests::wait_until_async(WAIT, || async {
        let (view, _) = plugin_view(&gw, "flood").await;
        (view["log_dropped"]["lines"] == 130).then_some(view["log_dropped"].clone())
    })
    .await;
    assert_eq!(
        dropped,
        json!({ "lines": 130, "fields": 50 * 4, "truncated": 50 }),
        "every written line lost 4 fields and had its message and values cut"
    );
    for (part, n) in [("line", 130.0), ("field", 200.0), ("truncated", 50.0)] {
        assert_eq!(
            gw.metric(
                "plugboard_plugin_log_dropped_total",
                &format!("plugin=\"flood\",part=\"{part}\"")
            )
            .await,
            n,
            "{part}"
        );
    }
    let (view, size) = plugin_view(&gw, "flood").await;
    assert!(
        size < 100 * 1024,
        "GET /admin/plugins answered {size} bytes"
    );
    let lines = view["recent_logs"].as_array().unwrap();
    assert!(!lines.is_empty());
    for line in lines {
        assert!(line["message"].as_str().unwrap().len() <= 4096, "{line}");
        assert!(line["fields"].as_array().unwrap().len() <= 16, "{line}");
    }
    // The gateway log holds at most 50 lines of at most ~21 KB for the call.
    let log = gw.log().len();
    assert!(log < 2 * 1024 * 1024, "the gateway logged {log} bytes");
}

/// Whether a line of the text log starts like a record:
/// `2026-12-01T21:22:54.123456Z  INFO target: …`.
fn is_record(line: &str) -> bool {
    let Some((stamp, rest)) = line.split_once(' ') else {
        return false;
    };
    let b = stamp.as_bytes();
    let shaped = b.len() >= 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[10] == b'T'
        && stamp.ends_with('Z');
    let level = rest.trim_start().split(' ').next().unwrap_or_default();
    shaped && ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level)
}

#[tokio::test]
async fn no_client_token_or_plugin_text_forges_a_line_of_the_text_log() {
    let (_rx, gw) = log_flood_gateway("[plugins.config]\nlines = \"2\"\nfields = \"2\"\nstdout_lines = \"1\"\ntext = \"FORGED-PLUGIN\\n1999-01-01 FORGED\\r\\u001b[2K\\u2028\"").await;
    // A token whose header holds a newline (no credentials needed).
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let token = format!(
        "{}.{}.AAAA",
        b64(&json!({ "alg": "HS256\nFORGED-JWT line", "typ": "JWT" })),
        b64(&json!({ "sub": "mallory" }))
    );
    let refused = WsClient::try_connect(&gw, &format!("{}?token={token}", gw.ws_url()), None)
        .await
        .err()
        .expect("the forged token is refused");
    assert_eq!(refused.status, Some(401), "{refused:?}");
    // A percent-encoded user id on the API.
    let (status, _) = gw
        .api(Method::POST, "/v1/users/a%0AFORGED-API%20line/kick", None)
        .await;
    assert!(status < 500, "{status}");
    // A plugin's message, fields and standard output.
    send_message(&gw, "alice", "bob", json!({ "text": "go" })).await;
    let log = wait_until(
        "the plugin's lines and the refusal in the log",
        WAIT,
        || {
            let log = gw.log();
            (log.contains("stdout line 0") && log.contains("FORGED-JWT")).then_some(log)
        },
    )
    .await;
    for line in log.lines() {
        if line.starts_with("plugboard: listening on") {
            continue;
        }
        assert!(is_record(line), "a line that is not a record: {line:?}");
    }
    assert!(
        log.contains("FORGED-PLUGIN\\n1999-01-01 FORGED\\r\\u{1b}[2K\\u{2028}"),
        "the plugin's text is kept, escaped"
    );
}

#[tokio::test]
async fn a_syntax_error_on_a_secret_line_is_shown_without_the_secret() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let secret = "SYNTAX-SECRET-0123456789abcdefghijklmnop";
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let broken: String = text
        .lines()
        .map(|l| {
            if l.starts_with("jwt_secret") {
                format!("jwt_secret = \"{secret}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(broken.contains(secret));
    std::fs::write(&gw.config_path, broken).unwrap();

    let (status, body) = gw.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("not valid TOML") && message.contains("line "),
        "{message}"
    );
    assert!(!body.to_string().contains("SYNTAX-SECRET"), "{body}");
    let log = wait_until("the refused reload in the log", WAIT, || {
        let log = gw.log();
        log.contains("config reload refused").then_some(log)
    })
    .await;
    assert!(!log.contains("SYNTAX-SECRET"), "{log}");

    let out = std::process::Command::new(plugboard_tests::gateway::binary())
        .args(["config", "check", "--config"])
        .arg(&gw.config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not valid TOML"), "{err}");
    assert!(!err.contains("SYNTAX-SECRET"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("SYNTAX-SECRET"));
}

#[tokio::test]
async fn webhook_url_credentials_are_redacted_in_every_output() {
    // A port nothing listens on: every delivery fails with a network error,
    // whose text names the URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://hookuser:HOOKPASS@127.0.0.1:{port}/hooks?token=HOOKTOKEN&x=1");
    let gw = Gateway::start(GatewayOptions::default().extra(&format!(
        "[[webhooks]]\nname = \"creds\"\nurl = {url:?}\nsecret = \"{SECRET}\"\n"
    )))
    .await;
    send_message(&gw, "alice", "bob", json!({ "text": "hi" })).await;
    let view = plugboard_tests::wait_until_admin(&gw, |v| {
        v["endpoints"][0]["last_error"].as_str().is_some()
    })
    .await;
    let endpoint = &view["endpoints"][0];
    assert_eq!(
        endpoint["url"],
        format!("http://***@127.0.0.1:{port}/hooks?token=***&x=***"),
        "{view}"
    );
    assert!(
        endpoint["last_error"]
            .as_str()
            .unwrap()
            .starts_with("request failed: "),
        "{view}"
    );
    let shown = view.to_string();
    for secret in ["hookuser", "HOOKPASS", "HOOKTOKEN"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    let log = wait_until("a failed delivery in the log", WAIT, || {
        let log = gw.log();
        log.contains("will retry").then_some(log)
    })
    .await;
    for secret in ["HOOKPASS", "HOOKTOKEN"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }

    let out = std::process::Command::new(plugboard_tests::gateway::binary())
        .args(["config", "check", "--config"])
        .arg(&gw.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!("127.0.0.1:{port}/hooks?token=***")),
        "{printed}"
    );
    for secret in ["hookuser", "HOOKPASS", "HOOKTOKEN"] {
        assert!(!printed.contains(secret), "{secret} in {printed}");
    }
}

/// A gateway serving plugin `echo` from a copy in a folder of the test's
/// own, with a compile cache of its own.
async fn upload_gateway(plugin_dir: &std::path::Path, cache: &std::path::Path) -> Gateway {
    std::fs::copy(plugins::ECHO_FORMATTER, plugin_dir.join("echo.wasm")).unwrap();
    Gateway::start(GatewayOptions::default().extra(&format!(
        "[plugin_runtime]\ndir = {:?}\ncache_dir = {:?}\n{}",
        plugin_dir.display().to_string(),
        cache.display().to_string(),
        plugin("echo", "echo.wasm", "hooks = [\"webhook-formatter\"]")
    )))
    .await
}

async fn upload(gw: &Gateway, bytes: Vec<u8>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .put(gw.url("/admin/plugins/echo"))
        .bearer_auth(plugboard_tests::gateway::ADMIN_TOKEN)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_upload_writes_nothing_into_the_plugins_folder_nor_through_a_planted_link() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let gw = upload_gateway(dir.path(), cache.path()).await;
    // A link planted where a predictable temporary name would be.
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "untouched").unwrap();
    let planted = dir.path().join(format!("echo.upload{}", gw.pid()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();

    let v2 = std::fs::read(plugins::ECHO_FORMATTER_V2).unwrap();
    let (status, body) = upload(&gw, v2.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["swapped"], true, "{body}");

    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"untouched",
        "the write went through the planted link"
    );
    let file = dir.path().join("echo.wasm");
    assert!(
        std::fs::symlink_metadata(&file)
            .unwrap()
            .file_type()
            .is_file(),
        "the plugin file is a plain file"
    );
    // The upload is kept in storage; the file keeps the file's version.
    assert_eq!(
        std::fs::read(&file).unwrap(),
        std::fs::read(plugins::ECHO_FORMATTER).unwrap()
    );
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expected = vec![
        "echo.wasm".to_string(),
        planted.file_name().unwrap().to_string_lossy().into_owned(),
        "victim.txt".to_string(),
    ];
    expected.sort();
    assert_eq!(left, expected, "nothing was written into the folder");
}

#[tokio::test]
async fn a_refused_upload_leaves_no_compiled_artifact_in_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let gw = upload_gateway(dir.path(), cache.path()).await;
    let cached = || -> Vec<String> {
        std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let serving = crate::plugins::sha256_hex(&std::fs::read(plugins::ECHO_FORMATTER).unwrap());
    assert!(
        cached().iter().any(|f| f.starts_with(&serving)),
        "{:?}",
        cached()
    );
    // Both compile, then are refused: one by its init, one by its exports.
    for refused in [plugins::BAD_INIT, plugins::FILTER_ECHO] {
        let bytes = std::fs::read(refused).unwrap();
        let (status, body) = upload(&gw, bytes.clone()).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], "plugin_refused", "{body}");
        let sha = crate::plugins::sha256_hex(&bytes);
        assert!(
            !cached().iter().any(|f| f.starts_with(&sha)),
            "{refused} left {:?}",
            cached()
        );
    }
    assert!(
        cached().iter().any(|f| f.starts_with(&serving)),
        "the serving version's artifact stays: {:?}",
        cached()
    );
}
