//! SessionStore: exactly-once close (two paths, two processes), presence
//! counted in the transaction, closing a node's sessions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use plugboard::storage::{ClaimedEvent, NewEvent, Presence, SessionEvents, SessionRecord};

use crate::{conformance, outbox};

fn record(connection: &str, user: &str, device: &str) -> SessionRecord {
    SessionRecord {
        connection_id: connection.to_string(),
        user_id: user.to_string(),
        device_id: device.to_string(),
        node_id: "node-1".to_string(),
        opened_at: 1,
        remote_addr: "127.0.0.1:1".to_string(),
    }
}

/// One `test.session` event per change, carrying the presence it saw.
fn events(kind: &'static str) -> SessionEvents {
    Arc::new(move |r: &SessionRecord, p: Presence| {
        vec![NewEvent {
            id: format!("evt_{kind}_{}_{}", r.connection_id, p.connections),
            event_type: format!("test.{kind}"),
            order_key: r.user_id.clone(),
            created_at: 1,
            data: plugboard::storage::event_data(
                &serde_json::json!({ "connections": p.connections, "devices": p.devices }),
            ),
        }]
    })
}

conformance! {
    async fn a_close_that_finds_no_session_writes_nothing(f) {
        let s = &f.backend.sessions;
        let before = f.backend.outbox.outbox_depth().await.unwrap();
        assert_eq!(s.close_session("nope", events("closed")).await.unwrap(), None);
        assert_eq!(f.backend.outbox.outbox_depth().await.unwrap(), before);

        let p = s.open_session(record("c1", "u1", "d1"), events("opened")).await.unwrap();
        assert_eq!(p, Presence { connections: 1, devices: 1 });
        let closed = s.close_session("c1", events("closed")).await.unwrap();
        assert_eq!(closed, Some(Presence { connections: 0, devices: 0 }));
        assert_eq!(s.close_session("c1", events("closed")).await.unwrap(), None);
        let (presence, open) = s.presence("u1").await.unwrap();
        assert_eq!(presence, Presence::default());
        assert!(open.is_empty());
    }
}

/// A session of `node`.
fn on_node(connection: &str, user: &str, device: &str, node: &str) -> SessionRecord {
    SessionRecord {
        node_id: node.to_string(),
        ..record(connection, user, device)
    }
}

/// One `test.<kind>` event per change with a unique id, carrying the
/// connection, its device and the presence the transaction saw.
fn traced(kind: &'static str) -> SessionEvents {
    Arc::new(move |r: &SessionRecord, p: Presence| {
        vec![NewEvent {
            id: plugboard::new_id("evt"),
            event_type: format!("test.{kind}"),
            order_key: r.user_id.clone(),
            created_at: 1,
            data: plugboard::storage::event_data(&serde_json::json!({
                "connection": r.connection_id,
                "device": r.device_id,
                "connections": p.connections,
                "devices": p.devices,
            })),
        }]
    })
}

/// How many `test.<kind>` events each connection has in the outbox.
fn per_connection(events: &[ClaimedEvent], kind: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for e in events
        .iter()
        .filter(|e| e.event_type == format!("test.{kind}"))
    {
        let c = outbox::data(e)["connection"].as_str().unwrap().to_string();
        *out.entry(c).or_default() += 1;
    }
    out
}

conformance! {
    async fn a_session_closed_by_two_paths_and_two_processes_closes_once(f) {
        const SESSIONS: usize = 20;
        let a = f.backend.clone();
        let b = f.another_process().await;
        outbox::watch(&a).await;
        for i in 0..SESSIONS {
            let p = if i % 2 == 0 { &a } else { &b };
            p.sessions
                .open_session(
                    record(&format!("c{i}"), &format!("u{i}"), "d"),
                    traced("opened"),
                )
                .await
                .unwrap();
        }
        // Each session closed four times at once: twice from each process.
        let closes = (0..SESSIONS).flat_map(|i| {
            [&a, &b, &a, &b].map(|p| {
                let p = p.clone();
                async move {
                    let id = format!("c{i}");
                    (
                        i,
                        p.sessions
                            .close_session(&id, traced("closed"))
                            .await
                            .unwrap(),
                    )
                }
            })
        });
        let results = futures_util::future::join_all(closes).await;
        for i in 0..SESSIONS {
            let some: Vec<_> = results
                .iter()
                .filter(|(j, r)| *j == i && r.is_some())
                .collect();
            assert_eq!(some.len(), 1, "c{i} closed {} times", some.len());
            assert_eq!(some[0].1, Some(Presence::default()));
        }
        let events = outbox::drain(&a).await;
        let closed = per_connection(&events, "closed");
        assert_eq!(closed.len(), SESSIONS);
        assert!(closed.values().all(|n| *n == 1), "{closed:?}");
        assert_eq!(per_connection(&events, "opened").len(), SESSIONS);
    }

    async fn presence_follows_concurrent_opens_and_closes_of_one_user(f) {
        const CONNECTIONS: usize = 24;
        let a = f.backend.clone();
        let b = f.another_process().await;
        outbox::watch(&a).await;
        let device = |i: usize| format!("d{}", i % 5);

        // All open at once, from both processes: each sees its own count.
        let opens = (0..CONNECTIONS).map(|i| {
            let p = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move {
                let r = record(&format!("c{i}"), "u", &device(i));
                p.sessions
                    .open_session(r, traced("opened"))
                    .await
                    .unwrap()
                    .connections
            }
        });
        let mut counts = futures_util::future::join_all(opens).await;
        counts.sort();
        assert_eq!(counts, (1..=CONNECTIONS as u32).collect::<Vec<_>>());
        let (p, open) = b.sessions.presence("u").await.unwrap();
        assert_eq!(
            p,
            Presence {
                connections: CONNECTIONS as u32,
                devices: 5
            }
        );
        assert_eq!(open.len(), CONNECTIONS);

        // Closes racing further opens and closes of new connections.
        let churn = (0..CONNECTIONS).map(|i| {
            let p = if i % 2 == 0 { b.clone() } else { a.clone() };
            let q = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move {
                p.sessions
                    .close_session(&format!("c{i}"), traced("closed"))
                    .await
                    .unwrap();
                let id = format!("n{i}");
                q.sessions
                    .open_session(record(&id, "u", &device(i + 1)), traced("opened"))
                    .await
                    .unwrap();
                p.sessions
                    .close_session(&id, traced("closed"))
                    .await
                    .unwrap();
            }
        });
        futures_util::future::join_all(churn).await;
        let (p, open) = a.sessions.presence("u").await.unwrap();
        assert_eq!(p, Presence::default());
        assert!(open.is_empty());

        // In outbox order every event saw the presence the events before it
        // leave: one more connection per open, one fewer per close.
        let events = outbox::drain(&a).await;
        assert_eq!(events.len(), 4 * CONNECTIONS);
        let mut live: HashMap<String, String> = HashMap::new();
        for e in &events {
            let d = outbox::data(e);
            let c = d["connection"].as_str().unwrap().to_string();
            match e.event_type.as_str() {
                "test.opened" => assert!(live
                    .insert(c.clone(), d["device"].as_str().unwrap().into())
                    .is_none()),
                "test.closed" => assert!(live.remove(&c).is_some(), "{c} closed before it opened"),
                other => panic!("unexpected event {other}"),
            }
            let devices: HashSet<&String> = live.values().collect();
            assert_eq!(
                d["connections"],
                live.len(),
                "event {} of {c}",
                e.event_type
            );
            assert_eq!(d["devices"], devices.len(), "event {} of {c}", e.event_type);
        }
        assert!(live.is_empty());
    }

    async fn close_node_sessions_closes_that_node_only_and_each_once(f) {
        let a = f.backend.clone();
        let b = f.another_process().await;
        outbox::watch(&a).await;
        let s = &a.sessions;
        for (c, u, node) in [
            ("c1", "u1", "node-a"),
            ("c2", "u1", "node-a"),
            ("c3", "u2", "node-a"),
            ("c4", "u1", "node-b"),
        ] {
            s.open_session(on_node(c, u, "d", node), traced("opened"))
                .await
                .unwrap();
        }
        // The sweep of node-a from both processes, racing a session's own close.
        let (x, y, own) = tokio::join!(
            a.sessions.close_node_sessions("node-a", traced("closed")),
            b.sessions.close_node_sessions("node-a", traced("closed")),
            b.sessions.close_session("c2", traced("closed")),
        );
        let own = usize::from(own.unwrap().is_some());
        assert_eq!(x.unwrap() + y.unwrap() + own, 3);
        assert_eq!(
            s.close_node_sessions("node-a", traced("closed"))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            s.close_node_sessions("node-nobody", traced("closed"))
                .await
                .unwrap(),
            0
        );

        let (p, open) = s.presence("u1").await.unwrap();
        assert_eq!(
            p,
            Presence {
                connections: 1,
                devices: 1
            }
        );
        assert_eq!(
            open.iter()
                .map(|r| r.connection_id.as_str())
                .collect::<Vec<_>>(),
            ["c4"]
        );
        assert_eq!(open[0].node_id, "node-b");
        let events = outbox::drain(&a).await;
        let closed = per_connection(&events, "closed");
        assert_eq!(closed.len(), 3, "{closed:?}");
        assert!(closed.values().all(|n| *n == 1));
        assert!(!closed.contains_key("c4"));
        // u1's last close saw c4 still open.
        let last_u1 = events
            .iter()
            .rfind(|e| e.event_type == "test.closed" && e.order_key == "u1")
            .unwrap();
        assert_eq!(outbox::data(last_u1)["connections"], 1);
    }
}
