//! GroupStore: unique ids (also under concurrent creates), reads and
//! updates, member changes with the ids that changed, the member limit
//! under concurrent additions, member pages, and the tombstones a deletion
//! or removal leaves in members' conversation lists.

use std::collections::HashSet;

use plugboard::storage::groups::{Group, GroupResult, Member};
use plugboard::storage::messages::{
    Channel, MessageRange, RowChange, RowState, SendRejected, SyncRefused,
};
use plugboard::storage::Backend;

use crate::conformance;
use crate::messages::{event, history, make_group, message, no_hook, row_of, send, sync_all};

fn group(gid: &str, name: &str, created_at: i64) -> Group {
    Group {
        group_id: gid.to_string(),
        name: name.to_string(),
        data: serde_json::json!({ "topic": name, "tags": [1, 2] }),
        member_count: 0,
        created_at,
        updated_at: 0,
    }
}

fn member(user: &str, role: &str, joined_at: i64) -> Member {
    Member {
        user_id: user.to_string(),
        role: role.to_string(),
        joined_at,
    }
}

fn members(users: &[&str]) -> Vec<Member> {
    users.iter().map(|u| member(u, "member", 1)).collect()
}

async fn ids(b: &Backend, gid: &str) -> Vec<String> {
    match b.groups.group_member_ids(gid).await.unwrap() {
        GroupResult::Ok(mut ids) => {
            ids.sort();
            ids
        }
        other => panic!("member ids of {gid}: {other:?}"),
    }
}

async fn count(b: &Backend, gid: &str) -> u64 {
    b.groups
        .group_get(gid)
        .await
        .unwrap()
        .expect("group")
        .member_count
}

async fn current(b: &Backend) -> u64 {
    b.messages.current_version().await.unwrap()
}

conformance! {
    async fn group_ids_are_unique_also_under_concurrent_creates(f) {
        let b = &f.backend;
        let created = b.groups.group_create(group("g1", "one", 1000), vec![member("u1", "admin", 5), member("u2", "member", 6)], 0).await.unwrap();
        let GroupResult::Ok(g) = created else { panic!("{created:?}") };
        assert_eq!(
            g,
            Group {
                group_id: "g1".into(),
                name: "one".into(),
                data: serde_json::json!({ "topic": "one", "tags": [1, 2] }),
                member_count: 2,
                created_at: 1000,
                updated_at: 1000,
            }
        );
        assert_eq!(b.groups.group_get("g1").await.unwrap(), Some(g));
        assert_eq!(b.groups.group_create(group("g1", "again", 2000), vec![], 0).await.unwrap(), GroupResult::Exists);
        // A taken id answers `Exists` before the limit is looked at.
        assert_eq!(b.groups.group_create(group("g1", "again", 2000), members(&["a", "b", "c"]), 2).await.unwrap(), GroupResult::Exists);
        assert_eq!(b.groups.group_get("g1").await.unwrap().unwrap().name, "one");
        assert_eq!(
            b.groups.group_create(group("g2", "big", 1), members(&["a", "b", "c"]), 2).await.unwrap(),
            GroupResult::TooManyMembers { limit: 2 }
        );
        assert_eq!(b.groups.group_get("g2").await.unwrap(), None, "a refused create writes nothing");
        // The limit counts users, not entries.
        let GroupResult::Ok(g3) = b.groups.group_create(group("g3", "dups", 1), members(&["a", "b", "a"]), 2).await.unwrap() else {
            panic!("a list naming two users fits a limit of two");
        };
        assert_eq!(g3.member_count, 2);

        // Concurrent creates of one id from two processes: one of each answer.
        let processes = [f.backend.clone(), f.another_process().await];
        let mut tasks = Vec::new();
        for i in 0..10 {
            for (p, backend) in processes.iter().enumerate() {
                let backend = backend.clone();
                tasks.push(tokio::spawn(async move {
                    let gid = format!("race-{i}");
                    let r = backend.groups.group_create(group(&gid, &format!("from-{p}"), 1), members(&[&format!("u{p}")]), 0).await.unwrap();
                    (i, p, r)
                }));
            }
        }
        let mut winners = std::collections::HashMap::new();
        let mut exists = 0;
        for t in tasks {
            match t.await.unwrap() {
                (i, p, GroupResult::Ok(g)) => {
                    assert_eq!(g.member_count, 1);
                    assert!(winners.insert(i, p).is_none(), "race-{i} created twice");
                }
                (_, _, GroupResult::Exists) => exists += 1,
                (_, _, other) => panic!("{other:?}"),
            }
        }
        assert_eq!((winners.len(), exists), (10, 10));
        for (i, p) in winners {
            let g = processes[1 - p].groups.group_get(&format!("race-{i}")).await.unwrap().unwrap();
            assert_eq!((g.name, g.member_count), (format!("from-{p}"), 1));
            assert_eq!(ids(&processes[0], &format!("race-{i}")).await, [format!("u{p}")]);
        }
    }

    async fn groups_read_update_and_delete(f) {
        let b = &f.backend;
        assert_eq!(b.groups.group_get("g1").await.unwrap(), None);
        assert_eq!(b.groups.group_update("g1", Some("x".into()), None).await.unwrap(), GroupResult::UnknownGroup);
        b.groups.group_create(group("g1", "one", 1000), members(&["u1"]), 0).await.unwrap();
        let GroupResult::Ok(renamed) = b.groups.group_update("g1", Some("renamed".into()), None).await.unwrap() else { panic!() };
        assert_eq!((renamed.name.as_str(), renamed.member_count, renamed.created_at), ("renamed", 1, 1000));
        assert_eq!(renamed.data, serde_json::json!({ "topic": "one", "tags": [1, 2] }), "data is kept");
        assert!(renamed.updated_at >= 1000);
        let data = serde_json::json!({ "nested": { "deep": [true, null, 1.5, "é\u{1f}"] } });
        let GroupResult::Ok(redata) = b.groups.group_update("g1", None, Some(data.clone())).await.unwrap() else { panic!() };
        assert_eq!((redata.name.as_str(), &redata.data), ("renamed", &data), "the name is kept");
        assert_eq!(b.groups.group_get("g1").await.unwrap(), Some(redata));

        assert!(b.groups.group_delete("g1").await.unwrap());
        assert_eq!(b.groups.group_get("g1").await.unwrap(), None);
        assert!(!b.groups.group_delete("g1").await.unwrap());
        assert_eq!(b.groups.group_member_ids("g1").await.unwrap(), GroupResult::UnknownGroup);
        assert_eq!(b.groups.group_members("g1", None, 10).await.unwrap(), GroupResult::UnknownGroup);
        assert_eq!(b.groups.group_update("g1", None, None).await.unwrap(), GroupResult::UnknownGroup);
        // The id is free again, with nothing of the old group.
        let GroupResult::Ok(fresh) = b.groups.group_create(group("g1", "new", 3000), vec![], 0).await.unwrap() else { panic!() };
        assert_eq!((fresh.name.as_str(), fresh.member_count), ("new", 0));
    }

    async fn members_are_added_and_removed_with_the_ids_that_changed(f) {
        let b = &f.backend;
        b.groups.group_create(group("g1", "one", 1), vec![member("u1", "member", 10)], 0).await.unwrap();
        let added = b.groups.group_add_members("g1", vec![member("u2", "member", 20), member("u1", "admin", 20), member("u3", "member", 20)], 0).await.unwrap();
        assert_eq!(added, GroupResult::Ok(vec!["u2".to_string(), "u3".to_string()]));
        let GroupResult::Ok(list) = b.groups.group_members("g1", None, 10).await.unwrap() else { panic!() };
        assert_eq!(list, vec![member("u1", "admin", 10), member("u2", "member", 20), member("u3", "member", 20)], "an existing member gets the role and keeps the join time");
        assert_eq!(count(b, "g1").await, 3);
        // One user named twice: added once, with the last role and the first time.
        let twice = b.groups.group_add_members("g1", vec![member("u4", "member", 30), member("u4", "admin", 40)], 4).await.unwrap();
        assert_eq!(twice, GroupResult::Ok(vec!["u4".to_string()]), "a user named twice counts once against the limit");
        let GroupResult::Ok(list) = b.groups.group_members("g1", Some("u3".into()), 10).await.unwrap() else { panic!() };
        assert_eq!(list, vec![member("u4", "admin", 30)]);

        let v = current(b).await;
        let removed = b.groups.group_remove_members("g1", vec!["u3".into(), "nobody".into(), "u3".into(), "u1".into()]).await.unwrap();
        assert_eq!(removed, GroupResult::Ok(vec!["u3".to_string(), "u1".to_string()]));
        assert_eq!(current(b).await, v + 1, "one version for the removal");
        assert_eq!(ids(b, "g1").await, ["u2", "u4"]);
        assert_eq!(b.groups.group_remove_members("g1", vec!["u3".into(), "nobody".into()]).await.unwrap(), GroupResult::Ok(vec![]));
        assert_eq!(b.groups.group_remove_members("g1", vec![]).await.unwrap(), GroupResult::Ok(vec![]));
        assert_eq!(current(b).await, v + 1, "removing nobody takes no version");
        assert_eq!(b.groups.group_add_members("g1", vec![], 0).await.unwrap(), GroupResult::Ok(vec![]));

        assert_eq!(b.groups.group_add_members("nope", members(&["u1"]), 0).await.unwrap(), GroupResult::UnknownGroup);
        assert_eq!(b.groups.group_remove_members("nope", vec!["u1".into()]).await.unwrap(), GroupResult::UnknownGroup);
        assert_eq!(b.groups.group_member_ids("nope").await.unwrap(), GroupResult::UnknownGroup);
    }

    async fn the_member_limit_holds_under_concurrent_adds(f) {
        const LIMIT: usize = 10;
        let processes = [f.backend.clone(), f.another_process().await];
        processes[0].groups.group_create(group("g1", "one", 1), members(&["u0"]), LIMIT).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let backend = processes[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                backend.groups.group_add_members("g1", members(&[&format!("a{i}")]), LIMIT).await.unwrap()
            }));
        }
        let (mut ok, mut refused) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                GroupResult::Ok(added) => {
                    assert_eq!(added.len(), 1);
                    ok += 1;
                }
                GroupResult::TooManyMembers { limit } => {
                    assert_eq!(limit, LIMIT);
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((ok, refused), (LIMIT - 1, 40 - (LIMIT - 1)));
        assert_eq!(count(&processes[1], "g1").await, LIMIT as u64);
        assert_eq!(ids(&processes[0], "g1").await.len(), LIMIT);
        // Naming members again at the limit adds nobody, and is allowed.
        assert_eq!(processes[0].groups.group_add_members("g1", members(&["u0"]), LIMIT).await.unwrap(), GroupResult::Ok(vec![]));

        // Batches: only whole batches that fit go in.
        processes[1].groups.group_create(group("g2", "two", 1), vec![], LIMIT).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let backend = processes[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let batch: Vec<String> = (0..3).map(|j| format!("b{i}-{j}")).collect();
                let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
                backend.groups.group_add_members("g2", members(&batch), LIMIT).await.unwrap()
            }));
        }
        let mut fitted = 0;
        for t in tasks {
            if let GroupResult::Ok(added) = t.await.unwrap() {
                assert_eq!(added.len(), 3);
                fitted += 1;
            }
        }
        assert_eq!(fitted, 3);
        assert_eq!(count(&processes[0], "g2").await, 9);
    }

    async fn members_page_in_id_order(f) {
        let b = &f.backend;
        let mut users: Vec<String> = (0..25).map(|i| format!("u{i:02}")).collect();
        // Byte order, whatever the database's locale.
        users.extend(["Zed", "alpha", "_x", "u1\u{e9}", "U9"].map(String::from));
        let list: Vec<&str> = users.iter().map(String::as_str).collect();
        b.groups.group_create(group("g1", "one", 1), members(&list), 0).await.unwrap();
        users.sort();
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let GroupResult::Ok(page) = b.groups.group_members("g1", after.clone(), 7).await.unwrap() else { panic!() };
            assert!(page.len() <= 7);
            paged.extend(page.iter().map(|m| m.user_id.clone()));
            if page.len() < 7 {
                break;
            }
            after = page.last().map(|m| m.user_id.clone());
        }
        assert_eq!(paged, users);
        assert_eq!(ids(b, "g1").await, users);
        assert_eq!(b.groups.group_members("g1", Some("zzz".into()), 7).await.unwrap(), GroupResult::Ok(vec![]));
        b.groups.group_create(group("empty", "none", 1), vec![], 0).await.unwrap();
        assert_eq!(b.groups.group_members("empty", None, 7).await.unwrap(), GroupResult::Ok(vec![]));
        assert_eq!(b.groups.group_member_ids("empty").await.unwrap(), GroupResult::Ok(vec![]));
    }

    async fn deleting_a_group_or_removing_members_leaves_tombstones(f) {
        let b = &f.backend;
        make_group(b, "g1", &["u1", "u2", "u3"]).await;
        let g = Channel::group("g1");
        send(b, &g, "u1", "one").await;
        let second = send(b, &g, "u2", "two").await;
        let mut fanout = (*second.members).clone();
        fanout.sort();
        assert_eq!(fanout, ["u1", "u2", "u3"]);
        for u in ["u1", "u2", "u3"] {
            let row = row_of(b, u, &g).await.unwrap();
            assert_eq!((row.state, row.version, row.channel_id.as_str()), (RowState::Live, second.message.version, "g1"));
        }

        // Removal: the removed member's row becomes a tombstone, read to the end.
        let v = current(b).await;
        assert_eq!(b.groups.group_remove_members("g1", vec!["u3".into()]).await.unwrap(), GroupResult::Ok(vec!["u3".to_string()]));
        let tomb = row_of(b, "u3", &g).await.unwrap();
        assert_eq!((tomb.state, tomb.version, tomb.unread, tomb.read_seq), (RowState::Deleted, v + 1, 0, 2));
        assert_eq!(row_of(b, "u1", &g).await.unwrap().version, second.message.version, "the others' rows are untouched");
        let delta = b.messages.conversations("u3", v, None, None, 10, 0).await.unwrap().unwrap();
        assert_eq!(delta.rows, vec![tomb.clone()]);
        let (_, full) = sync_all(b, "u3", 0, 10).await.unwrap();
        assert!(full.is_empty());
        // A former member reads nothing of the group any more.
        let refused = b.messages.messages("u3", MessageRange::After { channel: g.clone(), seq: 0 }, 10).await.unwrap();
        assert_eq!(refused.unwrap_err(), SyncRefused::NotMember);
        let cursor = b.messages.messages("u3", MessageRange::UserAfter { version: 0 }, 10).await.unwrap().unwrap();
        assert!(cursor.messages.is_empty());
        assert_eq!(b.messages.change_conversation("u3", g.clone(), RowChange::Read(None)).await.unwrap(), None);
        let not_member = b.messages.append_message(message(&g, "u3", "let me in"), event(), no_hook()).await.unwrap();
        assert_eq!(not_member.unwrap_err(), SendRejected::NotMember);
        // Back in: the next message revives the row.
        b.groups.group_add_members("g1", members(&["u3"]), 0).await.unwrap();
        let third = send(b, &g, "u1", "three").await;
        let row = row_of(b, "u3", &g).await.unwrap();
        assert_eq!((row.state, row.unread, row.read_seq, row.version), (RowState::Live, 1, 2, third.message.version));

        // Deletion: one version on every member's row, as a tombstone.
        b.messages.change_conversation("u2", g.clone(), RowChange::Hide).await.unwrap().unwrap();
        let v = current(b).await;
        assert!(b.groups.group_delete("g1").await.unwrap());
        assert_eq!(current(b).await, v + 1);
        for u in ["u1", "u2", "u3"] {
            let row = row_of(b, u, &g).await.unwrap();
            assert_eq!((row.state, row.version, row.unread, row.read_seq), (RowState::Deleted, v + 1, 0, 3), "{u}");
            let delta = b.messages.conversations(u, v, None, None, 10, 0).await.unwrap().unwrap();
            assert_eq!(delta.rows, vec![row]);
        }
        assert!(!b.groups.group_delete("g1").await.unwrap());
        assert_eq!(current(b).await, v + 1, "deleting nothing takes no version");
        let refused = b.messages.messages("u1", MessageRange::Before { channel: g.clone(), seq: 10 }, 10).await.unwrap();
        assert_eq!(refused.unwrap_err(), SyncRefused::UnknownGroup);
        let unknown = b.messages.append_message(message(&g, "u1", "anyone?"), event(), no_hook()).await.unwrap();
        assert_eq!(unknown.unwrap_err(), SendRejected::UnknownGroup);
        // A new group of that id starts a new history.
        make_group(b, "g1", &["u1", "u9"]).await;
        assert!(history(b, "u1", &g).await.is_empty());
        let first = send(b, &g, "u9", "again").await;
        assert_eq!(first.message.seq, 1);
        let row = row_of(b, "u1", &g).await.unwrap();
        assert_eq!((row.state, row.unread, row.read_seq), (RowState::Live, 1, 0));
        let row = row_of(b, "u9", &g).await.unwrap();
        assert_eq!((row.state, row.unread, row.read_seq), (RowState::Live, 0, 1));
        let seen: HashSet<String> = b.messages.messages("u9", MessageRange::UserAfter { version: 0 }, 10).await.unwrap().unwrap().messages.into_iter().map(|m| m.id).collect();
        assert_eq!(seen, HashSet::from([first.message.id]));
    }
}
