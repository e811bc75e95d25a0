//! Churn: many connections ended by a mix of causes yield exactly as many
//! opened and closed events, no duplicates, none missing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use plugboard_tests::{Gateway, WsClient};
use reqwest::Method;
use serde_json::json;

use crate::setup;

const CONNECTIONS: usize = 1000;

/// Ends connection `i` by one of seven causes; returns every connection id it opened.
async fn churn_one(gw: Arc<Gateway>, i: usize) -> Vec<String> {
    let user = format!("churn{i}");
    match i % 7 {
        0 => {
            let mut c = WsClient::connect(&gw, &user).await;
            c.close(1000, "");
            c.closed().await;
            vec![c.connection_id.clone()]
        }
        1 => {
            let c = WsClient::connect(&gw, &user).await;
            c.reset();
            vec![c.connection_id.clone()]
        }
        2 => {
            let c = WsClient::connect(&gw, &user).await;
            c.drop_tcp();
            vec![c.connection_id.clone()]
        }
        3 => {
            let mut c = WsClient::connect(&gw, &user).await;
            let (status, _) = gw
                .api(Method::POST, &format!("/v1/users/{user}/kick"), None)
                .await;
            assert_eq!(status, 200);
            assert_eq!(c.closed().await.1.code, Some(4002));
            vec![c.connection_id.clone()]
        }
        4 => {
            let mut first = WsClient::connect_device(&gw, &user, "d").await;
            let mut second = WsClient::connect_device(&gw, &user, "d").await;
            assert_eq!(first.closed().await.1.code, Some(4003));
            second.close(1000, "");
            second.closed().await;
            vec![first.connection_id.clone(), second.connection_id.clone()]
        }
        5 => {
            let mut c = WsClient::connect(&gw, &user).await;
            c.send_json(json!({ "type": "ping", "pad": "x".repeat(70 * 1024) }));
            assert_eq!(c.closed().await.1.code, Some(1009));
            vec![c.connection_id.clone()]
        }
        _ => {
            let token = gw.token(&user, None, Some(Duration::from_secs(1)));
            let mut c = WsClient::connect_token(&gw, &token).await;
            assert_eq!(c.closed().await.1.code, Some(4001));
            vec![c.connection_id.clone()]
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_ended_by_mixed_causes_are_each_reported_once() {
    plugboard_tests::raise_fd_limit();
    let (gw, rx) = setup("").await;
    let gw = Arc::new(gw);
    let limit = Arc::new(tokio::sync::Semaphore::new(100));
    let mut tasks = Vec::new();
    for i in 0..CONNECTIONS {
        let gw = gw.clone();
        let permit = limit.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let ids = churn_one(gw, i).await;
            drop(permit);
            ids
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let expected = ids.len();
    assert!(
        expected > CONNECTIONS,
        "replacements add connections: {expected}"
    );
    rx.wait_for(
        &format!("{expected} closed events"),
        Duration::from_secs(120),
        |ds| {
            let closed: HashSet<&str> = ds
                .iter()
                .filter(|d| d.event_type == "connection.closed")
                .map(|d| d.str("connection_id"))
                .collect();
            (closed.len() >= expected).then_some(())
        },
    )
    .await;
    let delivered = rx.delivered();
    let mut per_conn: HashMap<&str, (HashSet<&str>, HashSet<&str>)> = HashMap::new();
    for d in delivered
        .iter()
        .filter(|d| d.event_type.starts_with("connection."))
    {
        let entry = per_conn.entry(d.str("connection_id")).or_default();
        if d.event_type == "connection.opened" {
            entry.0.insert(&d.id);
        } else {
            entry.1.insert(&d.id);
        }
    }
    assert_eq!(
        per_conn.len(),
        expected,
        "events for exactly the connections opened"
    );
    for id in &ids {
        let (opened, closed) = per_conn
            .get(id.as_str())
            .unwrap_or_else(|| panic!("no events for {id}"));
        assert_eq!((opened.len(), closed.len()), (1, 1), "connection {id}");
    }
    let mut reasons: HashMap<&str, usize> = HashMap::new();
    for d in delivered
        .iter()
        .filter(|d| d.event_type == "connection.closed")
    {
        *reasons.entry(d.str("reason")).or_default() += 1;
    }
    for r in [
        "client_close",
        "abnormal",
        "kicked",
        "replaced",
        "message_too_big",
        "token_expired",
    ] {
        assert!(
            reasons.get(r).copied().unwrap_or(0) > 0,
            "no closes for {r}: {reasons:?}"
        );
    }
    assert_eq!(rx.bad_signatures(), 0);
    let (_, conns) = gw.admin(Method::GET, "/admin/connections", None).await;
    assert_eq!(conns["count"], 0, "{conns}");
}
