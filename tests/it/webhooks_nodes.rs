//! Webhooks on several nodes: two gateway processes on one PostgreSQL
//! database (whatever `TEST_STORAGE` says: sharing needs PostgreSQL), no
//! `[cluster]` section, one signature-checking receiver.
//!
//! One node at a time delivers the endpoint (the holder of its delivery
//! lease), whichever node recorded the events; endpoint state is shared
//! through the database; a killed holder is replaced once its lease lapses,
//! a stopped one at once, and nothing is lost, repeated or reordered per
//! user on the way. Which node sent is told by each node's own attempt
//! counter against what the receiver saw.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use plugboard_tests::{Gateway, GatewayOptions, Receiver, Reply, WsClient, WAIT};
use reqwest::Method;
use serde_json::{json, Value};

/// `outbox.endpoint_lease` of most tests here, and its request timeout
/// (the lease must be at least that long).
const LEASE: Duration = Duration::from_secs(4);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A node asks for a lease it does not hold every tenth of its length, at
/// most every second.
const POLL: Duration = Duration::from_millis(400);
/// Room for a loaded machine on top of a documented bound.
const SLACK: Duration = Duration::from_secs(5);

async fn database() -> String {
    tokio::task::spawn_blocking(|| plugboard_tests::postgres::shared().create_database())
        .await
        .expect("create the shared database")
}

/// A gateway `node_id = id` on database `db`, delivering to `rx`.
async fn node(rx: &Receiver, db: &str, id: &str, lease: Duration) -> Gateway {
    let extra = format!(
        "node_id = \"{id}\"\n[outbox]\nendpoint_lease = \"{}ms\"\nrequest_timeout = \"{}ms\"\n",
        lease.as_millis(),
        REQUEST_TIMEOUT.as_millis()
    );
    Gateway::start(
        GatewayOptions::with_receiver(&rx.url)
            .postgres_database(db)
            .extra(&extra),
    )
    .await
}

/// The `rx` endpoint as `gw`'s admin API shows it.
async fn endpoint(gw: &Gateway) -> Value {
    let (status, view) = gw.admin(Method::GET, "/admin/webhooks", None).await;
    assert_eq!(status, 200, "{view}");
    let ep = view["endpoints"][0].clone();
    assert_eq!(ep["name"], "rx", "{view}");
    ep
}

/// Waits until `gw` shows the endpoint's lease held by a process of node
/// `id`, for at most `within`; returns the endpoint's view.
async fn until_leader(gw: &Gateway, id: &str, within: Duration) -> Value {
    let prefix = format!("{id}/");
    let deadline = Instant::now() + within;
    loop {
        let ep = endpoint(gw).await;
        if ep["leader"]
            .as_str()
            .is_some_and(|l| l.starts_with(&prefix))
        {
            return ep;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not take the endpoint's lease within {within:?}: {ep}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sum of a node's series of `name` for the `rx` endpoint; 0 when it has
/// none yet, but the family must be served (so a misspelt name fails).
async fn rx_metric(gw: &Gateway, name: &str) -> f64 {
    // Text 0.0.4 (no `Accept`): a counter's family is named like its samples.
    let m = gw.metrics().await;
    assert!(
        m.text.contains(&format!("# TYPE {name} ")),
        "{name} is not served:\n{}",
        m.text
    );
    m.samples
        .iter()
        .filter(|s| s.name == name && s.label("endpoint") == Some("rx"))
        .map(|s| s.value)
        .sum()
}

/// Requests a node sent to the endpoint, whatever their outcome.
async fn attempts(gw: &Gateway) -> f64 {
    rx_metric(gw, "plugboard_webhook_attempts_total").await
}

/// A user's events as received, in order: (type, connection id).
fn received(rx: &Receiver, user: &str) -> Vec<(String, String)> {
    rx.for_user(user)
        .iter()
        .map(|d| (d.event_type.clone(), d.str("connection_id").to_string()))
        .collect()
}

fn expect(list: &mut Vec<(String, String)>, connection: &str, types: &[&str]) {
    for t in types {
        list.push((t.to_string(), connection.to_string()));
    }
}

/// Opens and closes one connection of `user` on `gw`; returns its id.
async fn session(gw: &Gateway, user: &str) -> String {
    let mut c = WsClient::connect(gw, user).await;
    c.close(1000, "");
    c.closed().await;
    c.connection_id.clone()
}

const ONE_SESSION: [&str; 4] = [
    "connection.opened",
    "user.online",
    "connection.closed",
    "user.offline",
];

/// Every delivered event id is distinct, and there are `total` of them.
fn assert_no_duplicates(rx: &Receiver, total: usize) {
    let delivered = rx.delivered();
    let mut ids: Vec<&str> = delivered.iter().map(|d| d.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (ids.len(), delivered.len()),
        (total, total),
        "every event exactly once"
    );
}

#[tokio::test]
async fn events_recorded_on_both_nodes_arrive_once_in_order_and_only_the_leader_sends() {
    let rx = Receiver::start().await;
    let db = database().await;
    let a = node(&rx, &db, "node-a", LEASE).await;
    let leader = until_leader(&a, "node-a", WAIT).await;
    let b = node(&rx, &db, "node-b", LEASE).await;
    // Both nodes show the one lease, and its end.
    let seen_by_b = endpoint(&b).await;
    assert_eq!(seen_by_b["leader"], leader["leader"], "{seen_by_b}");
    assert!(seen_by_b["lease_until"].is_string(), "{seen_by_b}");

    // Each user's sessions alternate between the nodes.
    let users: Vec<String> = (0..4).map(|i| format!("both{i}")).collect();
    let mut expected: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for round in 0..3 {
        for (i, u) in users.iter().enumerate() {
            let gw = if (i + round) % 2 == 0 { &a } else { &b };
            let id = session(gw, u).await;
            expect(expected.entry(u.clone()).or_default(), &id, &ONE_SESSION);
        }
    }
    let total = users.len() * 3 * ONE_SESSION.len();
    rx.wait_for("every event of both nodes", WAIT, |ds| {
        (ds.len() >= total).then_some(())
    })
    .await;
    rx.wait_settled().await;
    assert_no_duplicates(&rx, total);
    for u in &users {
        assert_eq!(&received(&rx, u), &expected[u], "per-user order of {u}");
    }

    // Every request the receiver saw came from node-a; node-b sent none.
    let (sent_a, sent_b) = (attempts(&a).await, attempts(&b).await);
    assert_eq!(sent_b, 0.0, "node-b is not the leader and sends nothing");
    assert_eq!(
        rx.attempts().len() as f64,
        sent_a,
        "node-a sent every request"
    );
    assert!(sent_a >= total as f64);
    let leader_gauge = "plugboard_webhook_endpoint_leader";
    assert_eq!(a.metric_strict(leader_gauge, "endpoint=\"rx\"").await, 1.0);
    assert_eq!(b.metric_strict(leader_gauge, "endpoint=\"rx\"").await, 0.0);
    assert_eq!(
        rx_metric(&a, "plugboard_webhook_lease_takeovers_total").await,
        1.0
    );
    assert_eq!(
        rx_metric(&b, "plugboard_webhook_lease_takeovers_total").await,
        0.0
    );
    // The lease is still node-a's: renewed, never handed over.
    let later = endpoint(&b).await;
    assert_eq!(later["leader"], leader["leader"], "{later}");
}

#[tokio::test]
async fn disabling_through_one_node_stops_the_leader_and_enabling_through_the_leader_resumes() {
    let rx = Receiver::start().await;
    let db = database().await;
    let a = node(&rx, &db, "node-a", LEASE).await;
    until_leader(&a, "node-a", WAIT).await;
    let b = node(&rx, &db, "node-b", LEASE).await;
    let first = session(&b, "off0").await;
    rx.assert_exactly_once(&first).await;

    // Disabled through node-b, which does not deliver.
    let (status, body) = b
        .admin(Method::POST, "/admin/webhooks/rx/disable", None)
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"name": "rx", "enabled": false}))
    );
    for gw in [&a, &b] {
        let ep = endpoint(gw).await;
        assert_eq!(ep["disabled"], true, "{ep}");
        assert_eq!(
            ep["disabled_reason"], "disabled through the admin API",
            "{ep}"
        );
        assert_eq!(
            gw.metric_strict("plugboard_webhook_endpoint_disabled", "endpoint=\"rx\"")
                .await,
            1.0
        );
    }
    // node-a's worker reads it from the database and stops.
    plugboard_tests::wait_until("node-a's worker to follow the disable", WAIT, || {
        a.log()
            .contains("webhook endpoint was disabled by another gateway process")
            .then_some(())
    })
    .await;
    let sent_before = rx.attempts().len();
    // Events recorded on both nodes queue up: node-a fans them out (so its
    // rounds run) and claims nothing.
    let on_a = session(&a, "off1").await;
    let on_b = session(&b, "off2").await;
    let queued = 2 * ONE_SESSION.len() as i64;
    let view = plugboard_tests::wait_until_admin(&a, |v| {
        v["endpoints"][0]["pending"].as_i64() == Some(queued)
    })
    .await;
    // One more round of node-a's worker (each lease renewal is one).
    let renewed = view["endpoints"][0]["lease_until"].clone();
    plugboard_tests::wait_until_admin(&a, |v| v["endpoints"][0]["lease_until"] != renewed).await;
    assert_eq!(
        rx.attempts().len(),
        sent_before,
        "nothing sent while disabled"
    );
    assert_eq!(
        endpoint(&b).await["pending"],
        queued,
        "node-b sees the same queue"
    );

    // Re-enabled through node-a, the leader: the backlog goes out, in order.
    let (status, body) = a
        .admin(Method::POST, "/admin/webhooks/rx/enable", None)
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"name": "rx", "enabled": true}))
    );
    rx.assert_exactly_once(&on_a).await;
    rx.assert_exactly_once(&on_b).await;
    for (user, id) in [("off1", &on_a), ("off2", &on_b)] {
        let mut want = Vec::new();
        expect(&mut want, id, &ONE_SESSION);
        assert_eq!(received(&rx, user), want, "per-user order of {user}");
    }
    for gw in [&a, &b] {
        let ep = endpoint(gw).await;
        assert_eq!(
            (ep["disabled"].clone(), ep["disabled_reason"].clone()),
            (json!(false), Value::Null),
            "{ep}"
        );
    }
    assert_no_duplicates(&rx, 3 * ONE_SESSION.len());
    assert_eq!(attempts(&b).await, 0.0, "node-b never sent");

    // Unknown endpoints are refused.
    let (status, body) = b
        .admin(Method::POST, "/admin/webhooks/nope/disable", None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}

#[tokio::test]
async fn a_killed_leader_is_replaced_in_time_without_loss_duplicates_or_reordering() {
    let rx = Receiver::start().await;
    let db = database().await;
    let a = node(&rx, &db, "node-a", LEASE).await;
    until_leader(&a, "node-a", WAIT).await;
    let b = node(&rx, &db, "node-b", LEASE).await;

    // Each user: a connection on node-a that stays open (its close comes
    // from node-a's crash recovery), and one on node-b that closes while
    // node-a is failing to deliver.
    let users: Vec<String> = (0..3).map(|i| format!("fo{i}")).collect();
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for u in &users {
        let ca = WsClient::connect_device(&a, u, "on-a").await;
        let cb = WsClient::connect_device(&b, u, "on-b").await;
        on_a.push(ca);
        on_b.push(cb);
    }
    for (ca, cb) in on_a.iter().zip(&on_b) {
        for id in [&ca.connection_id, &cb.connection_id] {
            let id = id.clone();
            rx.wait_for("the opens", WAIT, |ds| {
                ds.iter()
                    .any(|d| d.event_type == "connection.opened" && d.str("connection_id") == id)
                    .then_some(())
            })
            .await;
        }
    }
    rx.reply(Reply::Status(500));
    for cb in &mut on_b {
        cb.close(1000, "");
        cb.closed().await;
    }
    // node-a has each close in its retries when it dies.
    let closes: Vec<String> = on_b.iter().map(|c| c.connection_id.clone()).collect();
    rx.wait_for_requests("failed attempts of every close", WAIT, |attempts| {
        closes
            .iter()
            .all(|id| {
                attempts.iter().any(|a| {
                    a.answered == 500
                        && a.body["type"] == "connection.closed"
                        && a.body["data"]["connection_id"] == id.as_str()
                })
            })
            .then_some(())
    })
    .await;
    let restart = a.restart_handle();
    let killed = Instant::now();
    a.kill().await;

    // node-b takes over once node-a's lease lapses: at most a lease after
    // its last renewal, plus one try.
    let bound = LEASE + POLL + SLACK;
    until_leader(&b, "node-b", bound).await;
    let took = killed.elapsed();
    assert!(took <= bound, "took over {took:?} after the kill");
    // Anything node-a sent before it died was answered 500 by now.
    rx.reply(Reply::Status(200));
    // A close that node-a had in flight waits for its claim to end
    // (request timeout + 5 s after it was sent); the others go at once.
    let resumed = LEASE + POLL + REQUEST_TIMEOUT + Duration::from_secs(5) + SLACK;
    for id in &closes {
        let id = id.clone();
        rx.wait_for("the closes from node-b", resumed, |ds| {
            ds.iter()
                .any(|d| d.event_type == "connection.closed" && d.str("connection_id") == id)
                .then_some(())
        })
        .await;
    }
    assert!(
        attempts(&b).await >= closes.len() as f64,
        "node-b sent them"
    );

    // node-a comes back: its crash recovery closes what it left open, and
    // node-b, which holds the lease, delivers that too.
    let a2 = restart.restart().await;
    for ca in &on_a {
        let closed = rx.assert_exactly_once(&ca.connection_id).await;
        assert_eq!(closed.str("reason"), "gateway_crash");
    }
    for cb in &on_b {
        rx.assert_exactly_once(&cb.connection_id).await;
    }
    assert_no_duplicates(&rx, users.len() * 6);
    for (u, (ca, cb)) in users.iter().zip(on_a.iter().zip(&on_b)) {
        let mut want = Vec::new();
        expect(
            &mut want,
            &ca.connection_id,
            &["connection.opened", "user.online"],
        );
        expect(
            &mut want,
            &cb.connection_id,
            &["connection.opened", "connection.closed"],
        );
        expect(
            &mut want,
            &ca.connection_id,
            &["connection.closed", "user.offline"],
        );
        assert_eq!(received(&rx, u), want, "per-user order of {u}");
    }
    // The restarted node-a is a new holder and holds nothing: node-b sends.
    let ep = endpoint(&a2).await;
    assert!(
        ep["leader"]
            .as_str()
            .is_some_and(|l| l.starts_with("node-b/")),
        "{ep}"
    );
    assert_eq!(
        attempts(&a2).await,
        0.0,
        "the restarted node-a sent nothing"
    );
    let leader_gauge = "plugboard_webhook_endpoint_leader";
    assert_eq!(b.metric_strict(leader_gauge, "endpoint=\"rx\"").await, 1.0);
    assert_eq!(a2.metric_strict(leader_gauge, "endpoint=\"rx\"").await, 0.0);
    assert_eq!(
        rx_metric(&b, "plugboard_webhook_lease_takeovers_total").await,
        1.0
    );
}

#[tokio::test]
async fn a_leader_that_stops_cleanly_hands_the_endpoint_over_at_once() {
    // A lease far longer than the handover may take.
    let lease = Duration::from_secs(60);
    let rx = Receiver::start().await;
    let db = database().await;
    let a = node(&rx, &db, "node-a", lease).await;
    until_leader(&a, "node-a", WAIT).await;
    let b = node(&rx, &db, "node-b", lease).await;
    let before = session(&b, "calm0").await;
    rx.assert_exactly_once(&before).await;
    assert_eq!(a.terminate().await, Some(0));
    // Released after its flush: node-b takes it at its next try (a second
    // at most), not when the lease would have lapsed.
    let stopped = Instant::now();
    until_leader(&b, "node-b", Duration::from_secs(1) + SLACK).await;
    assert!(stopped.elapsed() < lease / 4);
    let after = session(&b, "calm1").await;
    rx.assert_exactly_once(&after).await;
    assert!(attempts(&b).await >= 4.0, "node-b delivers now");
    assert_no_duplicates(&rx, 2 * ONE_SESSION.len());
}
