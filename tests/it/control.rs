//! Business control messages: online-only and persisted delivery, priority
//! order, expiry, receipts, idempotency, a 10,000-target batch, group
//! subsets, bad requests, signatures, rate limits, the control-handler
//! policy and durability across SIGKILL.

use hmac::{Hmac, Mac};
use plugboard_tests::{plugins, Gateway, GatewayOptions, Receiver, WsClient, WAIT};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::messaging::create_group;
use crate::setup;

/// `POST /v1/control`.
async fn control(gw: &Gateway, body: Value) -> (u16, Value) {
    gw.api(Method::POST, "/v1/control", Some(body)).await
}

/// Sends an online-only control of `kind` to `user` and returns the frame
/// the user's client reads next, which must be that control: proof that
/// nothing else was queued before it.
async fn sentinel(gw: &Gateway, c: &mut WsClient, user: &str) {
    let (s, b) = control(
        gw,
        json!({"kind": "sentinel", "payload": {}, "targets": {"users": [user]}}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let f = c.next_of("control").await;
    assert_eq!(
        f["kind"], "sentinel",
        "expected nothing before the sentinel, got {f}"
    );
}

fn statuses(answer: &Value) -> Vec<(String, String)> {
    answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["user_id"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn online_only_controls_reach_exactly_the_online_targets() {
    let (gw, rx) = setup("").await;
    let mut a1 = WsClient::connect_device(&gw, "a", "phone").await;
    let mut a2 = WsClient::connect_device(&gw, "a", "web").await;
    let mut b = WsClient::connect(&gw, "b").await;
    let (s, answer) = control(
        &gw,
        json!({"kind": "profile.changed", "payload": {"fields": ["avatar"]}, "targets": {"users": ["a", "b", "c", "a"]}}),
    )
    .await;
    assert_eq!(s, 200, "{answer}");
    let id = answer["control_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ctl_"));
    assert_eq!(
        statuses(&answer),
        vec![
            ("a".into(), "delivered".into()),
            ("b".into(), "delivered".into()),
            ("c".into(), "offline".into())
        ]
    );
    assert_eq!(answer["results"][0]["devices"], 2);
    assert_eq!(
        answer["summary"],
        json!({"targets": 3, "delivered": 2, "stored": 0, "offline": 1, "rejected": 0})
    );
    for c in [&mut a1, &mut a2, &mut b] {
        let f = c.next_of("control").await;
        assert_eq!(f["control_id"], id.as_str());
        assert_eq!(f["kind"], "profile.changed");
        assert_eq!(f["payload"], json!({"fields": ["avatar"]}));
        assert_eq!(f["priority"], "normal");
        assert_eq!(f["receipt"], false);
    }
    let events = rx
        .wait_for("two control.delivered events", WAIT, |d| {
            let e: Vec<_> = d
                .iter()
                .filter(|e| e.event_type == "control.delivered")
                .cloned()
                .collect();
            (e.len() == 2).then_some(e)
        })
        .await;
    let mut users: Vec<&str> = events.iter().map(|e| e.str("user_id")).collect();
    users.sort();
    assert_eq!(users, vec!["a", "b"]);
    assert_eq!(events[0].str("control_id"), id);
    // c was offline: connecting later brings nothing of it.
    let mut c = WsClient::connect(&gw, "c").await;
    sentinel(&gw, &mut c, "c").await;
    // Every online user.
    let (s, all) = control(&gw, json!({"kind": "maintenance", "payload": null, "targets": {"online": true}, "priority": "high"})).await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(all["summary"]["delivered"], 3, "{all}");
    for cl in [&mut a1, &mut a2, &mut b, &mut c] {
        let f = cl.next_of("control").await;
        assert_eq!(
            (f["kind"].as_str(), f["priority"].as_str()),
            (Some("maintenance"), Some("high"))
        );
    }
}

#[tokio::test]
async fn persisted_controls_arrive_on_connect_in_priority_order_until_they_expire() {
    let (gw, rx) = setup("[control]\nexpiry_interval = \"50ms\"\n").await;
    let post = |kind: &'static str, priority: &'static str, ttl: u64| {
        let gw = &gw;
        async move {
            let (s, b) = control(
                gw,
                json!({"kind": kind, "payload": {"k": kind}, "targets": {"users": ["d"]}, "priority": priority,
                    "reliability": "persisted", "ttl_ms": ttl}),
            )
            .await;
            assert_eq!(s, 200, "{b}");
            assert_eq!(statuses(&b), vec![("d".to_string(), "stored".to_string())]);
            b
        }
    };
    post("low-1", "low", 60_000).await;
    post("normal-1", "normal", 60_000).await;
    post("high-1", "high", 60_000).await;
    post("short", "high", 100).await;
    post("high-2", "high", 60_000).await;
    // The short-lived one expires undelivered, with an event.
    let expired = rx
        .wait_for("control.expired", WAIT, |d| {
            d.iter()
                .find(|e| e.event_type == "control.expired")
                .cloned()
        })
        .await;
    assert_eq!(
        (expired.str("kind"), expired.str("user_id")),
        ("short", "d")
    );
    let mut d = WsClient::connect(&gw, "d").await;
    let mut kinds = Vec::new();
    for _ in 0..4 {
        let f = d.next_of("control").await;
        assert_eq!(f["persisted"], true);
        kinds.push(f["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds, vec!["high-1", "high-2", "normal-1", "low-1"]);
    sentinel(&gw, &mut d, "d").await;
    rx.wait_for("four delivered events for d", WAIT, |ev| {
        (ev.iter()
            .filter(|e| e.event_type == "control.delivered" && e.str("user_id") == "d")
            .count()
            >= 4)
            .then_some(())
    })
    .await;
    // Delivered once: the next connection gets nothing again.
    d.close(1000, "");
    d.closed().await;
    let mut d = WsClient::connect(&gw, "d").await;
    sentinel(&gw, &mut d, "d").await;
}

#[tokio::test]
async fn receipts_produce_acked_events_and_unacked_persisted_controls_come_again() {
    let (gw, rx) = setup("").await;
    let mut e = WsClient::connect_device(&gw, "e", "tablet").await;
    let (_, answer) = control(&gw, json!({"kind": "refresh", "payload": {"screen": "home"}, "targets": {"users": ["e"]}, "receipt": true})).await;
    let id = answer["control_id"].as_str().unwrap().to_string();
    let f = e.next_of("control").await;
    assert_eq!(f["receipt"], true);
    e.send_json(json!({"type": "ack", "control_id": id}));
    let acked = rx
        .wait_for("control.acked", WAIT, |d| {
            d.iter().find(|e| e.event_type == "control.acked").cloned()
        })
        .await;
    assert_eq!(
        (
            acked.str("control_id"),
            acked.str("user_id"),
            acked.str("device_id")
        ),
        (id.as_str(), "e", "tablet")
    );

    // A persisted control with a receipt is sent again at each connect until acked.
    let (_, answer) = control(
        &gw,
        json!({"kind": "must-see", "payload": {}, "targets": {"users": ["f"]}, "receipt": true, "reliability": "persisted"}),
    )
    .await;
    let id = answer["control_id"].as_str().unwrap().to_string();
    let mut f = WsClient::connect(&gw, "f").await;
    let first = f.next_of("control").await;
    assert_eq!(first["control_id"], id.as_str());
    f.close(1000, "");
    f.closed().await;
    let mut f = WsClient::connect(&gw, "f").await;
    let again = f.next_of("control").await;
    assert_eq!(
        (again["control_id"].as_str(), again["redelivery"].as_bool()),
        (Some(id.as_str()), Some(true))
    );
    f.send_json(json!({"type": "ack", "control_id": id}));
    // A second ack changes nothing.
    f.send_json(json!({"type": "ack", "control_id": id}));
    rx.wait_for("f's receipt", WAIT, |d| {
        d.iter()
            .find(|e| e.event_type == "control.acked" && e.str("user_id") == "f")
            .cloned()
    })
    .await;
    f.close(1000, "");
    f.closed().await;
    let mut f = WsClient::connect(&gw, "f").await;
    sentinel(&gw, &mut f, "f").await;
    // Events of one user arrive in order: once the sentinel's is in, a
    // second acked event would be too.
    rx.wait_for("the sentinel delivered to f", WAIT, |d| {
        d.iter()
            .find(|e| {
                e.event_type == "control.delivered"
                    && e.str("user_id") == "f"
                    && e.str("kind") == "sentinel"
            })
            .cloned()
    })
    .await;
    let acks = rx
        .delivered()
        .iter()
        .filter(|e| e.event_type == "control.acked" && e.str("user_id") == "f")
        .count();
    assert_eq!(acks, 1);
}

#[tokio::test]
async fn a_repeated_idempotency_key_does_not_deliver_twice() {
    let (gw, _rx) = setup("").await;
    let mut g = WsClient::connect(&gw, "g").await;
    let body = json!({"kind": "once", "payload": {}, "targets": {"users": ["g"]}, "idempotency_key": "job-42"});
    let (s1, first) = control(&gw, body.clone()).await;
    let (s2, second) = control(&gw, body).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["control_id"], first["control_id"]);
    assert_eq!(second["results"], first["results"]);
    assert_eq!(g.next_of("control").await["kind"], "once");
    sentinel(&gw, &mut g, "g").await;
}

#[tokio::test]
async fn a_ten_thousand_target_batch_completes_with_a_result_per_target() {
    let (gw, rx) = setup("").await;
    let mut online = Vec::new();
    for u in ["u0", "u4999", "u9999"] {
        online.push(WsClient::connect(&gw, u).await);
    }
    let users: Vec<String> = (0..10_000).map(|i| format!("u{i}")).collect();
    let (s, answer) = control(
        &gw,
        json!({"kind": "bulk", "payload": {"n": 1}, "targets": {"users": users}}),
    )
    .await;
    assert_eq!(s, 200, "{}", answer["error"]);
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 10_000);
    for (i, r) in results.iter().enumerate() {
        let user = format!("u{i}");
        assert_eq!(r["user_id"], user.as_str());
        let want = if ["u0", "u4999", "u9999"].contains(&user.as_str()) {
            "delivered"
        } else {
            "offline"
        };
        assert_eq!(r["status"], want, "{r}");
    }
    assert_eq!(answer["summary"]["delivered"], 3);
    for c in online.iter_mut() {
        assert_eq!(c.next_of("control").await["kind"], "bulk");
    }
    rx.wait_for("three delivered events", WAIT, |d| {
        (d.iter()
            .filter(|e| e.event_type == "control.delivered")
            .count()
            == 3)
            .then_some(())
    })
    .await;
    // One more than the documented limit is refused whole.
    let users: Vec<String> = (0..10_001).map(|i| format!("u{i}")).collect();
    let (s, b) = control(
        &gw,
        json!({"kind": "bulk", "payload": {}, "targets": {"users": users}}),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("too_many_targets")),
        "{b}"
    );
}

#[tokio::test]
async fn a_group_target_with_a_member_subset_reaches_only_that_subset() {
    let (gw, _rx) = setup("").await;
    create_group(&gw, "crew", &["m1", "m2", "m3", "m4"]).await;
    let mut clients = Vec::new();
    for m in ["m1", "m2", "m3", "m4"] {
        clients.push(WsClient::connect(&gw, m).await);
    }
    let (s, answer) = control(
        &gw,
        json!({"kind": "role.changed", "payload": {}, "targets": {"group": "crew", "members": ["m1", "m3", "stranger"]}}),
    )
    .await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(
        statuses(&answer),
        vec![
            ("m1".into(), "delivered".into()),
            ("m3".into(), "delivered".into()),
            ("stranger".into(), "rejected".into())
        ]
    );
    assert_eq!(
        answer["results"][2]["reason"],
        "not a member of group `crew`"
    );
    assert_eq!(clients[0].next_of("control").await["kind"], "role.changed");
    assert_eq!(clients[2].next_of("control").await["kind"], "role.changed");
    for (i, m) in [(1, "m2"), (3, "m4")] {
        sentinel(&gw, &mut clients[i], m).await;
    }
    // The whole group.
    let (_, all) = control(
        &gw,
        json!({"kind": "all", "payload": {}, "targets": {"group": "crew"}}),
    )
    .await;
    assert_eq!(all["summary"]["delivered"], 4);
    let (s, b) = control(
        &gw,
        json!({"kind": "x", "payload": {}, "targets": {"group": "nope"}}),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("unknown_channel"))
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_deliver_nothing() {
    let extra = format!(
        "[control]\nmax_targets = 5\nmax_payload_size = \"1KiB\"\n[[plugins]]\nname = \"echo\"\nfile = {:?}\n",
        plugins::CONTROL_ECHO
    );
    let (gw, rx) = setup(&extra).await;
    let mut h = WsClient::connect(&gw, "h").await;
    let check = |body: Value, status: u16, code: &'static str| {
        let gw = &gw;
        async move {
            let (s, b) = control(gw, body).await;
            assert_eq!(
                (s, b["error"]["code"].as_str()),
                (status, Some(code)),
                "{b}"
            );
            b
        }
    };
    let b = check(
        json!({"kind": "forbidden", "payload": {}, "targets": {"users": ["h"]}}),
        422,
        "rejected",
    )
    .await;
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kind forbidden rejected on purpose"),
        "{b}"
    );
    let rejected = rx
        .wait_for("control.rejected", WAIT, |d| {
            d.iter()
                .find(|e| e.event_type == "control.rejected")
                .cloned()
        })
        .await;
    assert_eq!(
        (rejected.str("kind"), rejected.str("plugin")),
        ("forbidden", "echo")
    );
    check(
        json!({"kind": "k", "payload": {"x": "y".repeat(2000)}, "targets": {"users": ["h"]}}),
        413,
        "payload_too_large",
    )
    .await;
    check(
        json!({"kind": "k", "payload": {}, "targets": {"users": ["1", "2", "3", "4", "5", "6"]}}),
        413,
        "too_many_targets",
    )
    .await;
    check(
        json!({"kind": "k", "payload": {}, "targets": {}}),
        400,
        "bad_request",
    )
    .await;
    check(
        json!({"kind": "k", "payload": {}, "targets": {"users": ["h"], "online": true}}),
        400,
        "bad_request",
    )
    .await;
    check(
        json!({"kind": "", "payload": {}, "targets": {"users": ["h"]}}),
        400,
        "bad_request",
    )
    .await;
    check(
        json!({"kind": "k", "payload": {}, "targets": {"users": ["h"]}, "ttl_ms": 5}),
        400,
        "bad_request",
    )
    .await;
    check(
        json!({"kind": "k", "payload": {}, "targets": {"users": ["h"]}, "priority": "urgent"}),
        422,
        "bad_request",
    )
    .await;
    check(
        json!({"kind": "k", "targets": {"users": ["h"]}}),
        422,
        "bad_request",
    )
    .await;
    sentinel(&gw, &mut h, "h").await;
}

/// The `plugboard-signature` header for the signed text `signed`.
fn sign_text(secret: &str, signed: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signed.as_bytes());
    format!("v1={}", plugboard::hex(&mac.finalize().into_bytes()))
}

fn sign(secret: &str, ts: i64, body: &str) -> String {
    sign_text(secret, &format!("{ts}.{body}"))
}

#[tokio::test]
async fn signatures_are_required_when_configured_and_replays_are_refused() {
    let secret = "control-signing-secret-0123";
    let (gw, _rx) = setup(&format!(
        "[control]\nrequire_signature = true\nsigning_secret = \"{secret}\"\n"
    ))
    .await;
    let mut i = WsClient::connect(&gw, "i").await;
    let body = json!({"kind": "signed", "payload": {}, "targets": {"users": ["i"]}}).to_string();
    let send = |ts: Option<String>, sig: Option<String>, body: String| {
        let gw = &gw;
        async move {
            let mut req = reqwest::Client::new()
                .post(gw.url("/v1/control"))
                .bearer_auth(plugboard_tests::gateway::API_KEY)
                .header("content-type", "application/json")
                .body(body);
            if let Some(ts) = ts {
                req = req.header("plugboard-timestamp", ts);
            }
            if let Some(sig) = sig {
                req = req.header("plugboard-signature", sig);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (s, b) = send(None, None, body.clone()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("bad_signature")),
        "{b}"
    );
    let (s, b) = send(
        Some(now.to_string()),
        Some(sign("wrong-secret-0123456789", now, &body)),
        body.clone(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("bad_signature")),
        "{b}"
    );
    // A signature over another body does not cover this one.
    let (s, b) = send(
        Some(now.to_string()),
        Some(sign(secret, now, "{}")),
        body.clone(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("bad_signature")),
        "{b}"
    );
    let old = now - 3600;
    let (s, b) = send(
        Some(old.to_string()),
        Some(sign(secret, old, &body)),
        body.clone(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("bad_signature")),
        "{b}"
    );
    let good = sign(secret, now, &body);
    let (s, b) = send(Some(now.to_string()), Some(good.clone()), body.clone()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(i.next_of("control").await["kind"], "signed");
    let (s, b) = send(Some(now.to_string()), Some(good), body.clone()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("replayed_request")),
        "{b}"
    );
    // Nothing was delivered by the refused requests: the next frame is a new signed control.
    let body2 = json!({"kind": "sentinel", "payload": {}, "targets": {"users": ["i"]}}).to_string();
    let (s, _) = send(
        Some(now.to_string()),
        Some(sign(secret, now, &body2)),
        body2.clone(),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(i.next_of("control").await["kind"], "sentinel");
}

#[tokio::test]
async fn each_api_key_is_rate_limited() {
    let (gw, _rx) = setup("[control]\nrate_limit = 0.1\nrate_burst = 2\n").await;
    let body = json!({"kind": "k", "payload": {}, "targets": {"users": ["j"]}});
    for _ in 0..2 {
        let (s, _) = control(&gw, body.clone()).await;
        assert_eq!(s, 200);
    }
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/control"))
        .bearer_auth(plugboard_tests::gateway::API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["error"]["code"], "rate_limited");
    // Other endpoints are not limited.
    let (s, _) = gw.api(Method::GET, "/v1/users/j/presence", None).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn a_trapping_control_handler_follows_its_policy() {
    let rx = Receiver::start().await;
    let opts = |on_error: &str| {
        GatewayOptions::with_receiver(&rx.url).extra(&format!(
            "[[plugins]]\nname = \"trap\"\nfile = {:?}\n{on_error}\n",
            plugins::CONTROL_TRAP
        ))
    };
    // No on_error: control-handler defaults to fail-closed.
    let gw = Gateway::start(opts("")).await;
    let mut k = WsClient::connect(&gw, "k").await;
    let body = json!({"kind": "k", "payload": {}, "targets": {"users": ["k"]}});
    let (s, b) = control(&gw, body.clone()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (503, Some("control_handler_failed")),
        "{b}"
    );
    let (s, b) = gw.reload_with(&opts("on_error = \"fail-open\"")).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = control(
        &gw,
        json!({"kind": "after", "payload": {}, "targets": {"users": ["k"]}}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // The refused request delivered nothing: the first frame is the later one.
    assert_eq!(k.next_of("control").await["kind"], "after");
}

#[tokio::test]
async fn persisted_controls_survive_sigkill() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let (s, b) = control(
        &gw,
        json!({"kind": "survivor", "payload": {"n": 7}, "targets": {"users": ["z"]}, "reliability": "persisted", "ttl_ms": 600000}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let handle = gw.restart_handle();
    gw.kill().await;
    let gw = handle.restart().await;
    let mut z = WsClient::connect(&gw, "z").await;
    let f = z.next_of("control").await;
    assert_eq!(
        (f["kind"].as_str(), f["payload"]["n"].as_u64()),
        (Some("survivor"), Some(7))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_handlers_check_kinds_limit_users_and_target_roles() {
    let extra = format!(
        "[[plugins]]\nname = \"rules\"\nfile = {:?}\norder = 1\n[plugins.config]\nkinds = \"profile.*,feature.toggled,sentinel\"\n\"required.profile.changed\" = \"user_id\"\nmax_per_user = \"2\"\n\
         [[plugins]]\nname = \"roles\"\nfile = {:?}\norder = 2\ninit_deadline = \"30s\"\ndeadline = \"5s\"\n",
        plugins::CONTROL_RULES,
        plugins::ROLE_TARGETS
    );
    let (gw, _rx) = setup(&extra).await;
    let (s, b) = control(
        &gw,
        json!({"kind": "chat.spam", "payload": {}, "targets": {"users": ["r1"]}}),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (422, Some("rejected")),
        "{b}"
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown kind `chat.spam`"),
        "{b}"
    );
    let (s, b) = control(
        &gw,
        json!({"kind": "profile.changed", "payload": {"name": "x"}, "targets": {"users": ["r1"]}}),
    )
    .await;
    assert_eq!(s, 422);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lacks `user_id`"),
        "{b}"
    );
    // Two per user per window, counted in the plugin's key-value store.
    for _ in 0..2 {
        let (s, b) = control(
            &gw,
            json!({"kind": "feature.toggled", "payload": {}, "targets": {"users": ["r1", "r2"]}}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, b) = control(
        &gw,
        json!({"kind": "feature.toggled", "payload": {}, "targets": {"users": ["r1", "r3"]}}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        statuses(&b),
        vec![
            ("r3".into(), "offline".into()),
            ("r1".into(), "rejected".into())
        ]
    );
    assert_eq!(
        b["results"][1]["reason"],
        "removed by control handler `rules`"
    );

    // The Python handler narrows a group to the members with a role.
    create_group(&gw, "crew2", &["p1", "p2", "p3"]).await;
    let (s, _) = gw
        .admin(
            Method::PUT,
            "/admin/plugins/roles/kv/roles:crew2",
            Some(json!({"p1": "admin", "p2": "member", "p3": "admin"})),
        )
        .await;
    assert_eq!(s, 200);
    let mut p2 = WsClient::connect(&gw, "p2").await;
    let mut p3 = WsClient::connect(&gw, "p3").await;
    let (s, b) = control(
        &gw,
        json!({"kind": "profile.audit", "payload": {"roles": ["admin"]}, "targets": {"group": "crew2"}}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let mut got = statuses(&b);
    got.sort();
    assert_eq!(
        got,
        vec![
            ("p1".into(), "offline".into()),
            ("p2".into(), "rejected".into()),
            ("p3".into(), "delivered".into())
        ]
    );
    assert_eq!(p3.next_of("control").await["kind"], "profile.audit");
    sentinel(&gw, &mut p2, "p2").await;
    let (s, b) = control(&gw, json!({"kind": "profile.audit", "payload": {"roles": ["admin"]}, "targets": {"users": ["p1"]}})).await;
    assert_eq!(s, 422, "{b}");
}

#[tokio::test]
async fn an_idempotency_key_reused_for_another_request_is_refused() {
    let (gw, _rx) = setup("").await;
    let mut r = WsClient::connect(&gw, "r").await;
    let first = json!({"kind": "once", "payload": {"n": 1}, "targets": {"users": ["r"]},
                       "idempotency_key": "job-7"});
    let (s, answer) = control(&gw, first.clone()).await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(r.next_of("control").await["payload"], json!({"n": 1}));
    // The same request again (its payload spaced and ordered differently
    // still counts as the same) is a repeat.
    let (s, again) = control(
        &gw,
        json!({"idempotency_key": "job-7", "targets": {"users": ["r"]}, "payload": {"n": 1}, "kind": "once"}),
    )
    .await;
    assert_eq!((s, &again["duplicate"]), (200, &json!(true)), "{again}");
    // Any other field changed under the same key: refused, nothing sent.
    for other in [
        json!({"kind": "once", "payload": {"n": 2}, "targets": {"users": ["r"]}, "idempotency_key": "job-7"}),
        json!({"kind": "twice", "payload": {"n": 1}, "targets": {"users": ["r"]}, "idempotency_key": "job-7"}),
        json!({"kind": "once", "payload": {"n": 1}, "targets": {"users": ["s"]}, "idempotency_key": "job-7"}),
        json!({"kind": "once", "payload": {"n": 1}, "targets": {"users": ["r"]}, "priority": "high", "idempotency_key": "job-7"}),
    ] {
        let (s, b) = control(&gw, other.clone()).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (422, Some("idempotency_key_reused")),
            "{other}: {b}"
        );
    }
    sentinel(&gw, &mut r, "r").await;
}

fn sign_with_nonce(secret: &str, ts: i64, nonce: &str, body: &str) -> String {
    sign_text(secret, &format!("{ts}.{nonce}.{body}"))
}

#[tokio::test]
async fn a_nonce_lets_a_signed_request_be_sent_twice_in_one_second() {
    let secret = "control-signing-secret-0123";
    let (gw, _rx) = setup(&format!(
        "[control]\nrequire_signature = true\nsigning_secret = \"{secret}\"\n"
    ))
    .await;
    let mut n = WsClient::connect(&gw, "n").await;
    let body = json!({"kind": "tick", "payload": {}, "targets": {"users": ["n"]}}).to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let send_body = |nonce: Option<&'static str>, sig: String, body: String| {
        let gw = &gw;
        async move {
            let mut req = reqwest::Client::new()
                .post(gw.url("/v1/control"))
                .bearer_auth(plugboard_tests::gateway::API_KEY)
                .header("content-type", "application/json")
                .header("plugboard-timestamp", ts.to_string())
                .header("plugboard-signature", sig)
                .body(body);
            if let Some(nonce) = nonce {
                req = req.header("plugboard-nonce", nonce);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let send = |nonce, sig| send_body(nonce, sig, body.clone());
    // The same body, the same second, two nonces: two requests, two controls.
    for nonce in ["req-1", "req-2"] {
        let (s, b) = send(Some(nonce), sign_with_nonce(secret, ts, nonce, &body)).await;
        assert_eq!(s, 200, "{nonce}: {b}");
        assert_eq!(n.next_of("control").await["kind"], "tick");
    }
    // A nonce used again with the same signature is still a replay.
    let (s, b) = send(Some("req-1"), sign_with_nonce(secret, ts, "req-1", &body)).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("replayed_request")),
        "{b}"
    );
    // The nonce is signed: another nonce under the first one's signature
    // fails, and so does a signature without the nonce it was made with.
    for (nonce, sig) in [
        (Some("req-3"), sign_with_nonce(secret, ts, "req-1", &body)),
        (None, sign_with_nonce(secret, ts, "req-4", &body)),
        (
            Some("bad nonce"),
            sign_with_nonce(secret, ts, "bad nonce", &body),
        ),
    ] {
        let (s, b) = send(nonce, sig).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (401, Some("bad_signature")),
            "{nonce:?}: {b}"
        );
    }
    // Nothing was delivered by the refused requests.
    let last = json!({"kind": "sentinel", "payload": {}, "targets": {"users": ["n"]}}).to_string();
    let sig = sign_with_nonce(secret, ts, "req-5", &last);
    let (s, b) = send_body(Some("req-5"), sig, last.clone()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(n.next_of("control").await["kind"], "sentinel");
}
