//! Messages: 1:1 and group delivery to every device, offline catch-up by
//! sequence and by the per-user cursor, deduplicated retries, one order per
//! channel for concurrent senders, bad input, groups through the API, and
//! durability across SIGKILL.

use std::collections::{BTreeSet, HashMap};

use plugboard_tests::{Gateway, GatewayOptions, WsClient, WAIT};
use reqwest::Method;
use serde_json::{json, Value};

use crate::setup;

/// Sends a `send` frame and returns the answer (a `sendack` or an `error`).
pub async fn send(
    c: &mut WsClient,
    kind: &str,
    to: &str,
    payload: Value,
    cmid: Option<&str>,
) -> Value {
    let mut frame =
        json!({"type": "send", "channel_type": kind, "channel_id": to, "payload": payload});
    if let Some(cmid) = cmid {
        frame["client_msg_id"] = json!(cmid);
    }
    c.request(frame).await
}

/// Sends and insists on a `sendack`.
pub async fn send_ok(c: &mut WsClient, kind: &str, to: &str, text: &str) -> Value {
    let ack = send(c, kind, to, json!({ "text": text }), None).await;
    assert_eq!(ack["type"], "sendack", "{ack}");
    ack
}

/// Creates a group through the API.
pub async fn create_group(gw: &Gateway, gid: &str, members: &[&str]) {
    let (status, body) = gw
        .api(
            Method::POST,
            "/v1/groups",
            Some(json!({"group_id": gid, "name": gid, "members": members})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Reads the next `n` frames, which must all be `message` frames.
pub async fn messages(c: &mut WsClient, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(c.next_of("message").await);
    }
    out
}

/// Pages through a sync request until `more` is false; returns every message.
pub async fn sync_all(
    c: &mut WsClient,
    mut frame: Value,
    next_field: &str,
    pos_field: &str,
) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        frame["type"] = json!("sync");
        let page = c.request(frame.clone()).await;
        assert_eq!(page["type"], "messages", "{page}");
        all.extend(page["messages"].as_array().unwrap().iter().cloned());
        if !page["more"].as_bool().unwrap() {
            return all;
        }
        frame[pos_field] = page[next_field].clone();
    }
}

/// Sends `frame` and insists on an `error` answer with `code`.
pub async fn expect_error(c: &mut WsClient, frame: Value, code: &str) {
    let reply = c.request(frame).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert!(!reply["message"].as_str().unwrap().is_empty());
}

fn ids(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn one_to_one_and_group_messages_reach_every_device() {
    let (gw, rx) = setup("").await;
    let mut alice_phone = WsClient::connect_device(&gw, "alice", "phone").await;
    let mut alice_laptop = WsClient::connect_device(&gw, "alice", "laptop").await;
    let mut bob_phone = WsClient::connect_device(&gw, "bob", "phone").await;
    let mut bob_web = WsClient::connect_device(&gw, "bob", "web").await;
    let mut carol = WsClient::connect(&gw, "carol").await;

    let ack = send(
        &mut alice_phone,
        "person",
        "bob",
        json!({"text": "hi bob"}),
        Some("a-1"),
    )
    .await;
    assert_eq!(ack["type"], "sendack", "{ack}");
    assert_eq!(ack["seq"], 1);
    assert_eq!(ack["channel_id"], "bob");
    assert_eq!(ack["client_msg_id"], "a-1");
    assert_eq!(ack["duplicate"], false);
    let id = ack["message_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("msg_"), "{id}");

    // The sender's other device sees the channel as "bob", bob's devices as "alice".
    let copy = alice_laptop.next_of("message").await;
    assert_eq!(
        (copy["message_id"].as_str(), copy["channel_id"].as_str()),
        (Some(id.as_str()), Some("bob"))
    );
    for c in [&mut bob_phone, &mut bob_web] {
        let m = c.next_of("message").await;
        assert_eq!(m["message_id"], id.as_str());
        assert_eq!(m["channel_type"], "person");
        assert_eq!(m["channel_id"], "alice");
        assert_eq!(m["sender"], "alice");
        assert_eq!(m["seq"], 1);
        assert_eq!(m["payload"], json!({"text": "hi bob"}));
        assert_eq!(m["version"], ack["version"]);
    }

    create_group(&gw, "team", &["alice", "bob", "carol"]).await;
    let gack = send_ok(&mut carol, "group", "team", "hello team").await;
    assert_eq!(gack["seq"], 1);
    for c in [
        &mut alice_phone,
        &mut alice_laptop,
        &mut bob_phone,
        &mut bob_web,
    ] {
        let m = c.next_of("message").await;
        assert_eq!(m["message_id"], gack["message_id"]);
        assert_eq!(m["channel_type"], "group");
        assert_eq!(m["channel_id"], "team");
        assert_eq!(m["sender"], "carol");
    }
    // Carol got her ack and nothing of the person message: her next frame answers a ping.
    let pong = carol.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "meta");
    // Acks are accepted silently.
    bob_phone.send_json(json!({"type": "ack", "message_ids": [id.clone()]}));
    let pong = bob_phone.request(json!({"type": "ping"})).await;
    assert_eq!(pong["event"], "heartbeat");

    // Both messages reach the webhook receiver as message.created.
    let events = rx
        .wait_for("two message.created events", WAIT, |d| {
            let m: Vec<_> = d
                .iter()
                .filter(|e| e.event_type == "message.created")
                .cloned()
                .collect();
            (m.len() == 2).then_some(m)
        })
        .await;
    let person = events
        .iter()
        .find(|e| e.str("channel_type") == "person")
        .unwrap();
    assert_eq!(person.str("message_id"), id);
    assert_eq!(person.str("sender"), "alice");
    assert_eq!(person.str("channel_id"), "bob");
    assert_eq!(person.data["payload"], json!({"text": "hi bob"}));
    let group = events
        .iter()
        .find(|e| e.str("channel_type") == "group")
        .unwrap();
    assert_eq!(group.str("channel_id"), "team");
    assert_eq!(group.data["seq"], 1);
}

#[tokio::test]
async fn an_offline_device_catches_up_exactly() {
    let (gw, _rx) = setup("").await;
    create_group(&gw, "pair", &["alice", "bob"]).await;
    let mut alice = WsClient::connect(&gw, "alice").await;
    let bob = WsClient::connect(&gw, "bob").await;
    bob.close(1000, "going offline");
    let mut bob = bob;
    bob.closed().await;

    let mut person_acks = Vec::new();
    for i in 0..25 {
        person_acks.push(send_ok(&mut alice, "person", "bob", &format!("p{i}")).await);
    }
    let mut group_acks = Vec::new();
    for i in 0..5 {
        group_acks.push(send_ok(&mut alice, "group", "pair", &format!("g{i}")).await);
    }
    let want: Vec<String> = person_acks
        .iter()
        .map(|a| a["message_id"].as_str().unwrap().to_string())
        .collect();

    let mut bob = WsClient::connect(&gw, "bob").await;
    // Per channel, forwards from sequence 0, in pages of 10.
    let mut pages = Vec::new();
    let mut after = 0u64;
    loop {
        let page = bob
            .request(json!({"type": "sync", "channel_type": "person", "channel_id": "alice", "after_seq": after, "limit": 10}))
            .await;
        assert_eq!(page["type"], "messages", "{page}");
        assert_eq!(page["channel_id"], "alice");
        let n = page["messages"].as_array().unwrap().len();
        pages.push(n);
        after = page["next_after_seq"].as_u64().unwrap();
        if !page["more"].as_bool().unwrap() {
            break;
        }
    }
    assert_eq!(pages, vec![10, 10, 5]);
    let got = sync_all(
        &mut bob,
        json!({"channel_type": "person", "channel_id": "alice", "after_seq": 0, "limit": 10}),
        "next_after_seq",
        "after_seq",
    )
    .await;
    assert_eq!(ids(&got), want, "exactly the missed messages, in order");
    let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=25).collect::<Vec<_>>());

    // From the middle: only what comes after.
    let tail = sync_all(
        &mut bob,
        json!({"channel_type": "person", "channel_id": "alice", "after_seq": 20}),
        "next_after_seq",
        "after_seq",
    )
    .await;
    assert_eq!(ids(&tail), want[20..].to_vec());

    // Across channels with the per-user cursor, in pages of 7.
    let all = sync_all(
        &mut bob,
        json!({"after_version": 0, "limit": 7}),
        "next_after_version",
        "after_version",
    )
    .await;
    assert_eq!(all.len(), 30, "{all:?}");
    let versions: Vec<u64> = all.iter().map(|m| m["version"].as_u64().unwrap()).collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions increase: {versions:?}"
    );
    let mut expect: BTreeSet<String> = want.iter().cloned().collect();
    expect.extend(
        group_acks
            .iter()
            .map(|a| a["message_id"].as_str().unwrap().to_string()),
    );
    assert_eq!(ids(&all).into_iter().collect::<BTreeSet<_>>(), expect);
    // After the last group message's version nothing is left.
    let last_version = group_acks.last().unwrap()["version"].as_u64().unwrap();
    let none = bob
        .request(json!({"type": "sync", "after_version": last_version}))
        .await;
    assert_eq!(none["messages"], json!([]));
    assert_eq!(none["more"], false);
    assert_eq!(none["next_after_version"], last_version);

    // History backwards from the end.
    let page = bob
        .request(json!({"type": "sync", "channel_type": "person", "channel_id": "alice", "before_seq": 26, "limit": 10}))
        .await;
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (16..=25).collect::<Vec<_>>());
    assert_eq!(page["more"], true);
    assert_eq!(page["next_before_seq"], 16);
    let older = sync_all(
        &mut bob,
        json!({"channel_type": "person", "channel_id": "alice", "before_seq": 6, "limit": 10}),
        "next_before_seq",
        "before_seq",
    )
    .await;
    let seqs: Vec<u64> = older.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);

    // The server API reads the same history on the user's behalf.
    let (status, body) = gw
        .api(
            Method::GET,
            "/v1/users/bob/messages?channel_type=group&channel_id=pair&after_seq=0",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn a_retried_send_is_not_duplicated() {
    let (gw, _rx) = setup("").await;
    let mut alice = WsClient::connect(&gw, "alice").await;
    let mut bob = WsClient::connect(&gw, "bob").await;
    let first = send(
        &mut alice,
        "person",
        "bob",
        json!({"text": "once"}),
        Some("retry-1"),
    )
    .await;
    let again = send(
        &mut alice,
        "person",
        "bob",
        json!({"text": "once"}),
        Some("retry-1"),
    )
    .await;
    assert_eq!(again["type"], "sendack", "{again}");
    assert_eq!(again["message_id"], first["message_id"]);
    assert_eq!(again["seq"], first["seq"]);
    assert_eq!(again["duplicate"], true);
    // The same client message id through the API, as alice: the same message.
    let (status, api) = gw
        .api(
            Method::POST,
            "/v1/messages",
            Some(json!({"from": "alice", "channel_type": "person", "channel_id": "bob", "payload": {"text": "once"}, "client_msg_id": "retry-1"})),
        )
        .await;
    assert_eq!(status, 200, "{api}");
    assert_eq!(api["message_id"], first["message_id"]);
    assert_eq!(api["duplicate"], true);

    let second = send(
        &mut alice,
        "person",
        "bob",
        json!({"text": "twice"}),
        Some("retry-2"),
    )
    .await;
    assert_eq!(second["seq"], 2);
    // Bob gets one frame per message: the retries sent nothing.
    let got = messages(&mut bob, 2).await;
    assert_eq!(
        ids(&got),
        vec![
            first["message_id"].as_str().unwrap().to_string(),
            second["message_id"].as_str().unwrap().to_string()
        ]
    );
    let stored = bob
        .request(json!({"type": "sync", "channel_type": "person", "channel_id": "alice", "after_seq": 0}))
        .await;
    assert_eq!(stored["messages"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn concurrent_senders_in_one_channel_share_one_order() {
    let (gw, _rx) = setup("").await;
    let senders = ["s1", "s2", "s3", "s4"];
    let mut members: Vec<&str> = senders.to_vec();
    members.extend(["r1", "r2"]);
    create_group(&gw, "busy", &members).await;
    let per_sender = 40usize;
    let total = per_sender * senders.len();
    let mut receivers = [
        WsClient::connect(&gw, "r1").await,
        WsClient::connect(&gw, "r2").await,
    ];
    let mut clients = Vec::new();
    for s in senders {
        clients.push(WsClient::connect(&gw, s).await);
    }
    // Every sender pipelines its messages without waiting for acks.
    for (i, c) in clients.iter().enumerate() {
        for n in 0..per_sender {
            c.send_json(
                json!({"type": "send", "id": n, "channel_type": "group", "channel_id": "busy",
                "payload": {"text": format!("{}-{n}", senders[i])}}),
            );
        }
    }
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            // Acks for our own messages, frames for the others', all in channel order.
            let mut acks = Vec::new();
            let mut seen = Vec::new();
            while acks.len() < per_sender || seen.len() < total - per_sender {
                let f = c.next_json().await;
                match f["type"].as_str().unwrap() {
                    "sendack" => acks.push(f),
                    "message" => seen.push(f["seq"].as_u64().unwrap()),
                    _ => panic!("unexpected frame {f}"),
                }
            }
            (acks, seen)
        }));
    }
    let mut orders = Vec::new();
    for r in receivers.iter_mut() {
        let got = messages(r, total).await;
        let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "every recipient sees 1..{total} in order"
        );
        orders.push(ids(&got));
    }
    assert_eq!(orders[0], orders[1], "both recipients see the same order");
    let mut all_acked = BTreeSet::new();
    for t in tasks {
        let (acks, seen) = t.await.unwrap();
        // One connection's sends keep their order; acks answer them in order.
        let ids: Vec<u64> = acks.iter().map(|a| a["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (0..per_sender as u64).collect::<Vec<_>>());
        let seqs: Vec<u64> = acks.iter().map(|a| a["seq"].as_u64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "senders see the others in order too"
        );
        all_acked.extend(seqs);
    }
    assert_eq!(all_acked, (1..=total as u64).collect::<BTreeSet<_>>());
}

#[tokio::test]
async fn bad_messages_get_clear_errors_and_change_nothing() {
    let (gw, _rx) = setup("[messaging]\nmax_payload_size = \"1KiB\"\n").await;
    create_group(&gw, "club", &["bob", "carol"]).await;
    let mut alice = WsClient::connect(&gw, "alice").await;
    expect_error(
        &mut alice,
        json!({"type": "send", "channel_type": "group", "channel_id": "nope", "payload": {}}),
        "unknown_channel",
    )
    .await;
    expect_error(
        &mut alice,
        json!({"type": "send", "channel_type": "group", "channel_id": "club", "payload": {}}),
        "not_member",
    )
    .await;
    let big = "x".repeat(2000);
    expect_error(&mut alice, json!({"type": "send", "channel_type": "person", "channel_id": "bob", "payload": {"text": big}}), "payload_too_large").await;
    expect_error(
        &mut alice,
        json!({"type": "send", "channel_type": "person", "channel_id": "bob"}),
        "malformed_frame",
    )
    .await;
    expect_error(
        &mut alice,
        json!({"type": "send", "channel_type": "room", "channel_id": "bob", "payload": {}}),
        "bad_request",
    )
    .await;
    expect_error(
        &mut alice,
        json!({"type": "send", "channel_type": "person", "channel_id": "", "payload": {}}),
        "bad_request",
    )
    .await;
    expect_error(&mut alice, json!({"type": "send", "channel_type": "person", "channel_id": "bob", "payload": {}, "extra": 1}), "malformed_frame").await;
    expect_error(
        &mut alice,
        json!({"type": "send", "channel_type": "person", "channel_id": "system", "payload": {}}),
        "bad_request",
    )
    .await;
    expect_error(
        &mut alice,
        json!({"type": "sync", "channel_type": "group", "channel_id": "club", "after_seq": 0}),
        "not_member",
    )
    .await;
    expect_error(
        &mut alice,
        json!({"type": "sync", "after_seq": 0}),
        "bad_request",
    )
    .await;
    expect_error(
        &mut alice,
        json!({"type": "sync", "after_version": 0, "after_seq": 0}),
        "bad_request",
    )
    .await;
    expect_error(
        &mut alice,
        json!({"type": "read", "channel_type": "person", "channel_id": "nobody"}),
        "unknown_conversation",
    )
    .await;
    // Not JSON at all: an error without an id, and the connection lives on.
    alice.send(tokio_tungstenite::tungstenite::Message::text("{not json"));
    let e = alice.next_of("error").await;
    assert_eq!(e["code"], "malformed_frame");

    // The server API answers the same mistakes with statuses.
    let api = |body: Value| {
        let gw = &gw;
        async move { gw.api(Method::POST, "/v1/messages", Some(body)).await }
    };
    let (s, b) = api(json!({"channel_type": "group", "channel_id": "nope", "payload": {}})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("unknown_channel")),
        "{b}"
    );
    let (s, b) =
        api(json!({"from": "alice", "channel_type": "group", "channel_id": "club", "payload": {}}))
            .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (403, Some("not_member")),
        "{b}"
    );
    let (s, b) = api(json!({"from": "alice", "channel_type": "person", "channel_id": "bob", "payload": {"text": "x".repeat(2000)}})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{b}"
    );
    let (s, b) = api(json!({"from": "alice", "channel_type": "person", "channel_id": "bob"})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (422, Some("bad_request")),
        "{b}"
    );
    let (s, b) = api(json!({"from": "alice", "channel_type": "person", "channel_id": "bob", "payload": {}, "to": "x"})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (422, Some("bad_request")),
        "{b}"
    );
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .json(&json!({"channel_type": "person", "channel_id": "bob", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let b: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(b["error"]["code"], "unauthorized", "{b}");

    // Nothing was stored: bob's channel with alice and the club are empty,
    // and the next good message is the first of its channel.
    let mut bob = WsClient::connect(&gw, "bob").await;
    let empty = bob.request(json!({"type": "sync", "channel_type": "person", "channel_id": "alice", "after_seq": 0})).await;
    assert_eq!(empty["messages"], json!([]), "{empty}");
    let club = bob
        .request(
            json!({"type": "sync", "channel_type": "group", "channel_id": "club", "after_seq": 0}),
        )
        .await;
    assert_eq!(club["messages"], json!([]), "{club}");
    let (_, list) = gw
        .api(Method::GET, "/v1/users/bob/conversations", None)
        .await;
    assert_eq!(list["conversations"], json!([]), "{list}");
    let ack = send_ok(&mut alice, "person", "bob", "finally").await;
    assert_eq!(ack["seq"], 1);
}

#[tokio::test]
async fn groups_are_managed_through_the_api_and_the_system_can_send() {
    let (gw, _rx) = setup("").await;
    let (s, g) = gw
        .api(
            Method::POST,
            "/v1/groups",
            Some(
                json!({"group_id": "g1", "name": "Team", "data": {"topic": "x"},
                "members": ["alice", {"user_id": "bob", "role": "admin"}, "carol", "alice"]}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{g}");
    assert_eq!(g["member_count"], 3);
    assert_eq!(g["data"], json!({"topic": "x"}));
    let (s, dup) = gw
        .api(Method::POST, "/v1/groups", Some(json!({"group_id": "g1"})))
        .await;
    assert_eq!(
        (s, dup["error"]["code"].as_str()),
        (409, Some("group_exists"))
    );
    let (s, gen) = gw.api(Method::POST, "/v1/groups", Some(json!({}))).await;
    assert_eq!(s, 201);
    assert!(
        gen["group_id"].as_str().unwrap().starts_with("grp_"),
        "{gen}"
    );

    let (s, g) = gw
        .api(
            Method::PATCH,
            "/v1/groups/g1",
            Some(json!({"name": "Team 2"})),
        )
        .await;
    assert_eq!(
        (s, g["name"].as_str(), g["data"]["topic"].as_str()),
        (200, Some("Team 2"), Some("x"))
    );
    let (_, added) = gw
        .api(
            Method::POST,
            "/v1/groups/g1/members",
            Some(json!({"members": ["dave", "alice"], "role": "guest"})),
        )
        .await;
    assert_eq!(added["added"], json!(["dave"]));
    // Pages of two, in user id order.
    let (_, p1) = gw
        .api(Method::GET, "/v1/groups/g1/members?limit=2", None)
        .await;
    let names: Vec<&str> = p1["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["alice", "bob"]);
    assert_eq!(p1["members"][1]["role"], "admin");
    assert_eq!(p1["more"], true);
    let (_, p2) = gw
        .api(
            Method::GET,
            &format!(
                "/v1/groups/g1/members?limit=2&after={}",
                p1["next_after"].as_str().unwrap()
            ),
            None,
        )
        .await;
    let names: Vec<&str> = p2["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["carol", "dave"]);
    assert_eq!(p2["more"], false);

    // The system sends to the group and to a person.
    let mut bob = WsClient::connect(&gw, "bob").await;
    let (s, sys) = gw
        .api(Method::POST, "/v1/messages", Some(json!({"channel_type": "group", "channel_id": "g1", "payload": {"text": "maintenance at noon"}})))
        .await;
    assert_eq!(s, 201, "{sys}");
    assert_eq!(sys["sender"], "system");
    let m = bob.next_of("message").await;
    assert_eq!(
        (m["sender"].as_str(), m["system"].as_bool()),
        (Some("system"), Some(true))
    );
    let (s, _) = gw
        .api(Method::POST, "/v1/messages", Some(json!({"channel_type": "person", "channel_id": "bob", "payload": "your order shipped"})))
        .await;
    assert_eq!(s, 201);
    let m = bob.next_of("message").await;
    assert_eq!(
        (m["channel_id"].as_str(), m["payload"].as_str()),
        (Some("system"), Some("your order shipped"))
    );
    // Nobody can connect as the system user.
    let refused = WsClient::try_connect(
        &gw,
        &format!("{}?token={}", gw.ws_url(), gw.token("system", None, None)),
        None,
    )
    .await;
    let refused = refused.err().expect("refused");
    assert_eq!(
        (refused.status, refused.code().as_deref()),
        (Some(401), Some("bad_token")),
        "{refused:?}"
    );
    // A user sends as a member through the API.
    let (s, _) = gw
        .api(Method::POST, "/v1/messages", Some(json!({"from": "carol", "channel_type": "group", "channel_id": "g1", "payload": {"text": "ok"}})))
        .await;
    assert_eq!(s, 201);
    assert_eq!(bob.next_of("message").await["sender"], "carol");

    // Removing bob: he can no longer send, and the group leaves his list.
    let (_, list) = gw
        .api(Method::GET, "/v1/users/bob/conversations", None)
        .await;
    let version = list["version"].as_u64().unwrap();
    let (s, r) = gw
        .api(Method::DELETE, "/v1/groups/g1/members/bob", None)
        .await;
    assert_eq!((s, r["removed"].clone()), (200, json!(["bob"])));
    let (s, r) = gw
        .api(Method::DELETE, "/v1/groups/g1/members/bob", None)
        .await;
    assert_eq!((s, r["error"]["code"].as_str()), (404, Some("not_member")));
    let e = send(&mut bob, "group", "g1", json!({}), None).await;
    assert_eq!(e["code"], "not_member");
    let (_, delta) = gw
        .api(
            Method::GET,
            &format!("/v1/users/bob/conversations?since_version={version}"),
            None,
        )
        .await;
    assert_eq!(
        delta["removed"],
        json!([{"channel_type": "group", "channel_id": "g1", "version": delta["removed"][0]["version"], "reason": "deleted"}]),
        "{delta}"
    );
    let (s, r) = gw
        .api(
            Method::DELETE,
            "/v1/groups/g1/members",
            Some(json!({"members": ["dave", "nobody"]})),
        )
        .await;
    assert_eq!((s, r["removed"].clone()), (200, json!(["dave"])));

    // Deleting the group: unknown afterwards everywhere.
    let (s, _) = gw.api(Method::DELETE, "/v1/groups/g1", None).await;
    assert_eq!(s, 200);
    for (method, path) in [
        (Method::GET, "/v1/groups/g1"),
        (Method::DELETE, "/v1/groups/g1"),
        (Method::GET, "/v1/groups/g1/members"),
    ] {
        let (s, b) = gw.api(method, path, None).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (404, Some("unknown_channel")),
            "{path}"
        );
    }
    let (s, b) = gw
        .api(Method::PATCH, "/v1/groups/g1", Some(json!({"name": "x"})))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("unknown_channel"))
    );
    let (s, b) = gw
        .api(
            Method::POST,
            "/v1/messages",
            Some(json!({"channel_type": "group", "channel_id": "g1", "payload": {}})),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("unknown_channel")),
        "{b}"
    );
}

#[tokio::test]
async fn acknowledged_messages_survive_sigkill_and_reach_their_recipients() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let pairs = 4usize;
    let mut tasks = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for p in 0..pairs {
        let mut c = WsClient::connect(&gw, &format!("sender{p}")).await;
        let stop = stop_rx.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            // Keeps up to 8 sends in flight until told to stop or the gateway dies.
            let mut got: Vec<(u64, String)> = Vec::new();
            let mut sent = 0u64;
            let mut in_flight = 0u64;
            let mut stopping = false;
            loop {
                while !stopping && in_flight < 8 {
                    c.send_json(json!({"type": "send", "id": sent, "channel_type": "person",
                        "channel_id": format!("receiver{p}"), "payload": {"text": format!("m{sent}")}}));
                    sent += 1;
                    in_flight += 1;
                }
                stopping = stopping || *stop.borrow();
                let (frames, done) = match tokio::time::timeout(std::time::Duration::from_millis(50), c.next_json_or_closed()).await {
                    Ok(Some(f)) => (vec![f], false),
                    Ok(None) => (vec![], true),
                    Err(_) => (vec![], false),
                };
                for f in frames {
                    if f["type"] == "sendack" {
                        got.push((f["seq"].as_u64().unwrap(), f["message_id"].as_str().unwrap().to_string()));
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        in_flight -= 1;
                    }
                }
                if done {
                    return got;
                }
            }
        }));
    }
    // Let a few hundred messages through, then kill the process mid-stream.
    plugboard_tests::wait_until("300 acknowledged messages", WAIT * 3, || {
        (acked.load(std::sync::atomic::Ordering::Relaxed) >= 300).then_some(())
    })
    .await;
    let handle = gw.restart_handle();
    gw.kill().await;
    let _ = stop_tx.send(true);
    let mut acked_by_pair = Vec::new();
    for t in tasks {
        acked_by_pair.push(t.await.unwrap());
    }
    let gw = handle.restart().await;
    for (p, acks) in acked_by_pair.iter().enumerate() {
        assert!(!acks.is_empty());
        let mut r = WsClient::connect(&gw, &format!("receiver{p}")).await;
        let got = sync_all(
            &mut r,
            json!({"channel_type": "person", "channel_id": format!("sender{p}"), "after_seq": 0, "limit": 500}),
            "next_after_seq",
            "after_seq",
        )
        .await;
        let stored: HashMap<String, u64> = got
            .iter()
            .map(|m| {
                (
                    m["message_id"].as_str().unwrap().to_string(),
                    m["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        for (seq, id) in acks {
            assert_eq!(
                stored.get(id),
                Some(seq),
                "acknowledged message {id} (seq {seq}) is stored after the restart"
            );
        }
        // No gaps and no duplicates: sequence numbers run 1..n.
        let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=got.len() as u64).collect::<Vec<_>>());
    }
    // The channel goes on from where it was.
    let mut s = WsClient::connect(&gw, "sender0").await;
    let ack = send_ok(&mut s, "person", "receiver0", "after the crash").await;
    let max0 = acked_by_pair[0].iter().map(|(s, _)| *s).max().unwrap();
    assert!(ack["seq"].as_u64().unwrap() > max0);
}
