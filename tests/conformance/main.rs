//! Storage conformance: one set of tests of the storage contract
//! (`plugboard::storage`), each run against every engine.
//!
//! Every test is written once with [`conformance!`], which makes a module per
//! test with one `#[tokio::test]` per engine (`…::sqlite`, `…::postgres`).
//! SQLite gets a fresh database file in a temporary folder; PostgreSQL a
//! fresh database on the test binary's own server. Tests of behaviour under
//! several gateway processes open a second [`Backend`] on the same database
//! with [`Fixture::another_process`] (two pools, two writers, as two
//! gateways would have); SQLite, a one-process engine, hands back the same
//! backend, so those tests still check the property among concurrent tasks.

use plugboard::config::{StorageBackend, StorageConfig};
use plugboard::storage::Backend;

mod controls;
mod groups;
mod kv;
mod leases;
mod messages;
mod outbox;
mod plugins;
mod sessions;

/// The engines a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// One test's storage.
pub struct Fixture {
    pub engine: Engine,
    pub backend: Backend,
    config: StorageConfig,
    /// Holds the SQLite folder for the test's lifetime.
    dir: tempfile::TempDir,
}

impl Fixture {
    pub async fn new(engine: Engine) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = match engine {
            Engine::Sqlite => StorageConfig::default(),
            Engine::Postgres => StorageConfig {
                backend: StorageBackend::Postgres,
                url: postgres_url(),
                ..StorageConfig::default()
            },
        };
        let backend = plugboard::storage::open(&config, dir.path(), None)
            .await
            .unwrap_or_else(|e| panic!("open {engine:?} storage: {e}"));
        Fixture {
            engine,
            backend,
            config,
            dir,
        }
    }

    /// The storage a second gateway process sharing this database would
    /// have (PostgreSQL); the same backend on SQLite.
    pub async fn another_process(&self) -> Backend {
        match self.engine {
            Engine::Sqlite => self.backend.clone(),
            Engine::Postgres => plugboard::storage::open(&self.config, self.dir.path(), None)
                .await
                .expect("open a second backend"),
        }
    }

    /// Opens the same database again, as a restarted gateway would.
    pub async fn reopen(&self) -> Backend {
        plugboard::storage::open(&self.config, self.dir.path(), None)
            .await
            .expect("reopen storage")
    }
}

/// A fresh database on the test binary's PostgreSQL server.
fn postgres_url() -> String {
    plugboard_tests::postgres::shared().create_database()
}

/// Defines tests that run on every engine:
///
/// ```ignore
/// conformance! {
///     async fn a_close_that_finds_no_session_writes_nothing(f) {
///         // f: &Fixture
///     }
/// }
/// ```
#[macro_export]
macro_rules! conformance {
    ($(async fn $name:ident($f:ident) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($f: &$crate::Fixture) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                run(&$crate::Fixture::new($crate::Engine::Sqlite).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                run(&$crate::Fixture::new($crate::Engine::Postgres).await).await;
            }
        }
    )*};
}
