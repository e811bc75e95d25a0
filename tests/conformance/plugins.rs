//! PluginStore: put, get, replace, delete and list uploaded plugin
//! versions; a put replaces bytes, hash and time together, so a reader
//! (another process included) never sees a torn version; the size limit
//! refuses without changing anything; versions survive a restart.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use plugboard::storage::plugins::{StoredPlugin, StoredPluginInfo, MAX_PLUGIN_BYTES};
use plugboard::storage::StorageError;
use sha2::Digest;

use crate::conformance;

fn sha(bytes: &[u8]) -> String {
    plugboard::hex(&sha2::Sha256::digest(bytes))
}

/// A component-sized blob, different for each `seed`.
fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8 ^ seed)
        .collect()
}

fn stored(name: &str, bytes: &[u8], at: i64) -> StoredPlugin {
    StoredPlugin {
        name: name.to_string(),
        sha256: sha(bytes),
        bytes: bytes.to_vec(),
        uploaded_at_ms: at,
    }
}

fn info(name: &str, bytes: &[u8], at: i64) -> StoredPluginInfo {
    StoredPluginInfo {
        name: name.to_string(),
        sha256: sha(bytes),
        size: bytes.len() as u64,
        uploaded_at_ms: at,
    }
}

conformance! {
    async fn put_get_replace_delete_and_list(f) {
        let p = &f.backend.plugin_store;
        assert_eq!(p.plugin_get("echo").await.unwrap(), None);
        assert!(p.plugin_list().await.unwrap().is_empty());
        assert!(!p.plugin_delete("echo").await.unwrap());

        // Every byte value round-trips.
        let v1: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        p.plugin_put("echo", &sha(&v1), v1.clone(), 1_000).await.unwrap();
        assert_eq!(p.plugin_get("echo").await.unwrap(), Some(stored("echo", &v1, 1_000)));

        // A put replaces the version: bytes, hash and time.
        let v2 = blob(7, 12_345);
        p.plugin_put("echo", &sha(&v2), v2.clone(), 2_000).await.unwrap();
        assert_eq!(p.plugin_get("echo").await.unwrap(), Some(stored("echo", &v2, 2_000)));

        // Plugins are separate; the list is by name, in byte order, with sizes.
        let other = blob(9, 10);
        p.plugin_put("Zed", &sha(&other), other.clone(), 3_000).await.unwrap();
        p.plugin_put("a-b", &sha(&other), other.clone(), 4_000).await.unwrap();
        p.plugin_put("a_b", &sha(&other), other.clone(), 5_000).await.unwrap();
        assert_eq!(
            p.plugin_list().await.unwrap(),
            vec![
                info("Zed", &other, 3_000),
                info("a-b", &other, 4_000),
                info("a_b", &other, 5_000),
                info("echo", &v2, 2_000),
            ]
        );

        // Another process sees the same; its delete is seen here.
        let b = f.another_process().await;
        assert_eq!(
            b.plugin_store.plugin_get("echo").await.unwrap(),
            Some(stored("echo", &v2, 2_000))
        );
        assert!(b.plugin_store.plugin_delete("echo").await.unwrap());
        assert!(!p.plugin_delete("echo").await.unwrap());
        assert_eq!(p.plugin_get("echo").await.unwrap(), None);
        assert_eq!(
            p.plugin_get("Zed").await.unwrap(),
            Some(stored("Zed", &other, 3_000))
        );
        let names: Vec<String> =
            p.plugin_list().await.unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["Zed", "a-b", "a_b"]);
    }

    async fn a_version_over_the_limit_is_refused_and_changes_nothing(f) {
        let p = &f.backend.plugin_store;
        let kept = blob(1, 1_000);
        p.plugin_put("big", &sha(&kept), kept.clone(), 1).await.unwrap();
        let over = vec![0u8; MAX_PLUGIN_BYTES + 1];
        let refused = p.plugin_put("big", &sha(&over), over, 2).await;
        assert!(matches!(refused, Err(StorageError::Quota(_))), "{refused:?}");
        assert_eq!(p.plugin_get("big").await.unwrap(), Some(stored("big", &kept, 1)));
        // Up to the byte is fine.
        let max = blob(2, MAX_PLUGIN_BYTES);
        p.plugin_put("big", &sha(&max), max.clone(), 3).await.unwrap();
        let got = p.plugin_get("big").await.unwrap().unwrap();
        assert_eq!((got.bytes.len(), got.sha256.as_str()), (MAX_PLUGIN_BYTES, sha(&max).as_str()));
        assert!(got.bytes == max);
        assert_eq!(p.plugin_list().await.unwrap(), vec![info("big", &max, 3)]);
    }

    async fn a_reader_never_sees_a_torn_version(f) {
        // Two versions of different sizes and contents; version `n` is
        // uploaded at time `n`, so its time says which bytes must come with it.
        let a = Arc::new(blob(0xA1, 1024 * 1024 + 3));
        let b = Arc::new(blob(0xB2, 300 * 1024));
        let (sha_a, sha_b) = (sha(&a), sha(&b));
        let bytes_of = |n: i64| if n % 2 == 0 { a.clone() } else { b.clone() };
        let writer = f.backend.plugin_store.clone();
        writer.plugin_put("p", &sha_a, a.to_vec(), 0).await.unwrap();
        let other = f.another_process().await;
        let seen = Arc::new(AtomicI64::new(-1));
        let done = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for r in 0..4 {
            let store = if r % 2 == 0 { other.plugin_store.clone() } else { writer.clone() };
            let (a, b, sha_a, sha_b) = (a.clone(), b.clone(), sha_a.clone(), sha_b.clone());
            let (seen, done) = (seen.clone(), done.clone());
            readers.push(tokio::spawn(async move {
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let got = store.plugin_get("p").await.unwrap().expect("a version");
                    let (want_sha, want) = if got.uploaded_at_ms % 2 == 0 {
                        (&sha_a, &a)
                    } else {
                        (&sha_b, &b)
                    };
                    assert_eq!(&got.sha256, want_sha, "hash of version {}", got.uploaded_at_ms);
                    assert!(
                        got.bytes == **want,
                        "version {} came with {} other bytes",
                        got.uploaded_at_ms,
                        got.bytes.len()
                    );
                    let listed = store.plugin_list().await.unwrap();
                    let i = &listed[0];
                    let want_len = if i.uploaded_at_ms % 2 == 0 { a.len() } else { b.len() };
                    let want_sha = if i.uploaded_at_ms % 2 == 0 { &sha_a } else { &sha_b };
                    assert_eq!((i.size, &i.sha256), (want_len as u64, want_sha), "{i:?}");
                    seen.fetch_max(got.uploaded_at_ms, Ordering::Relaxed);
                    reads += 1;
                }
                reads
            }));
        }
        for n in 1..=30i64 {
            let bytes = bytes_of(n);
            writer.plugin_put("p", &sha(&bytes), bytes.to_vec(), n).await.unwrap();
            // Once the put resolved, a read in the other process sees it.
            let now = other.plugin_store.plugin_get("p").await.unwrap().unwrap();
            assert_eq!(now.uploaded_at_ms, n);
            // The readers read this version before the next put replaces it.
            plugboard_tests::wait_until(
                &format!("a reader to see version {n}"),
                plugboard_tests::WAIT,
                || (seen.load(Ordering::Relaxed) >= n).then_some(()),
            )
            .await;
        }
        done.store(true, Ordering::Relaxed);
        let mut total = 0;
        for r in readers {
            total += r.await.unwrap();
        }
        assert!(total >= 30, "{total} reads");
    }

    async fn versions_survive_a_restart(f) {
        let p = &f.backend.plugin_store;
        let kept = blob(3, 4_096);
        let gone = blob(4, 10);
        p.plugin_put("kept", &sha(&kept), kept.clone(), 11).await.unwrap();
        p.plugin_put("gone", &sha(&gone), gone, 12).await.unwrap();
        assert!(p.plugin_delete("gone").await.unwrap());
        let r = f.reopen().await;
        assert_eq!(r.plugin_store.plugin_get("kept").await.unwrap(), Some(stored("kept", &kept, 11)));
        assert_eq!(r.plugin_store.plugin_get("gone").await.unwrap(), None);
        assert_eq!(r.plugin_store.plugin_list().await.unwrap(), vec![info("kept", &kept, 11)]);
    }
}
