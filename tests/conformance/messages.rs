//! MessageStore: a channel's seqs follow commit order, a user's versions
//! increase in commit order, client message ids are unique per sender, and
//! the ranges, pages, row changes, pruning and refusals of the contract.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use plugboard::storage::groups::{Group, GroupResult, Member};
use plugboard::storage::messages::{
    Appended, Channel, ConversationPage, ConversationRow, EventBuilder, MessagePage, MessageRange,
    NewMessage, OnAppend, RowChange, RowState, SendRejected, StoredMessage, SyncRefused,
};
use plugboard::storage::{Backend, NewEvent};
use serde_json::value::RawValue;

use crate::conformance;

/// A message from `sender` whose payload says `text` (spaced oddly, to show
/// it is kept byte for byte).
pub(crate) fn message(channel: &Channel, sender: &str, text: &str) -> NewMessage {
    NewMessage {
        id: plugboard::new_id("msg"),
        channel: channel.clone(),
        sender: sender.to_string(),
        system: false,
        client_msg_id: None,
        payload: RawValue::from_string(format!(
            "{{ \"text\" :{}}}",
            serde_json::to_string(text).unwrap()
        ))
        .unwrap(),
        preview: text.to_string(),
        created_at: plugboard::now_ms(),
        max_members: 0,
    }
}

pub(crate) fn event() -> EventBuilder {
    Box::new(|m: &StoredMessage| NewEvent {
        id: format!("evt_{}", m.id),
        event_type: "message.created".to_string(),
        order_key: m.channel.key.clone(),
        created_at: m.created_at,
        data: plugboard::storage::event_data(
            &serde_json::json!({ "message_id": m.id, "seq": m.seq, "version": m.version }),
        ),
    })
}

pub(crate) fn no_hook() -> OnAppend {
    Box::new(|_: &Appended| {})
}

/// Appends a message that must be accepted.
pub(crate) async fn send(b: &Backend, channel: &Channel, sender: &str, text: &str) -> Appended {
    b.messages
        .append_message(message(channel, sender, text), event(), no_hook())
        .await
        .expect("append")
        .unwrap_or_else(|r| panic!("append refused: {r:?}"))
}

pub(crate) async fn make_group(b: &Backend, gid: &str, members: &[&str]) {
    let group = Group {
        group_id: gid.to_string(),
        name: gid.to_string(),
        data: serde_json::Value::Null,
        member_count: 0,
        created_at: plugboard::now_ms(),
        updated_at: 0,
    };
    let members = members
        .iter()
        .map(|u| Member {
            user_id: u.to_string(),
            role: "member".to_string(),
            joined_at: 1,
        })
        .collect();
    match b.groups.group_create(group, members, 0).await.unwrap() {
        GroupResult::Ok(_) => {}
        other => panic!("create {gid}: {other:?}"),
    }
}

pub(crate) async fn history(b: &Backend, user: &str, channel: &Channel) -> Vec<StoredMessage> {
    let page = b
        .messages
        .messages(
            user,
            MessageRange::After {
                channel: channel.clone(),
                seq: 0,
            },
            100_000,
        )
        .await
        .unwrap()
        .unwrap();
    assert!(!page.more);
    page.messages
}

/// Every page of one sync from `since`; the rows in order and the version
/// the first page pinned.
pub(crate) async fn sync_all(
    b: &Backend,
    user: &str,
    since: u64,
    limit: usize,
) -> std::result::Result<(u64, Vec<ConversationRow>), SyncRefused> {
    let mut high = None;
    let mut after = None;
    let mut rows = Vec::new();
    loop {
        let page: ConversationPage = b
            .messages
            .conversations(user, since, high, after.clone(), limit, 0)
            .await
            .unwrap()?;
        assert_eq!(*high.get_or_insert(page.version), page.version);
        assert!(page.rows.len() <= limit);
        rows.extend(page.rows);
        match page.next_key {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    for pair in rows.windows(2) {
        assert!(
            pair[0].channel.key < pair[1].channel.key,
            "pages are in key order"
        );
    }
    Ok((high.unwrap_or(0), rows))
}

/// The row of `user` for `channel`, whatever its state: from a full sync
/// when live, else from a delta from version 1 (a hidden or deleted row
/// changed after its first message).
pub(crate) async fn row_of(b: &Backend, user: &str, channel: &Channel) -> Option<ConversationRow> {
    let (_, live) = sync_all(b, user, 0, 1000).await.unwrap();
    if let Some(row) = live.into_iter().find(|r| &r.channel == channel) {
        return Some(row);
    }
    match sync_all(b, user, 1, 1000).await {
        Ok((_, rows)) => rows.into_iter().find(|r| &r.channel == channel),
        Err(SyncRefused::ResetRequired { current: 0 }) => None,
        Err(e) => panic!("sync of {user} refused: {e:?}"),
    }
}

async fn current(b: &Backend) -> u64 {
    b.messages.current_version().await.unwrap()
}

fn seqs(page: &MessagePage) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

/// A client following one user: incremental conversation syncs and the
/// cross-channel message cursor.
#[derive(Default)]
struct Follower {
    since: u64,
    rows: BTreeMap<String, ConversationRow>,
    cursor: u64,
    seen: HashSet<String>,
}

impl Follower {
    async fn sync(&mut self, b: &Backend, user: &str) {
        let (high, rows) = sync_all(b, user, self.since, 4)
            .await
            .unwrap_or_else(|r| panic!("incremental sync from {} refused: {r:?}", self.since));
        assert!(high >= self.since, "the version never goes back");
        for row in rows {
            if row.state == RowState::Live {
                self.rows.insert(row.channel.key.clone(), row);
            } else {
                self.rows.remove(&row.channel.key);
            }
        }
        self.since = high;
    }

    async fn drain(&mut self, b: &Backend, user: &str) {
        loop {
            let page = b
                .messages
                .messages(
                    user,
                    MessageRange::UserAfter {
                        version: self.cursor,
                    },
                    7,
                )
                .await
                .unwrap()
                .unwrap_or_else(|r| panic!("message cursor {} refused: {r:?}", self.cursor));
            for m in &page.messages {
                assert!(m.version > self.cursor, "the cursor only moves forward");
                assert!(self.seen.insert(m.id.clone()), "{} came twice", m.id);
                self.cursor = m.version;
            }
            if !page.more {
                return;
            }
        }
    }
}

conformance! {
    async fn a_channels_seqs_follow_commit_order(f) {
        const EACH: usize = 120;
        let processes = [f.backend.clone(), f.another_process().await];
        let channel = Channel::person("alice", "bob");
        let hooks: [Arc<Mutex<Vec<u64>>>; 2] = Default::default();
        let mut tasks = Vec::new();
        for (p, backend) in processes.iter().enumerate() {
            for i in 0..EACH {
                let backend = backend.clone();
                let hook = hooks[p].clone();
                let channel = channel.clone();
                let sender = if i % 3 == 0 { "bob" } else { "alice" };
                tasks.push(tokio::spawn(async move {
                    let on_append: OnAppend =
                        Box::new(move |a: &Appended| hook.lock().unwrap().push(a.message.seq));
                    let m = message(&channel, sender, &format!("{p}-{i}"));
                    let a = backend.messages.append_message(m, event(), on_append).await;
                    (p, a.expect("append").expect("accepted"))
                }));
            }
        }
        let mut by_process: [Vec<u64>; 2] = Default::default();
        let mut all = Vec::new();
        for t in tasks {
            let (p, a) = t.await.unwrap();
            assert!(!a.duplicate);
            assert_eq!(*a.members, vec!["alice".to_string(), "bob".to_string()]);
            by_process[p].push(a.message.seq);
            all.push(a.message.seq);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=2 * EACH as u64).collect::<Vec<_>>(), "no gap, no repeat");
        for p in 0..2 {
            let seen = hooks[p].lock().unwrap().clone();
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "process {p}'s hooks in seq order: {seen:?}");
            let mut own = by_process[p].clone();
            own.sort_unstable();
            assert_eq!(seen, own, "process {p}'s hooks saw exactly its own messages");
        }
        // Commit order: the history's versions rise with its seqs.
        let stored = history(&processes[1], "bob", &channel).await;
        assert_eq!(stored.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=2 * EACH as u64).collect::<Vec<_>>());
        assert!(stored.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(current(&processes[0]).await, stored.last().unwrap().version);
        // The rows end at the last message.
        let last = stored.last().unwrap();
        for user in ["alice", "bob"] {
            let row = row_of(&processes[0], user, &channel).await.unwrap();
            assert_eq!(row.version, last.version);
            assert_eq!(row.last_message.as_ref().unwrap().seq, last.seq);
            assert_eq!(row.last_message.as_ref().unwrap().id, last.id);
        }
    }

    async fn a_users_versions_increase_in_commit_order(f) {
        const TASKS: usize = 3;
        const OPS: usize = 40;
        let processes = [f.backend.clone(), f.another_process().await];
        let peers: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
        let mut members: Vec<&str> = peers.iter().map(String::as_str).collect();
        members.push("r");
        make_group(&processes[0], "g1", &members).await;
        let mut channels: Vec<Channel> = peers.iter().map(|p| Channel::person("r", p)).collect();
        channels.push(Channel::group("g1"));

        let done = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for (p, backend) in processes.iter().enumerate() {
            for task in 0..TASKS {
                let backend = backend.clone();
                let channels = channels.clone();
                let peers = peers.clone();
                writers.push(tokio::spawn(async move {
                    let mut sent = Vec::new();
                    for i in 0..OPS {
                        let n = p * 1000 + task * 100 + i;
                        let channel = &channels[n % channels.len()];
                        let peer = &peers[n % peers.len()];
                        match n % 7 {
                            // Appends from peers and from the user.
                            0..=3 => {
                                let sender = match channel.persons() {
                                    Some((a, b)) if n % 2 == 0 => if a == "r" { b } else { a },
                                    Some(_) => "r",
                                    None => peer.as_str(),
                                };
                                sent.push(send(&backend, channel, sender, &format!("m{n}")).await.message.id);
                            }
                            4 => {
                                backend.messages.change_conversation("r", channel.clone(), RowChange::Read(None)).await.unwrap();
                            }
                            5 => {
                                backend.messages.change_conversation("r", channel.clone(), RowChange::Hide).await.unwrap();
                            }
                            _ => {
                                backend.messages.change_conversation("r", channel.clone(), RowChange::Delete).await.unwrap();
                            }
                        }
                    }
                    sent
                }));
            }
        }
        let reader = {
            let processes = processes.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut follower = Follower::default();
                let mut rounds = 0usize;
                loop {
                    // Read before syncing: the last round starts after every write.
                    let last = done.load(Ordering::SeqCst);
                    follower.sync(&processes[rounds % 2], "r").await;
                    follower.drain(&processes[(rounds + 1) % 2], "r").await;
                    rounds += 1;
                    if last {
                        return (follower, rounds);
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut sent = HashSet::new();
        for w in writers {
            for id in w.await.unwrap() {
                assert!(sent.insert(id));
            }
        }
        done.store(true, Ordering::SeqCst);
        let (follower, rounds) = reader.await.unwrap();
        assert!(rounds >= 1);
        // The incremental state is what a full sync shows now.
        let (_, full) = sync_all(&processes[0], "r", 0, 1000).await.unwrap();
        let full: BTreeMap<String, ConversationRow> =
            full.into_iter().map(|r| (r.channel.key.clone(), r)).collect();
        assert_eq!(follower.rows, full);
        assert_eq!(follower.since, current(&processes[1]).await);
        // Every message came through the cursor exactly once.
        assert_eq!(follower.seen, sent);
    }

    async fn client_msg_ids_are_unique_per_sender_under_concurrent_duplicates(f) {
        const ROUNDS: usize = 20;
        let processes = [f.backend.clone(), f.another_process().await];
        let channel = Channel::person("alice", "bob");
        let hooked = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for round in 0..ROUNDS {
            // Two copies from each process, all at once.
            for copy in 0..4 {
                let backend = processes[copy % 2].clone();
                let channel = channel.clone();
                let hooked = hooked.clone();
                tasks.push(tokio::spawn(async move {
                    let mut m = message(&channel, "alice", &format!("round {round}"));
                    m.client_msg_id = Some(format!("cid-{round}"));
                    let on_append: OnAppend = Box::new(move |_: &Appended| {
                        hooked.fetch_add(1, Ordering::SeqCst);
                    });
                    let a = backend.messages.append_message(m, event(), on_append).await;
                    (round, a.expect("append").expect("accepted"))
                }));
            }
        }
        let mut rounds: HashMap<usize, Vec<Appended>> = HashMap::new();
        for t in tasks {
            let (round, a) = t.await.unwrap();
            rounds.entry(round).or_default().push(a);
        }
        for (round, answers) in &rounds {
            let first: Vec<&Appended> = answers.iter().filter(|a| !a.duplicate).collect();
            assert_eq!(first.len(), 1, "round {round}: exactly one stored");
            let first = &first[0].message;
            for a in answers.iter().filter(|a| a.duplicate) {
                assert_eq!(a.message.id, first.id);
                assert_eq!(a.message.seq, first.seq);
                assert_eq!(a.message.version, first.version);
                assert_eq!(a.message.client_msg_id.as_deref(), Some(format!("cid-{round}").as_str()));
                assert_eq!(a.message.payload.get(), first.payload.get());
                assert!(a.members.is_empty());
            }
        }
        assert_eq!(hooked.load(Ordering::SeqCst), ROUNDS, "hooks run for stored messages only");
        assert_eq!(history(&processes[0], "alice", &channel).await.len(), ROUNDS);
        // Duplicates took no version.
        assert_eq!(current(&processes[0]).await, ROUNDS as u64);

        // The id is the sender's: another sender may use it…
        let mut m = message(&channel, "bob", "bob's");
        m.client_msg_id = Some("cid-0".into());
        let bobs = processes[1].messages.append_message(m, event(), no_hook()).await.unwrap().unwrap();
        assert!(!bobs.duplicate);
        // …and the sender's retry finds the first message whatever the channel.
        let mut m = message(&Channel::person("alice", "carol"), "alice", "elsewhere");
        m.client_msg_id = Some("cid-0".into());
        let again = processes[0].messages.append_message(m, event(), no_hook()).await.unwrap().unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message.channel, channel);
        assert_eq!(again.message.id, rounds[&0].iter().find(|a| !a.duplicate).unwrap().message.id);
        assert_eq!(current(&processes[0]).await, ROUNDS as u64 + 1);
    }

    async fn message_ranges_page_with_more(f) {
        let b = &f.backend;
        let channel = Channel::person("alice", "bob");
        let mut sent = Vec::new();
        for i in 0..25 {
            sent.push(send(b, &channel, if i % 2 == 0 { "alice" } else { "bob" }, &format!("m{i}")).await.message);
        }
        let range = |after: Option<u64>, before: Option<u64>| match (after, before) {
            (Some(seq), _) => MessageRange::After { channel: channel.clone(), seq },
            (_, Some(seq)) => MessageRange::Before { channel: channel.clone(), seq },
            _ => unreachable!(),
        };
        let page = |r: MessageRange, user: &'static str| {
            let b = b.clone();
            async move { b.messages.messages(user, r, 10).await.unwrap() }
        };
        let p = page(range(Some(0), None), "alice").await.unwrap();
        assert_eq!((seqs(&p), p.more), ((1..=10).collect(), true));
        let p = page(range(Some(10), None), "bob").await.unwrap();
        assert_eq!((seqs(&p), p.more), ((11..=20).collect(), true));
        let p = page(range(Some(20), None), "bob").await.unwrap();
        assert_eq!((seqs(&p), p.more), ((21..=25).collect(), false));
        let p = page(range(Some(25), None), "bob").await.unwrap();
        assert_eq!((seqs(&p), p.more), (vec![], false));
        let p = page(range(Some(u64::MAX), None), "bob").await.unwrap();
        assert_eq!((seqs(&p), p.more), (vec![], false), "nothing is after the largest seq");
        // Backwards: the newest page before the position, oldest first.
        let p = page(range(None, Some(u64::MAX)), "alice").await.unwrap();
        assert_eq!((seqs(&p), p.more), ((16..=25).collect(), true));
        let p = page(range(None, Some(16)), "alice").await.unwrap();
        assert_eq!((seqs(&p), p.more), ((6..=15).collect(), true));
        let p = page(range(None, Some(6)), "alice").await.unwrap();
        assert_eq!((seqs(&p), p.more), ((1..=5).collect(), false));
        let p = page(range(None, Some(1)), "alice").await.unwrap();
        assert_eq!((seqs(&p), p.more), (vec![], false));
        // Messages read back as they were stored, payload byte for byte.
        let stored = history(b, "alice", &channel).await;
        for (s, m) in stored.iter().zip(&sent) {
            assert_eq!((&s.id, s.seq, s.version, &s.sender, s.created_at), (&m.id, m.seq, m.version, &m.sender, m.created_at));
            assert_eq!(s.payload.get(), m.payload.get());
            assert!(s.payload.get().starts_with("{ \"text\" :"));
            assert_eq!(s.channel, channel);
            assert!(!s.system);
        }

        // The cross-channel cursor, in version order with `more`.
        let other = Channel::person("alice", "carol");
        let late = send(b, &other, "carol", "late").await.message;
        let mut cursor = 0;
        let mut order = Vec::new();
        loop {
            let p = b.messages.messages("alice", MessageRange::UserAfter { version: cursor }, 10).await.unwrap().unwrap();
            order.extend(p.messages.iter().map(|m| m.id.clone()));
            cursor = p.messages.last().map(|m| m.version).unwrap_or(cursor);
            if !p.more {
                break;
            }
        }
        let mut expected: Vec<String> = sent.iter().map(|m| m.id.clone()).collect();
        expected.push(late.id.clone());
        assert_eq!(order, expected);
        let p = b.messages.messages("bob", MessageRange::UserAfter { version: sent[20].version }, 10).await.unwrap().unwrap();
        assert_eq!(seqs(&p), (22..=25).collect::<Vec<_>>(), "bob's cursor does not see alice's other channel");
        let now = current(b).await;
        assert_eq!(
            b.messages.messages("alice", MessageRange::UserAfter { version: now + 1 }, 10).await.unwrap().unwrap_err(),
            SyncRefused::ResetRequired { current: now }
        );

        // Who may read what.
        assert_eq!(page(range(Some(0), None), "mallory").await.unwrap_err(), SyncRefused::NotMember);
        make_group(b, "g1", &["alice"]).await;
        let g = Channel::group("g1");
        let refused = b.messages.messages("bob", MessageRange::Before { channel: g.clone(), seq: 10 }, 10).await.unwrap();
        assert_eq!(refused.unwrap_err(), SyncRefused::NotMember);
        let unknown = b.messages.messages("bob", MessageRange::After { channel: Channel::group("nope"), seq: 0 }, 10).await.unwrap();
        assert_eq!(unknown.unwrap_err(), SyncRefused::UnknownGroup);
        let empty = b.messages.messages("alice", MessageRange::After { channel: g, seq: 0 }, 10).await.unwrap().unwrap();
        assert_eq!((empty.messages.len(), empty.more), (0, false));
    }

    async fn conversation_pages_pin_their_version_and_follow_the_cursor(f) {
        let b = &f.backend;
        let channels: Vec<Channel> = (1..=7).map(|i| Channel::person("u", &format!("p{i}"))).collect();
        for (i, c) in channels.iter().enumerate() {
            for j in 0..=i.min(2) {
                send(b, c, &format!("p{}", i + 1), &format!("{i}.{j}")).await;
            }
        }
        let high = current(b).await;
        let first = b.messages.conversations("u", 0, None, None, 3, 2).await.unwrap().unwrap();
        assert_eq!(first.version, high);
        assert_eq!(first.rows.iter().map(|r| r.channel_id.as_str()).collect::<Vec<_>>(), ["p1", "p2", "p3"]);
        assert_eq!(first.next_key.as_deref(), Some(channels[2].key.as_str()));
        // Each live row with its newest messages, oldest first.
        assert_eq!(first.messages.len(), 3);
        assert_eq!(first.messages[0].iter().map(|m| m.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(first.messages[1].iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(first.messages[2].iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3]);
        let row = &first.rows[2];
        assert_eq!((row.user_id.as_str(), row.state, row.unread, row.read_seq), ("u", RowState::Live, 3, 0));
        assert_eq!(row.last_message.as_ref().unwrap().preview, "2.2");
        assert_eq!(row.last_message.as_ref().unwrap().sender, "p3");

        // Mid-sync, a row already passed and a row still ahead change.
        let passed = send(b, &channels[0], "p1", "passed").await.message;
        let ahead = send(b, &channels[5], "p6", "ahead").await.message;
        let second = b.messages.conversations("u", 0, Some(first.version), first.next_key.clone(), 3, 0).await.unwrap().unwrap();
        assert_eq!(second.version, high, "the first page's version is kept");
        assert_eq!(second.rows.iter().map(|r| r.channel_id.as_str()).collect::<Vec<_>>(), ["p4", "p5", "p6"]);
        assert_eq!(second.messages.len(), 3);
        assert!(second.messages.iter().all(Vec::is_empty), "no messages asked for");
        assert_eq!(second.rows[2].version, ahead.version, "a row ahead comes with its newest state");
        let third = b.messages.conversations("u", 0, Some(high), second.next_key.clone(), 3, 0).await.unwrap().unwrap();
        assert_eq!(third.rows.iter().map(|r| r.channel_id.as_str()).collect::<Vec<_>>(), ["p7"]);
        assert_eq!(third.next_key, None);
        // The next sync from the pinned version brings both changes.
        let delta = b.messages.conversations("u", high, None, None, 10, 1).await.unwrap().unwrap();
        assert_eq!(delta.version, ahead.version);
        assert_eq!(delta.rows.iter().map(|r| r.channel_id.as_str()).collect::<Vec<_>>(), ["p1", "p6"]);
        assert_eq!(delta.rows[0].version, passed.version);
        assert_eq!(delta.messages[0].iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [passed.id.as_str()]);

        // A delta lists hidden and deleted rows, without messages; a full
        // sync leaves them out.
        let before = current(b).await;
        b.messages.change_conversation("u", channels[1].clone(), RowChange::Hide).await.unwrap().unwrap();
        b.messages.change_conversation("u", channels[3].clone(), RowChange::Delete).await.unwrap().unwrap();
        let delta = b.messages.conversations("u", before, None, None, 10, 5).await.unwrap().unwrap();
        assert_eq!(delta.rows.iter().map(|r| (r.channel_id.as_str(), r.state)).collect::<Vec<_>>(), [("p2", RowState::Hidden), ("p4", RowState::Deleted)]);
        assert!(delta.messages.iter().all(Vec::is_empty));
        let (_, full) = sync_all(b, "u", 0, 2).await.unwrap();
        assert_eq!(full.iter().map(|r| r.channel_id.as_str()).collect::<Vec<_>>(), ["p1", "p3", "p5", "p6", "p7"]);
        // Nothing changed since now; a version never handed out needs a reset.
        let now = current(b).await;
        let empty = b.messages.conversations("u", now, None, None, 10, 0).await.unwrap().unwrap();
        assert_eq!((empty.version, empty.rows.len(), empty.next_key), (now, 0, None));
        let refused = b.messages.conversations("u", now + 1, None, None, 10, 0).await.unwrap();
        assert_eq!(refused.unwrap_err(), SyncRefused::ResetRequired { current: now });
    }

    async fn row_changes_read_hide_delete_and_count_unread(f) {
        let b = &f.backend;
        let c = Channel::person("alice", "bob");
        for i in 0..3 {
            send(b, &c, "alice", &format!("a{i}")).await;
        }
        let row = row_of(b, "bob", &c).await.unwrap();
        assert_eq!((row.state, row.unread, row.read_seq, row.channel_id.as_str()), (RowState::Live, 3, 0, "alice"));
        let mine = row_of(b, "alice", &c).await.unwrap();
        assert_eq!((mine.unread, mine.read_seq, mine.channel_id.as_str()), (0, 3, "bob"));
        let change = |user: &'static str, change: RowChange| {
            let b = b.clone();
            let c = c.clone();
            async move { b.messages.change_conversation(user, c, change).await.unwrap() }
        };

        let v = current(b).await;
        let read = change("bob", RowChange::Read(Some(2))).await.unwrap();
        assert_eq!((read.read_seq, read.unread, read.version), (2, 1, v + 1));
        assert_eq!(current(b).await, v + 1, "one version per change");
        // Reading backwards changes nothing, and takes no version.
        let same = change("bob", RowChange::Read(Some(1))).await.unwrap();
        assert_eq!(same, read);
        assert_eq!(current(b).await, v + 1);
        // Past the end reads up to the last message.
        let all = change("bob", RowChange::Read(Some(99))).await.unwrap();
        assert_eq!((all.read_seq, all.unread, all.version), (3, 0, v + 2));
        assert_eq!(change("bob", RowChange::Read(None)).await.unwrap(), all);
        assert_eq!(change("bob", RowChange::Read(Some(u64::MAX))).await.unwrap(), all);

        // A member's own message reads the row to it.
        send(b, &c, "alice", "a3").await; // 4
        send(b, &c, "bob", "b0").await; // 5
        let row = row_of(b, "bob", &c).await.unwrap();
        assert_eq!((row.unread, row.read_seq), (0, 5));
        let row = row_of(b, "alice", &c).await.unwrap();
        assert_eq!((row.unread, row.read_seq), (1, 4));
        send(b, &c, "alice", "a4").await; // 6
        send(b, &c, "alice", "a5").await; // 7
        let read = change("bob", RowChange::Read(Some(6))).await.unwrap();
        assert_eq!((read.read_seq, read.unread), (6, 1));

        // Hide: the row keeps its counts; a new message brings it back.
        let v = current(b).await;
        let hidden = change("bob", RowChange::Hide).await.unwrap();
        assert_eq!((hidden.state, hidden.version, hidden.unread), (RowState::Hidden, v + 1, 1));
        assert_eq!(change("bob", RowChange::Hide).await.unwrap(), hidden);
        let read_hidden = change("bob", RowChange::Read(None)).await.unwrap();
        assert_eq!((read_hidden.state, read_hidden.unread, read_hidden.read_seq), (RowState::Hidden, 0, 7));
        let m = send(b, &c, "alice", "a6").await.message; // 8
        let row = row_of(b, "bob", &c).await.unwrap();
        assert_eq!((row.state, row.unread, row.read_seq, row.version), (RowState::Live, 1, 7, m.version));

        // Delete: a tombstone read to the end; reading or hiding it finds
        // nothing; deleting again changes nothing; a message revives it.
        let v = current(b).await;
        let gone = change("bob", RowChange::Delete).await.unwrap();
        assert_eq!((gone.state, gone.unread, gone.read_seq, gone.version), (RowState::Deleted, 0, 8, v + 1));
        assert_eq!(gone.last_message.as_ref().unwrap().seq, 8);
        assert_eq!(change("bob", RowChange::Read(None)).await, None);
        assert_eq!(change("bob", RowChange::Hide).await, None);
        assert_eq!(change("bob", RowChange::Delete).await.unwrap(), gone);
        assert_eq!(current(b).await, v + 1);
        send(b, &c, "alice", "a7").await; // 9
        let row = row_of(b, "bob", &c).await.unwrap();
        assert_eq!((row.state, row.unread, row.read_seq), (RowState::Live, 1, 8));

        // No such conversation.
        assert_eq!(change("carol", RowChange::Read(None)).await, None);
        let none = b.messages.change_conversation("bob", Channel::person("bob", "zed"), RowChange::Delete).await.unwrap();
        assert_eq!(none, None);
    }

    async fn pruning_tombstones_makes_older_syncs_reset(f) {
        let b = &f.backend;
        let c1 = Channel::person("alice", "bob");
        let c2 = Channel::person("alice", "carol");
        send(b, &c1, "bob", "hi").await;
        send(b, &c2, "carol", "hi").await;
        let before = current(b).await;
        let gone = b.messages.change_conversation("alice", c1.clone(), RowChange::Delete).await.unwrap().unwrap();
        let carols = b.messages.change_conversation("carol", c2.clone(), RowChange::Delete).await.unwrap().unwrap();
        assert_eq!(b.messages.prune_conversations(0).await.unwrap(), 0, "nothing is that old");
        // The tombstone is still served.
        let delta = b.messages.conversations("alice", before, None, None, 10, 0).await.unwrap().unwrap();
        assert_eq!(delta.rows.len(), 1);
        assert_eq!(delta.rows[0].state, RowState::Deleted);

        let pruned = b.messages.prune_conversations(plugboard::now_ms() + 60_000).await.unwrap();
        assert_eq!(pruned, 2);
        assert_eq!(b.messages.prune_conversations(plugboard::now_ms() + 60_000).await.unwrap(), 0);
        let now = current(b).await;
        assert_eq!(now, carols.version, "pruning takes no version");
        // Below the floor (the newest version pruned for the user): reset.
        for since in [1, before, gone.version - 1] {
            let refused = b.messages.conversations("alice", since, None, None, 10, 0).await.unwrap();
            assert_eq!(refused.unwrap_err(), SyncRefused::ResetRequired { current: now });
            let refused = b.messages.messages("alice", MessageRange::UserAfter { version: since }, 10).await.unwrap();
            assert_eq!(refused.unwrap_err(), SyncRefused::ResetRequired { current: now });
        }
        // From the floor on, and a full sync, are served.
        let delta = b.messages.conversations("alice", gone.version, None, None, 10, 0).await.unwrap().unwrap();
        assert!(delta.rows.is_empty());
        let (_, full) = sync_all(b, "alice", 0, 10).await.unwrap();
        assert_eq!(full.iter().map(|r| r.channel_id.as_str()).collect::<Vec<_>>(), ["carol"]);
        assert!(b.messages.messages("alice", MessageRange::UserAfter { version: 0 }, 10).await.unwrap().is_ok());
        // Floors are per user: bob pruned nothing.
        assert!(b.messages.conversations("bob", 1, None, None, 10, 0).await.unwrap().is_ok());
        // A later prune keeps the newest floor.
        let gone_again = {
            send(b, &c1, "bob", "again").await;
            b.messages.change_conversation("alice", c1.clone(), RowChange::Delete).await.unwrap().unwrap()
        };
        assert_eq!(b.messages.prune_conversations(plugboard::now_ms() + 60_000).await.unwrap(), 1);
        let now = current(b).await;
        let refused = b.messages.conversations("alice", gone.version, None, None, 10, 0).await.unwrap();
        assert_eq!(refused.unwrap_err(), SyncRefused::ResetRequired { current: now });
        assert!(b.messages.conversations("alice", gone_again.version, None, None, 10, 0).await.unwrap().is_ok());
        // The reopened database keeps the floors.
        let again = f.reopen().await;
        let refused = again.messages.conversations("alice", gone.version, None, None, 10, 0).await.unwrap();
        assert_eq!(refused.unwrap_err(), SyncRefused::ResetRequired { current: now });
    }

    async fn a_failed_append_takes_nothing_and_spoils_no_other(f) {
        let processes = [f.backend.clone(), f.another_process().await];
        let channel = Channel::person("alice", "bob");
        let first = send(&processes[0], &channel, "alice", "first").await.message;
        let hooked = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..60 {
            let b = processes[i % 2].clone();
            let channel = channel.clone();
            let taken = first.id.clone();
            let hooked = hooked.clone();
            tasks.push(tokio::spawn(async move {
                let mut m = message(&channel, "bob", &format!("m{i}"));
                // Every third reuses a stored message id: the storage refuses it.
                if i % 3 == 0 {
                    m.id = taken;
                }
                let on_append: OnAppend = Box::new(move |_: &Appended| {
                    hooked.fetch_add(1, Ordering::SeqCst);
                });
                (i, b.messages.append_message(m, event(), on_append).await)
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (i, Ok(Ok(a))) => {
                    assert!(i % 3 != 0, "append {i} reused an id and was stored");
                    seqs.push(a.message.seq);
                }
                (i, Err(e)) => {
                    assert!(i % 3 == 0, "append {i} failed: {e}");
                    assert!(!e.is_unavailable());
                }
                (i, Ok(Err(r))) => panic!("append {i} refused: {r:?}"),
            }
        }
        // The failed ones took no seq and no version, and undid nothing else.
        seqs.sort_unstable();
        assert_eq!(seqs, (2..=41).collect::<Vec<u64>>());
        assert_eq!(hooked.load(Ordering::SeqCst), 40);
        assert_eq!(current(&processes[1]).await, 41);
        let stored = history(&processes[1], "bob", &channel).await;
        assert_eq!(stored.len(), 41);
        assert_eq!(stored[0].id, first.id);
        assert_eq!(stored[0].payload.get(), first.payload.get());
        assert_eq!(row_of(&processes[0], "alice", &channel).await.unwrap().unread, 40);
    }

    async fn writes_keep_commit_order_whatever_the_default_isolation(f) {
        // A database whose sessions default to SERIALIZABLE (an
        // administrator's choice): the writer's snapshot must still be
        // taken after the write lock, statement by statement.
        if f.engine == crate::Engine::Postgres {
            let name = plugboard_tests::postgres::database_name(&f.config.url);
            plugboard_tests::postgres::shared().psql(
                &f.config.url,
                &format!("ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'serializable'"),
            );
        }
        // Fresh pools: every connection starts with the new default.
        let processes = [f.another_process().await, f.another_process().await];
        make_group(&processes[0], "g1", &["alice", "bob"]).await;
        let channel = Channel::group("g1");
        let mut tasks = Vec::new();
        for i in 0..60 {
            let b = processes[i % 2].clone();
            let channel = channel.clone();
            tasks.push(tokio::spawn(async move {
                let mut m = message(&channel, "alice", &format!("m{i}"));
                m.client_msg_id = Some(format!("c{}", i / 2));
                let a = b.messages.append_message(m, event(), no_hook()).await;
                let read = b.messages.change_conversation("bob", channel.clone(), RowChange::Read(None)).await;
                (a.expect("append").expect("accepted"), read.expect("read"))
            }));
        }
        let mut stored = Vec::new();
        for t in tasks {
            let (a, _) = t.await.unwrap();
            if !a.duplicate {
                stored.push(a.message.seq);
            }
        }
        // Each client message id once, seqs without gap or repeat.
        stored.sort_unstable();
        assert_eq!(stored, (1..=30).collect::<Vec<u64>>());
        assert_eq!(history(&processes[1], "alice", &channel).await.len(), 30);
        let row = row_of(&processes[0], "bob", &channel).await.unwrap();
        assert_eq!(row.last_message.unwrap().seq, 30);
    }

    async fn client_msg_ids_and_previews_may_hold_any_character(f) {
        let b = &f.backend;
        let c = Channel::person("alice", "bob");
        let with_id = |id: &str, text: &str| {
            let mut m = message(&c, "alice", text);
            m.client_msg_id = Some(id.to_string());
            let b = b.clone();
            async move { b.messages.append_message(m, event(), no_hook()).await.unwrap().unwrap() }
        };
        // U+0000 (which PostgreSQL text cannot hold) and other controls.
        let first = with_id("x\u{0}y", "a\u{0}b\u{1}").await;
        assert!(!first.duplicate);
        let row = row_of(b, "bob", &c).await.unwrap();
        // The preview shows the same text (an engine may drop the U+0000).
        assert_eq!(row.last_message.unwrap().preview.replace('\u{0}', ""), "ab\u{1}");
        assert!(!with_id("x\u{0}z", "other").await.duplicate);
        assert!(!with_id("x", "prefix").await.duplicate);
        let again = with_id("x\u{0}y", "retry").await;
        assert!(again.duplicate);
        assert_eq!(again.message.id, first.message.id);
        assert_eq!(again.message.client_msg_id.as_deref(), Some("x\u{0}y"));
        let stored = history(b, "bob", &c).await;
        assert_eq!(stored.len(), 3);
        assert_eq!(stored[0].client_msg_id.as_deref(), Some("x\u{0}y"));
        assert_eq!(stored[0].payload.get(), first.message.payload.get());
        assert!(stored[0].payload.get().contains("\\u0000"));
    }

    async fn rejected_appends_write_nothing(f) {
        let b = &f.backend;
        make_group(b, "g1", &["alice", "bob"]).await;
        let built = Arc::new(AtomicUsize::new(0));
        let hooked = Arc::new(AtomicUsize::new(0));
        let attempt = |channel: Channel, sender: &'static str, system: bool, cid: Option<&'static str>| {
            let b = b.clone();
            let built = built.clone();
            let hooked = hooked.clone();
            async move {
                let mut m = message(&channel, sender, "x");
                m.system = system;
                m.client_msg_id = cid.map(str::to_string);
                let event: EventBuilder = Box::new(move |m: &StoredMessage| {
                    built.fetch_add(1, Ordering::SeqCst);
                    event()(m)
                });
                let on_append: OnAppend = Box::new(move |_: &Appended| {
                    hooked.fetch_add(1, Ordering::SeqCst);
                });
                b.messages.append_message(m, event, on_append).await.unwrap()
            }
        };
        let before = current(b).await;
        assert_eq!(attempt(Channel::group("nope"), "alice", false, None).await.unwrap_err(), SendRejected::UnknownGroup);
        assert_eq!(attempt(Channel::group("nope"), "system", true, Some("c1")).await.unwrap_err(), SendRejected::UnknownGroup);
        assert_eq!(attempt(Channel::group("g1"), "mallory", false, Some("c2")).await.unwrap_err(), SendRejected::NotMember);
        // No event was built (so none written), no hook ran, no version or
        // seq was taken, no row was made.
        assert_eq!(built.load(Ordering::SeqCst), 0);
        assert_eq!(hooked.load(Ordering::SeqCst), 0);
        assert_eq!(current(b).await, before);
        assert!(row_of(b, "mallory", &Channel::group("g1")).await.is_none());
        assert!(history(b, "alice", &Channel::group("g1")).await.is_empty());
        // A refused client message id stays free.
        let ok = attempt(Channel::group("g1"), "alice", false, Some("c2")).await.unwrap();
        assert!(!ok.duplicate);
        assert_eq!((ok.message.seq, ok.message.version), (1, before + 1));
        let mut members = (*ok.members).clone();
        members.sort();
        assert_eq!(members, ["alice", "bob"]);
        assert_eq!((built.load(Ordering::SeqCst), hooked.load(Ordering::SeqCst)), (1, 1));
        // The system may write to a group it is not in; its row is not made.
        let sys = attempt(Channel::group("g1"), "system", true, None).await.unwrap();
        assert_eq!(sys.message.seq, 2);
        assert!(sys.message.system);
        assert!(row_of(b, "system", &Channel::group("g1")).await.is_none());
        let row = row_of(b, "bob", &Channel::group("g1")).await.unwrap();
        assert_eq!((row.unread, row.channel_id.as_str()), (2, "g1"));
        // Refused after being accepted (the sender left): nothing again.
        b.groups.group_remove_members("g1", vec!["alice".into()]).await.unwrap();
        let v = current(b).await;
        assert_eq!(attempt(Channel::group("g1"), "alice", false, None).await.unwrap_err(), SendRejected::NotMember);
        assert_eq!(current(b).await, v);
        assert_eq!(history(b, "bob", &Channel::group("g1")).await.len(), 2);
        // …but a retry of a stored message is still answered with it.
        let dup = attempt(Channel::group("g1"), "alice", false, Some("c2")).await.unwrap();
        assert!(dup.duplicate);
        assert_eq!(dup.message.id, ok.message.id);
        assert_eq!((built.load(Ordering::SeqCst), hooked.load(Ordering::SeqCst)), (2, 2));
    }
}

/// Not a property of the contract: a throughput probe, printing figures.
/// Appends/s of 1:1 messages from 64 concurrent senders (each its own
/// channel, one append in flight each) through one Backend, on SQLite, on
/// the test server (no fsync) and on a durable PostgreSQL server; then the
/// time of one message to a 10,000-member group.
///
/// ```text
/// cargo test -p plugboard-tests --test conformance -- --ignored --nocapture append_throughput
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a throughput probe, not a test: run it by name to print figures"]
async fn append_throughput() {
    use plugboard::config::{StorageBackend, StorageConfig};
    use plugboard_tests::postgres::{PgOptions, PgServer};
    use std::time::Instant;

    const SENDERS: usize = 64;
    const EACH: usize = 60;
    const GROUP: usize = 10_000;

    let durable = tokio::task::spawn_blocking(|| PgServer::start(PgOptions::durable()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let durable_backend = plugboard::storage::open(
        &StorageConfig {
            backend: StorageBackend::Postgres,
            url: durable.create_database(),
            ..StorageConfig::default()
        },
        dir.path(),
        None,
    )
    .await
    .unwrap();
    let sqlite = crate::Fixture::new(crate::Engine::Sqlite).await;
    let fast = crate::Fixture::new(crate::Engine::Postgres).await;
    let engines = [
        ("sqlite (synchronous=FULL)", sqlite.backend.clone()),
        ("postgres, test server (fsync off)", fast.backend.clone()),
        ("postgres, durable server", durable_backend),
    ];
    for (name, b) in engines {
        // Warm-up: connections, prepared statements, first rows.
        for i in 0..SENDERS {
            send(
                &b,
                &Channel::person(&format!("s{i}"), &format!("r{i}")),
                &format!("s{i}"),
                "warm",
            )
            .await;
        }
        let started = Instant::now();
        let tasks: Vec<_> = (0..SENDERS)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move {
                    let channel = Channel::person(&format!("s{i}"), &format!("r{i}"));
                    for j in 0..EACH {
                        send(&b, &channel, &format!("s{i}"), &format!("m{j}")).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let took = started.elapsed();
        let n = SENDERS * EACH;
        println!(
            "{name}: {n} 1:1 appends by {SENDERS} senders in {:.2} s = {:.0} appends/s ({:.3} ms of writer time each)",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            took.as_secs_f64() * 1000.0 / n as f64
        );

        let users: Vec<String> = (0..GROUP).map(|i| format!("m{i:05}")).collect();
        let list: Vec<&str> = users.iter().map(String::as_str).collect();
        make_group(&b, "big", &list).await;
        let g = Channel::group("big");
        let mut times = Vec::new();
        for sender in &users[..5] {
            let started = Instant::now();
            let a = send(&b, &g, sender, "to everyone").await;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(a.members.len(), GROUP);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{name}: one message to a {GROUP}-member group: median {:.1} ms (min {:.1}, max {:.1})",
            times[2], times[0], times[4]
        );
    }
}
