//! KvStore: reads and writes per plugin, the quota refuses a write without
//! changing anything, values survive a restart.

use plugboard::storage::kv::MAX_BYTES;
use plugboard::storage::StorageError;

use crate::conformance;

conformance! {
    async fn get_set_delete_per_plugin(f) {
        let kv = &f.backend.kv;
        assert_eq!(kv.kv_get("p1", "k").await.unwrap(), None);
        kv.kv_set("p1", "k", b"one".to_vec()).await.unwrap();
        kv.kv_set("p2", "k", b"other".to_vec()).await.unwrap();
        assert_eq!(
            kv.kv_get("p1", "k").await.unwrap().as_deref(),
            Some(&b"one"[..])
        );
        kv.kv_set("p1", "k", b"two".to_vec()).await.unwrap();
        assert_eq!(
            kv.kv_get("p1", "k").await.unwrap().as_deref(),
            Some(&b"two"[..])
        );
        kv.kv_set("p1", "empty", Vec::new()).await.unwrap();
        assert_eq!(kv.kv_get("p1", "empty").await.unwrap(), Some(Vec::new()));
        let binary: Vec<u8> = (0..=255).collect();
        kv.kv_set("p1", "bin", binary.clone()).await.unwrap();
        assert_eq!(kv.kv_get("p1", "bin").await.unwrap(), Some(binary));

        kv.kv_delete("p1", "k").await.unwrap();
        kv.kv_delete("p1", "k").await.unwrap();
        kv.kv_delete("p1", "never").await.unwrap();
        assert_eq!(kv.kv_get("p1", "k").await.unwrap(), None);
        assert_eq!(
            kv.kv_get("p2", "k").await.unwrap().as_deref(),
            Some(&b"other"[..])
        );
    }

    async fn a_write_past_the_quota_changes_nothing(f) {
        let kv = &f.backend.kv;
        let quota = |r: plugboard::storage::Result<()>| matches!(r, Err(StorageError::Quota(_)));
        kv.kv_set("p", "small", b"kept".to_vec()).await.unwrap();
        // Too large on its own: refused, for a new key and for an existing one.
        let over = vec![0u8; MAX_BYTES as usize + 1];
        assert!(quota(kv.kv_set("p", "big", over.clone()).await));
        assert!(quota(kv.kv_set("p", "small", over).await));
        assert_eq!(kv.kv_get("p", "big").await.unwrap(), None);
        assert_eq!(
            kv.kv_get("p", "small").await.unwrap().as_deref(),
            Some(&b"kept"[..])
        );

        // Up to the byte: fits beside the other values; one byte more does not.
        let room = MAX_BYTES as usize - 4;
        assert!(quota(kv.kv_set("p", "big", vec![1u8; room + 1]).await));
        assert_eq!(kv.kv_get("p", "big").await.unwrap(), None);
        kv.kv_set("p", "big", vec![1u8; room]).await.unwrap();
        assert!(quota(kv.kv_set("p", "x", vec![2u8]).await));
        assert_eq!(kv.kv_get("p", "x").await.unwrap(), None);
        // Replacing a value counts the new size, not both.
        kv.kv_set("p", "big", vec![3u8; room]).await.unwrap();
        assert!(quota(kv.kv_set("p", "small", b"kept!".to_vec()).await));
        assert_eq!(
            kv.kv_get("p", "small").await.unwrap().as_deref(),
            Some(&b"kept"[..])
        );
        let big = kv.kv_get("p", "big").await.unwrap().unwrap();
        assert_eq!((big.len(), big[0]), (room, 3));
        // Another plugin has a quota of its own.
        kv.kv_set("q", "x", vec![2u8]).await.unwrap();
        kv.kv_delete("p", "big").await.unwrap();
        kv.kv_set("p", "x", vec![2u8]).await.unwrap();
    }

    async fn values_survive_a_restart(f) {
        f.backend
            .kv
            .kv_set("p", "k", b"durable".to_vec())
            .await
            .unwrap();
        f.backend
            .kv
            .kv_set("p", "gone", b"x".to_vec())
            .await
            .unwrap();
        f.backend.kv.kv_delete("p", "gone").await.unwrap();
        let r = f.reopen().await;
        assert_eq!(
            r.kv.kv_get("p", "k").await.unwrap().as_deref(),
            Some(&b"durable"[..])
        );
        assert_eq!(r.kv.kv_get("p", "gone").await.unwrap(), None);
    }
}
