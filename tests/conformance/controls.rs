//! ControlStore: idempotency keys unique under concurrent creates, what a
//! key answers, each target's moves (delivered, offline, acked, expired)
//! written once also when they race, persisted controls by priority then age.

use std::collections::HashMap;

use plugboard::storage::controls::{
    Deliverable, Existing, NewControl, NewTarget, Priority, TargetEvents, TargetState,
};
use plugboard::storage::{Backend, NewEvent};

use crate::{conformance, outbox};

struct Spec {
    priority: Priority,
    persist: bool,
    receipt: bool,
    created_at: i64,
    expires_at: Option<i64>,
}

const PERSISTED: Spec = Spec {
    priority: Priority::Normal,
    persist: true,
    receipt: true,
    created_at: 1_000,
    expires_at: None,
};

fn control(id: &str, spec: &Spec, targets: &[(&str, TargetState)]) -> NewControl {
    NewControl {
        id: id.to_string(),
        kind: "test.kind".to_string(),
        payload: format!(r#"{{"control":"{id}"}}"#),
        priority: spec.priority,
        persist: spec.persist,
        expires_at: spec.expires_at,
        receipt: spec.receipt,
        idempotency_key: None,
        request_hash: "hash".to_string(),
        created_at: spec.created_at,
        targets: targets
            .iter()
            .map(|(u, state)| NewTarget {
                user_id: u.to_string(),
                payload: None,
                state: *state,
                reason: (*state == TargetState::Rejected).then(|| "not a member".to_string()),
            })
            .collect(),
    }
}

fn keyed(id: &str, key: &str, hash: &str) -> NewControl {
    NewControl {
        idempotency_key: Some(key.to_string()),
        request_hash: hash.to_string(),
        ..control(
            id,
            &PERSISTED,
            &[(&format!("user-of-{id}"), TargetState::Pending)],
        )
    }
}

/// One `test.control.<kind>` event per target that moved.
fn events(kind: &'static str) -> TargetEvents {
    Box::new(move |d: &Deliverable| NewEvent {
        id: plugboard::new_id("evt"),
        event_type: format!("test.control.{kind}"),
        order_key: d.user_id.clone(),
        created_at: 1,
        data: plugboard::storage::event_data(
            &serde_json::json!({ "control_id": d.control_id, "user_id": d.user_id }),
        ),
    })
}

/// The events written since `watch`, as (kind, control, user), sorted.
async fn moves(b: &Backend) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = outbox::drain(b)
        .await
        .iter()
        .map(|e| {
            let d = outbox::data(e);
            (
                e.event_type.trim_start_matches("test.control.").to_string(),
                d["control_id"].as_str().unwrap().to_string(),
                d["user_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn mv(kind: &str, control: &str, user: &str) -> (String, String, String) {
    (kind.to_string(), control.to_string(), user.to_string())
}

fn control_ids(list: &[Deliverable]) -> Vec<&str> {
    list.iter().map(|d| d.control_id.as_str()).collect()
}

conformance! {
    async fn an_idempotency_key_is_taken_once_under_concurrent_creates(f) {
        const KEYS: usize = 16;
        let a = f.backend.clone();
        let b = f.another_process().await;
        // Each key created at once from both processes; odd keys by two
        // different requests.
        let creates = (0..KEYS).flat_map(|k| {
            let key = format!("key-{k}");
            let other_hash = if k % 2 == 0 { "h" } else { "h2" };
            [
                (a.clone(), keyed(&format!("ctl_{k}_a"), &key, "h")),
                (b.clone(), keyed(&format!("ctl_{k}_b"), &key, other_hash)),
            ]
            .map(|(p, c)| async move {
                let id = c.id.clone();
                (
                    k,
                    id,
                    c.request_hash.clone(),
                    p.controls.control_create(c).await.unwrap(),
                )
            })
        });
        let results = futures_util::future::join_all(creates).await;
        for k in 0..KEYS {
            let of_key: Vec<_> = results.iter().filter(|r| r.0 == k).collect();
            let won: Vec<_> = of_key.iter().filter(|r| r.3.is_ok()).collect();
            assert_eq!(won.len(), 1, "key-{k} taken {} times", won.len());
            let lost = of_key.iter().find(|r| r.3.is_err()).unwrap();
            let same_request = won[0].2 == lost.2;
            match (&lost.3, same_request) {
                (Err(Existing::InProgress), true) | (Err(Existing::OtherRequest), false) => {}
                (other, _) => panic!("key-{k}: the second create got {other:?}"),
            }
            // Only the winner's targets were recorded.
            let (winner, loser) = (&won[0].1, &lost.1);
            let targets = a
                .controls
                .controls_for_user(&format!("user-of-{winner}"), 0)
                .await
                .unwrap();
            assert_eq!(control_ids(&targets), [winner.as_str()]);
            assert!(b
                .controls
                .controls_for_user(&format!("user-of-{loser}"), 0)
                .await
                .unwrap()
                .is_empty());

            // What the key answers, before and after the answer is stored.
            let key = format!("key-{k}");
            let winner_hash = &won[0].2;
            assert!(matches!(
                a.controls.control_by_key(&key, winner_hash).await.unwrap(),
                Some(Existing::InProgress)
            ));
            assert!(matches!(
                b.controls.control_by_key(&key, "another").await.unwrap(),
                Some(Existing::OtherRequest)
            ));
            b.controls
                .control_answered(winner, format!("answer-{k}"))
                .await
                .unwrap();
            match a.controls.control_by_key(&key, winner_hash).await.unwrap() {
                Some(Existing::Answered(answer)) => assert_eq!(answer, format!("answer-{k}")),
                other => panic!("key-{k} answers {other:?}"),
            }
            assert!(matches!(
                a.controls.control_by_key(&key, "another").await.unwrap(),
                Some(Existing::OtherRequest)
            ));
            match a
                .controls
                .control_create(keyed("ctl_late", &key, winner_hash))
                .await
                .unwrap()
            {
                Err(Existing::Answered(answer)) => assert_eq!(answer, format!("answer-{k}")),
                other => panic!("a late repeat of key-{k} got {other:?}"),
            }
        }
        assert!(a
            .controls
            .control_by_key("key-unknown", "h")
            .await
            .unwrap()
            .is_none());
        // Controls without a key never collide.
        a.controls
            .control_create(control("ctl_free_1", &PERSISTED, &[]))
            .await
            .unwrap()
            .unwrap();
        b.controls
            .control_create(control("ctl_free_2", &PERSISTED, &[]))
            .await
            .unwrap()
            .unwrap();
    }

    async fn each_target_move_writes_its_event_once(f) {
        let c = &f.backend.controls;
        outbox::watch(&f.backend).await;
        let online = Spec {
            persist: false,
            ..PERSISTED
        };
        let targets = [
            ("u1", TargetState::Pending),
            ("u2", TargetState::Pending),
            ("u3", TargetState::Pending),
            ("u4", TargetState::Rejected),
        ];
        c.control_create(control("ctl_online", &online, &targets))
            .await
            .unwrap()
            .unwrap();
        let delivered = vec!["u1".to_string(), "u1".to_string()];
        let unreached = vec!["u2".to_string(), "u4".to_string()];
        for _ in 0..2 {
            c.control_delivered(
                "ctl_online",
                delivered.clone(),
                unreached.clone(),
                events("delivered"),
            )
            .await
            .unwrap();
        }
        // Receipts: u1 (delivered) and u3 (still pending) once each; not
        // the offline or rejected ones.
        let acked = c
            .control_ack("ctl_online", "u1", events("acked"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (acked.control_id.as_str(), acked.user_id.as_str()),
            ("ctl_online", "u1")
        );
        assert_eq!(acked.payload, r#"{"control":"ctl_online"}"#);
        assert!(c
            .control_ack("ctl_online", "u1", events("acked"))
            .await
            .unwrap()
            .is_none());
        assert!(c
            .control_ack("ctl_online", "u3", events("acked"))
            .await
            .unwrap()
            .is_some());
        assert!(c
            .control_ack("ctl_online", "u2", events("acked"))
            .await
            .unwrap()
            .is_none());
        assert!(c
            .control_ack("ctl_online", "u4", events("acked"))
            .await
            .unwrap()
            .is_none());
        assert!(c
            .control_ack("ctl_unknown", "u1", events("acked"))
            .await
            .unwrap()
            .is_none());

        // Persisted: an unreached target stays pending; no receipt asked.
        let stored = Spec {
            receipt: false,
            expires_at: Some(5_000),
            ..PERSISTED
        };
        let targets = [("v1", TargetState::Pending), ("v2", TargetState::Pending)];
        c.control_create(control("ctl_stored", &stored, &targets))
            .await
            .unwrap()
            .unwrap();
        c.control_delivered(
            "ctl_stored",
            Vec::new(),
            vec!["v1".into()],
            events("delivered"),
        )
        .await
        .unwrap();
        assert_eq!(
            control_ids(&c.controls_for_user("v1", 0).await.unwrap()),
            ["ctl_stored"]
        );
        let ids = vec![
            "ctl_stored".to_string(),
            "ctl_stored".to_string(),
            "ctl_unknown".to_string(),
        ];
        c.controls_redelivered("v1", ids.clone(), events("delivered"))
            .await
            .unwrap();
        c.controls_redelivered("v1", ids, events("delivered"))
            .await
            .unwrap();
        assert!(c
            .control_ack("ctl_stored", "v1", events("acked"))
            .await
            .unwrap()
            .is_none());
        assert!(
            c.controls_for_user("v1", 0).await.unwrap().is_empty(),
            "delivered, no receipt"
        );
        assert_eq!(
            c.controls_expire(4_999, 10, events("expired"))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            c.controls_expire(5_000, 10, events("expired"))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            c.controls_expire(9_000, 10, events("expired"))
                .await
                .unwrap(),
            0
        );
        assert!(c
            .control_ack("ctl_stored", "v2", events("acked"))
            .await
            .unwrap()
            .is_none());

        assert_eq!(
            moves(&f.backend).await,
            [
                mv("acked", "ctl_online", "u1"),
                mv("acked", "ctl_online", "u3"),
                mv("delivered", "ctl_online", "u1"),
                mv("delivered", "ctl_stored", "v1"),
                mv("expired", "ctl_stored", "v2"),
            ]
        );
    }

    async fn racing_receipt_redelivery_and_expiry_move_a_target_once(f) {
        const CONTROLS: usize = 24;
        const EXPIRES: i64 = 10_000;
        let a = f.backend.clone();
        let b = f.another_process().await;
        outbox::watch(&a).await;
        let spec = Spec {
            expires_at: Some(EXPIRES),
            ..PERSISTED
        };
        for i in 0..CONTROLS {
            let user = format!("w{i}");
            let c = control(&format!("ctl_{i}"), &spec, &[(&user, TargetState::Pending)]);
            a.controls.control_create(c).await.unwrap().unwrap();
        }
        let acked = std::sync::atomic::AtomicUsize::new(0);
        let expired = std::sync::atomic::AtomicUsize::new(0);
        let per_target = (0..CONTROLS).map(|i| {
            let (a, b) = (a.clone(), b.clone());
            let (acked, expired) = (&acked, &expired);
            async move {
                let (id, user) = (format!("ctl_{i}"), format!("w{i}"));
                // Twice each, from both processes, in an order that varies
                // with the target.
                let (p, q) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                let redeliver = |p: &Backend| {
                    let (p, id, user) = (p.clone(), id.clone(), user.clone());
                    async move {
                        p.controls
                            .controls_redelivered(&user, vec![id], events("delivered"))
                            .await
                            .unwrap()
                    }
                };
                let ack = |p: &Backend| {
                    let (p, id, user) = (p.clone(), id.clone(), user.clone());
                    async move {
                        if p.controls
                            .control_ack(&id, &user, events("acked"))
                            .await
                            .unwrap()
                            .is_some()
                        {
                            acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                };
                let expire = |p: &Backend| {
                    let p = p.clone();
                    async move {
                        let n = p
                            .controls
                            .controls_expire(EXPIRES, 5, events("expired"))
                            .await
                            .unwrap();
                        expired.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                    }
                };
                match i % 3 {
                    0 => {
                        tokio::join!(
                            redeliver(p),
                            ack(q),
                            expire(p),
                            redeliver(q),
                            ack(p),
                            expire(q)
                        );
                    }
                    1 => {
                        tokio::join!(
                            ack(p),
                            expire(q),
                            redeliver(p),
                            expire(p),
                            redeliver(q),
                            ack(q)
                        );
                    }
                    _ => {
                        tokio::join!(
                            expire(p),
                            redeliver(q),
                            ack(p),
                            ack(q),
                            expire(q),
                            redeliver(p)
                        );
                    }
                }
            }
        });
        futures_util::future::join_all(per_target).await;
        // Whatever is still pending expires now.
        loop {
            let n = a
                .controls
                .controls_expire(EXPIRES, 100, events("expired"))
                .await
                .unwrap();
            expired.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            if n == 0 {
                break;
            }
        }

        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        for (kind, control, _) in moves(&a).await {
            seen.entry(control).or_default().push(kind);
        }
        let count = |kind: &str| seen.values().flatten().filter(|k| *k == kind).count();
        assert_eq!(count("acked"), acked.into_inner());
        assert_eq!(count("expired"), expired.into_inner());
        for i in 0..CONTROLS {
            let id = format!("ctl_{i}");
            let mut kinds = seen.remove(&id).unwrap_or_default();
            kinds.sort();
            let still_listed = !a
                .controls
                .controls_for_user(&format!("w{i}"), EXPIRES - 1)
                .await
                .unwrap()
                .is_empty();
            // The moves that can happen, each once: pending → expired;
            // pending → acked; pending → delivered (→ acked).
            match kinds.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["expired"] | ["acked"] | ["acked", "delivered"] => {
                    assert!(!still_listed, "{id}: {kinds:?}")
                }
                ["delivered"] => assert!(still_listed, "{id} waits for its receipt"),
                _ => panic!("{id} moved {kinds:?}"),
            }
        }
    }

    async fn persisted_controls_come_by_priority_then_age_until_they_expire(f) {
        let c = &f.backend.controls;
        let spec = |priority, created_at, expires_at| Spec {
            priority,
            created_at,
            expires_at,
            ..PERSISTED
        };
        let u = [("u", TargetState::Pending)];
        for (id, s) in [
            ("ctl_low", spec(Priority::Low, 100, None)),
            ("ctl_high_late", spec(Priority::High, 300, None)),
            // Same priority and age: by id, byte order ("B" < "a").
            ("ctl_a", spec(Priority::Normal, 200, None)),
            ("ctl_B", spec(Priority::Normal, 200, None)),
            ("ctl_high", spec(Priority::High, 100, None)),
            ("ctl_high_soon", spec(Priority::High, 50, Some(1_000))),
        ] {
            c.control_create(control(id, &s, &u))
                .await
                .unwrap()
                .unwrap();
        }
        // Not listed: online-only, rejected, acked, delivered without receipt.
        let online = Spec {
            persist: false,
            ..PERSISTED
        };
        c.control_create(control("ctl_online", &online, &u))
            .await
            .unwrap()
            .unwrap();
        c.control_create(control(
            "ctl_rejected",
            &PERSISTED,
            &[("u", TargetState::Rejected)],
        ))
        .await
        .unwrap()
        .unwrap();
        c.control_create(control("ctl_acked", &PERSISTED, &u))
            .await
            .unwrap()
            .unwrap();
        assert!(c
            .control_ack("ctl_acked", "u", events("acked"))
            .await
            .unwrap()
            .is_some());
        let quiet = Spec {
            receipt: false,
            ..PERSISTED
        };
        c.control_create(control("ctl_quiet", &quiet, &u))
            .await
            .unwrap()
            .unwrap();
        c.controls_redelivered("u", vec!["ctl_quiet".into()], events("delivered"))
            .await
            .unwrap();
        // Listed again until acked: delivered, with a receipt asked.
        c.control_create(control("ctl_again", &spec(Priority::Normal, 150, None), &u))
            .await
            .unwrap()
            .unwrap();
        c.controls_redelivered("u", vec!["ctl_again".into()], events("delivered"))
            .await
            .unwrap();
        // A target's own payload; a user listed twice keeps the first row.
        let mut own = control(
            "ctl_own",
            &spec(Priority::Low, 50, None),
            &[("u", TargetState::Pending), ("u", TargetState::Rejected)],
        );
        own.targets[0].payload = Some(r#"{"just":"u"}"#.to_string());
        own.targets[1].payload = Some(r#"{"second":true}"#.to_string());
        c.control_create(own).await.unwrap().unwrap();

        let list = c.controls_for_user("u", 999).await.unwrap();
        assert_eq!(
            control_ids(&list),
            [
                "ctl_high_soon",
                "ctl_high",
                "ctl_high_late",
                "ctl_again",
                "ctl_B",
                "ctl_a",
                "ctl_own",
                "ctl_low"
            ]
        );
        let again = &list[3];
        assert!(again.redelivery && again.receipt && again.persist);
        assert!(!list[0].redelivery);
        assert_eq!(list[0].expires_at, Some(1_000));
        assert_eq!((list[0].priority, list[0].created_at), (Priority::High, 50));
        assert_eq!(list[6].payload, r#"{"just":"u"}"#);
        assert_eq!(list[7].payload, r#"{"control":"ctl_low"}"#);
        assert_eq!(list[7].kind, "test.kind");
        // Past its time-to-live it is no longer delivered, expired or not.
        let list = c.controls_for_user("u", 1_000).await.unwrap();
        assert_eq!(list.len(), 7);
        assert!(!control_ids(&list).contains(&"ctl_high_soon"));
        assert!(c.controls_for_user("nobody", 0).await.unwrap().is_empty());

        // Expiry takes at most `limit` at a time.
        let spec2 = Spec {
            expires_at: Some(2_000),
            ..PERSISTED
        };
        c.control_create(control(
            "ctl_x",
            &spec2,
            &[
                ("v1", TargetState::Pending),
                ("v2", TargetState::Pending),
                ("v3", TargetState::Pending),
            ],
        ))
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            c.controls_expire(2_000, 2, events("expired"))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            c.controls_expire(2_000, 2, events("expired"))
                .await
                .unwrap(),
            2,
            "ctl_x's last, and ctl_high_soon"
        );
        assert_eq!(
            c.controls_expire(2_000, 2, events("expired"))
                .await
                .unwrap(),
            0
        );
    }
}
