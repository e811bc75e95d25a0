//! OutboxStore: only the oldest pending delivery of a key is due, claims
//! and fan-out under concurrent workers and processes, outbox order is
//! commit order, settlements, endpoint state, pruning, durability, leases.
//!
//! Also the helpers other modules read the outbox with ([`watch`],
//! [`drain`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plugboard::storage::{Backend, ClaimedEvent, EventFilter, NewEvent, Settlement};

use crate::{conformance, Engine};

/// The endpoint [`drain`] reads through.
pub const WATCH: &str = "conformance-watch";

/// A logical "now" later than any wall-clock time the engines stamp
/// (fan-out makes heads due at the wall clock).
const LATER: i64 = 1 << 60;
/// A lease that never ends in a test.
const FOREVER: i64 = LATER + (1 << 40);

/// Longest a concurrency test may take before it fails instead of hanging.
const BOUND: Duration = Duration::from_secs(60);

pub fn all() -> EventFilter {
    Arc::new(|_: &str| true)
}

/// An event of `key`, its number in `data.n`.
pub fn event(key: &str, n: usize) -> NewEvent {
    NewEvent {
        id: plugboard::new_id("evt"),
        event_type: "test.event".to_string(),
        order_key: key.to_string(),
        created_at: n as i64,
        data: plugboard::storage::event_data(&serde_json::json!({ "n": n })),
    }
}

/// Registers the endpoint [`drain`] reads; it sees events appended after this.
pub async fn watch(b: &Backend) {
    b.outbox.endpoint_register(WATCH).await.unwrap();
}

/// Every event appended since [`watch`] and not drained yet, in outbox
/// order (delivered to the watch endpoint and settled).
pub async fn drain(b: &Backend) -> Vec<ClaimedEvent> {
    while b.outbox.endpoint_fanout(WATCH, all(), 1000).await.unwrap() == 1000 {}
    let mut out = Vec::new();
    loop {
        let claimed = b
            .outbox
            .deliveries_claim(WATCH, LATER, 1000, FOREVER)
            .await
            .unwrap();
        if claimed.is_empty() {
            break;
        }
        let seqs = claimed.iter().map(|c| c.seq).collect();
        b.outbox
            .deliveries_settle(WATCH, seqs, Settlement::Delivered, 1)
            .await
            .unwrap();
        out.extend(claimed);
    }
    out.sort_by_key(|c| c.seq);
    out
}

/// The `data` of a claimed event.
pub fn data(c: &ClaimedEvent) -> serde_json::Value {
    serde_json::from_str(&c.data).expect("event data is JSON")
}

fn ids(claimed: &[ClaimedEvent]) -> Vec<String> {
    claimed.iter().map(|c| c.id.clone()).collect()
}

fn retry(next_at: i64) -> Settlement {
    Settlement::Retry {
        next_at,
        error: "HTTP 500".to_string(),
    }
}

conformance! {
    async fn only_the_oldest_pending_delivery_of_a_key_is_due(f) {
        let o = &f.backend.outbox;
        o.endpoint_register("hook").await.unwrap();
        let e: Vec<NewEvent> = ["u1", "u1", "u1", "u2"]
            .iter()
            .enumerate()
            .map(|(n, k)| event(k, n + 1))
            .collect();
        o.append_events(e.clone()).await.unwrap();
        assert_eq!(o.endpoint_fanout("hook", all(), 100).await.unwrap(), 4);
        let t = plugboard::now_ms() + 60_000;
        let lease = t + 10_000;

        // One per key: e1 (u1) and e4 (u2); e2 and e3 wait behind e1.
        let c = o.deliveries_claim("hook", t, 10, lease).await.unwrap();
        assert_eq!(ids(&c), [e[0].id.clone(), e[3].id.clone()]);
        assert!(c.iter().all(|c| c.attempts == 0));
        let (s1, s4) = (c[0].seq, c[1].seq);
        assert!(
            o.deliveries_claim("hook", t, 10, lease)
                .await
                .unwrap()
                .is_empty(),
            "leased"
        );

        // A retry keeps e1 the head of u1: nothing of u1 is due before it.
        let failing = o
            .deliveries_settle("hook", vec![s1], retry(t + 100), t)
            .await
            .unwrap();
        assert_eq!(failing, Some(t));
        assert_eq!(o.deliveries_next_due("hook").await.unwrap(), Some(t + 100));
        assert!(o
            .deliveries_claim("hook", t + 50, 10, lease)
            .await
            .unwrap()
            .is_empty());
        let c = o
            .deliveries_claim("hook", t + 100, 10, lease)
            .await
            .unwrap();
        assert_eq!(ids(&c), [e[0].id.clone()]);
        assert_eq!(c[0].attempts, 1);

        // A hold is due again at once and is not counted as an attempt.
        let hold = Settlement::Hold {
            error: "disabled".into(),
        };
        o.deliveries_settle("hook", vec![s1], hold, t + 100)
            .await
            .unwrap();
        let c = o
            .deliveries_claim("hook", t + 100, 10, lease)
            .await
            .unwrap();
        assert_eq!(ids(&c), [e[0].id.clone()]);
        assert_eq!(c[0].attempts, 1);

        // Failed: kept aside, and the next of u1 becomes due.
        let failed = Settlement::Failed {
            error: "gave up".into(),
        };
        o.deliveries_settle("hook", vec![s1], failed, t + 200)
            .await
            .unwrap();
        let c = o
            .deliveries_claim("hook", t + 200, 10, lease)
            .await
            .unwrap();
        assert_eq!(ids(&c), [e[1].id.clone()]);
        assert_eq!(c[0].attempts, 0);
        let s2 = c[0].seq;
        let state = o.endpoint_state("hook").await.unwrap().unwrap();
        assert_eq!((state.pending, state.failed), (3, 1));
        assert_eq!(state.last_error.as_deref(), Some("gave up"));

        // A later fan-out step: the new event of u1 waits behind e2 (in
        // flight), one of u3 (two steps) is due alone.
        let later = vec![event("u1", 5), event("u3", 6), event("u3", 7)];
        o.append_events(later.clone()).await.unwrap();
        assert_eq!(o.endpoint_fanout("hook", all(), 2).await.unwrap(), 2);
        assert_eq!(o.endpoint_fanout("hook", all(), 2).await.unwrap(), 1);
        assert_eq!(o.endpoint_fanout("hook", all(), 2).await.unwrap(), 0);
        let c = o
            .deliveries_claim("hook", t + 300, 10, lease)
            .await
            .unwrap();
        assert_eq!(ids(&c), [later[1].id.clone()]);
        let s6 = c[0].seq;

        // Settling the head promotes the next of its key, and only that one.
        let st = o
            .deliveries_settle("hook", vec![s2], Settlement::Delivered, t + 300)
            .await
            .unwrap();
        assert_eq!(st, None, "a delivery ends the run of failures");
        let c = o
            .deliveries_claim("hook", t + 300, 10, lease)
            .await
            .unwrap();
        assert_eq!(ids(&c), [e[2].id.clone()]);
        o.deliveries_settle("hook", vec![c[0].seq], Settlement::Skipped, t + 300)
            .await
            .unwrap();
        o.deliveries_settle("hook", vec![s4, s6], Settlement::Delivered, t + 300)
            .await
            .unwrap();
        let c = o
            .deliveries_claim("hook", t + 300, 10, lease)
            .await
            .unwrap();
        assert_eq!(ids(&c), [later[0].id.clone(), later[2].id.clone()]);
        let (s5, s7) = (c[0].seq, c[1].seq);

        // A failed delivery put back waits for the key's head in flight.
        assert_eq!(o.endpoint_retry_failed("hook", t + 400).await.unwrap(), 1);
        assert!(o
            .deliveries_claim("hook", t + 400, 10, lease)
            .await
            .unwrap()
            .is_empty());
        o.deliveries_settle("hook", vec![s5, s7], Settlement::Delivered, t + 500)
            .await
            .unwrap();
        let c = o
            .deliveries_claim("hook", t + 500, 10, lease)
            .await
            .unwrap();
        assert_eq!(ids(&c), [e[0].id.clone()]);
        assert_eq!(c[0].attempts, 0, "retry_failed starts the count again");
        o.deliveries_settle("hook", vec![c[0].seq], Settlement::Delivered, t + 500)
            .await
            .unwrap();

        let state = o.endpoint_state("hook").await.unwrap().unwrap();
        assert_eq!((state.pending, state.failed), (0, 0));
        assert_eq!((state.delivered_total, state.skipped_total), (6, 1));
        assert_eq!(state.failing_since, None);
        assert_eq!(state.oldest_pending_at, None);
        assert_eq!(o.deliveries_next_due("hook").await.unwrap(), None);
    }

    async fn concurrent_claims_never_share_a_delivery_or_a_key(f) {
        const KEYS: usize = 30;
        const PER_KEY: usize = 6;
        const TOTAL: usize = KEYS * PER_KEY;
        let a = f.backend.clone();
        let b = f.another_process().await;
        a.outbox.endpoint_register("hook").await.unwrap();
        // Keys interleaved in the outbox, appended from both processes.
        for n in 0..PER_KEY {
            let events: Vec<NewEvent> = (0..KEYS).map(|k| event(&format!("u{k}"), n)).collect();
            let p = if n % 2 == 0 { &a } else { &b };
            p.outbox.append_events(events).await.unwrap();
        }
        while a.outbox.endpoint_fanout("hook", all(), 50).await.unwrap() == 50 {}

        #[derive(Default)]
        struct Seen {
            in_flight_keys: HashSet<String>,
            in_flight: HashSet<i64>,
            delivered: HashMap<String, Vec<i64>>,
            delivered_seqs: HashSet<i64>,
            retried: HashSet<i64>,
        }
        let seen = Arc::new(Mutex::new(Seen::default()));
        let done = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for w in 0..6 {
            let p = if w % 2 == 0 { a.clone() } else { b.clone() };
            let (seen, done) = (seen.clone(), done.clone());
            workers.push(tokio::spawn(async move {
                while done.load(Ordering::SeqCst) < TOTAL {
                    let claimed = p
                        .outbox
                        .deliveries_claim("hook", LATER, 7, FOREVER)
                        .await
                        .unwrap();
                    if claimed.is_empty() {
                        // Waiting for another worker's settlement.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    {
                        let mut s = seen.lock().unwrap();
                        for c in &claimed {
                            assert!(
                                s.in_flight.insert(c.seq),
                                "delivery {} claimed twice",
                                c.seq
                            );
                            assert!(
                                s.in_flight_keys.insert(c.order_key.clone()),
                                "two deliveries of {} in flight at once",
                                c.order_key
                            );
                            assert!(
                                !s.delivered_seqs.contains(&c.seq),
                                "{} claimed after delivery",
                                c.seq
                            );
                        }
                    }
                    // Every third event fails once first.
                    let (again, ok): (Vec<ClaimedEvent>, Vec<ClaimedEvent>) = claimed
                        .into_iter()
                        .partition(|c| c.seq % 3 == 0 && c.attempts == 0);
                    // Out of flight before the settlement commits: the next
                    // of a key can only be claimed after that.
                    {
                        let mut s = seen.lock().unwrap();
                        for c in again.iter().chain(&ok) {
                            s.in_flight.remove(&c.seq);
                            s.in_flight_keys.remove(&c.order_key);
                        }
                        for c in &again {
                            s.retried.insert(c.seq);
                        }
                        for c in &ok {
                            assert_eq!(c.attempts, u32::from(s.retried.contains(&c.seq)));
                            s.delivered
                                .entry(c.order_key.clone())
                                .or_default()
                                .push(c.seq);
                            assert!(s.delivered_seqs.insert(c.seq), "{} delivered twice", c.seq);
                        }
                    }
                    if !again.is_empty() {
                        let seqs = again.iter().map(|c| c.seq).collect();
                        p.outbox
                            .deliveries_settle("hook", seqs, retry(LATER), LATER)
                            .await
                            .unwrap();
                    }
                    if !ok.is_empty() {
                        let seqs = ok.iter().map(|c| c.seq).collect();
                        p.outbox
                            .deliveries_settle("hook", seqs, Settlement::Delivered, LATER)
                            .await
                            .unwrap();
                        done.fetch_add(ok.len(), Ordering::SeqCst);
                    }
                }
            }));
        }
        tokio::time::timeout(BOUND, async {
            for w in workers {
                w.await.unwrap();
            }
        })
        .await
        .expect("every delivery settled");

        {
            let s = seen.lock().unwrap();
            assert_eq!(s.delivered_seqs.len(), TOTAL);
            assert_eq!(s.delivered.len(), KEYS);
            for (key, seqs) in &s.delivered {
                assert_eq!(seqs.len(), PER_KEY, "{key}");
                assert!(
                    seqs.windows(2).all(|w| w[0] < w[1]),
                    "{key} out of order: {seqs:?}"
                );
            }
        }
        let state = a.outbox.endpoint_state("hook").await.unwrap().unwrap();
        assert_eq!((state.pending, state.failed), (0, 0));
        assert_eq!(state.delivered_total, TOTAL as i64);
    }

    async fn fanout_from_two_processes_copies_each_event_once(f) {
        const EVENTS: usize = 300;
        let a = f.backend.clone();
        let b = f.another_process().await;
        a.outbox.endpoint_register("hook").await.unwrap();
        let events: Vec<NewEvent> = (0..EVENTS)
            .map(|n| event(&format!("u{}", n % 10), n))
            .collect();
        a.outbox.append_events(events.clone()).await.unwrap();

        let considered = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for w in 0..4 {
            let p = if w % 2 == 0 { a.clone() } else { b.clone() };
            let considered = considered.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let n = p.outbox.endpoint_fanout("hook", all(), 17).await.unwrap();
                    considered.fetch_add(n, Ordering::SeqCst);
                    if n < 17 {
                        break;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            considered.load(Ordering::SeqCst),
            EVENTS,
            "each event considered once"
        );
        let state = a.outbox.endpoint_state("hook").await.unwrap().unwrap();
        assert_eq!(state.pending, EVENTS as i64);

        // Each key's events in order, once each.
        let mut got: Vec<ClaimedEvent> = Vec::new();
        loop {
            let c = b
                .outbox
                .deliveries_claim("hook", LATER, 100, FOREVER)
                .await
                .unwrap();
            if c.is_empty() {
                break;
            }
            let seqs = c.iter().map(|c| c.seq).collect();
            b.outbox
                .deliveries_settle("hook", seqs, Settlement::Delivered, LATER)
                .await
                .unwrap();
            got.extend(c);
        }
        assert_eq!(got.len(), EVENTS);
        let mut by_key: HashMap<&str, Vec<i64>> = HashMap::new();
        for c in &got {
            by_key.entry(&c.order_key).or_default().push(c.seq);
        }
        for (key, seqs) in by_key {
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{key}: {seqs:?}");
        }
        let mut got_ids = ids(&got);
        got_ids.sort();
        let mut want = ids_of(&events);
        want.sort();
        assert_eq!(got_ids, want);
    }

    async fn a_cursor_never_passes_an_event_that_commits_later(f) {
        const APPENDERS: usize = 4;
        const EACH: usize = 80;
        let a = f.backend.clone();
        let b = f.another_process().await;
        a.outbox.endpoint_register("hook").await.unwrap();
        let appended = Arc::new(Mutex::new(Vec::new()));
        let finished = Arc::new(AtomicBool::new(false));
        let considered = Arc::new(AtomicUsize::new(0));

        // Fan-out from both processes while both append, event by event.
        let mut fanouts = Vec::new();
        for w in 0..2 {
            let p = if w == 0 { a.clone() } else { b.clone() };
            let (finished, considered) = (finished.clone(), considered.clone());
            fanouts.push(tokio::spawn(async move {
                loop {
                    let last_round = finished.load(Ordering::SeqCst);
                    let n = p.outbox.endpoint_fanout("hook", all(), 25).await.unwrap();
                    considered.fetch_add(n, Ordering::SeqCst);
                    if last_round && n == 0 {
                        break;
                    }
                    if n == 0 {
                        // Waiting for the next append.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }));
        }
        let mut appenders = Vec::new();
        for w in 0..APPENDERS {
            let p = if w % 2 == 0 { a.clone() } else { b.clone() };
            let appended = appended.clone();
            appenders.push(tokio::spawn(async move {
                for n in 0..EACH {
                    let e = event(&format!("w{w}-{n}"), n);
                    p.outbox.append_events(vec![e.clone()]).await.unwrap();
                    appended.lock().unwrap().push(e.id);
                }
            }));
        }
        tokio::time::timeout(BOUND, async {
            for t in appenders {
                t.await.unwrap();
            }
            finished.store(true, Ordering::SeqCst);
            for t in fanouts {
                t.await.unwrap();
            }
        })
        .await
        .expect("appends and fan-outs finish");

        assert_eq!(considered.load(Ordering::SeqCst), APPENDERS * EACH);
        let mut got = Vec::new();
        loop {
            let c = a
                .outbox
                .deliveries_claim("hook", LATER, 1000, FOREVER)
                .await
                .unwrap();
            if c.is_empty() {
                break;
            }
            let seqs = c.iter().map(|c| c.seq).collect();
            a.outbox
                .deliveries_settle("hook", seqs, Settlement::Delivered, LATER)
                .await
                .unwrap();
            got.extend(ids(&c));
        }
        got.sort();
        let mut want = appended.lock().unwrap().clone();
        want.sort();
        assert_eq!(got.len(), want.len(), "an event was missed or copied twice");
        assert_eq!(got, want);
    }

    async fn endpoint_state_counts_outstanding_depth_and_prune(f) {
        let o = &f.backend.outbox;
        o.endpoint_register("a").await.unwrap();
        o.endpoint_register("b").await.unwrap();
        assert!(o.endpoint_state("nope").await.unwrap().is_none());
        let e = vec![event("u1", 10), event("u1", 20), event("u2", 30)];
        o.append_events(e.clone()).await.unwrap();
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();

        // Not fanned out yet: every event past the cursor counts.
        let now = plugboard::now_ms() + 60_000;
        assert_eq!(
            o.deliveries_outstanding(names(&["a"]), now).await.unwrap(),
            3
        );
        assert_eq!(
            o.deliveries_outstanding(names(&["a", "b"]), now)
                .await
                .unwrap(),
            6
        );
        assert_eq!(
            o.deliveries_outstanding(names(&["nope"]), now)
                .await
                .unwrap(),
            0
        );
        assert_eq!(o.outbox_depth().await.unwrap(), 0);
        assert_eq!(o.endpoint_fanout("a", all(), 100).await.unwrap(), 3);
        // Due heads count, the row waiting behind one does not.
        let t = plugboard::now_ms() + 60_000;
        assert_eq!(o.deliveries_outstanding(names(&["a"]), t).await.unwrap(), 2);
        assert_eq!(
            o.deliveries_outstanding(names(&["a", "b"]), t)
                .await
                .unwrap(),
            5
        );
        assert_eq!(o.outbox_depth().await.unwrap(), 3);
        assert_eq!(o.endpoint_fanout("b", all(), 100).await.unwrap(), 3);
        assert_eq!(o.outbox_depth().await.unwrap(), 6);
        let state = o.endpoint_state("a").await.unwrap().unwrap();
        assert_eq!(
            (state.pending, state.failed, state.oldest_pending_at),
            (3, 0, Some(10))
        );

        // Leased deliveries are outstanding however long their lease.
        let c = o.deliveries_claim("a", t, 10, t + 1_000_000).await.unwrap();
        assert_eq!(ids(&c), [e[0].id.clone(), e[2].id.clone()]);
        assert_eq!(o.deliveries_outstanding(names(&["a"]), t).await.unwrap(), 2);
        let failed = Settlement::Failed {
            error: "HTTP 410".into(),
        };
        let since = o
            .deliveries_settle("a", c.iter().map(|c| c.seq).collect(), failed, t)
            .await
            .unwrap();
        assert_eq!(since, Some(t));
        let state = o.endpoint_state("a").await.unwrap().unwrap();
        assert_eq!((state.pending, state.failed), (1, 2));
        assert_eq!(state.oldest_pending_at, Some(20));
        assert_eq!(state.failing_since, Some(t));
        assert_eq!(o.deliveries_outstanding(names(&["a"]), t).await.unwrap(), 1);

        // Disabled: the first reason and time stay.
        o.endpoint_set_disabled("a", Some("gone".into()), t)
            .await
            .unwrap();
        o.endpoint_set_disabled("a", Some("again".into()), t + 5)
            .await
            .unwrap();
        let state = o.endpoint_state("a").await.unwrap().unwrap();
        assert_eq!(
            (state.disabled_at, state.disabled_reason.as_deref()),
            (Some(t), Some("gone"))
        );

        // In backoff, then re-enabled: due at once.
        let c = o.deliveries_claim("a", t, 10, t + 1_000_000).await.unwrap();
        assert_eq!(ids(&c), [e[1].id.clone()]);
        let s2 = c[0].seq;
        o.deliveries_settle("a", vec![s2], retry(t + 100_000), t + 1)
            .await
            .unwrap();
        assert_eq!(o.deliveries_next_due("a").await.unwrap(), Some(t + 100_000));
        assert_eq!(
            o.deliveries_outstanding(names(&["a"]), t + 2)
                .await
                .unwrap(),
            0
        );
        o.endpoint_set_disabled("a", None, t + 10).await.unwrap();
        let state = o.endpoint_state("a").await.unwrap().unwrap();
        assert_eq!(
            (
                state.disabled_at,
                state.disabled_reason,
                state.failing_since
            ),
            (None, None, None)
        );
        assert_eq!(o.deliveries_next_due("a").await.unwrap(), Some(t + 10));

        // The failed ones back: u2's is due, u1's waits behind e2.
        assert_eq!(o.endpoint_retry_failed("a", t + 20).await.unwrap(), 2);
        assert_eq!(o.endpoint_retry_failed("a", t + 20).await.unwrap(), 0);
        let state = o.endpoint_state("a").await.unwrap().unwrap();
        assert_eq!((state.pending, state.failed), (3, 0));
        let c = o
            .deliveries_claim("a", t + 20, 10, t + 1_000_000)
            .await
            .unwrap();
        assert_eq!(ids(&c), [e[1].id.clone(), e[2].id.clone()]);
        assert_eq!(c[0].attempts, 1);
        o.deliveries_settle(
            "a",
            c.iter().map(|c| c.seq).collect(),
            Settlement::Delivered,
            t + 30,
        )
        .await
        .unwrap();
        let c = o
            .deliveries_claim("a", t + 30, 10, t + 1_000_000)
            .await
            .unwrap();
        assert_eq!(ids(&c), [e[0].id.clone()]);
        o.deliveries_settle("a", vec![c[0].seq], Settlement::Delivered, t + 30)
            .await
            .unwrap();
        let state = o.endpoint_state("a").await.unwrap().unwrap();
        assert_eq!(
            (state.pending, state.failed, state.delivered_total),
            (0, 0, 3)
        );
        assert_eq!(o.outbox_depth().await.unwrap(), 3, "b's queue");

        // Pruning keeps what a listed endpoint has not moved past and what
        // any delivery refers to.
        assert_eq!(o.outbox_prune(names(&["a", "nope"])).await.unwrap(), 0);
        assert_eq!(
            o.outbox_prune(names(&["a", "b"])).await.unwrap(),
            0,
            "b still holds them"
        );
        let c = o.deliveries_claim("b", t, 10, t + 1).await.unwrap();
        o.deliveries_settle(
            "b",
            c.iter().map(|c| c.seq).collect(),
            Settlement::Delivered,
            t,
        )
        .await
        .unwrap();
        let c = o.deliveries_claim("b", t, 10, t + 1).await.unwrap();
        o.deliveries_settle(
            "b",
            c.iter().map(|c| c.seq).collect(),
            Settlement::Delivered,
            t,
        )
        .await
        .unwrap();
        assert_eq!(o.outbox_depth().await.unwrap(), 0);
        assert_eq!(o.outbox_prune(names(&["a", "b"])).await.unwrap(), 3);

        // A new endpoint starts after the newest event; an unknown one
        // holds pruning back; none listed prunes every unreferenced event.
        let registered = o.endpoint_register("a").await.unwrap();
        assert_eq!(
            registered.delivered_total, 3,
            "registering again keeps the state"
        );
        o.append_events(vec![event("u3", 40)]).await.unwrap();
        let c_state = o.endpoint_register("c").await.unwrap();
        o.append_events(vec![event("u3", 50)]).await.unwrap();
        assert_eq!(o.endpoint_fanout("c", all(), 10).await.unwrap(), 1);
        assert_eq!(
            o.endpoint_state("c").await.unwrap().unwrap().cursor,
            c_state.cursor + 1
        );
        assert_eq!(o.outbox_prune(names(&["nope"])).await.unwrap(), 0);
        assert_eq!(
            o.outbox_prune(Vec::new()).await.unwrap(),
            1,
            "the event c holds stays"
        );
        assert!(o.endpoint_fanout("nope", all(), 10).await.is_err());
    }

    async fn appended_events_and_queues_survive_a_restart(f) {
        let o = &f.backend.outbox;
        o.endpoint_register("hook").await.unwrap();
        let events: Vec<NewEvent> = (0..5).map(|n| event("u1", n)).collect();
        o.append_events(events[..2].to_vec()).await.unwrap();
        assert_eq!(o.endpoint_fanout("hook", all(), 10).await.unwrap(), 2);
        o.append_events(events[2..].to_vec()).await.unwrap();

        let r = f.reopen().await;
        let state = r.outbox.endpoint_state("hook").await.unwrap().unwrap();
        assert_eq!(state.pending, 2);
        assert_eq!(
            r.outbox.endpoint_fanout("hook", all(), 10).await.unwrap(),
            3
        );
        let mut got = Vec::new();
        loop {
            let c = r
                .outbox
                .deliveries_claim("hook", LATER, 10, FOREVER)
                .await
                .unwrap();
            if c.is_empty() {
                break;
            }
            r.outbox
                .deliveries_settle(
                    "hook",
                    c.iter().map(|c| c.seq).collect(),
                    Settlement::Delivered,
                    LATER,
                )
                .await
                .unwrap();
            got.extend(c);
        }
        assert_eq!(ids(&got), ids_of(&events), "all five, in order");
        assert_eq!(data(&got[3]), serde_json::json!({ "n": 3 }));
        assert_eq!(got[3].created_at, 3);
        assert_eq!(got[3].event_type, "test.event");
    }

    async fn a_lease_ends_at_its_time_and_survives_another_process_starting(f) {
        let o = &f.backend.outbox;
        o.endpoint_register("hook").await.unwrap();
        o.append_events(vec![event("u1", 1), event("u1", 2)])
            .await
            .unwrap();
        o.endpoint_fanout("hook", all(), 10).await.unwrap();
        let t = plugboard::now_ms() + 60_000;
        let c = o.deliveries_claim("hook", t, 10, t + 1000).await.unwrap();
        assert_eq!(c.len(), 1);
        let first = c[0].seq;
        assert_eq!(o.deliveries_next_due("hook").await.unwrap(), Some(t + 1000));
        assert!(o
            .deliveries_claim("hook", t + 999, 10, t + 2000)
            .await
            .unwrap()
            .is_empty());
        // Its lease over, the same delivery (still the head) is claimed again.
        let c = o
            .deliveries_claim("hook", t + 1000, 10, t + 2000)
            .await
            .unwrap();
        assert_eq!(c.iter().map(|c| c.seq).collect::<Vec<_>>(), [first]);
        assert_eq!(c[0].attempts, 0);

        // A process starting on the database: SQLite (one process) voids
        // the previous process's leases; on PostgreSQL the lease may be a
        // live process's and runs to its end.
        let r = f.reopen().await;
        let c = r
            .outbox
            .deliveries_claim("hook", t + 1500, 10, t + 3000)
            .await
            .unwrap();
        match f.engine {
            Engine::Sqlite => assert_eq!(c.iter().map(|c| c.seq).collect::<Vec<_>>(), [first]),
            Engine::Postgres => {
                assert!(c.is_empty(), "a live lease was voided");
                let c = r
                    .outbox
                    .deliveries_claim("hook", t + 2000, 10, t + 3000)
                    .await
                    .unwrap();
                assert_eq!(c.iter().map(|c| c.seq).collect::<Vec<_>>(), [first]);
            }
        }
    }
}

fn ids_of(events: &[NewEvent]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}
