//! Plugins' key-value stores on PostgreSQL. A write checks the plugin's
//! quota and writes in one statement under the write lock, so writes from
//! several processes cannot together take a plugin past it; a refused write
//! changes nothing.

use async_trait::async_trait;

use super::PostgresStorage;
use crate::storage::kv::{MAX_BYTES, MAX_KEYS};
use crate::storage::{KvStore, Result, StorageError};

fn quota_error() -> StorageError {
    StorageError::Quota(format!(
        "a plugin's store holds at most {MAX_KEYS} keys and {MAX_BYTES} bytes"
    ))
}

#[async_trait]
impl KvStore for PostgresStorage {
    async fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let (plugin, key) = (plugin.to_string(), key.to_string());
        self.read(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached("SELECT value FROM plugin_kv WHERE plugin = $1 AND key = $2")
                    .await?;
                Ok(t.query_opt(&stmt, &[&plugin, &key])
                    .await?
                    .map(|r| r.get(0)))
            })
        })
        .await
    }

    async fn kv_set(&self, plugin: &str, key: &str, value: Vec<u8>) -> Result<()> {
        let len = value.len() as i64;
        // Over the quota on its own: refused without a round trip.
        if len > MAX_BYTES {
            return Err(quota_error());
        }
        let (plugin, key) = (plugin.to_string(), key.to_string());
        let stored = self
            .write_urgent(move |t| {
                Box::pin(async move {
                    // The plugin's other keys and their bytes, then the write
                    // only if this value fits beside them.
                    let stmt = t
                        .prepare_cached(
                            "WITH used AS (
                                 SELECT COUNT(*) AS keys,
                                        COALESCE(SUM(octet_length(value)), 0) AS bytes
                                 FROM plugin_kv WHERE plugin = $1 AND key <> $2)
                             INSERT INTO plugin_kv (plugin, key, value)
                             SELECT $1, $2, $3::bytea FROM used
                             WHERE used.keys < $4 AND used.bytes + $5 <= $6
                             ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
                        )
                        .await?;
                    let n = t
                        .execute(&stmt, &[&plugin, &key, &value, &MAX_KEYS, &len, &MAX_BYTES])
                        .await?;
                    Ok(n > 0)
                })
            })
            .await?;
        if stored {
            Ok(())
        } else {
            Err(quota_error())
        }
    }

    async fn kv_delete(&self, plugin: &str, key: &str) -> Result<()> {
        let (plugin, key) = (plugin.to_string(), key.to_string());
        self.write_urgent(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached("DELETE FROM plugin_kv WHERE plugin = $1 AND key = $2")
                    .await?;
                t.execute(&stmt, &[&plugin, &key]).await?;
                Ok(())
            })
        })
        .await
    }
}
