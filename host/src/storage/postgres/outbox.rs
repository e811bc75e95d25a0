//! OutboxStore on PostgreSQL (being written).
#![allow(unused_variables)] // placeholder bodies until the engine is written

use async_trait::async_trait;

use super::PostgresStorage;
use crate::storage::{
    ClaimedEvent, EndpointState, EventFilter, NewEvent, OutboxStore, Result, Settlement,
};

#[async_trait]
impl OutboxStore for PostgresStorage {
    async fn endpoint_register(&self, name: &str) -> Result<EndpointState> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn endpoint_fanout(
        &self,
        name: &str,
        accepts: EventFilter,
        limit: usize,
    ) -> Result<usize> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn deliveries_claim(
        &self,
        name: &str,
        now: i64,
        limit: usize,
        lease_until: i64,
    ) -> Result<Vec<ClaimedEvent>> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn deliveries_next_due(&self, name: &str) -> Result<Option<i64>> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn deliveries_settle(
        &self,
        name: &str,
        seqs: Vec<i64>,
        outcome: Settlement,
        now: i64,
    ) -> Result<Option<i64>> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn endpoint_set_disabled(
        &self,
        name: &str,
        reason: Option<String>,
        now: i64,
    ) -> Result<()> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn endpoint_retry_failed(&self, name: &str, now: i64) -> Result<usize> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn endpoint_state(&self, name: &str) -> Result<Option<EndpointState>> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn deliveries_outstanding(&self, names: Vec<String>, now: i64) -> Result<i64> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn outbox_depth(&self) -> Result<i64> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn outbox_prune(&self, names: Vec<String>) -> Result<usize> {
        todo!("PostgreSQL OutboxStore")
    }
    async fn append_events(&self, events: Vec<NewEvent>) -> Result<()> {
        todo!("PostgreSQL OutboxStore")
    }
}
