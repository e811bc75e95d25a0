//! Plugins' key-value stores: one namespace per plugin, bounded by a quota.
//!
//! Properties every engine keeps: a write is durable when its future
//! resolves; a write that would take a plugin past [`MAX_KEYS`] keys or
//! [`MAX_BYTES`] bytes of values fails with
//! [`super::StorageError::Quota`] and changes nothing.

use async_trait::async_trait;

use super::Result;

/// Most keys one plugin's store may hold.
pub const MAX_KEYS: i64 = 100_000;
/// Most bytes of values one plugin's store may hold.
pub const MAX_BYTES: i64 = 64 * 1024 * 1024;

/// The plugin key-value contract.
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// Reads a key of a plugin's key-value store.
    async fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>>;

    /// Writes a key of a plugin's key-value store (durable on return).
    async fn kv_set(&self, plugin: &str, key: &str, value: Vec<u8>) -> Result<()>;

    /// Deletes a key of a plugin's key-value store.
    async fn kv_delete(&self, plugin: &str, key: &str) -> Result<()>;
}
