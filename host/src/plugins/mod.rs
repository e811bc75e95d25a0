//! The plugin runtime: sandboxed WebAssembly components that carry each
//! deployment's policy (webhook formatting, conversation filtering, control
//! handling), loaded from the config, called under a CPU deadline and a
//! memory cap, and replaced while traffic flows.
//!
//! - [`engine`]: the wasmtime engine, linker and compile cache.
//! - [`bindings`]: code generated from `wit/` and the host side of `host`.
//! - [`instance`]: one loaded version of a plugin and its pool of instances.
//! - [`registry`]: the plugins of a gateway, their breakers, hot swap, the
//!   folder watcher; the only way the rest of the gateway calls a plugin.
//! - [`logs`]: each plugin's recent log lines.
//! - [`tool`]: `plugboard plugin check` and `plugboard plugin run`.
//!
//! It does not decide what a failure means for the work at hand: callers get
//! the plugin's `on_error` policy with every failure and apply it.

pub mod bindings;
pub mod engine;
pub mod instance;
pub mod logs;
pub mod registry;
pub mod tool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use instance::{CallFailure, LoadedPlugin};
pub use registry::{LoadReport, PluginRegistry, PluginView, Source};

use crate::storage::KvStore;
use bindings::plugboard::plugin::types::KvError;

/// Why a plugin could not be loaded (at start, on reload or on upload).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin engine: {0}")]
    Engine(String),
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("does not fit the plugboard:plugin contract: {0}")]
    Contract(String),
    #[error("its init refused the config: {0}")]
    Init(String),
    #[error("no plugin named `{0}` in the config")]
    Unknown(String),
    /// Storage failed or refused (an upload is not swapped in then).
    #[error("cannot {action}: {error}")]
    Storage {
        action: &'static str,
        error: crate::storage::StorageError,
    },
    /// A stored upload was refused when loaded (at start, on a reload).
    #[error("its uploaded version {version} (uploaded {uploaded_at}) was refused: {error}")]
    Stored {
        /// The first 12 hex digits of its SHA-256.
        version: String,
        uploaded_at: String,
        error: Box<PluginError>,
    },
    #[error("plugin `{0}` has no uploaded version in storage")]
    NoUpload(String),
    #[error("plugin `{name}`: {error}")]
    Named {
        name: String,
        error: Box<PluginError>,
    },
}

/// Where a plugin's key-value store lives.
pub enum Kv {
    /// The gateway's storage (durable).
    Storage(Arc<dyn KvStore>),
    /// Process memory (the `plugboard plugin` command line).
    Memory(Mutex<HashMap<(String, String), Vec<u8>>>),
}

impl Kv {
    pub fn memory() -> Kv {
        Kv::Memory(Mutex::new(HashMap::new()))
    }

    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match self {
            Kv::Storage(s) => s
                .kv_get(plugin, key)
                .await
                .map_err(|e| KvError::Storage(e.to_string())),
            Kv::Memory(m) => Ok(m
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(plugin.to_string(), key.to_string()))
                .cloned()),
        }
    }

    async fn set(&self, plugin: &str, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        match self {
            Kv::Storage(s) => s.kv_set(plugin, key, value).await.map_err(|e| match e {
                crate::storage::StorageError::Quota(m) => KvError::QuotaExceeded(m),
                e => KvError::Storage(e.to_string()),
            }),
            Kv::Memory(m) => {
                m.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((plugin.to_string(), key.to_string()), value);
                Ok(())
            }
        }
    }

    async fn delete(&self, plugin: &str, key: &str) -> Result<(), KvError> {
        match self {
            Kv::Storage(s) => s
                .kv_delete(plugin, key)
                .await
                .map_err(|e| KvError::Storage(e.to_string())),
            Kv::Memory(m) => {
                m.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(plugin.to_string(), key.to_string()));
                Ok(())
            }
        }
    }
}

/// What every instance of one plugin shares.
pub struct PluginContext {
    pub name: String,
    /// The plugin's config map, in key order.
    pub config: Vec<(String, String)>,
    pub log: Arc<logs::PluginLog>,
    pub kv: Arc<Kv>,
}
