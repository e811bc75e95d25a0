//! Uploaded plugin versions on PostgreSQL: one row per plugin (a `bytea`
//! column holds the component), replaced by one upsert under the write
//! lock. A row is one tuple, so a reader in any process sees the old
//! version or the new one, whole; a put's future resolves after its commit,
//! so every read that starts later, in any process, sees it.

use async_trait::async_trait;

use super::PostgresStorage;
use crate::storage::plugins::{check_size, PluginStore, StoredPlugin, StoredPluginInfo};
use crate::storage::Result;

#[async_trait]
impl PluginStore for PostgresStorage {
    async fn plugin_put(
        &self,
        name: &str,
        sha256_hex: &str,
        bytes: Vec<u8>,
        uploaded_at_ms: i64,
    ) -> Result<()> {
        check_size(bytes.len())?;
        let (name, sha256) = (name.to_string(), sha256_hex.to_string());
        // The normal lane: a large write must not hold up the bookkeeping one.
        self.write(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(
                        "INSERT INTO plugin_versions (name, sha256, bytes, uploaded_at)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256,
                             bytes = excluded.bytes, uploaded_at = excluded.uploaded_at",
                    )
                    .await?;
                t.execute(&stmt, &[&name, &sha256, &bytes, &uploaded_at_ms])
                    .await?;
                Ok(())
            })
        })
        .await
    }

    async fn plugin_get(&self, name: &str) -> Result<Option<StoredPlugin>> {
        let name = name.to_string();
        self.read(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(
                        "SELECT name, sha256, bytes, uploaded_at FROM plugin_versions
                         WHERE name = $1",
                    )
                    .await?;
                Ok(t.query_opt(&stmt, &[&name]).await?.map(|r| StoredPlugin {
                    name: r.get(0),
                    sha256: r.get(1),
                    bytes: r.get(2),
                    uploaded_at_ms: r.get(3),
                }))
            })
        })
        .await
    }

    async fn plugin_delete(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.write(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached("DELETE FROM plugin_versions WHERE name = $1")
                    .await?;
                Ok(t.execute(&stmt, &[&name]).await? > 0)
            })
        })
        .await
    }

    async fn plugin_list(&self) -> Result<Vec<StoredPluginInfo>> {
        self.read(|t| {
            Box::pin(async move {
                // `octet_length` of a TOASTed value reads its header, not the
                // bytes; `COLLATE "C"`: byte order, as on SQLite.
                let stmt = t
                    .prepare_cached(
                        "SELECT name, sha256, octet_length(bytes)::BIGINT, uploaded_at
                         FROM plugin_versions ORDER BY name COLLATE \"C\"",
                    )
                    .await?;
                Ok(t.query(&stmt, &[])
                    .await?
                    .into_iter()
                    .map(|r| StoredPluginInfo {
                        name: r.get(0),
                        sha256: r.get(1),
                        size: r.get::<_, i64>(2) as u64,
                        uploaded_at_ms: r.get(3),
                    })
                    .collect())
            })
        })
        .await
    }
}
