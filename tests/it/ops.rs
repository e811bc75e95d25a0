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
        ("plugboard_lifecycle_events_total", "counter"),
        ("plugboard_handshake_failures_total", "counter"),
        ("plugboard_outbox_depth", "gauge"),
        ("plugboard_webhook_attempts_total", "counter"),
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

/// One `/metrics` body: family types from `# TYPE`, families with `# HELP`,
/// and each sample's name and label names.
struct Exposition {
    types: std::collections::BTreeMap<String, String>,
    helped: std::collections::BTreeSet<String>,
    samples: Vec<(String, Vec<String>)>,
}

fn parse_exposition(text: &str) -> Exposition {
    let mut e = Exposition {
        types: Default::default(),
        helped: Default::default(),
        samples: Vec::new(),
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            assert!(e.helped.contains(name), "# HELP comes before # TYPE {name}");
            let before = e.types.insert(name.to_string(), kind.to_string());
            assert!(before.is_none(), "one # TYPE per family: {name}");
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            e.helped
                .insert(rest.split(' ').next().unwrap_or_default().to_string());
        } else if line.starts_with('#') {
            assert_eq!(line, "# EOF", "an unexpected comment line");
        } else if !line.is_empty() {
            let name_end = line.find(['{', ' ']).expect("a sample has a value");
            let name = line[..name_end].to_string();
            let labels = match line[name_end..].strip_prefix('{') {
                Some(rest) => rest[..rest.find('}').expect("labels close")]
                    .split(',')
                    .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_string()))
                    .collect(),
                None => Vec::new(),
            };
            e.samples.push((name, labels));
        }
    }
    e
}

impl Exposition {
    /// The family a sample belongs to, under each format's naming rules.
    #[track_caller]
    fn family_of(&self, sample: &str, openmetrics: bool) -> String {
        let histogram = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = sample.strip_suffix(suffix)?;
            (self.types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
        });
        if let Some(base) = histogram {
            return base.to_string();
        }
        if openmetrics {
            if let Some(base) = sample.strip_suffix("_total") {
                if self.types.get(base).map(String::as_str) == Some("counter") {
                    return base.to_string();
                }
            }
        }
        assert!(
            self.types.contains_key(sample),
            "sample {sample} has no # TYPE line of its family"
        );
        let kind = &self.types[sample];
        if openmetrics {
            assert_ne!(
                kind, "counter",
                "{sample}: OpenMetrics counter samples end in _total"
            );
        } else if kind == "counter" {
            assert!(
                sample.ends_with("_total"),
                "{sample}: counters end in _total"
            );
        }
        sample.to_string()
    }
}

async fn scrape(gw: &plugboard_tests::Gateway, accept: Option<&str>) -> (String, String) {
    let mut req = reqwest::Client::new().get(gw.url("/metrics"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    (ct, resp.text().await.unwrap())
}

#[tokio::test]
async fn metrics_serve_the_negotiated_format_and_every_family_is_documented() {
    let (gw, rx) = setup("").await;
    // Some labelled samples: a connection's events delivered, a message.
    let c = WsClient::connect(&gw, "mo").await;
    c.close(1000, "");
    rx.assert_exactly_once(&c.connection_id).await;
    let (status, _) = gw
        .api(
            Method::POST,
            "/v1/messages",
            Some(serde_json::json!({"channel_type": "person", "channel_id": "mo", "payload": {}})),
        )
        .await;
    assert_eq!(status, 201);

    // Without Accept (curl) and with text/plain: Prometheus text 0.0.4.
    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let (ct, text) = scrape(&gw, accept).await;
        assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8", "{accept:?}");
        assert!(!text.contains("# EOF"), "text 0.0.4 has no # EOF");
        let e = parse_exposition(&text);
        for (sample, _) in &e.samples {
            e.family_of(sample, false);
        }
        assert_eq!(e.types["plugboard_lifecycle_events_total"], "counter");
    }

    // What Prometheus sends: OpenMetrics.
    let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let (ct, om) = scrape(&gw, Some(prometheus)).await;
    assert_eq!(
        ct,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    let e = parse_exposition(&om);
    for (sample, _) in &e.samples {
        e.family_of(sample, true);
    }
    assert_eq!(e.types["plugboard_lifecycle_events"], "counter");

    // Every family of the 0.0.4 body (named like its samples, as the docs
    // name them) has a row in the metrics reference with its type, and
    // every label seen on its samples is listed there.
    let (_, text) = scrape(&gw, None).await;
    let e = parse_exposition(&text);
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/webhooks.md"))
        .expect("docs/webhooks.md");
    let section = doc
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Metrics section");
    let rows: std::collections::BTreeMap<String, (String, String)> = section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((
                name.to_string(),
                (cells.get(2)?.to_string(), cells.get(3)?.to_string()),
            ))
        })
        .collect();
    assert!(e.types.len() >= 30, "{} families", e.types.len());
    for (family, kind) in &e.types {
        let Some((doc_kind, doc_labels)) = rows.get(family) else {
            panic!("{family} ({kind}) is served but not documented in docs/webhooks.md#metrics");
        };
        assert_eq!(doc_kind, kind, "documented type of {family}");
        for (sample, labels) in &e.samples {
            if &e.family_of(sample, false) != family {
                continue;
            }
            for label in labels.iter().filter(|l| *l != "le") {
                assert!(
                    doc_labels.contains(&format!("`{label}`")),
                    "{family}: label `{label}` is not documented"
                );
            }
        }
    }
    // And nothing is documented that is not served.
    for name in rows.keys() {
        assert!(
            e.types.contains_key(name),
            "{name} is documented but not served"
        );
    }
}
