//! ControlStore on PostgreSQL (being written).
#![allow(unused_variables)] // placeholder bodies until the engine is written

use async_trait::async_trait;

use super::PostgresStorage;
use crate::storage::controls::{ControlStore, Deliverable, Existing, NewControl, TargetEvents};
use crate::storage::Result;

#[async_trait]
impl ControlStore for PostgresStorage {
    async fn control_by_key(&self, key: &str, request_hash: &str) -> Result<Option<Existing>> {
        todo!("PostgreSQL ControlStore")
    }
    async fn control_create(
        &self,
        control: NewControl,
    ) -> Result<std::result::Result<(), Existing>> {
        todo!("PostgreSQL ControlStore")
    }
    async fn control_answered(&self, control_id: &str, answer: String) -> Result<()> {
        todo!("PostgreSQL ControlStore")
    }
    async fn control_delivered(
        &self,
        control_id: &str,
        delivered: Vec<String>,
        unreached: Vec<String>,
        events: TargetEvents,
    ) -> Result<()> {
        todo!("PostgreSQL ControlStore")
    }
    async fn controls_for_user(&self, user_id: &str, now: i64) -> Result<Vec<Deliverable>> {
        todo!("PostgreSQL ControlStore")
    }
    async fn controls_redelivered(
        &self,
        user_id: &str,
        control_ids: Vec<String>,
        events: TargetEvents,
    ) -> Result<()> {
        todo!("PostgreSQL ControlStore")
    }
    async fn control_ack(
        &self,
        control_id: &str,
        user_id: &str,
        events: TargetEvents,
    ) -> Result<Option<Deliverable>> {
        todo!("PostgreSQL ControlStore")
    }
    async fn controls_expire(&self, now: i64, limit: usize, events: TargetEvents) -> Result<usize> {
        todo!("PostgreSQL ControlStore")
    }
}
