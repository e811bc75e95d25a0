//! GroupStore on PostgreSQL (being written).
#![allow(unused_variables)] // placeholder bodies until the engine is written

use async_trait::async_trait;

use super::PostgresStorage;
use crate::storage::groups::{Group, GroupResult, GroupStore, Member};
use crate::storage::Result;

#[async_trait]
impl GroupStore for PostgresStorage {
    async fn group_create(
        &self,
        group: Group,
        members: Vec<Member>,
        max_members: usize,
    ) -> Result<GroupResult<Group>> {
        todo!("PostgreSQL GroupStore")
    }
    async fn group_get(&self, group_id: &str) -> Result<Option<Group>> {
        todo!("PostgreSQL GroupStore")
    }
    async fn group_update(
        &self,
        group_id: &str,
        name: Option<String>,
        data: Option<serde_json::Value>,
    ) -> Result<GroupResult<Group>> {
        todo!("PostgreSQL GroupStore")
    }
    async fn group_delete(&self, group_id: &str) -> Result<bool> {
        todo!("PostgreSQL GroupStore")
    }
    async fn group_add_members(
        &self,
        group_id: &str,
        members: Vec<Member>,
        max_members: usize,
    ) -> Result<GroupResult<Vec<String>>> {
        todo!("PostgreSQL GroupStore")
    }
    async fn group_remove_members(
        &self,
        group_id: &str,
        users: Vec<String>,
    ) -> Result<GroupResult<Vec<String>>> {
        todo!("PostgreSQL GroupStore")
    }
    async fn group_members(
        &self,
        group_id: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<GroupResult<Vec<Member>>> {
        todo!("PostgreSQL GroupStore")
    }
    async fn group_member_ids(&self, group_id: &str) -> Result<GroupResult<Vec<String>>> {
        todo!("PostgreSQL GroupStore")
    }
}
