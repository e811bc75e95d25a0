//! KvStore on PostgreSQL (being written).
#![allow(unused_variables)] // placeholder bodies until the engine is written

use async_trait::async_trait;

use super::PostgresStorage;
use crate::storage::{KvStore, Result};

#[async_trait]
impl KvStore for PostgresStorage {
    async fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        todo!("PostgreSQL KvStore")
    }
    async fn kv_set(&self, plugin: &str, key: &str, value: Vec<u8>) -> Result<()> {
        todo!("PostgreSQL KvStore")
    }
    async fn kv_delete(&self, plugin: &str, key: &str) -> Result<()> {
        todo!("PostgreSQL KvStore")
    }
}
