//! A client that follows the catch-up loop of docs/conversations.md ("A
//! client's sync loop") to the letter, through hides, deletes and
//! reconnects made by the user's other device, must end up holding every
//! message of every channel, with no gaps and no duplicates.
//!
//! The loop keeps, per channel, the contiguous high-water mark: the highest
//! `seq` up to which it holds every message. A conversation that another
//! device hid or deleted while this one was offline is reported as removed,
//! so nothing on reconnect asks for the messages sent before the removal;
//! the first live message after it jumps past the mark, and the loop syncs
//! the channel from the mark. A loop that only compared `last_message.seq`
//! of listed conversations would store the live message and keep the gap.

use std::collections::{BTreeMap, BTreeSet};

use plugboard_tests::{Gateway, WsClient, WAIT};
use reqwest::Method;
use serde_json::{json, Value};

use crate::messaging::create_group;
use crate::setup;

type Channel = (String, String);

fn channel_of(v: &Value) -> Channel {
    (
        v["channel_type"].as_str().unwrap().to_string(),
        v["channel_id"].as_str().unwrap().to_string(),
    )
}

/// What a device keeps between connections, and the loop over it.
#[derive(Default)]
struct Device {
    /// The conversation list, by channel.
    list: BTreeMap<Channel, Value>,
    /// The `version` of the last completed conversation sync.
    list_version: u64,
    /// Per channel: every message with `seq` up to this one is held.
    mark: BTreeMap<Channel, u64>,
    /// Per channel: the messages held, by `seq` (message id).
    held: BTreeMap<Channel, BTreeMap<u64, String>>,
    /// Every message id stored (the documented dedupe key).
    ids: BTreeSet<String>,
}

impl Device {
    fn store(&mut self, m: &Value) {
        let ch = channel_of(m);
        let id = m["message_id"].as_str().unwrap().to_string();
        if !self.ids.insert(id.clone()) {
            // Seen already: a pushed message that a catch-up page repeats.
            return;
        }
        let seq = m["seq"].as_u64().unwrap();
        let earlier = self.held.entry(ch.clone()).or_default().insert(seq, id);
        assert!(earlier.is_none(), "{ch:?}: two message ids for seq {seq}");
        // Advance the mark over what is now contiguous.
        let held = &self.held[&ch];
        let mark = self.mark.entry(ch).or_insert(0);
        while held.contains_key(&(*mark + 1)) {
            *mark += 1;
        }
    }

    fn mark(&self, ch: &Channel) -> u64 {
        self.mark.get(ch).copied().unwrap_or(0)
    }

    /// "on connect": the list from the held version, then every listed
    /// conversation whose last message is past its mark, then whatever
    /// frames arrived meanwhile.
    async fn on_connect(&mut self, c: &mut WsClient) {
        let mut frame = json!({"type": "sync_conversations", "since_version": self.list_version});
        loop {
            let page = c.request(frame).await;
            if page["type"] == "error" {
                assert_eq!(page["code"], "reset_required", "{page}");
                self.list.clear();
                self.list_version = 0;
                frame = json!({"type": "sync_conversations", "since_version": 0});
                continue;
            }
            assert_eq!(page["type"], "conversations", "{page}");
            for conv in page["conversations"].as_array().unwrap() {
                self.list.insert(channel_of(conv), conv.clone());
            }
            for r in page["removed"].as_array().unwrap() {
                self.list.remove(&channel_of(r));
            }
            if page["more"] == true {
                frame = json!({"type": "sync_conversations", "cursor": page["cursor"]});
                continue;
            }
            self.list_version = page["version"].as_u64().unwrap();
            break;
        }
        let behind: Vec<Channel> = self
            .list
            .iter()
            .filter(|(ch, conv)| conv["last_message"]["seq"].as_u64().unwrap_or(0) > self.mark(ch))
            .map(|(ch, _)| ch.clone())
            .collect();
        for ch in behind {
            self.catch_up(c, &ch).await;
        }
    }

    /// `sync` the channel from its mark until `more` is false.
    async fn catch_up(&mut self, c: &mut WsClient, ch: &Channel) {
        loop {
            let page = c
                .request(
                    json!({"type": "sync", "channel_type": ch.0, "channel_id": ch.1,
                                "after_seq": self.mark(ch)}),
                )
                .await;
            assert_eq!(page["type"], "messages", "{page}");
            for m in page["messages"].as_array().unwrap() {
                self.store(m);
            }
            if page["more"] != true {
                return;
            }
        }
    }

    /// "while connected": one frame.
    async fn on_frame(&mut self, c: &mut WsClient, frame: Value) {
        match frame["type"].as_str().unwrap() {
            "message" => {
                let ch = channel_of(&frame);
                let seq = frame["seq"].as_u64().unwrap();
                let jumped = seq > self.mark(&ch) + 1;
                self.store(&frame);
                if jumped {
                    self.catch_up(c, &ch).await;
                }
            }
            "conversations" => {
                for conv in frame["conversations"].as_array().unwrap() {
                    self.list.insert(channel_of(conv), conv.clone());
                }
                for r in frame["removed"].as_array().unwrap() {
                    self.list.remove(&channel_of(r));
                }
            }
            _ => {}
        }
    }

    /// Handles frames until the channel's mark reaches `seq`.
    async fn run_until(&mut self, c: &mut WsClient, ch: &Channel, seq: u64) {
        tokio::time::timeout(WAIT, async {
            while self.mark(ch) < seq {
                let frame = c.next_json().await;
                self.on_frame(c, frame).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{ch:?}: mark {} never reached {seq}; held {:?}",
                self.mark(ch),
                self.held.get(ch).map(|h| h.keys().collect::<Vec<_>>())
            )
        });
    }

    /// Asserts the device holds exactly seqs 1..=n of the channel.
    #[track_caller]
    fn assert_holds(&self, ch: &Channel, n: u64) {
        let seqs: Vec<u64> = self
            .held
            .get(ch)
            .map(|h| h.keys().copied().collect())
            .unwrap_or_default();
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{ch:?}");
        assert_eq!(self.mark(ch), n, "{ch:?}");
    }
}

/// Sends through the API and returns the message's `seq`.
async fn api_send(gw: &Gateway, from: &str, kind: &str, to: &str, text: &str) -> u64 {
    let (status, body) = gw
        .api(
            Method::POST,
            "/v1/messages",
            Some(json!({"from": from, "channel_type": kind, "channel_id": to, "payload": {"text": text}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["seq"].as_u64().unwrap()
}

/// Hides or deletes a conversation through the API (another device's doing).
async fn change(gw: &Gateway, user: &str, method: Method, path: &str) {
    let reason = if method == Method::DELETE {
        "deleted"
    } else {
        "hidden"
    };
    let (status, body) = gw
        .api(
            method,
            &format!("/v1/users/{user}/conversations/{path}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{path}: {body}");
    assert_eq!(body["removed"][0]["reason"], reason, "{path}: {body}");
}

#[tokio::test]
async fn documented_loop_has_no_gaps_through_hide_delete_and_reconnect() {
    let (gw, _rx) = setup("").await;
    create_group(&gw, "crew", &["alice", "bob"]).await;
    let person: Channel = ("person".into(), "bob".into());
    let group: Channel = ("group".into(), "crew".into());

    let mut phone = Device::default();
    let mut c = WsClient::connect_device(&gw, "alice", "phone").await;
    phone.on_connect(&mut c).await;
    let s = api_send(&gw, "bob", "person", "alice", "p1").await;
    api_send(&gw, "bob", "group", "crew", "g1").await;
    phone.run_until(&mut c, &person, s).await;
    phone.run_until(&mut c, &group, 1).await;
    c.close(1000, "bye");
    c.closed().await;

    // While the phone is away: messages, then the laptop hides the person
    // conversation and deletes the group one.
    api_send(&gw, "bob", "person", "alice", "p2").await;
    api_send(&gw, "bob", "group", "crew", "g2").await;
    change(&gw, "alice", Method::POST, "person/bob/hide").await;
    change(&gw, "alice", Method::DELETE, "group/crew").await;

    let mut c = WsClient::connect_device(&gw, "alice", "phone").await;
    phone.on_connect(&mut c).await;
    assert!(!phone.list.contains_key(&person) && !phone.list.contains_key(&group));
    // The next live messages bring both conversations back, one seq past
    // what the phone saw before the removal.
    let p3 = api_send(&gw, "bob", "person", "alice", "p3").await;
    let g3 = api_send(&gw, "bob", "group", "crew", "g3").await;
    phone.run_until(&mut c, &person, p3).await;
    phone.run_until(&mut c, &group, g3).await;
    phone.assert_holds(&person, 3);
    phone.assert_holds(&group, 3);

    // Away again, removed again, messages after the removal this time: the
    // conversations are listed on reconnect and caught up from the mark.
    c.close(1000, "bye");
    c.closed().await;
    change(&gw, "alice", Method::DELETE, "person/bob").await;
    change(&gw, "alice", Method::POST, "group/crew/hide").await;
    api_send(&gw, "bob", "person", "alice", "p4").await;
    let p5 = api_send(&gw, "alice", "person", "bob", "p5 from the laptop").await;
    let g4 = api_send(&gw, "bob", "group", "crew", "g4").await;
    let mut c = WsClient::connect_device(&gw, "alice", "phone").await;
    phone.on_connect(&mut c).await;
    assert!(phone.list.contains_key(&person) && phone.list.contains_key(&group));
    phone.assert_holds(&person, p5);
    phone.assert_holds(&group, g4);
}
