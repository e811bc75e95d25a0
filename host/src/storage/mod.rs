//! Durable storage: the contract everything durable goes through, and its
//! engines.
//!
//! The gateway never writes SQL outside this module. The contract is split
//! by concern, one trait each: [`SessionStore`] (open connections),
//! [`OutboxStore`] (webhook events and their delivery queues), [`KvStore`]
//! (plugins' key-value stores), [`MessageStore`] (messages and conversation
//! lists), [`GroupStore`] (groups and members), [`ControlStore`]
//! (business control messages) and [`PluginStore`] (uploaded plugin
//! versions). Each trait's module lists the properties any engine must
//! keep. A [`Backend`] bundles one engine's implementation of all of them;
//! the server is built with one.
//!
//! Engines: [`sqlite`] (embedded; the default) and [`postgres`] (several
//! gateway processes may share one database).
//!
//! Invariant of every engine: an operation that changes state writes the
//! outbox events that the change causes in the same transaction, and its
//! future resolves only after that transaction committed.

pub mod cluster;
pub mod controls;
pub mod groups;
pub mod kv;
pub mod messages;
pub mod outbox;
pub mod plugins;
pub mod postgres;
pub mod queue;
pub mod sessions;
pub mod sqlite;

use std::sync::Arc;

pub use controls::ControlStore;
pub use groups::GroupStore;
pub use kv::KvStore;
pub use messages::MessageStore;
pub use outbox::{
    event_data, ClaimedEvent, EndpointState, EventFilter, NewEvent, OutboxStore, Settlement,
};
pub use plugins::PluginStore;
pub use sessions::{Presence, SessionEvents, SessionRecord, SessionStore};
pub use sqlite::SqliteStorage;

/// Errors from the storage layer, the same for every engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The database cannot be reached right now (connection refused or
    /// lost, server shutting down, pool exhausted past its wait). Nothing
    /// was written; the same operation may succeed later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The engine refused or failed the operation.
    #[error("database error: {0}")]
    Database(String),
    /// The transaction ran but its commit failed: nothing was written.
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("cannot open the database at {target}: {message}")]
    Open { target: String, message: String },
    #[error("storage is shut down")]
    Closed,
    #[error("quota exceeded: {0}")]
    Quota(String),
    /// The writer's queue stayed full for the whole wait (see [`queue`]):
    /// nothing was written; the same operation may succeed shortly.
    #[error("the storage writer is behind: all {queued} places in its queue stayed taken for {waited:?}")]
    Busy {
        queued: usize,
        waited: std::time::Duration,
    },
}

impl StorageError {
    /// Nothing was done and the same operation may succeed later: the
    /// database cannot be reached, or its writer is behind (`Busy`).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StorageError::Unavailable(_) | StorageError::Busy { .. }
        )
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Whether the engine can serve requests now.
#[async_trait::async_trait]
pub trait Health: Send + Sync + 'static {
    /// `Ok` when a cheap round trip to the database succeeded just now;
    /// `/readyz` reports not-ready otherwise.
    async fn check(&self) -> Result<()>;
}

/// One engine's implementation of every storage concern.
#[derive(Clone)]
pub struct Backend {
    /// `"sqlite"` or `"postgres"`.
    pub engine: &'static str,
    pub sessions: Arc<dyn SessionStore>,
    pub outbox: Arc<dyn OutboxStore>,
    pub kv: Arc<dyn KvStore>,
    pub messages: Arc<dyn MessageStore>,
    pub groups: Arc<dyn GroupStore>,
    pub controls: Arc<dyn ControlStore>,
    pub plugin_store: Arc<dyn PluginStore>,
    pub health: Arc<dyn Health>,
    /// Node leases and gap reads; only engines that several processes share.
    pub cluster: Option<Arc<dyn cluster::ClusterStore>>,
}

impl Backend {
    /// A backend whose every concern is served by one engine value.
    pub fn from_engine<E>(engine: &'static str, store: Arc<E>) -> Backend
    where
        E: SessionStore
            + OutboxStore
            + KvStore
            + MessageStore
            + GroupStore
            + ControlStore
            + PluginStore
            + Health,
    {
        Backend {
            engine,
            sessions: store.clone(),
            outbox: store.clone(),
            kv: store.clone(),
            messages: store.clone(),
            groups: store.clone(),
            controls: store.clone(),
            plugin_store: store.clone(),
            health: store,
            cluster: None,
        }
    }
}

/// Opens the engine `config` names: SQLite at `<data_dir>/plugboard.db`, or
/// PostgreSQL at `config.url` (schema migrations applied first).
pub async fn open(
    config: &crate::config::StorageConfig,
    data_dir: &std::path::Path,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> Result<Backend> {
    match config.backend {
        crate::config::StorageBackend::Sqlite => {
            let path = data_dir.join("plugboard.db");
            let config = config.clone();
            let store =
                tokio::task::spawn_blocking(move || SqliteStorage::open(&path, &config, metrics))
                    .await
                    .map_err(|e| StorageError::Open {
                        target: data_dir.join("plugboard.db").display().to_string(),
                        message: e.to_string(),
                    })??;
            Ok(Backend::from_engine("sqlite", Arc::new(store)))
        }
        crate::config::StorageBackend::Postgres => {
            let store = Arc::new(postgres::PostgresStorage::open(config, metrics).await?);
            let mut backend = Backend::from_engine("postgres", store.clone());
            backend.cluster = Some(store);
            Ok(backend)
        }
    }
}
