//! The SQLite implementation of [`PluginStore`]: one row per plugin,
//! replaced by one upsert, so a read (one statement on its own connection,
//! under WAL) sees the old row or the new one.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use super::SqliteStorage;
use crate::storage::plugins::{check_size, PluginStore, StoredPlugin, StoredPluginInfo};
use crate::storage::Result;

// A rowid table on purpose: a component is up to 64 MiB, and in a WITHOUT
// ROWID table it would sit in the key's B-tree. Added in schema version 2;
// `IF NOT EXISTS` also adds it to a version-1 database at open.
pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS plugin_versions (
    name        TEXT PRIMARY KEY,
    sha256      TEXT NOT NULL,
    bytes       BLOB NOT NULL,
    uploaded_at INTEGER NOT NULL
);
"#;

#[async_trait]
impl PluginStore for SqliteStorage {
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
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO plugin_versions (name, sha256, bytes, uploaded_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256,
                     bytes = excluded.bytes, uploaded_at = excluded.uploaded_at",
            )?
            .execute(params![name, sha256, bytes, uploaded_at_ms])?;
            Ok(())
        })
        .await
    }

    async fn plugin_get(&self, name: &str) -> Result<Option<StoredPlugin>> {
        let name = name.to_string();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT name, sha256, bytes, uploaded_at FROM plugin_versions WHERE name = ?1",
            )?
            .query_row(params![name], |r| {
                Ok(StoredPlugin {
                    name: r.get(0)?,
                    sha256: r.get(1)?,
                    bytes: r.get(2)?,
                    uploaded_at_ms: r.get(3)?,
                })
            })
            .optional()
        })
        .await
    }

    async fn plugin_delete(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM plugin_versions WHERE name = ?1")?
                .execute(params![name])?;
            Ok(n > 0)
        })
        .await
    }

    async fn plugin_list(&self) -> Result<Vec<StoredPluginInfo>> {
        self.read(|conn| {
            // `length` of a BLOB reads its size from the record header, not
            // the bytes.
            conn.prepare_cached(
                "SELECT name, sha256, length(bytes), uploaded_at FROM plugin_versions
                 ORDER BY name",
            )?
            .query_map([], |r| {
                Ok(StoredPluginInfo {
                    name: r.get(0)?,
                    sha256: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    uploaded_at_ms: r.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }
}
