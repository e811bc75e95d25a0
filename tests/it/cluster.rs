//! Cluster mode end to end: three gateway processes on one PostgreSQL
//! database, routed through one NATS server, all started by the harness
//! (`plugboard_tests::Cluster`). Every test runs whatever `TEST_STORAGE`
//! says: cluster nodes are always on PostgreSQL.
//!
//! What a user would notice, checked as they see it: every device on every
//! node sees a channel in `seq` order with nothing missing or twice; the
//! webhook stream has one opened and one closed event per connection and
//! one presence event per transition, also when a node is killed; a
//! client of a dead or draining node reconnects elsewhere and catches up;
//! NATS going away loses nothing acknowledged.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use plugboard_tests::{Cluster, ClusterOptions, Gateway, GatewayOptions, Receiver, WsClient, WAIT};
use reqwest::Method;
use serde_json::json;

/// At most two clusters (six gateway processes) at a time in this test
/// process: more would starve the 2-core machines these tests run on,
/// beside the rest of the suite.
static CLUSTERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Starts a cluster once a slot is free; the permit is held for the test.
async fn start(opts: ClusterOptions) -> (Cluster, tokio::sync::SemaphorePermit<'static>) {
    let permit = CLUSTERS
        .acquire()
        .await
        .expect("the semaphore is never closed");
    (Cluster::start(opts).await, permit)
}

/// Sends `count` messages from `c` to a channel, without waiting.
fn send_many(c: &WsClient, kind: &str, id: &str, tag: &str, count: usize) {
    for i in 0..count {
        c.send_json(json!({
            "type": "send", "channel_type": kind, "channel_id": id,
            "client_msg_id": format!("{tag}-{i}"), "payload": {"tag": tag, "i": i},
        }));
    }
}

/// What one device saw of a channel: the `seq` of each `message` frame in
/// arrival order, and the `seq` of each `sendack` of its own sends.
#[derive(Default, Debug)]
struct Seen {
    messages: Vec<u64>,
    acks: Vec<u64>,
}

/// Reads `c` until it has `want` frames (messages of `channel_id` plus
/// sendacks) in all.
async fn collect(c: &mut WsClient, channel_id: &str, want: usize) -> Seen {
    let mut seen = Seen::default();
    while seen.messages.len() + seen.acks.len() < want {
        let f = match tokio::time::timeout(WAIT, c.next_json_or_closed()).await {
            Ok(Some(f)) => f,
            // Which seqs never came tells a loss from a slow node.
            failed => {
                let mut got: Vec<u64> = seen.messages.iter().chain(&seen.acks).copied().collect();
                got.sort_unstable();
                let missing: Vec<u64> = (1..=want as u64)
                    .filter(|s| got.binary_search(s).is_err())
                    .collect();
                panic!(
                    "{} on {channel_id}, {} of {want} frames in: messages {:?}, sendacks {:?}; of 1..={want} not seen: {missing:?}",
                    if failed.is_err() {
                        format!("no frame within {WAIT:?}")
                    } else {
                        "connection closed".to_string()
                    },
                    seen.messages.len() + seen.acks.len(),
                    seen.messages,
                    seen.acks
                )
            }
        };
        match f["type"].as_str() {
            Some("message") if f["channel_id"] == channel_id => {
                seen.messages.push(f["seq"].as_u64().unwrap())
            }
            Some("sendack") => seen.acks.push(f["seq"].as_u64().unwrap()),
            Some("error") => panic!("error frame: {f}"),
            _ => {}
        }
    }
    seen
}

/// A channel's messages after `after`, all pages, as `sync` serves them.
async fn sync_after(c: &mut WsClient, kind: &str, id: &str, mut after: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        let page = c
            .request(
                json!({"type": "sync", "channel_type": kind, "channel_id": id,
                            "after_seq": after, "limit": 100}),
            )
            .await;
        assert_eq!(page["type"], "messages", "{page}");
        for m in page["messages"].as_array().unwrap() {
            seqs.push(m["seq"].as_u64().unwrap());
        }
        after = page["next_after_seq"].as_u64().unwrap_or(after);
        if !page["more"].as_bool().unwrap() {
            return seqs;
        }
    }
}

fn assert_in_order_once(what: &str, seqs: &[u64]) {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        seqs.len(),
        "{what}: a seq came twice: {seqs:?}"
    );
    assert_eq!(sorted, seqs, "{what}: out of seq order: {seqs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_on_every_node_sees_each_channel_in_seq_order() {
    let (cluster, _slot) = start(ClusterOptions::default()).await;
    let members: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    let (status, body) = cluster
        .node(0)
        .api(
            Method::POST,
            "/v1/groups",
            Some(json!({"group_id": "crew", "name": "Crew", "members": members})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // Each member has two devices, on two different nodes.
    let mut devices = Vec::new();
    for (k, m) in members.iter().enumerate() {
        for (d, node) in [("one", k % 3), ("two", (k + 1) % 3)] {
            let c = WsClient::connect_device(cluster.node(node), m, d).await;
            devices.push((m.clone(), d, node, c));
        }
    }
    // Device "one" of every member sends at once, so commits interleave
    // across the three nodes.
    const EACH: usize = 20;
    let total = members.len() * EACH;
    for (m, d, _, c) in &devices {
        if *d == "one" {
            send_many(c, "group", "crew", m, EACH);
        }
    }
    let mut tasks = Vec::new();
    for (m, d, node, mut c) in devices {
        tasks.push(tokio::spawn(async move {
            let seen = collect(&mut c, "crew", total).await;
            (format!("{m}/{d} on node {node}"), seen)
        }));
    }
    for t in tasks {
        let (who, seen) = t.await.unwrap();
        assert_in_order_once(&who, &seen.messages);
        let mut all: Vec<u64> = seen.messages.iter().chain(&seen.acks).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (1..=total as u64).collect::<Vec<_>>(),
            "{who}: every seq exactly once, as a message or its own sendack"
        );
    }

    // 1:1 across nodes, both ways at once.
    let mut alice = WsClient::connect(cluster.node(0), "alice").await;
    let mut bob = WsClient::connect(cluster.node(2), "bob").await;
    let mut bob_too = WsClient::connect_device(cluster.node(1), "bob", "tablet").await;
    send_many(&alice, "person", "bob", "a", 30);
    send_many(&bob, "person", "alice", "b", 30);
    let a = collect(&mut alice, "bob", 60).await;
    let b = collect(&mut bob, "alice", 60).await;
    let t = collect(&mut bob_too, "alice", 60).await;
    for (who, seen) in [("alice", &a), ("bob", &b), ("bob's tablet", &t)] {
        assert_in_order_once(who, &seen.messages);
    }
    assert_eq!(
        t.messages,
        (1..=60).collect::<Vec<_>>(),
        "bob's tablet sees both sides"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_kicks_controls_and_lists_reach_any_node() {
    let (cluster, _slot) = start(ClusterOptions::default()).await;
    let mut carol = WsClient::connect_device(cluster.node(2), "carol", "phone").await;
    let mut dave = WsClient::connect(cluster.node(1), "dave").await;

    // The admin list on any node covers every node.
    let (status, list) = cluster
        .node(0)
        .admin(Method::GET, "/admin/connections", None)
        .await;
    assert_eq!(status, 200, "{list}");
    let nodes: HashMap<String, String> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["connection_id"].as_str().unwrap().to_string(),
                c["node_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        nodes.get(&carol.connection_id).map(String::as_str),
        Some("node-c")
    );
    assert_eq!(
        nodes.get(&dave.connection_id).map(String::as_str),
        Some("node-b")
    );

    // A control sent through node a reaches carol on node c, counted.
    let (status, answer) = cluster
        .node(0)
        .api(
            Method::POST,
            "/v1/control",
            Some(json!({"kind": "ping.me", "payload": {"n": 1}, "targets": {"users": ["carol"]}})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], "delivered", "{answer}");
    assert_eq!(answer["results"][0]["devices"], 1, "{answer}");
    let frame = carol.next_of("control").await;
    assert_eq!(frame["kind"], "ping.me");
    assert_eq!(frame["payload"], json!({"n": 1}));

    // Controls to everyone online find users on every node.
    let (status, answer) = cluster
        .node(1)
        .api(
            Method::POST,
            "/v1/control",
            Some(json!({"kind": "all.hands", "payload": {}, "targets": {"online": true}})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["summary"]["delivered"], 2, "{answer}");
    carol.next_of("control").await;
    dave.next_of("control").await;

    // Presence through node b counts carol's device on node c.
    let (_, presence) = cluster
        .node(1)
        .api(Method::GET, "/v1/users/carol/presence", None)
        .await;
    assert_eq!(presence["online"], true, "{presence}");
    assert_eq!(presence["sessions"][0]["node_id"], "node-c", "{presence}");

    // The same device connecting on another node replaces the first.
    let carol_again = WsClient::connect_device(cluster.node(0), "carol", "phone").await;
    let (_, closed) = carol.closed().await;
    assert_eq!(closed.code, Some(4003), "{closed:?}");

    // A kick through node c closes dave on node b and carol on node a.
    for (user, mut client) in [("dave", dave), ("carol", carol_again)] {
        let (status, body) = cluster
            .node(2)
            .api(Method::POST, &format!("/v1/users/{user}/kick"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["kicked"], json!([client.connection_id]), "{body}");
        assert_eq!(client.closed().await.1.code, Some(4002));
    }

    // The cluster view lists the three nodes, alive.
    let (status, view) = cluster
        .node(2)
        .admin(Method::GET, "/admin/cluster", None)
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["node_id"], "node-c");
    assert_eq!(view["nats"], "connected");
    let alive: BTreeSet<&str> = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == true)
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(alive, BTreeSet::from(["node-a", "node-b", "node-c"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_over_three_nodes_reports_each_connection_and_transition_once() {
    plugboard_tests::raise_fd_limit();
    let rx = Receiver::start().await;
    let (cluster, _slot) = start(ClusterOptions::default().with_receiver(&rx.url)).await;
    let mut ids = Vec::new();
    for i in 0..60usize {
        let user = format!("churner{i}");
        // Two devices on two nodes, ended two different ways.
        let first = cluster.node(i % 3);
        let second = cluster.node((i + 1) % 3);
        let a = WsClient::connect_device(first, &user, "a").await;
        let mut b = WsClient::connect_device(second, &user, "b").await;
        ids.push((
            user.clone(),
            a.connection_id.clone(),
            b.connection_id.clone(),
        ));
        match i % 3 {
            0 => {
                a.reset();
                b.close(1000, "");
                b.closed().await;
            }
            1 => {
                let (status, _) = cluster
                    .node((i + 2) % 3)
                    .api(Method::POST, &format!("/v1/users/{user}/kick"), None)
                    .await;
                assert_eq!(status, 200);
                assert_eq!(b.closed().await.1.code, Some(4002));
            }
            _ => {
                // Replaced by the same device on the third node, then closed.
                let mut c = WsClient::connect_device(cluster.node((i + 2) % 3), &user, "b").await;
                assert_eq!(b.closed().await.1.code, Some(4003));
                a.drop_tcp();
                c.close(1000, "");
                c.closed().await;
                ids.push((user.clone(), c.connection_id.clone(), String::new()));
            }
        }
    }
    for (_, a, b) in &ids {
        for id in [a, b].into_iter().filter(|id| !id.is_empty()) {
            rx.assert_exactly_once(id).await;
        }
    }
    rx.wait_settled().await;
    for i in 0..60usize {
        let user = format!("churner{i}");
        let events = rx.for_user(&user);
        let presence: Vec<&str> = events
            .iter()
            .filter(|d| d.event_type.starts_with("user."))
            .map(|d| d.event_type.as_str())
            .collect();
        assert_eq!(
            presence,
            ["user.online", "user.offline"],
            "{user}: one online when the first device opened anywhere, one offline when the last closed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_closed_once_by_a_survivor_and_its_clients_catch_up_elsewhere() {
    let rx = Receiver::start().await;
    let ttl = Duration::from_secs(3);
    let (mut cluster, _slot) = start(ClusterOptions::default().with_receiver(&rx.url)).await;
    let mut sender = WsClient::connect(cluster.node(0), "sender").await;
    let mut victims = Vec::new();
    for i in 0..5 {
        victims.push(WsClient::connect(cluster.node(1), &format!("victim{i}")).await);
    }
    // Traffic to every victim before, during and after the kill.
    for i in 0..5 {
        send_many(
            &sender,
            "person",
            &format!("victim{i}"),
            &format!("pre{i}"),
            10,
        );
    }
    let first = collect(&mut sender, "", 50).await;
    assert_eq!(first.acks.len(), 50);
    let mut last_seen = HashMap::new();
    for (i, v) in victims.iter_mut().enumerate() {
        let seen = collect(v, "sender", 10).await;
        last_seen.insert(i, *seen.messages.last().unwrap());
    }
    let killed_at = Instant::now();
    cluster.kill(1).await;
    for i in 0..5 {
        send_many(
            &sender,
            "person",
            &format!("victim{i}"),
            &format!("post{i}"),
            10,
        );
    }
    let after = collect(&mut sender, "", 50).await;
    assert_eq!(after.acks.len(), 50, "sends go on while a node is down");

    // A survivor closes each of the dead node's connections once, 1006 node_lost.
    for v in &victims {
        let closed = rx.closed_event(&v.connection_id).await;
        assert_eq!(closed.str("reason"), "node_lost", "{:?}", closed.data);
        assert_eq!(closed.code(), 1006);
    }
    let took = killed_at.elapsed();
    assert!(
        took < ttl + Duration::from_secs(10),
        "the dead node's connections were closed {took:?} after the kill (lease {ttl:?})"
    );
    // Its clients reconnect to the other nodes and catch up with no gap.
    for (i, _) in victims.iter().enumerate() {
        let node = if i % 2 == 0 { 0 } else { 2 };
        let mut again = WsClient::connect(cluster.node(node), &format!("victim{i}")).await;
        let rest = sync_after(&mut again, "person", "sender", last_seen[&i]).await;
        let expected: Vec<u64> = (last_seen[&i] + 1..=20).collect();
        assert_eq!(rest, expected, "victim{i} catches up after the kill");
    }
    // The dead node comes back and closes nothing twice.
    cluster.restart(1).await;
    let back = WsClient::connect(cluster.node(1), "returner").await;
    drop(back);
    for v in &victims {
        rx.assert_exactly_once(&v.connection_id).await;
    }
    assert!(
        rx.delivered()
            .iter()
            .all(|d| d.str("reason") != "gateway_crash"),
        "the restarted node found nothing left to close"
    );
    for i in 0..5 {
        let offline = rx
            .for_user(&format!("victim{i}"))
            .iter()
            .filter(|d| d.event_type == "user.offline")
            .count();
        assert!(offline >= 1, "victim{i} went offline when its node died");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_going_away_under_load_loses_nothing_acknowledged() {
    let (cluster, _slot) = start(ClusterOptions::default()).await;
    let mut sender = WsClient::connect(cluster.node(0), "talker").await;
    let mut listeners = Vec::new();
    for node in [1, 2] {
        listeners.push(
            WsClient::connect_device(cluster.node(node), "hearer", &format!("d{node}")).await,
        );
    }
    const ROUND: usize = 40;
    send_many(&sender, "person", "hearer", "before", ROUND);
    assert_eq!(collect(&mut sender, "", ROUND).await.acks.len(), ROUND);
    cluster.nats().kill();
    send_many(&sender, "person", "hearer", "during", ROUND);
    assert_eq!(
        collect(&mut sender, "", ROUND).await.acks.len(),
        ROUND,
        "sends are acknowledged while NATS is down"
    );
    cluster.nats().start_again();
    send_many(&sender, "person", "hearer", "after", ROUND);
    assert_eq!(collect(&mut sender, "", ROUND).await.acks.len(), ROUND);
    // Without a sync of their own, both devices get every message once, in order.
    for (k, l) in listeners.iter_mut().enumerate() {
        let seen = collect(l, "talker", 3 * ROUND).await;
        assert_eq!(
            seen.messages,
            (1..=3 * ROUND as u64).collect::<Vec<_>>(),
            "device {k} of the hearer"
        );
    }
    let filled: f64 = cluster
        .node(1)
        .metric("plugboard_cluster_filled_messages_total", "")
        .await
        + cluster
            .node(2)
            .metric("plugboard_cluster_filled_messages_total", "")
            .await;
    assert!(
        filled > 0.0,
        "what NATS did not carry was read from the database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_sends_its_clients_elsewhere_with_nothing_lost() {
    let (mut cluster, _slot) = start(ClusterOptions::default()).await;
    let mut sender = WsClient::connect(cluster.node(0), "boss").await;
    let mut worker = WsClient::connect(cluster.node(2), "worker").await;
    send_many(&sender, "person", "worker", "one", 15);
    collect(&mut sender, "", 15).await;
    let got = collect(&mut worker, "boss", 15).await;
    let last = *got.messages.last().unwrap();
    let (exit, (frames, closed)) = tokio::join!(cluster.terminate(2), worker.closed());
    assert_eq!(closed.code, Some(1001), "{closed:?}");
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "meta" && f["event"] == "shutdown"),
        "the client is told before the close: {frames:?}"
    );
    assert_eq!(exit, Some(0), "node c drained and exited cleanly");
    send_many(&sender, "person", "worker", "two", 15);
    collect(&mut sender, "", 15).await;
    let mut again = WsClient::connect(cluster.node(1), "worker").await;
    let rest = sync_after(&mut again, "person", "boss", last).await;
    assert_eq!(rest, (last + 1..=30).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_single_node_has_no_cluster_view() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let (status, body) = gw.admin(Method::GET, "/admin/cluster", None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_clustered", "{body}");
}

/// Request bodies the receiver answered 200, as JSON.
fn bodies(rx: &Receiver) -> Vec<serde_json::Value> {
    rx.attempts()
        .into_iter()
        .filter(|a| a.answered == 200)
        .map(|a| a.body)
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_uploaded_to_one_node_serves_on_every_node_with_no_failed_call() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let v1 = std::fs::read(plugboard_tests::plugins::ECHO_FORMATTER).unwrap();
    let v2 = std::fs::read(plugboard_tests::plugins::ECHO_FORMATTER_V2).unwrap();
    std::fs::write(dir.path().join("echo.wasm"), &v1).unwrap();
    let extra = format!(
        "[plugin_runtime]\ndir = {:?}\nwatch = false\n\
         [[plugins]]\nname = \"echo\"\nfile = \"echo.wasm\"\non_error = \"fail-closed\"\n\
         [plugins.config]\nversion = \"x\"\n\
         [[webhooks]]\nname = \"rx\"\nurl = \"{}\"\nsecret = \"{}\"\nformatter = \"echo\"\n",
        dir.path().display().to_string(),
        rx.url,
        plugboard_tests::receiver::SECRET
    );
    let (cluster, _slot) = start(ClusterOptions::default().extra(&extra)).await;
    // Traffic across nodes all along: messages node a → node b, and
    // connections opening and closing on every node (their events go
    // through the formatter).
    let mut talker = WsClient::connect(cluster.node(0), "talker").await;
    let mut hearer = WsClient::connect(cluster.node(1), "hearer").await;
    let mut sent = 0usize;
    for swap in 0..6usize {
        let (bytes, label) = if swap % 2 == 0 {
            (&v2, "echo-v2")
        } else {
            (&v1, "echo")
        };
        let want = sha256_hex(bytes);
        send_many(&talker, "person", "hearer", &format!("s{swap}"), 10);
        sent += 10;
        let churn = WsClient::connect(cluster.node(swap % 3), &format!("churn{swap}")).await;
        let resp = reqwest::Client::new()
            .put(cluster.node(swap % 3).url("/admin/plugins/echo"))
            .bearer_auth(plugboard_tests::gateway::ADMIN_TOKEN)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let answer: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(answer["sha256"], want.as_str(), "{answer}");
        let nodes = answer["nodes"]
            .as_array()
            .expect("every other node's report");
        assert_eq!(nodes.len(), 2, "{answer}");
        for n in nodes {
            assert_eq!(n["answered"], true, "{answer}");
            assert_eq!(n["report"]["sha256"], want.as_str(), "{answer}");
        }
        churn.close(1000, "");
        // Every node serves the new version now, as its own view says.
        for (i, gw) in cluster.running() {
            let (_, view) = gw.admin(Method::GET, "/admin/plugins", None).await;
            let echo = view["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "echo")
                .cloned()
                .unwrap();
            assert_eq!(echo["sha256"], want.as_str(), "node {i}: {view}");
        }
        // An event created after the swap, on any node, is formatted by it.
        let user = format!("probe{swap}");
        let probe = WsClient::connect(cluster.node((swap + 1) % 3), &user).await;
        let body =
            plugboard_tests::wait_until(&format!("the opened event of {user}"), WAIT, || {
                bodies(&rx).into_iter().find(|b| {
                    b["data"]["user_id"] == user.as_str() && b["event"] == "connection.opened"
                })
            })
            .await;
        assert_eq!(body["plugin"], label, "swap {swap}: {body}");
        probe.close(1000, "");
    }
    let talked = collect(&mut talker, "", sent).await;
    assert_eq!(talked.acks.len(), sent);
    let heard = collect(&mut hearer, "talker", sent).await;
    assert_eq!(heard.messages, (1..=sent as u64).collect::<Vec<_>>());
    // No call failed on any node (only the endpoint's lease holder formats).
    let mut ok_calls = 0.0;
    for (i, gw) in cluster.running() {
        let (_, text) = gw.get_text("/metrics").await;
        for line in text
            .lines()
            .filter(|l| l.starts_with("plugboard_plugin_calls_total{"))
        {
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            if line.contains("outcome=\"ok\"") {
                ok_calls += value;
            } else {
                assert_eq!(value, 0.0, "node {i}: {line}");
            }
        }
    }
    assert!(ok_calls > 0.0, "the formatter was called");
}

/// Sends messages from `c` to `to`, one at a time, at least `count` and
/// on until `done` is set; a send refused (storage unavailable) is sent
/// again with the same `client_msg_id`, as a client would. Returns the
/// acknowledged seqs and how many were refused.
async fn send_through(
    c: &mut WsClient,
    to: &str,
    count: usize,
    done: &std::sync::atomic::AtomicBool,
) -> (Vec<u64>, usize) {
    let (mut acked, mut refused) = (Vec::new(), 0usize);
    let mut n = 0;
    while n < count || !done.load(std::sync::atomic::Ordering::SeqCst) {
        n += 1;
        let cmid = format!("m{n}");
        loop {
            let answer = c
                .request(
                    json!({"type": "send", "channel_type": "person", "channel_id": to,
                                "client_msg_id": cmid, "payload": {"n": n}}),
                )
                .await;
            match answer["type"].as_str() {
                Some("sendack") => {
                    acked.push(answer["seq"].as_u64().unwrap());
                    break;
                }
                Some("error") => {
                    // storage_unavailable, or a commit whose answer was
                    // lost: the same client_msg_id makes the retry safe.
                    if answer["code"] == "storage_unavailable" {
                        refused += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => panic!("unexpected answer to a send: {answer}"),
            }
        }
    }
    (acked, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_loses_nothing_on_any_node() {
    // Leases long enough to ride out the restart: no node fences.
    let (cluster, _slot) = start(
        ClusterOptions::default()
            .private_postgres()
            .lease(Duration::from_secs(20), Duration::from_secs(1))
            .extra("[storage]\nconnect_timeout = \"1s\"\nstatement_timeout = \"3s\"\n"),
    )
    .await;
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for w in 0..3usize {
        writers.push(WsClient::connect(cluster.node(w), &format!("writer{w}")).await);
        readers.push(WsClient::connect(cluster.node((w + 1) % 3), &format!("reader{w}")).await);
    }
    // At least COUNT each, and on until the restart is over, so that every
    // writer sends through it however fast the machine is.
    const COUNT: usize = 60;
    let restarted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (w, mut c) in writers.into_iter().enumerate() {
        let restarted = restarted.clone();
        tasks.push(tokio::spawn(async move {
            let out = send_through(&mut c, &format!("reader{w}"), COUNT, &restarted).await;
            (c, out)
        }));
    }
    // Restart PostgreSQL while the three writers send.
    let pg = cluster.postgres();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| {
        pg.stop();
        std::thread::sleep(Duration::from_secs(2));
        pg.start_again();
    });
    restarted.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut refused_total = 0;
    let mut keep = Vec::new();
    let mut sent = Vec::new();
    for t in tasks {
        let (c, (acked, refused)) = t.await.unwrap();
        assert!(acked.len() >= COUNT, "{}", acked.len());
        assert_eq!(
            acked,
            (1..=acked.len() as u64).collect::<Vec<_>>(),
            "one seq per message, in order"
        );
        refused_total += refused;
        sent.push(acked.len());
        keep.push(c);
    }
    assert!(refused_total > 0, "the restart was felt by the writers");
    // Every reader, on another node than its writer, got every message once, in order.
    for (w, r) in readers.iter_mut().enumerate() {
        let seen = collect(r, &format!("writer{w}"), sent[w]).await;
        assert_eq!(
            seen.messages,
            (1..=sent[w] as u64).collect::<Vec<_>>(),
            "reader{w}"
        );
    }
    // Every node is ready again and takes new connections.
    for (i, gw) in cluster.running() {
        plugboard_tests::wait_until_async(WAIT, || async {
            (gw.get_text("/readyz").await.0 == 200).then_some(())
        })
        .await;
        let fresh = WsClient::connect(gw, &format!("fresh{i}")).await;
        drop(fresh);
        assert_eq!(
            gw.metric("plugboard_cluster_fenced", "").await,
            0.0,
            "node {i}"
        );
    }
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_control_replayed_to_another_node_is_refused() {
    use hmac::{Hmac, Mac};
    let secret = "control-signing-secret-0123";
    let (cluster, _slot) = start(ClusterOptions::default().extra(&format!(
        "[control]\nrequire_signature = true\nsigning_secret = \"{secret}\"\n"
    )))
    .await;
    let body =
        json!({"kind": "signed", "payload": {}, "targets": {"users": ["nobody"]}}).to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    let signature = format!("v1={}", plugboard::hex(&mac.finalize().into_bytes()));
    let mut answers = Vec::new();
    for node in [0, 1, 2] {
        let resp = reqwest::Client::new()
            .post(cluster.node(node).url("/v1/control"))
            .bearer_auth(plugboard_tests::gateway::API_KEY)
            .header("content-type", "application/json")
            .header("plugboard-timestamp", ts.to_string())
            .header("plugboard-signature", &signature)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let answer: serde_json::Value = resp.json().await.unwrap();
        answers.push((status, answer["error"]["code"].clone()));
    }
    assert_eq!(answers[0].0, 200, "{answers:?}");
    for replay in &answers[1..] {
        assert_eq!(
            (replay.0, replay.1.as_str()),
            (401, Some("replayed_request")),
            "{answers:?}"
        );
    }
}
