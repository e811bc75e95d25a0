//! Limits on everything the gateway builds and accepts: pages cut to fit a
//! frame (message sync, conversation lists with last messages), a frame
//! too large for one connection answered with an error instead of killing
//! it, the nesting limit on payloads (refused at the door, kept byte for
//! byte when accepted), and plugin output held to the API's limits
//! (control-handler payloads and targets, conversation-filter previews).

use std::collections::BTreeMap;

use futures_util::{SinkExt, StreamExt};
use plugboard_tests::gateway::API_KEY;
use plugboard_tests::{plugins, Gateway, GatewayOptions, WsClient, WAIT};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::setup;

/// The nesting limit of `host/src/json.rs` (docs/protocol.md, "Limits").
const MAX_DEPTH: usize = 64;

/// A payload of about `bytes` bytes that names its number.
fn large_payload(n: usize, bytes: usize) -> Value {
    json!({"text": format!("message {n}"), "blob": "x".repeat(bytes)})
}

/// Sends `payload` from `from` to person `to` through the server API.
async fn api_send(gw: &Gateway, from: &str, to: &str, payload: Value) -> Value {
    let (s, b) = gw
        .api(
            Method::POST,
            "/v1/messages",
            Some(json!({"from": from, "channel_type": "person", "channel_id": to, "payload": payload})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    b
}

/// Pages through a message sync over the WebSocket until `more` is false;
/// returns every page.
async fn ws_pages(c: &mut WsClient, mut frame: Value, next_field: &str, pos: &str) -> Vec<Value> {
    let mut pages = Vec::new();
    loop {
        frame["type"] = json!("sync");
        let page = c.request(frame.clone()).await;
        assert_eq!(page["type"], "messages", "{page}");
        let more = page["more"].as_bool().unwrap();
        frame[pos] = page[next_field].clone();
        pages.push(page);
        if !more {
            return pages;
        }
        assert!(pages.len() < 100, "the sync never ends");
    }
}

/// The `text` of every message of `pages`, in order.
fn texts(pages: &[Value]) -> Vec<String> {
    pages
        .iter()
        .flat_map(|p| p["messages"].as_array().unwrap().iter())
        .map(|m| m["payload"]["text"].as_str().unwrap().to_string())
        .collect()
}

fn expected(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("message {i}")).collect()
}

#[tokio::test]
async fn a_sync_of_many_large_messages_pages_through_to_the_end() {
    let (gw, _rx) = setup("").await;
    // 80 messages of ~15 KB (under the 16 KiB payload limit) while alice is
    // offline: one 100-message page of them would be over 1.2 MB.
    let n = 80;
    for i in 1..=n {
        api_send(&gw, "bob", "alice", large_payload(i, 15_000)).await;
    }
    let mut alice = WsClient::connect(&gw, "alice").await;

    // The per-user cursor, from the start.
    let pages = ws_pages(
        &mut alice,
        json!({"after_version": 0}),
        "next_after_version",
        "after_version",
    )
    .await;
    assert!(pages.len() >= 2, "{} pages", pages.len());
    assert_eq!(texts(&pages), expected(n));
    for p in &pages[..pages.len() - 1] {
        assert_eq!(p["more"], true);
        assert!(p["messages"].as_array().unwrap().len() < 100);
    }

    // One channel by sequence number, forwards…
    let channel = json!({"channel_type": "person", "channel_id": "bob"});
    let mut frame = channel.clone();
    frame["after_seq"] = json!(0);
    let pages = ws_pages(&mut alice, frame, "next_after_seq", "after_seq").await;
    assert_eq!(texts(&pages), expected(n));

    // …and backwards through history: newest page first, each page in order.
    let mut frame = channel.clone();
    frame["before_seq"] = json!(n + 1);
    let pages = ws_pages(&mut alice, frame, "next_before_seq", "before_seq").await;
    assert!(pages.len() >= 2);
    let mut back: Vec<String> = Vec::new();
    for p in pages.iter().rev() {
        back.extend(texts(std::slice::from_ref(p)));
    }
    assert_eq!(back, expected(n));

    // The server API pages the same way.
    let mut after = 0u64;
    let mut all = Vec::new();
    loop {
        let (s, page) = gw
            .api(
                Method::GET,
                &format!("/v1/users/alice/messages?after_version={after}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{page}");
        all.push(page.clone());
        after = page["next_after_version"].as_u64().unwrap();
        if page["more"] == false {
            break;
        }
    }
    assert!(all.len() >= 2);
    assert_eq!(texts(&all), expected(n));

    // The connection is still open and answering.
    let pong = alice.request(json!({"type": "ping"})).await;
    assert_eq!(pong["event"], "heartbeat", "{pong}");
}

#[tokio::test]
async fn conversation_pages_with_last_messages_fit_a_frame() {
    let (gw, _rx) = setup("").await;
    // Four conversations of twenty ~15 KB messages: ~300 KB each with their
    // last messages, over 1.2 MB for the four.
    let senders = ["s1", "s2", "s3", "s4"];
    for from in senders {
        for i in 1..=20 {
            api_send(&gw, from, "alice", large_payload(i, 15_000)).await;
        }
    }
    let mut alice = WsClient::connect(&gw, "alice").await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut frame = json!({"type": "sync_conversations", "last_messages": 20});
    let mut pages = 0;
    loop {
        let page = alice.request(frame.clone()).await;
        assert_eq!(page["type"], "conversations", "{page}");
        pages += 1;
        for c in page["conversations"].as_array().unwrap() {
            let id = c["channel_id"].as_str().unwrap().to_string();
            let messages = c["messages"].as_array().unwrap();
            assert_eq!(messages.len(), 20, "{id}");
            assert_eq!(messages[19]["payload"]["text"], "message 20");
            *seen.entry(id).or_default() += 1;
        }
        if page["more"] == false {
            break;
        }
        frame["cursor"] = page["cursor"].clone();
        assert!(pages < 20, "the list never ends");
    }
    assert!(pages >= 2, "{pages} pages");
    let expect: BTreeMap<String, usize> = senders.iter().map(|s| (s.to_string(), 1)).collect();
    assert_eq!(seen, expect);
    let pong = alice.request(json!({"type": "ping"})).await;
    assert_eq!(pong["event"], "heartbeat", "{pong}");
}

#[tokio::test]
async fn a_frame_too_large_for_a_connection_is_answered_with_an_error_not_a_close() {
    let (gw, rx) = setup("").await;
    // alice opens under the default limits: her connection writes frames of
    // at most 1 MiB.
    let mut alice = WsClient::connect(&gw, "alice").await;
    let opts = GatewayOptions::with_receiver(&rx.url).extra(
        "[gateway]\nmax_message_size = \"2MiB\"\nmax_frame_size = \"2MiB\"\n\
         [messaging]\nmax_payload_size = \"1536KiB\"",
    );
    let (s, b) = gw.reload_with(&opts).await;
    assert_eq!(s, 200, "{b}");
    // bob opens after the reload and sends alice a 1.2 MB message.
    let mut bob = WsClient::connect(&gw, "bob").await;
    let ack = bob
        .request(
            json!({"type": "send", "channel_type": "person", "channel_id": "alice",
            "payload": large_payload(1, 1_200_000)}),
        )
        .await;
    assert_eq!(ack["type"], "sendack", "{ack}");
    // alice cannot be written the message frame: she is told instead.
    let e = alice.next_of("error").await;
    assert_eq!(e["code"], "frame_too_large", "{e}");
    // A sync answer too large for her connection is an error answering it.
    let reply = alice
        .request(json!({"type": "sync", "after_version": 0}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("frame_too_large")),
        "{reply}"
    );
    // The connection is still open; a new one gets the new limits.
    let pong = alice.request(json!({"type": "ping"})).await;
    assert_eq!(pong["event"], "heartbeat", "{pong}");
    let mut again = WsClient::connect(&gw, "alice").await;
    let page = again
        .request(json!({"type": "sync", "after_version": 0}))
        .await;
    assert_eq!(page["type"], "messages", "{page}");
    assert_eq!(page["messages"][0]["payload"]["text"], "message 1");
}

/// `n` nested arrays around `inner`.
fn nested(n: usize, inner: &str) -> String {
    format!("{}{inner}{}", "[".repeat(n), "]".repeat(n))
}

/// A raw `POST /v1/messages` with `body` as the exact text sent.
async fn post_raw(gw: &Gateway, body: String) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket whose frames the test reads as text, byte for byte.
async fn raw_ws(gw: &Gateway, user: &str) -> RawWs {
    let url = format!("{}?token={}", gw.ws_url(), gw.token(user, None, None));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

/// The next text frame whose JSON `check` accepts, as its text.
async fn raw_next(ws: &mut RawWs, check: impl Fn(&Value) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a frame in time")
            .expect("the connection stays open")
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if check(&v) {
                return t.to_string();
            }
        }
    }
}

#[tokio::test]
async fn nested_payloads_are_refused_at_the_door_and_kept_exactly_when_accepted() {
    let (gw, rx) = setup("").await;
    let mut bob = raw_ws(&gw, "bob").await;
    raw_next(&mut bob, |v| v["event"] == "connect").await;

    // Deeper than the limit: refused with a stable code, nothing stored.
    for depth in [129, MAX_DEPTH + 1] {
        let body = format!(
            r#"{{"from":"alice","channel_type":"person","channel_id":"bob","payload":{}}}"#,
            nested(depth, "")
        );
        let (s, b) = post_raw(&gw, body).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (422, Some("too_deep")),
            "{depth}: {b}"
        );
    }
    let (s, page) = gw
        .api(Method::GET, "/v1/users/bob/messages?after_version=0", None)
        .await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(page["messages"], json!([]), "{page}");
    // The same over the WebSocket: an error answering the frame, and the
    // connection goes on.
    let frame = format!(
        r#"{{"type":"send","id":"deep","channel_type":"person","channel_id":"alice","payload":{}}}"#,
        nested(129, "")
    );
    bob.send(Message::text(frame)).await.unwrap();
    let e = raw_next(&mut bob, |v| v["id"] == "deep").await;
    let e: Value = serde_json::from_str(&e).unwrap();
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("too_deep")),
        "{e}"
    );

    // The deepest payload a body or frame can carry (the body's own object
    // is one more level), written with spacing, key order and number forms
    // that re-serialising would change.
    let payload = format!(
        r#"{{"z": 1.50, "a" : {}}}"#,
        nested(MAX_DEPTH - 2, r#""\u00e9 é""#)
    );
    assert_eq!(
        payload.matches('[').count() + 1,
        MAX_DEPTH - 1,
        "payload depth"
    );
    let body = format!(
        r#"{{"from":"alice","channel_type":"person","channel_id":"bob","payload":{payload}}}"#
    );
    let (s, ack) = post_raw(&gw, body).await;
    assert_eq!(s, 201, "{ack}");
    let as_value: Value = serde_json::from_str(&payload).unwrap();

    // Frames carry it byte for byte: the pushed message and a sync page.
    let pushed = raw_next(&mut bob, |v| v["type"] == "message").await;
    assert!(pushed.contains(&payload), "{pushed}");
    bob.send(Message::text(
        r#"{"type":"sync","id":"s1","after_version":0}"#,
    ))
    .await
    .unwrap();
    let page = raw_next(&mut bob, |v| v["id"] == "s1").await;
    assert!(page.contains(&payload), "{page}");
    // The server API and the webhook answer JSON values: the same value.
    let (s, api) = gw
        .api(Method::GET, "/v1/users/bob/messages?after_version=0", None)
        .await;
    assert_eq!(s, 200, "{api}");
    assert_eq!(api["messages"][0]["payload"], as_value);
    let created = rx
        .wait_for("message.created", WAIT, |d| {
            d.iter()
                .find(|e| e.event_type == "message.created")
                .cloned()
        })
        .await;
    assert_eq!(created.data["payload"], as_value);
}

/// `POST /v1/control`.
async fn control(gw: &Gateway, body: Value) -> (u16, Value) {
    gw.api(Method::POST, "/v1/control", Some(body)).await
}

fn control_plugin(settings: &str) -> String {
    format!(
        "[control]\nmax_payload_size = \"1KiB\"\n[[plugins]]\nname = \"echo\"\nfile = {:?}\n{settings}\n\
         [plugins.config]\npayload_bytes = \"4096\"\npayload_depth = \"100\"\nadd_target = \"system\"\n",
        plugins::CONTROL_ECHO
    )
}

#[tokio::test]
async fn a_control_handlers_payloads_meet_the_api_limits() {
    let (gw, rx) = setup(&control_plugin("")).await;
    let mut h = WsClient::connect(&gw, "h").await;
    let request = |kind: &str| {
        json!({"kind": kind, "payload": {"small": true}, "targets": {"users": ["h", "off"]},
            "reliability": "persisted"})
    };
    // fail-closed (the default): a plan payload over the limits refuses the request.
    for kind in ["big", "deep"] {
        let (s, b) = control(&gw, request(kind)).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (503, Some("control_handler_failed")),
            "{kind}: {b}"
        );
    }
    let (s, b) = control(&gw, request("sentinel")).await;
    assert_eq!(s, 200, "{b}");
    let f = h.next_of("control").await;
    assert_eq!(
        f["kind"], "sentinel",
        "nothing goes before the sentinel: {f}"
    );
    // Nothing was stored for the offline target either.
    let mut off = WsClient::connect(&gw, "off").await;
    let f = off.next_of("control").await;
    assert_eq!(f["kind"], "sentinel", "{f}");

    // fail-open: the request goes on without the handler's plan.
    let opts =
        GatewayOptions::with_receiver(&rx.url).extra(&control_plugin("on_error = \"fail-open\""));
    let (s, b) = gw.reload_with(&opts).await;
    assert_eq!(s, 200, "{b}");
    for kind in ["big", "deep"] {
        let (s, b) = control(&gw, request(kind)).await;
        assert_eq!(s, 200, "{kind}: {b}");
        let f = h.next_of("control").await;
        assert_eq!(
            (f["kind"].as_str(), &f["payload"]),
            (Some(kind), &json!({"small": true}))
        );
    }
}

#[tokio::test]
async fn the_system_user_is_never_a_control_target() {
    let (gw, _rx) = setup(&control_plugin("")).await;
    let mut h = WsClient::connect(&gw, "h").await;
    let reason_of = |answer: &Value| {
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["user_id"] == "system")
            .cloned()
            .unwrap_or_else(|| panic!("no result for the system user: {answer}"))
    };
    // Added by a control handler…
    let (s, b) = control(
        &gw,
        json!({"kind": "retarget", "payload": {}, "targets": {"users": ["h"]}, "reliability": "persisted"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let r = reason_of(&b);
    assert_eq!(r["status"], "rejected", "{b}");
    assert!(r["reason"].as_str().unwrap().contains("system user"), "{r}");
    assert_eq!(b["summary"]["delivered"], 1, "{b}");
    assert_eq!(b["summary"]["rejected"], 1, "{b}");
    assert_eq!(h.next_of("control").await["kind"], "retarget");
    // …or named by the request.
    let (s, b) = control(
        &gw,
        json!({"kind": "named", "payload": {}, "targets": {"users": ["system", "h"]}}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(reason_of(&b)["status"], "rejected", "{b}");
    assert_eq!(b["summary"]["delivered"], 1, "{b}");
}

#[tokio::test]
async fn a_filters_rewritten_preview_is_cut_to_preview_chars() {
    let extra = format!(
        "[messaging]\npreview_chars = 10\n[[plugins]]\nname = \"echo\"\nfile = {:?}\n\
         [plugins.config]\npreview = \"é-\"\npreview_repeat = \"500\"\n",
        plugins::FILTER_ECHO
    );
    let (gw, _rx) = setup(&extra).await;
    api_send(&gw, "alice", "bob", json!({"text": "hello"})).await;
    let cut = "é-".repeat(5);
    let (s, page) = gw
        .api(Method::GET, "/v1/users/bob/conversations", None)
        .await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(
        page["conversations"][0]["last_message"]["preview"],
        cut.as_str()
    );
    let mut bob = WsClient::connect(&gw, "bob").await;
    let page = bob.request(json!({"type": "sync_conversations"})).await;
    assert_eq!(
        page["conversations"][0]["last_message"]["preview"],
        cut.as_str(),
        "{page}"
    );
}
