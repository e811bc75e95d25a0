//! Groups and their members.
//!
//! Properties every engine keeps: a group id is unique (a concurrent second
//! create answers [`GroupResult::Exists`]); the member limit holds under
//! concurrent additions (the count is checked in the transaction that adds);
//! deleting a group or removing members turns their conversation rows into
//! `deleted` tombstones with new versions, like any other row change.

use async_trait::async_trait;
use serde::Serialize;

use super::Result;

/// A group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Group {
    pub group_id: String,
    pub name: String,
    /// Free-form JSON the business server keeps with the group.
    pub data: serde_json::Value,
    pub member_count: u64,
    /// Unix ms.
    pub created_at: i64,
    pub updated_at: i64,
}

/// A member of a group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    pub role: String,
    /// Unix ms.
    pub joined_at: i64,
}

/// Outcome of a group operation that may name a missing group.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupResult<T> {
    Ok(T),
    UnknownGroup,
    /// Creating a group whose id is taken.
    Exists,
    /// The operation would make the group larger than allowed.
    TooManyMembers {
        limit: usize,
    },
}

/// The group contract.
#[async_trait]
pub trait GroupStore: Send + Sync + 'static {
    async fn group_create(
        &self,
        group: Group,
        members: Vec<Member>,
        max_members: usize,
    ) -> Result<GroupResult<Group>>;
    async fn group_get(&self, group_id: &str) -> Result<Option<Group>>;
    async fn group_update(
        &self,
        group_id: &str,
        name: Option<String>,
        data: Option<serde_json::Value>,
    ) -> Result<GroupResult<Group>>;
    /// Deletes the group, its members and messages; members' rows become deleted.
    async fn group_delete(&self, group_id: &str) -> Result<bool>;
    /// Adds members (existing ones get the given role). Returns the user ids
    /// that were not members before.
    async fn group_add_members(
        &self,
        group_id: &str,
        members: Vec<Member>,
        max_members: usize,
    ) -> Result<GroupResult<Vec<String>>>;
    /// Removes members; their rows of the group become deleted. Returns the
    /// user ids that were members.
    async fn group_remove_members(
        &self,
        group_id: &str,
        users: Vec<String>,
    ) -> Result<GroupResult<Vec<String>>>;
    /// Members in user id order after `after`, at most `limit`.
    async fn group_members(
        &self,
        group_id: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<GroupResult<Vec<Member>>>;
    /// Every member id (for control targets and fan-out sizing).
    async fn group_member_ids(&self, group_id: &str) -> Result<GroupResult<Vec<String>>>;
}
