//! P3 and crash recovery: disabling by reload, graceful shutdown, SIGKILL.

use plugboard_tests::{Gateway, GatewayOptions, RawClient, Receiver, WsClient, WAIT};
use reqwest::Method;
use serde_json::Value;

use crate::setup;

#[tokio::test]
async fn disabling_by_reload_drains_with_1012_and_refuses_upgrades_until_reenabled() {
    let (gw, rx) = setup("").await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(WsClient::connect(&gw, &format!("user{i}")).await);
    }
    let opts = GatewayOptions::with_receiver(&rx.url);
    let (status, report) = gw
        .reload_with(&opts.clone().extra("[gateway]\nenabled = false"))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["websocket_enabled"], false);
    assert_eq!(report["drained"], 5);
    for c in clients.iter_mut() {
        let (frames, closed) = c.closed().await;
        assert_eq!(closed.code, Some(1012));
        assert!(
            frames
                .iter()
                .any(|f| f["type"] == "meta" && f["event"] == "disable" && f["code"] == 1012),
            "meta frame before the close: {frames:?}"
        );
        let ev = rx.assert_exactly_once(&c.connection_id).await;
        assert_eq!((ev.str("reason"), ev.code()), ("service_disabled", 1012));
    }
    // New upgrades are refused while disabled, and readiness says so.
    let token = gw.token("late", None, None);
    let refused = WsClient::try_connect(&gw, &format!("{}?token={token}", gw.ws_url()), None)
        .await
        .err()
        .expect("refused while disabled");
    assert_eq!(
        (
            refused.status,
            refused.code().as_deref(),
            refused.message().as_deref(),
            refused.header("retry-after")
        ),
        (
            Some(503),
            Some("service_unavailable"),
            Some("the WebSocket service is disabled"),
            Some("5")
        ),
        "{refused:?}"
    );
    assert_eq!(gw.get_text("/readyz").await.0, 503);

    // SIGHUP re-reads the file: re-enabled without a restart.
    gw.write_config(&opts);
    gw.signal(libc::SIGHUP);
    let c = plugboard_tests::wait_until_async_connect(&gw, "late").await;
    assert_eq!(gw.get_text("/readyz").await.0, 200);
    c.close(1000, "");
    rx.assert_exactly_once(&c.connection_id).await;
}

#[tokio::test]
async fn shutdown_closes_with_1001_and_delivers_every_event() {
    let (gw, rx) = setup("").await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(WsClient::connect(&gw, &format!("s{i}")).await);
    }
    let ids: Vec<String> = clients.iter().map(|c| c.connection_id.clone()).collect();
    let gw_exit = tokio::spawn(gw.terminate());
    for c in clients.iter_mut() {
        let (frames, closed) = c.closed().await;
        assert_eq!(closed.code, Some(1001));
        assert!(
            frames.iter().any(|f| f["event"] == "shutdown"),
            "{frames:?}"
        );
    }
    assert_eq!(gw_exit.await.unwrap(), Some(0), "clean exit");
    // The process has exited: everything it owed the receiver was delivered before.
    for id in &ids {
        let ev = rx.assert_exactly_once(id).await;
        assert_eq!((ev.str("reason"), ev.code()), ("shutdown", 1001));
    }
    let offline = rx
        .delivered()
        .iter()
        .filter(|d| d.event_type == "user.offline")
        .count();
    assert_eq!(offline, 20);
}

#[tokio::test]
async fn crash_recovery_closes_every_open_connection_exactly_once() {
    let (gw, rx) = setup("").await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(WsClient::connect(&gw, &format!("k{i}")).await);
    }
    let ids: Vec<String> = clients.iter().map(|c| c.connection_id.clone()).collect();
    // Wait until the opens are delivered, so the crash cannot be confused with lost opens.
    rx.wait_for("10 opened events", WAIT, |ds| {
        (ds.iter()
            .filter(|d| d.event_type == "connection.opened")
            .count()
            == 10)
            .then_some(())
    })
    .await;
    let restart_from = gw.restart_handle();
    gw.kill().await;
    for c in clients.iter_mut() {
        c.closed().await;
    }
    let gw2 = restart_from.restart().await;
    for id in &ids {
        let ev = rx.assert_exactly_once(id).await;
        assert_eq!((ev.str("reason"), ev.code()), ("gateway_crash", 1006));
    }
    // A second restart finds nothing left to close.
    let handle = gw2.restart_handle();
    assert_eq!(gw2.terminate().await, Some(0));
    let gw3 = handle.restart().await;
    let c = WsClient::connect(&gw3, "k0").await;
    c.close(1000, "");
    rx.assert_exactly_once(&c.connection_id).await;
    for id in &ids {
        rx.assert_exactly_once(id).await;
    }
    let (_, p) = gw3.api(Method::GET, "/v1/users/k1/presence", None).await;
    assert_eq!(p["online"], false);
}

#[tokio::test]
async fn undelivered_events_survive_a_shutdown_and_go_out_after_restart() {
    let (gw, rx) = setup("[shutdown]\noutbox_flush_timeout = \"200ms\"").await;
    rx.reply(plugboard_tests::Reply::Status(503));
    let c = WsClient::connect(&gw, "late-receiver").await;
    c.close(1000, "");
    plugboard_tests::wait_until("a failed attempt", WAIT, || {
        rx.attempts()
            .iter()
            .any(|a| a.answered == 503)
            .then_some(())
    })
    .await;
    let handle = gw.restart_handle();
    assert_eq!(gw.terminate().await, Some(0));
    assert!(rx.delivered().is_empty());
    rx.reply(plugboard_tests::Reply::Status(200));
    let _gw2 = handle.restart().await;
    rx.assert_exactly_once(&c.connection_id).await;
}

/// Long enough that a drain, not the auth deadline, ends the wait.
const PATIENT_AUTH: &str = "[gateway]\nauth_timeout = \"60s\"";

/// Upgrades without a token and proves the gateway is waiting for the
/// `auth` frame: a WebSocket ping is answered only once the wait has begun.
async fn waiting_for_auth(gw: &Gateway) -> RawClient {
    let (mut raw, status) = RawClient::upgrade(&gw.addr, "/v1/ws").await;
    assert!(status.contains("101"), "{status}");
    raw.write_frame(0x9, b"are you there", true).await;
    let pong = raw.read_frame(WAIT).await.expect("pong");
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (0xA, &b"are you there"[..])
    );
    raw
}

/// The frames a drained connection that never authenticated gets: the
/// drain's `meta` frame, the `error` frame `service_unavailable`, and the
/// close code. Answers the close and checks the gateway then ends TCP.
async fn drained_before_auth(raw: &mut RawClient, event: &str, reason: &str, code: u16) {
    let text = |f: plugboard_tests::raw::RawFrame| -> Value {
        assert_eq!(f.opcode, 1, "a text frame: {f:?}");
        serde_json::from_slice(&f.payload).unwrap()
    };
    let meta = text(raw.read_frame(WAIT).await.expect("meta frame"));
    assert_eq!(
        (
            &meta["type"],
            &meta["event"],
            &meta["reason"],
            &meta["code"]
        ),
        (
            &Value::from("meta"),
            &Value::from(event),
            &Value::from(reason),
            &Value::from(code)
        ),
        "{meta}"
    );
    let error = text(raw.read_frame(WAIT).await.expect("error frame"));
    assert_eq!(
        (&error["type"], &error["code"]),
        (&Value::from("error"), &Value::from("service_unavailable")),
        "{error}"
    );
    assert_eq!(error["message"], meta["message"]);
    let close = raw.read_frame(WAIT).await.expect("close frame");
    assert_eq!(close.close_code(), Some(code), "{close:?}");
    raw.write_frame(0x8, &code.to_be_bytes(), true).await;
    assert!(
        raw.read_frame(WAIT).await.is_none(),
        "TCP ends after the close"
    );
}

#[tokio::test]
async fn a_reload_that_disables_the_service_drains_connections_waiting_for_auth_with_1012() {
    let (gw, rx) = setup(PATIENT_AUTH).await;
    let mut raw = waiting_for_auth(&gw).await;
    let disabled =
        GatewayOptions::with_receiver(&rx.url).extra(&format!("{PATIENT_AUTH}\nenabled = false"));
    let (status, report) = gw.reload_with(&disabled).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["drained"], 1,
        "the waiting connection is counted: {report}"
    );
    drained_before_auth(&mut raw, "disable", "service_disabled", 1012).await;
    assert!(
        gw.metric(
            "plugboard_handshake_failures_total",
            "reason=\"service_unavailable\""
        )
        .await
            >= 1.0
    );
    // It never opened: no lifecycle event.
    assert!(rx.delivered().is_empty(), "{:?}", rx.delivered());
}

#[tokio::test]
async fn shutdown_drains_connections_waiting_for_auth_with_1001() {
    let (gw, _rx) = setup(PATIENT_AUTH).await;
    let mut raw = waiting_for_auth(&gw).await;
    let exit = tokio::spawn(gw.terminate());
    drained_before_auth(&mut raw, "shutdown", "shutdown", 1001).await;
    assert_eq!(exit.await.unwrap(), Some(0), "clean exit");
}

/// A gateway whose endpoint `svc` takes only the service events.
async fn with_service_receiver(extra: &str) -> (Gateway, Receiver, GatewayOptions) {
    let rx = Receiver::start().await;
    let opts = GatewayOptions::default().extra(&format!(
        "[[webhooks]]\nname = \"svc\"\nurl = \"{}\"\nsecret = \"{}\"\nevents = [\"service.*\"]\n{extra}",
        rx.url,
        plugboard_tests::receiver::SECRET
    ));
    (Gateway::start(opts.clone()).await, rx, opts)
}

/// The service events delivered so far, as (type, reason), each checked for its node.
fn service_events(rx: &Receiver) -> Vec<(String, String)> {
    rx.delivered()
        .iter()
        .map(|d| {
            assert!(d.event_type.starts_with("service."), "{d:?}");
            assert!(!d.str("node").is_empty(), "{d:?}");
            (d.event_type.clone(), d.str("reason").to_string())
        })
        .collect()
}

fn pair(t: &str, reason: &str) -> (String, String) {
    (t.to_string(), reason.to_string())
}

#[tokio::test]
async fn the_service_is_reported_enabled_at_start_and_on_reload_and_disabled_with_its_reason() {
    let (gw, rx, opts) = with_service_receiver("").await;
    rx.wait_for("service.enabled", WAIT, |ds| (!ds.is_empty()).then_some(()))
        .await;
    assert_eq!(service_events(&rx), [pair("service.enabled", "start")]);

    let (status, report) = gw
        .reload_with(&opts.clone().extra("[gateway]\nenabled = false"))
        .await;
    assert_eq!(status, 200, "{report}");
    rx.wait_for("service.disabled", WAIT, |ds| (ds.len() == 2).then_some(()))
        .await;
    // A reload that changes nothing about the service reports nothing.
    gw.reload_with(&opts.clone().extra("[gateway]\nenabled = false"))
        .await;
    let (status, _) = gw.reload_with(&opts).await;
    assert_eq!(status, 200);
    rx.wait_for("service.enabled again", WAIT, |ds| {
        (ds.len() == 3).then_some(())
    })
    .await;
    assert_eq!(gw.terminate().await, Some(0));
    // The process has exited: what it owed the receiver was delivered first.
    assert_eq!(
        service_events(&rx),
        [
            pair("service.enabled", "start"),
            pair("service.disabled", "reload"),
            pair("service.enabled", "reload"),
            pair("service.disabled", "shutdown"),
        ]
    );
}

#[tokio::test]
async fn the_disabled_event_of_a_shutdown_is_durable_and_goes_out_after_the_restart() {
    let (gw, rx, _) = with_service_receiver("[shutdown]\noutbox_flush_timeout = \"200ms\"").await;
    rx.wait_for("service.enabled", WAIT, |ds| (!ds.is_empty()).then_some(()))
        .await;
    // The receiver goes down before the shutdown.
    rx.reply(plugboard_tests::Reply::Status(503));
    let handle = gw.restart_handle();
    assert_eq!(gw.terminate().await, Some(0));
    assert_eq!(service_events(&rx), [pair("service.enabled", "start")]);
    rx.reply(plugboard_tests::Reply::Status(200));
    let _gw2 = handle.restart().await;
    rx.wait_for("both events of the restart", WAIT, |ds| {
        (ds.len() == 3).then_some(())
    })
    .await;
    // One order key per node: the shutdown's event comes before the next start's.
    assert_eq!(
        service_events(&rx),
        [
            pair("service.enabled", "start"),
            pair("service.disabled", "shutdown"),
            pair("service.enabled", "start"),
        ]
    );
}
