//! P3 and crash recovery: disabling by reload, graceful shutdown, SIGKILL.

use plugboard_tests::{GatewayOptions, WsClient, WAIT};
use reqwest::Method;

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
