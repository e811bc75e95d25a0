//! Operations: health, readiness, metrics, credentials on the APIs.

use plugboard_tests::WsClient;
use reqwest::Method;

use crate::setup;

#[tokio::test]
async fn health_readiness_metrics_and_admin_views() {
    let (gw, rx) = setup("").await;
    assert_eq!(gw.get_text("/healthz").await.0, 200);
    let (status, body) = gw.get_text("/readyz").await;
    assert_eq!(status, 200, "{body}");

    let c = WsClient::connect_device(&gw, "pat", "tablet").await;
    let (status, conns) = gw.admin(Method::GET, "/admin/connections", None).await;
    assert_eq!(status, 200);
    assert_eq!(conns["count"], 1);
    assert_eq!(
        conns["connections"][0]["connection_id"],
        c.connection_id.as_str()
    );
    assert_eq!(conns["connections"][0]["device_id"], "tablet");
    assert_eq!(gw.metric("plugboard_connections_open", "").await, 1.0);

    c.close(1000, "");
    rx.assert_exactly_once(&c.connection_id).await;
    let (_, text) = gw.get_text("/metrics").await;
    for (name, kind) in [
        ("plugboard_connections_open", "gauge"),
        ("plugboard_lifecycle_events", "counter"),
        ("plugboard_handshake_failures", "counter"),
        ("plugboard_outbox_depth", "gauge"),
        ("plugboard_webhook_attempts", "counter"),
        ("plugboard_webhook_latency_seconds", "histogram"),
        ("plugboard_webhook_event_lag_seconds", "histogram"),
        ("plugboard_storage_commit_seconds", "histogram"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "metrics lack {name} ({kind})"
        );
    }
    assert!(
        text.contains("plugboard_webhook_latency_seconds_bucket{"),
        "latency histogram has samples"
    );
    assert_eq!(
        gw.metric(
            "plugboard_lifecycle_events_total",
            "reason=\"client_close\""
        )
        .await,
        1.0
    );
    assert!(
        gw.metric("plugboard_webhook_attempts_total", "outcome=\"success\"")
            .await
            >= 3.0
    );
}

#[tokio::test]
async fn apis_require_their_credentials() {
    let (gw, _rx) = setup("").await;
    let http = reqwest::Client::new();
    for (path, method) in [
        ("/admin/connections", Method::GET),
        ("/admin/reload", Method::POST),
        ("/admin/webhooks", Method::GET),
        ("/v1/users/u/presence", Method::GET),
        ("/v1/users/u/kick", Method::POST),
    ] {
        let resp = http
            .request(method.clone(), gw.url(path))
            .send()
            .await
            .unwrap();
        check_unauthorized(resp, &format!("{path} without credentials")).await;
        let resp = http
            .request(method, gw.url(path))
            .bearer_auth("wrong-key-0123456789")
            .send()
            .await
            .unwrap();
        check_unauthorized(resp, &format!("{path} with a wrong key")).await;
    }
    // The API key is not an admin token.
    let resp = http
        .get(gw.url("/admin/connections"))
        .bearer_auth(plugboard_tests::gateway::API_KEY)
        .send()
        .await
        .unwrap();
    check_unauthorized(resp, "the admin API with the API key").await;
    let (status, body) = gw.get_text("/no/such/route").await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
}

/// `401` with `WWW-Authenticate: Bearer` and the `unauthorized` code.
async fn check_unauthorized(resp: reqwest::Response, what: &str) {
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (status, challenge.as_deref(), body["error"]["code"].as_str()),
        (401, Some("Bearer"), Some("unauthorized")),
        "{what}: {body}"
    );
}
