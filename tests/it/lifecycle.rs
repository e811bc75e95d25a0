//! P1: one `connection.opened` and one `connection.closed` per open
//! connection, with the right reason and code, for every way it can end
//! (the slow consumer's 4004 is in `codes.rs`, with what the client sees).

use std::time::Duration;

use plugboard_tests::{RawClient, WsClient, WAIT};
use reqwest::Method;
use serde_json::json;

use crate::setup;

#[tokio::test]
async fn client_close_frame_records_the_clients_code() {
    let (gw, rx) = setup("").await;
    let mut c = WsClient::connect(&gw, "alice").await;
    assert_eq!(c.connect["user_id"], "alice");
    c.close(4100, "bye");
    let (_, closed) = c.closed().await;
    assert_eq!(closed.code, Some(4100), "server echoes the client's code");
    let ev = rx.assert_exactly_once(&c.connection_id).await;
    assert_eq!(ev.str("reason"), "client_close");
    assert_eq!(ev.code(), 4100);

    let mut c = WsClient::connect(&gw, "alice").await;
    c.close(1000, "");
    c.closed().await;
    let ev = rx.assert_exactly_once(&c.connection_id).await;
    assert_eq!((ev.str("reason"), ev.code()), ("client_close", 1000));
}

#[tokio::test]
async fn tcp_reset_and_eof_without_close_frame_are_1006() {
    let (gw, rx) = setup("").await;
    let reset = WsClient::connect(&gw, "bob").await;
    reset.reset();
    let ev = rx.assert_exactly_once(&reset.connection_id).await;
    assert_eq!((ev.str("reason"), ev.code()), ("abnormal", 1006));

    let eof = WsClient::connect(&gw, "bob").await;
    eof.drop_tcp();
    let ev = rx.assert_exactly_once(&eof.connection_id).await;
    assert_eq!((ev.str("reason"), ev.code()), ("abnormal", 1006));
}

async fn open_raw(gw: &plugboard_tests::Gateway, user: &str) -> (RawClient, String) {
    let token = gw.token(user, None, None);
    let (mut raw, status) = RawClient::upgrade(&gw.addr, &format!("/v1/ws?token={token}")).await;
    assert!(status.contains("101"), "{status}");
    let frame = raw.read_frame(WAIT).await.expect("connect frame");
    let connect: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
    (raw, connect["connection_id"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn protocol_violation_is_1002() {
    let (gw, rx) = setup("").await;
    let (mut raw, id) = open_raw(&gw, "carol").await;
    // Client frames must be masked.
    raw.write_frame(1, br#"{"type":"ping"}"#, false).await;
    assert_eq!(raw.read_close_code(WAIT).await, Some(1002));
    let ev = rx.assert_exactly_once(&id).await;
    assert_eq!((ev.str("reason"), ev.code()), ("protocol_error", 1002));
}

#[tokio::test]
async fn invalid_utf8_is_1007() {
    let (gw, rx) = setup("").await;
    let (mut raw, id) = open_raw(&gw, "dave").await;
    raw.write_frame(1, &[0x7b, 0xff, 0xfe, 0x7d], true).await;
    assert_eq!(raw.read_close_code(WAIT).await, Some(1007));
    let ev = rx.assert_exactly_once(&id).await;
    assert_eq!((ev.str("reason"), ev.code()), ("invalid_utf8", 1007));
}

#[tokio::test]
async fn oversize_message_is_1009() {
    let (gw, rx) = setup("[gateway]\nmax_message_size = \"4KiB\"\nmax_frame_size = \"4KiB\"").await;
    let mut c = WsClient::connect(&gw, "erin").await;
    c.send_json(json!({ "type": "ping", "pad": "x".repeat(8 * 1024) }));
    let (_, closed) = c.closed().await;
    assert_eq!(closed.code, Some(1009));
    let ev = rx.assert_exactly_once(&c.connection_id).await;
    assert_eq!((ev.str("reason"), ev.code()), ("message_too_big", 1009));
}

#[tokio::test]
async fn a_silent_peer_is_closed_with_4000_after_an_unanswered_ping() {
    // ping every 1s, 1s to answer. The raw client reads but never writes,
    // so pings go unanswered (reading sends nothing back).
    let (gw, rx) = setup("").await;
    let token = gw.token("frank", None, None);
    let (mut raw, status) = RawClient::upgrade(&gw.addr, &format!("/v1/ws?token={token}")).await;
    assert!(status.contains("101"), "{status}");
    // What the client sees, in order: `connect`, a ping, then (no frame
    // from the client in between) `disconnect` and the close frame.
    let mut seen = Vec::new();
    while let Some(frame) = raw.read_frame(WAIT).await {
        let entry = match frame.opcode {
            1 => {
                let v: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
                match (
                    v["event"].as_str(),
                    v["reason"].as_str(),
                    v["code"].as_u64(),
                ) {
                    (Some("disconnect"), Some(reason), Some(code)) => {
                        format!("disconnect {reason} {code}")
                    }
                    (Some(event), _, _) => event.to_string(),
                    _ => v.to_string(),
                }
            }
            8 => format!("close {:?}", frame.close_code()),
            9 => "ping".to_string(),
            op => format!("opcode {op}"),
        };
        seen.push(entry);
        if frame.opcode == 8 {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "connect",
            "ping",
            "disconnect heartbeat_timeout 4000",
            "close Some(4000)"
        ]
    );
    let ev = rx
        .wait_for("heartbeat close", WAIT, |ds| {
            ds.iter()
                .find(|d| d.event_type == "connection.closed" && d.str("user_id") == "frank")
                .cloned()
        })
        .await;
    assert_eq!((ev.str("reason"), ev.code()), ("heartbeat_timeout", 4000));
    rx.assert_exactly_once(ev.str("connection_id")).await;
}

#[tokio::test]
async fn an_answering_client_is_not_closed_by_heartbeats() {
    let (gw, rx) = setup("").await;
    let mut c = WsClient::connect(&gw, "grace").await;
    // Several heartbeat periods pass while the client's reader answers pings.
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        c.send_json(json!({ "type": "ping", "id": i }));
        let hb = c.next_json().await;
        assert_eq!(
            (hb["type"].as_str(), hb["event"].as_str(), hb["id"].as_i64()),
            (Some("meta"), Some("heartbeat"), Some(i))
        );
    }
    c.close(1000, "done");
    let ev = rx.assert_exactly_once(&c.connection_id).await;
    assert_eq!(ev.str("reason"), "client_close");
}

#[tokio::test]
async fn token_expiry_closes_with_4001() {
    let (gw, rx) = setup("").await;
    let token = gw.token("heidi", None, Some(Duration::from_secs(2)));
    let mut c = WsClient::connect_token(&gw, &token).await;
    let (frames, closed) = c.closed().await;
    assert_eq!(closed.code, Some(4001));
    assert!(
        frames
            .iter()
            .any(|f| f["event"] == "disconnect" && f["reason"] == "token_expired"),
        "meta frame explains the close: {frames:?}"
    );
    let ev = rx.assert_exactly_once(&c.connection_id).await;
    assert_eq!((ev.str("reason"), ev.code()), ("token_expired", 4001));
}

#[tokio::test]
async fn kick_through_the_api_closes_with_4002() {
    let (gw, rx) = setup("").await;
    let mut phone = WsClient::connect_device(&gw, "ivan", "phone").await;
    let mut laptop = WsClient::connect_device(&gw, "ivan", "laptop").await;
    let (status, body) = gw
        .api(
            Method::POST,
            "/v1/users/ivan/kick",
            Some(json!({ "device_id": "phone", "reason": "password changed" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kicked"], json!([phone.connection_id]));
    let (frames, closed) = phone.closed().await;
    assert_eq!(closed.code, Some(4002));
    assert!(
        frames
            .iter()
            .any(|f| f["reason"] == "kicked" && f["message"] == "password changed"),
        "{frames:?}"
    );
    let ev = rx.assert_exactly_once(&phone.connection_id).await;
    assert_eq!((ev.str("reason"), ev.code()), ("kicked", 4002));

    // The other device stays; a kick without a device takes it too.
    let (status, body) = gw.api(Method::POST, "/v1/users/ivan/kick", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kicked"], json!([laptop.connection_id]));
    assert_eq!(laptop.closed().await.1.code, Some(4002));
    rx.assert_exactly_once(&laptop.connection_id).await;
}

#[tokio::test]
async fn second_login_on_the_same_device_replaces_the_first() {
    let (gw, rx) = setup("").await;
    let mut first = WsClient::connect_device(&gw, "judy", "phone").await;
    let second = WsClient::connect_device(&gw, "judy", "phone").await;
    let (frames, closed) = first.closed().await;
    assert_eq!(closed.code, Some(4003));
    assert!(
        frames.iter().any(|f| f["reason"] == "replaced"),
        "{frames:?}"
    );
    let ev = rx.assert_exactly_once(&first.connection_id).await;
    assert_eq!((ev.str("reason"), ev.code()), ("replaced", 4003));
    // The user never went offline: one user.online, no user.offline.
    second.close(1000, "");
    rx.assert_exactly_once(&second.connection_id).await;
    rx.wait_for("user.offline of judy", WAIT, |ds| {
        ds.iter()
            .find(|d| d.event_type == "user.offline" && d.str("user_id") == "judy")
            .cloned()
    })
    .await;
    let types: Vec<String> = rx
        .for_user("judy")
        .iter()
        .filter(|d| d.event_type.starts_with("user."))
        .map(|d| d.event_type.clone())
        .collect();
    assert_eq!(types, ["user.online", "user.offline"]);
}

#[tokio::test]
async fn device_limit_replaces_the_oldest_or_rejects() {
    let (gw, rx) = setup("[gateway.devices]\nmax_devices = 2").await;
    let mut a = WsClient::connect_device(&gw, "ken", "a").await;
    let _b = WsClient::connect_device(&gw, "ken", "b").await;
    let _c = WsClient::connect_device(&gw, "ken", "c").await;
    assert_eq!(a.closed().await.1.code, Some(4003));
    let ev = rx.assert_exactly_once(&a.connection_id).await;
    assert_eq!(ev.str("reason"), "replaced");

    let (gw, _rx) = setup(
        "[gateway.devices]\nmax_devices = 1\nwhen_full = \"reject\"\nsame_device = \"reject\"",
    )
    .await;
    let _a = WsClient::connect_device(&gw, "ken", "a").await;
    for (device, message) in [
        (
            "b",
            "user already has 1 devices connected (gateway.devices.max_devices = 1)",
        ),
        (
            "a",
            "device `a` already has a connection and gateway.devices.same_device = \"reject\"",
        ),
    ] {
        let token = gw.token("ken", Some(device), None);
        let refused = WsClient::try_connect(&gw, &format!("{}?token={token}", gw.ws_url()), None)
            .await
            .err()
            .expect("refused");
        assert_eq!(
            (
                refused.status,
                refused.code().as_deref(),
                refused.message().as_deref()
            ),
            (Some(409), Some("device_policy"), Some(message)),
            "{refused:?}"
        );
    }
}

#[tokio::test]
async fn bearer_header_and_auth_frame_both_authenticate() {
    let (gw, rx) = setup("").await;
    let token = gw.token("leo", Some("web"), None);
    let c = WsClient::try_connect(&gw, &gw.ws_url(), Some(&token))
        .await
        .expect("bearer works");
    assert_eq!(c.connect["device_id"], "web");
    c.close(1000, "");
    rx.assert_exactly_once(&c.connection_id).await;

    // No token on the request: an `auth` frame opens the connection.
    let (req_ws, _) = tokio_tungstenite::connect_async(gw.ws_url()).await.unwrap();
    let mut c = WsClient::from_stream(req_ws);
    c.send_json(json!({ "type": "auth", "token": token }));
    let connect = c.next_json().await;
    assert_eq!(
        (connect["event"].as_str(), connect["user_id"].as_str()),
        (Some("connect"), Some("leo"))
    );
    c.close(1000, "");
    rx.assert_exactly_once(connect["connection_id"].as_str().unwrap())
        .await;
}

#[tokio::test]
async fn attempts_that_never_opened_produce_no_events() {
    let (gw, rx) = setup("").await;
    let ws = gw.ws_url();
    // Bad signature.
    let forged =
        plugboard::auth::mint_token("mallory", None, None, b"not-the-secret-not-the-secret-000");
    let r = WsClient::try_connect(&gw, &format!("{ws}?token={forged}"), None)
        .await
        .err()
        .unwrap();
    assert_eq!(
        (r.status, r.code().as_deref(), r.header("www-authenticate")),
        (Some(401), Some("bad_token"), Some("Bearer")),
        "{r:?}"
    );
    // Expired.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = gw.token_with_claims(&json!({ "sub": "mallory", "exp": now - 60 }));
    let r = WsClient::try_connect(&gw, &format!("{ws}?token={expired}"), None)
        .await
        .err()
        .unwrap();
    assert_eq!(
        (r.status, r.code().as_deref(), r.header("www-authenticate")),
        (Some(401), Some("token_expired"), Some("Bearer")),
        "{r:?}"
    );
    // Not an upgrade at all.
    let (status, body) = gw.get_text("/v1/ws").await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (426, Some("bad_upgrade")),
        "{body}"
    );
    // Upgraded, but never authenticates (auth_timeout = 1s).
    let (mut raw, status) = RawClient::upgrade(&gw.addr, "/v1/ws").await;
    assert!(status.contains("101"));
    let error = raw.read_frame(WAIT).await.expect("an error frame");
    let error: serde_json::Value = serde_json::from_slice(&error.payload).unwrap();
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("auth_timeout")),
        "{error}"
    );
    assert_eq!(raw.read_close_code(WAIT).await, Some(1008));
    // Upgraded, authenticates with a bad token in the frame.
    let (req_ws, _) = tokio_tungstenite::connect_async(gw.ws_url()).await.unwrap();
    let mut c = WsClient::from_stream(req_ws);
    c.send_json(json!({ "type": "auth", "token": forged }));
    let (frames, closed) = c.closed().await;
    assert_eq!(closed.code, Some(1008));
    assert_eq!(frames[0]["code"], "bad_token");

    // Counted by reason.
    assert!(
        gw.metric("plugboard_handshake_failures_total", "reason=\"bad_token\"")
            .await
            >= 2.0
    );
    assert!(
        gw.metric(
            "plugboard_handshake_failures_total",
            "reason=\"token_expired\""
        )
        .await
            >= 1.0
    );
    assert!(
        gw.metric(
            "plugboard_handshake_failures_total",
            "reason=\"bad_upgrade\""
        )
        .await
            >= 1.0
    );
    assert!(
        gw.metric(
            "plugboard_handshake_failures_total",
            "reason=\"auth_timeout\""
        )
        .await
            >= 1.0
    );

    // A sentinel connection of the same user: events are ordered per user, so
    // had any attempt above produced an event, it would arrive before these.
    let sentinel = WsClient::connect(&gw, "mallory").await;
    sentinel.close(1000, "");
    rx.assert_exactly_once(&sentinel.connection_id).await;
    rx.wait_for("user.offline of mallory", WAIT, |ds| {
        ds.iter()
            .find(|d| d.event_type == "user.offline" && d.str("user_id") == "mallory")
            .cloned()
    })
    .await;
    let others: Vec<_> = rx
        .for_user("mallory")
        .into_iter()
        .filter(|d| {
            d.data.get("connection_id").and_then(|v| v.as_str())
                != Some(sentinel.connection_id.as_str())
        })
        .collect();
    assert!(
        others.is_empty(),
        "events for attempts that never opened: {others:#?}"
    );
    // The raw client from the auth-timeout attempt has nothing to say either.
    drop(raw);
}

#[tokio::test]
async fn presence_counts_devices_and_connections() {
    let (gw, rx) = setup("[gateway.devices]\nsame_device = \"allow\"").await;
    let a = WsClient::connect_device(&gw, "nina", "phone").await;
    let b = WsClient::connect_device(&gw, "nina", "phone").await;
    let c = WsClient::connect_device(&gw, "nina", "laptop").await;
    let (status, p) = gw.api(Method::GET, "/v1/users/nina/presence", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            p["online"].as_bool(),
            p["devices"].as_u64(),
            p["connections"].as_u64()
        ),
        (Some(true), Some(2), Some(3))
    );
    let online = rx
        .wait_for("user.online", WAIT, |ds| {
            ds.iter()
                .find(|d| d.event_type == "user.online" && d.str("user_id") == "nina")
                .cloned()
        })
        .await;
    assert_eq!(online.str("connection_id"), a.connection_id);
    for cl in [&a, &b, &c] {
        cl.close(1000, "");
        rx.assert_exactly_once(&cl.connection_id).await;
    }
    let offline = rx
        .wait_for("user.offline", WAIT, |ds| {
            ds.iter()
                .find(|d| d.event_type == "user.offline" && d.str("user_id") == "nina")
                .cloned()
        })
        .await;
    assert_eq!(offline.data["connections"], 0);
    let (_, p) = gw.api(Method::GET, "/v1/users/nina/presence", None).await;
    assert_eq!(
        (p["online"].as_bool(), p["connections"].as_u64()),
        (Some(false), Some(0))
    );
    let count = |t: &str| {
        rx.for_user("nina")
            .iter()
            .filter(|d| d.event_type == t)
            .count()
    };
    assert_eq!((count("user.online"), count("user.offline")), (1, 1));
}

#[tokio::test]
async fn a_token_that_never_expires_keeps_its_connection_open() {
    // `exp` at the largest value a JWT can carry: adding the leeway must not
    // wrap around into the past (which closed the connection with 4001).
    let (gw, _rx) = setup("").await;
    let token = gw.token_with_claims(&json!({ "sub": "forever", "exp": u64::MAX }));
    let mut c = WsClient::connect_token(&gw, &token).await;
    let beat = c.request(json!({"type": "ping"})).await;
    assert_eq!(
        (&beat["type"], &beat["event"]),
        (&json!("meta"), &json!("heartbeat")),
        "{beat}"
    );
    c.close(1000, "done");
    let (_, closed) = c.closed().await;
    assert_eq!(closed.code, Some(1000), "{closed:?}");
}
