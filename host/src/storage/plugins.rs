//! Uploaded plugin versions: the component bytes an upload through the
//! admin API made current, one per plugin name, so that a restarted gateway
//! (and every gateway sharing the database) loads the same version.
//!
//! Properties every engine keeps:
//! - a put is durable when its future resolves;
//! - a put replaces the plugin's previous version atomically, bytes, hash
//!   and upload time together: a reader (of this process or another one
//!   sharing the database) sees either the old version or the new one,
//!   whole, never a mix, and once the put resolved, every later read sees
//!   the new one;
//! - a version larger than [`MAX_PLUGIN_BYTES`] is refused with
//!   [`super::StorageError::Quota`] and changes nothing;
//! - a delete removes the version durably and says whether there was one;
//! - [`PluginStore::plugin_list`] reads no component bytes and lists the
//!   plugins in name order (byte order).
//!
//! The store keeps the SHA-256 it is given: the caller hashes the bytes (the
//! plugin engine does, to name its compile cache) and checks them again when
//! it loads them.

use async_trait::async_trait;

use super::{Result, StorageError};

/// Largest component a plugin version may have: the limit of
/// `PUT /admin/plugins/{name}` too.
pub const MAX_PLUGIN_BYTES: usize = 64 * 1024 * 1024;

/// Refuses a version larger than [`MAX_PLUGIN_BYTES`] (`Quota`).
pub fn check_size(len: usize) -> Result<()> {
    if len > MAX_PLUGIN_BYTES {
        return Err(StorageError::Quota(format!(
            "a plugin version is at most {MAX_PLUGIN_BYTES} bytes, not {len}"
        )));
    }
    Ok(())
}

/// A plugin's stored version, bytes included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPlugin {
    pub name: String,
    /// Hex SHA-256 of `bytes`, as given to the put.
    pub sha256: String,
    pub bytes: Vec<u8>,
    /// When it was uploaded, in milliseconds since the Unix epoch.
    pub uploaded_at_ms: i64,
}

/// A plugin's stored version without its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPluginInfo {
    pub name: String,
    pub sha256: String,
    /// Length of the component in bytes.
    pub size: u64,
    pub uploaded_at_ms: i64,
}

/// The uploaded-plugin-versions contract.
#[async_trait]
pub trait PluginStore: Send + Sync + 'static {
    /// Makes `bytes` (whose hex SHA-256 is `sha256_hex`) plugin `name`'s
    /// stored version, replacing any previous one (durable on return).
    async fn plugin_put(
        &self,
        name: &str,
        sha256_hex: &str,
        bytes: Vec<u8>,
        uploaded_at_ms: i64,
    ) -> Result<()>;

    /// Plugin `name`'s stored version, if it has one.
    async fn plugin_get(&self, name: &str) -> Result<Option<StoredPlugin>>;

    /// Removes plugin `name`'s stored version; `true` if there was one.
    async fn plugin_delete(&self, name: &str) -> Result<bool>;

    /// Every stored version without its bytes, by name (byte order).
    async fn plugin_list(&self) -> Result<Vec<StoredPluginInfo>>;
}
