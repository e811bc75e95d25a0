//! Recent conversations: incremental sync always rebuilds what a full sync
//! shows, pagination under concurrent messages, unread counts across
//! devices, hide and delete, last messages, reset, and the filter chain on
//! both the client frame and the server API.

use std::collections::{BTreeMap, BTreeSet};

use plugboard_tests::{Gateway, WsClient, WAIT};
use reqwest::Method;
use serde_json::{json, Value};

use crate::messaging::{create_group, expect_error, send_ok};
use crate::setup;

type State = BTreeMap<(String, String), Value>;

fn key(c: &Value) -> (String, String) {
    (
        c["channel_type"].as_str().unwrap().to_string(),
        c["channel_id"].as_str().unwrap().to_string(),
    )
}

/// Applies one answer (`conversations` and `removed`) to a client's state.
fn apply(state: &mut State, page: &Value) {
    for c in page["conversations"].as_array().unwrap() {
        state.insert(key(c), c.clone());
    }
    for r in page["removed"].as_array().unwrap() {
        state.remove(&key(r));
    }
}

/// One conversation page through the server API.
async fn api_page(gw: &Gateway, user: &str, query: &str) -> Value {
    let (status, body) = gw
        .api(
            Method::GET,
            &format!("/v1/users/{user}/conversations?{query}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{query}: {body}");
    body
}

/// Every page of a sync from `since` through the API: the pages and the version to hold.
async fn api_sync(gw: &Gateway, user: &str, since: u64, limit: usize) -> (Vec<Value>, u64) {
    let mut pages = Vec::new();
    let mut query = format!("since_version={since}&limit={limit}");
    loop {
        let page = api_page(gw, user, &query).await;
        let more = page["more"].as_bool().unwrap();
        let version = page["version"].as_u64().unwrap();
        let cursor = page["cursor"].as_str().map(str::to_string);
        pages.push(page);
        if !more {
            return (pages, version);
        }
        query = format!("cursor={}&limit={limit}", cursor.unwrap());
    }
}

/// The same through `sync_conversations` frames.
async fn ws_sync(c: &mut WsClient, since: u64, limit: usize) -> (Vec<Value>, u64) {
    let mut pages = Vec::new();
    let mut frame = json!({"type": "sync_conversations", "since_version": since, "limit": limit});
    loop {
        let page = c.request(frame.clone()).await;
        assert_eq!(page["type"], "conversations", "{page}");
        let more = page["more"].as_bool().unwrap();
        let version = page["version"].as_u64().unwrap();
        let cursor = page["cursor"].clone();
        pages.push(page);
        if !more {
            return (pages, version);
        }
        frame = json!({"type": "sync_conversations", "cursor": cursor, "limit": limit});
    }
}

async fn full_state(gw: &Gateway, user: &str) -> State {
    let (pages, _) = api_sync(gw, user, 0, 3).await;
    let mut state = State::new();
    for p in &pages {
        assert_eq!(p["removed"], json!([]), "a full sync removes nothing");
        for c in p["conversations"].as_array().unwrap() {
            assert!(
                state.insert(key(c), c.clone()).is_none(),
                "{c} listed twice"
            );
        }
    }
    state
}

/// A small deterministic generator, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn api_send(gw: &Gateway, from: &str, kind: &str, to: &str, text: &str) {
    let (status, body) = gw
        .api(
            Method::POST,
            "/v1/messages",
            Some(json!({"from": from, "channel_type": kind, "channel_id": to, "payload": {"text": text}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

fn key_of(target: (&str, &str)) -> (String, String) {
    (target.0.to_string(), target.1.to_string())
}

/// A change answers `200` with the conversation when the user has it, and
/// `404 unknown_conversation` when not.
#[track_caller]
fn check_change(step: usize, what: &str, has: bool, status: u16, body: &Value) {
    if has {
        assert_eq!(status, 200, "step {step}: {what}: {body}");
        assert!(
            body["conversations"].is_array(),
            "step {step}: {what}: {body}"
        );
    } else {
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("unknown_conversation")),
            "step {step}: {what}: {body}"
        );
    }
}

#[tokio::test]
async fn incremental_syncs_always_rebuild_the_full_list() {
    let (gw, _rx) = setup("").await;
    let peers = ["p1", "p2", "p3", "p4", "p5"];
    create_group(&gw, "ga", &["u0", "p1", "p2"]).await;
    create_group(&gw, "gb", &["u0", "p3", "p4", "p5"]).await;
    let mut ws = WsClient::connect_device(&gw, "u0", "d1").await;
    let mut rng = Rng(0x5eed_2026_1122);
    let mut state = State::new();
    let mut version = 0u64;
    let mut syncs = 0;
    // Whether u0 has each conversation, and whether it is deleted: what
    // decides between `200` and `404 unknown_conversation` below.
    let mut rows: std::collections::HashMap<(String, String), bool> = Default::default();
    for step in 0..160 {
        let peer = peers[rng.below(peers.len() as u64) as usize];
        let group = if rng.below(2) == 0 { "ga" } else { "gb" };
        let target = if rng.below(3) == 0 {
            ("group", group)
        } else {
            ("person", peer)
        };
        match rng.below(100) {
            0..=29 => {
                api_send(&gw, peer, "person", "u0", &format!("s{step}")).await;
                rows.insert(("person".into(), peer.into()), false);
            }
            30..=39 => {
                api_send(&gw, "u0", "person", peer, &format!("s{step}")).await;
                rows.insert(("person".into(), peer.into()), false);
            }
            40..=59 => {
                rows.insert(("group".into(), group.into()), false);
                let sender = if group == "ga" {
                    ["u0", "p1", "p2"][rng.below(3) as usize]
                } else {
                    "p3"
                };
                api_send(&gw, sender, "group", group, &format!("s{step}")).await
            }
            60..=69 => {
                let body = if rng.below(2) == 0 {
                    Some(json!({"seq": rng.below(4)}))
                } else {
                    None
                };
                let (s, b) = gw
                    .api(
                        Method::POST,
                        &format!("/v1/users/u0/conversations/{}/{}/read", target.0, target.1),
                        body,
                    )
                    .await;
                // Read and hide need a conversation that is not deleted.
                let live = rows.get(&key_of(target)) == Some(&false);
                check_change(step, "read", live, s, &b);
            }
            70..=76 => {
                let (s, b) = gw
                    .api(
                        Method::DELETE,
                        &format!("/v1/users/u0/conversations/{}/{}", target.0, target.1),
                        None,
                    )
                    .await;
                // Delete needs a conversation, deleted already or not.
                let known = rows.contains_key(&key_of(target));
                check_change(step, "delete", known, s, &b);
                if known {
                    rows.insert(key_of(target), true);
                }
            }
            77..=83 => {
                let (s, b) = gw
                    .api(
                        Method::POST,
                        &format!("/v1/users/u0/conversations/{}/{}/hide", target.0, target.1),
                        None,
                    )
                    .await;
                let live = rows.get(&key_of(target)) == Some(&false);
                check_change(step, "hide", live, s, &b);
            }
            _ => {
                let limit = 1 + rng.below(4) as usize;
                // Half the syncs through the client frame, half through the API.
                let (pages, v) = if rng.below(2) == 0 {
                    ws_sync(&mut ws, version, limit).await
                } else {
                    api_sync(&gw, "u0", version, limit).await
                };
                for p in &pages {
                    apply(&mut state, p);
                }
                assert!(v >= version, "the version never goes back");
                version = v;
                syncs += 1;
                let full = full_state(&gw, "u0").await;
                assert_eq!(
                    state, full,
                    "step {step}: incremental state differs from a full sync"
                );
            }
        }
    }
    assert!(
        syncs > 10,
        "the sequence exercised incremental syncs ({syncs})"
    );
    // Frames pushed to the device for reads, hides and deletes made through the API.
    let mut pushed = 0;
    while let Ok(f) =
        tokio::time::timeout(std::time::Duration::from_millis(200), ws.next_json()).await
    {
        if f["type"] == "conversations" && f["event"] == "changed" {
            pushed += 1;
        }
    }
    assert!(
        pushed > 0,
        "changes made through the API are pushed to the user's devices"
    );
}

#[tokio::test]
async fn paging_while_messages_arrive_neither_skips_nor_repeats() {
    let (gw, _rx) = setup("").await;
    let peers: Vec<String> = (0..40).map(|i| format!("peer{i:02}")).collect();
    for p in &peers {
        api_send(&gw, p, "person", "v", "hello").await;
    }
    let before: BTreeSet<(String, String)> = full_state(&gw, "v").await.into_keys().collect();
    assert_eq!(before.len(), 40);

    let mut seen: Vec<(String, String)> = Vec::new();
    let mut state = State::new();
    let mut query = "limit=5".to_string();
    let mut page_no = 0;
    let version = loop {
        let page = api_page(&gw, "v", &query).await;
        for c in page["conversations"].as_array().unwrap() {
            seen.push(key(c));
        }
        apply(&mut state, &page);
        if !page["more"].as_bool().unwrap() {
            break page["version"].as_u64().unwrap();
        }
        // Between pages: a message to a conversation already passed, one to a
        // conversation ahead, and a brand-new conversation.
        page_no += 1;
        api_send(&gw, &peers[(page_no * 3) % 5], "person", "v", "again").await;
        api_send(&gw, &peers[39 - page_no], "person", "v", "again").await;
        api_send(&gw, &format!("new{page_no}"), "person", "v", "first").await;
        query = format!("cursor={}&limit=5", page["cursor"].as_str().unwrap());
    };
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "no conversation twice in one sync: {seen:?}"
    );
    let (delta, _) = api_sync(&gw, "v", version, 7).await;
    let mut late = BTreeSet::new();
    for p in &delta {
        for c in p["conversations"].as_array().unwrap() {
            late.insert(key(c));
        }
        apply(&mut state, p);
    }
    for k in &before {
        assert!(
            unique.contains(k) || late.contains(k),
            "{k:?} was skipped by the sync and its follow-up"
        );
    }
    assert_eq!(
        state,
        full_state(&gw, "v").await,
        "the paged sync plus its follow-up equals a full sync"
    );
}

#[tokio::test]
async fn unread_counts_agree_across_devices() {
    let (gw, _rx) = setup("").await;
    let mut alice = WsClient::connect(&gw, "alice").await;
    let mut phone = WsClient::connect_device(&gw, "bob", "phone").await;
    let mut tablet = WsClient::connect_device(&gw, "bob", "tablet").await;
    for i in 0..3 {
        send_ok(&mut alice, "person", "bob", &format!("m{i}")).await;
    }
    for c in [&mut phone, &mut tablet] {
        crate::messaging::messages(c, 3).await;
    }
    let list = phone.request(json!({"type": "sync_conversations"})).await;
    assert_eq!(list["conversations"][0]["unread"], 3, "{list}");
    assert_eq!(list["conversations"][0]["last_message"]["preview"], "m2");
    // The sender's own list counts nothing unread.
    let (_, mine) = gw
        .api(Method::GET, "/v1/users/alice/conversations", None)
        .await;
    assert_eq!(mine["conversations"][0]["unread"], 0, "{mine}");

    // Read up to seq 2 on the phone: the phone is answered, the tablet told.
    let answer = phone
        .request(json!({"type": "read", "channel_type": "person", "channel_id": "alice", "seq": 2}))
        .await;
    assert_eq!(answer["type"], "conversations", "{answer}");
    assert_eq!(answer["conversations"][0]["unread"], 1);
    assert_eq!(answer["conversations"][0]["read_seq"], 2);
    let pushed = tablet.next_of("conversations").await;
    assert_eq!(pushed["event"], "changed");
    assert_eq!(pushed["conversations"][0]["unread"], 1);
    assert_eq!(pushed["version"], answer["version"]);
    let (_, api) = gw
        .api(Method::GET, "/v1/users/bob/conversations", None)
        .await;
    assert_eq!(api["conversations"][0]["unread"], 1);

    // Reading through the API tells every device.
    let (s, _) = gw
        .api(
            Method::POST,
            "/v1/users/bob/conversations/person/alice/read",
            None,
        )
        .await;
    assert_eq!(s, 200);
    for c in [&mut phone, &mut tablet] {
        let f = c.next_of("conversations").await;
        assert_eq!(f["conversations"][0]["unread"], 0, "{f}");
    }

    // Hide: gone from the list with reason "hidden"; a new message brings it back.
    let hidden = tablet
        .request(
            json!({"type": "hide_conversation", "channel_type": "person", "channel_id": "alice"}),
        )
        .await;
    assert_eq!(hidden["removed"][0]["reason"], "hidden", "{hidden}");
    assert_eq!(
        phone.next_of("conversations").await["removed"][0]["reason"],
        "hidden"
    );
    let (_, api) = gw
        .api(Method::GET, "/v1/users/bob/conversations", None)
        .await;
    assert_eq!(api["conversations"], json!([]));
    send_ok(&mut alice, "person", "bob", "back").await;
    let (_, api) = gw
        .api(Method::GET, "/v1/users/bob/conversations", None)
        .await;
    assert_eq!(api["conversations"][0]["unread"], 1, "{api}");

    // Delete: removed with reason "deleted"; a new message starts a fresh row.
    let deleted = phone
        .request(
            json!({"type": "delete_conversation", "channel_type": "person", "channel_id": "alice"}),
        )
        .await;
    assert_eq!(deleted["removed"][0]["reason"], "deleted", "{deleted}");
    let (_, api) = gw
        .api(Method::GET, "/v1/users/bob/conversations", None)
        .await;
    assert_eq!(api["conversations"], json!([]));
    send_ok(&mut alice, "person", "bob", "new start").await;
    let (_, api) = gw
        .api(Method::GET, "/v1/users/bob/conversations", None)
        .await;
    assert_eq!(api["conversations"][0]["unread"], 1, "{api}");
    assert_eq!(
        api["conversations"][0]["last_message"]["preview"],
        "new start"
    );
    expect_error(
        &mut phone,
        json!({"type": "read", "channel_type": "person", "channel_id": "stranger"}),
        "unknown_conversation",
    )
    .await;
}

#[tokio::test]
async fn last_messages_are_included_on_request_and_capped() {
    let (gw, _rx) = setup("").await;
    let mut alice = WsClient::connect(&gw, "alice").await;
    for i in 0..30 {
        send_ok(&mut alice, "person", "bob", &format!("m{i}")).await;
    }
    let plain = api_page(&gw, "bob", "").await;
    assert!(
        plain["conversations"][0].get("messages").is_none(),
        "none unless asked: {plain}"
    );
    let five = api_page(&gw, "bob", "last_messages=5").await;
    let seqs: Vec<u64> = five["conversations"][0]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![26, 27, 28, 29, 30]);
    assert_eq!(
        five["conversations"][0]["messages"][4]["payload"],
        json!({"text": "m29"})
    );
    let capped = api_page(&gw, "bob", "last_messages=1000").await;
    assert_eq!(
        capped["conversations"][0]["messages"]
            .as_array()
            .unwrap()
            .len(),
        20,
        "capped by conversations.max_last_messages"
    );
    let mut bob = WsClient::connect(&gw, "bob").await;
    let f = bob
        .request(json!({"type": "sync_conversations", "last_messages": 2}))
        .await;
    assert_eq!(
        f["conversations"][0]["messages"].as_array().unwrap().len(),
        2
    );
    assert_eq!(f["conversations"][0]["messages"][0]["channel_id"], "alice");
}

#[tokio::test]
async fn a_version_older_than_pruned_tombstones_must_reset() {
    let (gw, _rx) =
        setup("[conversations]\ntombstone_retention = \"1ms\"\nprune_interval = \"100ms\"\n").await;
    for p in ["a", "b", "c"] {
        api_send(&gw, p, "person", "u", "hi").await;
    }
    let old = api_page(&gw, "u", "").await["version"].as_u64().unwrap();
    let (s, _) = gw
        .api(Method::DELETE, "/v1/users/u/conversations/person/b", None)
        .await;
    assert_eq!(s, 200);
    // Once the tombstone is pruned, a delta from before it cannot be served.
    let body = plugboard_tests::wait_until_async(WAIT, || async {
        let (status, body) = gw
            .api(
                Method::GET,
                &format!("/v1/users/u/conversations?since_version={old}"),
                None,
            )
            .await;
        (status == 410).then_some(body)
    })
    .await;
    assert_eq!(body["error"]["code"], "reset_required", "{body}");
    let mut ws = WsClient::connect(&gw, "u").await;
    expect_error(
        &mut ws,
        json!({"type": "sync_conversations", "since_version": old}),
        "reset_required",
    )
    .await;
    expect_error(
        &mut ws,
        json!({"type": "sync", "after_version": old}),
        "reset_required",
    )
    .await;
    // A version from the future is refused the same way.
    expect_error(
        &mut ws,
        json!({"type": "sync_conversations", "since_version": 1_000_000}),
        "reset_required",
    )
    .await;
    // A full sync works, and deltas from its version are served again.
    let (pages, version) = ws_sync(&mut ws, 0, 10).await;
    let names: Vec<String> = pages[0]["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| key(c).1)
        .collect();
    assert_eq!(names, vec!["a", "c"]);
    let delta = api_page(&gw, "u", &format!("since_version={version}")).await;
    assert_eq!(delta["conversations"], json!([]));
    let (s, b) = gw
        .api(
            Method::GET,
            "/v1/users/u/conversations?cursor=garbage",
            None,
        )
        .await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_request")));
    let (s, b) = gw
        .api(Method::GET, "/v1/users/u/conversations?colour=blue", None)
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{b}"
    );
}

/// A `[[plugins]]` entry.
fn plugin_toml(name: &str, file: &str, settings: &str, config: &str) -> String {
    format!(
        "[[plugins]]\nname = \"{name}\"\nfile = {file:?}\n{settings}\n[plugins.config]\n{config}\n"
    )
}

/// The channel ids of a list, with their previews.
fn shown(page: &Value) -> BTreeMap<String, String> {
    page["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                format!(
                    "{}:{}",
                    c["channel_type"].as_str().unwrap(),
                    c["channel_id"].as_str().unwrap()
                ),
                c["last_message"]["preview"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_filter_chain_applies_to_client_frames_and_the_server_api() {
    let toml = plugin_toml(
        "rules",
        plugboard_tests::plugins::CONVERSATION_RULES,
        "",
        "hide = \"group:ops-*\"\nredact = \"person:carol\"",
    );
    let (gw, _rx) = setup(&toml).await;
    create_group(&gw, "ops-1", &["bob", "x"]).await;
    create_group(&gw, "team", &["bob", "x", "eve"]).await;
    for (from, kind, to, text) in [
        ("alice", "person", "bob", "from alice"),
        ("carol", "person", "bob", "secret from carol"),
        ("dave", "person", "bob", "from dave"),
        ("x", "group", "ops-1", "alert"),
        ("x", "group", "team", "from x"),
        ("eve", "group", "team", "from eve"),
    ] {
        api_send(&gw, from, kind, to, text).await;
    }
    let before = api_page(&gw, "bob", "").await;
    let expect: BTreeMap<String, String> = [
        ("person:alice", "from alice"),
        ("person:carol", "[hidden]"),
        ("person:dave", "from dave"),
        ("group:team", "from eve"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(
        shown(&before),
        expect,
        "config rules: ops-* hidden, carol redacted"
    );
    let version = before["version"].as_u64().unwrap();

    // Per-user rules from the plugin's key-value store, set through the admin API.
    let (s, b) = gw
        .admin(
            Method::PUT,
            "/admin/plugins/rules/kv/muted:bob",
            Some(json!(["person:dave"])),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = gw
        .admin(
            Method::PUT,
            "/admin/plugins/rules/kv/blocked:bob",
            Some(json!(["eve"])),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = gw
        .admin(Method::GET, "/admin/plugins/rules/kv/muted:bob", None)
        .await;
    assert_eq!((s, v), (200, json!(["person:dave"])));
    let (s, b) = gw
        .admin(Method::PUT, "/admin/plugins/nobody/kv/k", Some(json!(1)))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{b}"
    );

    let after: BTreeMap<String, String> = [
        ("person:alice", "from alice"),
        ("person:carol", "[hidden]"),
        ("group:team", "[hidden]"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(
        shown(&api_page(&gw, "bob", "").await),
        after,
        "the server API is filtered"
    );
    let mut ws = WsClient::connect_device(&gw, "bob", "phone").await;
    let (pages, _) = ws_sync(&mut ws, 0, 2).await;
    let mut via_ws = BTreeMap::new();
    for p in &pages {
        via_ws.extend(shown(p));
    }
    assert_eq!(via_ws, after, "the client frame is filtered the same way");
    // Other users are not affected by bob's rules.
    assert_eq!(
        shown(&api_page(&gw, "x", "").await).len(),
        1,
        "x sees team only (ops-* hidden for all)"
    );

    // A muted conversation that changes is reported as removed ("filtered") to a client that showed it.
    api_send(&gw, "dave", "person", "bob", "again").await;
    let delta = ws
        .request(json!({"type": "sync_conversations", "since_version": version}))
        .await;
    assert_eq!(delta["conversations"], json!([]), "{delta}");
    assert_eq!(delta["removed"][0]["channel_id"], "dave");
    assert_eq!(delta["removed"][0]["reason"], "filtered");
    // The plugin's calls are counted.
    assert!(
        gw.metric(
            "plugboard_plugin_calls_total",
            "plugin=\"rules\",hook=\"conversation-filter\",outcome=\"ok\""
        )
        .await
            >= 4.0
    );
}

#[tokio::test]
async fn a_failing_filter_follows_its_on_error_policy() {
    let rx = plugboard_tests::Receiver::start().await;
    let opts = |policy: &str| {
        plugboard_tests::GatewayOptions::with_receiver(&rx.url).extra(&plugin_toml(
            "trap",
            plugboard_tests::plugins::FILTER_TRAP,
            &format!("on_error = \"{policy}\""),
            "",
        ))
    };
    let gw = Gateway::start(opts("fail-open")).await;
    api_send(&gw, "alice", "person", "bob", "one").await;
    api_send(&gw, "carol", "person", "bob", "two").await;
    // fail-open: the list goes on unfiltered.
    let page = api_page(&gw, "bob", "").await;
    assert_eq!(shown(&page).len(), 2, "{page}");
    let mut ws = WsClient::connect(&gw, "bob").await;
    let f = ws.request(json!({"type": "sync_conversations"})).await;
    assert_eq!(f["conversations"].as_array().unwrap().len(), 2, "{f}");
    let (_, m) = gw.get_text("/metrics").await;
    let calls: Vec<&str> = m
        .lines()
        .filter(|l| l.contains("plugin=\"trap\""))
        .collect();
    assert!(
        calls.iter().any(|l| l.contains("outcome=\"trap\"")),
        "{calls:#?}"
    );

    // fail-closed: refused rather than shown unfiltered.
    let (s, b) = gw.reload_with(&opts("fail-closed")).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = gw
        .api(Method::GET, "/v1/users/bob/conversations", None)
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (503, Some("filter_failed")),
        "{b}"
    );
    expect_error(
        &mut ws,
        json!({"type": "sync_conversations"}),
        "filter_failed",
    )
    .await;
    // Messages themselves are not filtered: sending and syncing messages still work.
    api_send(&gw, "alice", "person", "bob", "three").await;
    assert_eq!(ws.next_of("message").await["payload"]["text"], "three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_filter_archives_and_caps_unread_counts() {
    let toml = plugin_toml(
        "archive",
        plugboard_tests::plugins::ARCHIVE_FILTER,
        "init_deadline = \"30s\"\ndeadline = \"5s\"",
        "max_unread = \"2\"",
    );
    let (gw, _rx) = setup(&toml).await;
    api_send(&gw, "alice", "person", "bob", "hi").await;
    for i in 0..5 {
        api_send(&gw, "carol", "person", "bob", &format!("c{i}")).await;
    }
    let page = api_page(&gw, "bob", "").await;
    assert_eq!(shown(&page).len(), 2);
    let carol = page["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel_id"] == "carol")
        .unwrap();
    assert_eq!(carol["unread"], 2, "capped at max_unread: {carol}");
    let (s, _) = gw
        .admin(
            Method::PUT,
            "/admin/plugins/archive/kv/archived:bob",
            Some(json!(["person:alice"])),
        )
        .await;
    assert_eq!(s, 200);
    let page = api_page(&gw, "bob", "").await;
    let names: Vec<String> = shown(&page).into_keys().collect();
    assert_eq!(names, vec!["person:carol"], "{page}");
}
