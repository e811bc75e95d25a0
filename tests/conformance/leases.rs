//! OutboxStore, several processes on one endpoint: its delivery lease has
//! one holder at a time, is renewed by that holder, is taken over once it
//! lapses and is free at once when released; the endpoint's state
//! (disabled, re-enabled, failed deliveries put back) is shared.
//!
//! SQLite is owned by one process and grants every lease request (the
//! documented behaviour): the tests that show exclusion assert exactly that
//! there, and the rest hold on both engines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plugboard::storage::{Backend, Settlement};

use crate::outbox::{all, event};
use crate::{conformance, Engine};

/// A lease that does not lapse during a test.
const LONG: Duration = Duration::from_secs(60);

/// Longest a test waits for a lease to lapse before it fails.
const BOUND: Duration = Duration::from_secs(30);

async fn take(b: &Backend, holder: &str, ttl: Duration) -> bool {
    b.outbox.endpoint_lease("hook", holder, ttl).await.unwrap()
}

async fn holder(b: &Backend) -> (Option<String>, Option<i64>) {
    let state = b.outbox.endpoint_state("hook").await.unwrap().unwrap();
    (state.lease_holder, state.lease_until)
}

/// Waits until the endpoint's state names no lease holder.
async fn until_lapsed(b: &Backend) {
    let deadline = Instant::now() + BOUND;
    while holder(b).await.0.is_some() {
        assert!(Instant::now() < deadline, "the lease never lapsed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

conformance! {
    async fn an_endpoint_lease_has_one_holder_at_a_time(f) {
        let a = f.backend.clone();
        let b = f.another_process().await;
        a.outbox.endpoint_register("hook").await.unwrap();
        assert!(take(&a, "node-a/1", LONG).await, "a free lease is taken");
        assert!(take(&a, "node-a/1", LONG).await, "and renewed by its holder");
        let other = take(&b, "node-b/1", LONG).await;
        match f.engine {
            Engine::Postgres => {
                assert!(!other, "a live lease is not taken by another holder");
                // The refusal changed nothing.
                assert_eq!(holder(&b).await.0.as_deref(), Some("node-a/1"));
                assert!(take(&a, "node-a/1", LONG).await);
                assert!(!take(&b, "node-b/1", LONG).await);
                // Its holder renews it from any connection, as from another process.
                assert!(take(&b, "node-a/1", LONG).await);
            }
            Engine::Sqlite => {
                assert!(other, "SQLite grants every request: one process owns the file");
                assert_eq!(holder(&a).await.0.as_deref(), Some("node-b/1"), "the last grant");
            }
        }
        // Each endpoint has a lease of its own.
        b.outbox.endpoint_register("other").await.unwrap();
        assert!(b.outbox.endpoint_lease("other", "node-b/1", LONG).await.unwrap());
    }

    async fn concurrent_takers_of_a_free_or_lapsed_lease_get_it_once(f) {
        const TAKERS: usize = 8;
        let a = f.backend.clone();
        let b = f.another_process().await;
        a.outbox.endpoint_register("hook").await.unwrap();
        // First with no lease row at all, then with one that lapsed.
        for round in 0..2 {
            if round == 1 {
                assert!(take(&a, "node-a/old", Duration::from_millis(1)).await);
                until_lapsed(&a).await;
            }
            let barrier = Arc::new(tokio::sync::Barrier::new(TAKERS));
            let mut tasks = Vec::new();
            for i in 0..TAKERS {
                let p = if i % 2 == 0 { a.clone() } else { b.clone() };
                let barrier = barrier.clone();
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let holder = format!("node-{i}/{round}");
                    let granted = take(&p, &holder, LONG).await;
                    (holder, granted)
                }));
            }
            let mut granted = Vec::new();
            for t in tasks {
                let (holder, ok) = t.await.unwrap();
                if ok {
                    granted.push(holder);
                }
            }
            match f.engine {
                Engine::Postgres => {
                    assert_eq!(granted.len(), 1, "round {round}: granted to {granted:?}");
                    assert_eq!(holder(&a).await.0.as_ref(), Some(&granted[0]));
                }
                Engine::Sqlite => assert_eq!(granted.len(), TAKERS, "round {round}"),
            }
            for h in &granted {
                a.outbox.endpoint_release("hook", h).await.unwrap();
            }
        }
    }

    async fn a_lapsed_lease_is_taken_over_and_its_old_holder_cannot_renew_it(f) {
        let a = f.backend.clone();
        let b = f.another_process().await;
        a.outbox.endpoint_register("hook").await.unwrap();
        let ttl = Duration::from_millis(400);
        let sent = Instant::now();
        assert!(take(&a, "node-a/1", ttl).await);
        // b asks until it gets the lease; on PostgreSQL never before the
        // lease a took could have ended (it counts from a's call).
        let deadline = Instant::now() + BOUND;
        while !take(&b, "node-b/1", LONG).await {
            assert!(Instant::now() < deadline, "the lapsed lease was never taken over");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let taken_after = sent.elapsed();
        match f.engine {
            Engine::Postgres => {
                assert!(taken_after >= ttl, "taken over {taken_after:?} after a lease of {ttl:?}");
                assert!(!take(&a, "node-a/1", ttl).await, "the old holder cannot renew it");
                assert_eq!(holder(&a).await.0.as_deref(), Some("node-b/1"));
                // The old holder's release does not free the new holder's lease.
                a.outbox.endpoint_release("hook", "node-a/1").await.unwrap();
                assert!(!take(&a, "node-c/1", LONG).await);
                assert_eq!(holder(&b).await.0.as_deref(), Some("node-b/1"));
            }
            Engine::Sqlite => {
                assert!(take(&a, "node-a/1", ttl).await, "SQLite grants every request");
            }
        }
    }

    async fn a_released_lease_is_free_at_once_and_only_its_holder_releases_it(f) {
        let a = f.backend.clone();
        let b = f.another_process().await;
        a.outbox.endpoint_register("hook").await.unwrap();
        assert!(take(&a, "node-a/1", LONG).await);
        // Another holder's release, or a release of another endpoint, changes nothing.
        b.outbox.endpoint_release("hook", "node-b/1").await.unwrap();
        b.outbox.endpoint_release("other", "node-a/1").await.unwrap();
        assert_eq!(holder(&b).await.0.as_deref(), Some("node-a/1"));
        if f.engine == Engine::Postgres {
            assert!(!take(&b, "node-b/1", LONG).await);
        }
        a.outbox.endpoint_release("hook", "node-a/1").await.unwrap();
        assert_eq!(holder(&b).await, (None, None), "released: no one holds it");
        assert!(take(&b, "node-b/1", LONG).await, "taken at once, long before it would lapse");
        assert_eq!(holder(&a).await.0.as_deref(), Some("node-b/1"));
        // Releasing what one does not hold is no error.
        b.outbox.endpoint_release("hook", "node-b/1").await.unwrap();
        b.outbox.endpoint_release("hook", "node-b/1").await.unwrap();
    }

    async fn the_endpoint_state_names_the_holder_until_its_lease_ends(f) {
        let o = &f.backend;
        o.outbox.endpoint_register("hook").await.unwrap();
        assert_eq!(holder(o).await, (None, None), "never taken");
        let before = plugboard::now_ms();
        assert!(take(o, "node-a/1", LONG).await);
        let after = plugboard::now_ms();
        let (who, until) = holder(o).await;
        assert_eq!(who.as_deref(), Some("node-a/1"));
        // The database's clock is this machine's here: the lease ends a
        // lease length after the call, give or take a second.
        let until = until.expect("lease_until");
        let long = LONG.as_millis() as i64;
        assert!(
            (before + long - 1_000..=after + long + 1_000).contains(&until),
            "lease_until {until} for a call between {before} and {after}"
        );
        // A renewal moves the end; a lapsed lease names no one.
        assert!(take(o, "node-a/1", Duration::from_millis(1)).await);
        until_lapsed(o).await;
        assert_eq!(holder(o).await, (None, None));
        assert!(take(o, "node-a/1", LONG).await, "a lapsed lease is taken again");
        assert_eq!(holder(o).await.0.as_deref(), Some("node-a/1"));
    }

    async fn endpoint_state_is_shared_between_processes(f) {
        let a = f.backend.clone();
        let b = f.another_process().await;
        a.outbox.endpoint_register("hook").await.unwrap();
        assert_eq!(b.outbox.endpoint_disabled("hook").await.unwrap(), None);
        assert_eq!(b.outbox.endpoint_disabled("nope").await.unwrap(), None, "unknown");
        let t = plugboard::now_ms();

        // Disabled by one process: the other reads it, with the first reason.
        a.outbox.endpoint_set_disabled("hook", Some("gone".into()), t).await.unwrap();
        b.outbox.endpoint_set_disabled("hook", Some("later".into()), t).await.unwrap();
        assert_eq!(b.outbox.endpoint_disabled("hook").await.unwrap().as_deref(), Some("gone"));
        assert_eq!(a.outbox.endpoint_disabled("hook").await.unwrap().as_deref(), Some("gone"));
        // Re-enabled by the other.
        b.outbox.endpoint_set_disabled("hook", None, t).await.unwrap();
        assert_eq!(a.outbox.endpoint_disabled("hook").await.unwrap(), None);

        // A failed delivery put back by one process is due for the other's claim.
        a.outbox.append_events(vec![event("u1", 1)]).await.unwrap();
        assert_eq!(a.outbox.endpoint_fanout("hook", all(), 10).await.unwrap(), 1);
        let now = plugboard::now_ms() + 1_000;
        let c = a.outbox.deliveries_claim("hook", now, 10, now + 60_000).await.unwrap();
        assert_eq!(c.len(), 1);
        let failed = Settlement::Failed { error: "HTTP 500".into() };
        a.outbox.deliveries_settle("hook", vec![c[0].seq], failed, now).await.unwrap();
        assert!(a.outbox.deliveries_claim("hook", now, 10, now + 60_000).await.unwrap().is_empty());
        assert_eq!(b.outbox.endpoint_retry_failed("hook", now).await.unwrap(), 1);
        let again = a.outbox.deliveries_claim("hook", now, 10, now + 60_000).await.unwrap();
        assert_eq!(again.iter().map(|e| &e.id).collect::<Vec<_>>(), [&c[0].id]);
    }
}
