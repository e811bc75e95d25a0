//! GroupStore on PostgreSQL: the semantics of the SQLite engine, one
//! statement per operation.
//!
//! Every change runs under the write lock, so a group id is checked and
//! taken with no other writer in between (of two concurrent creates the
//! second finds the first: `Exists`), and the member limit is checked
//! against the count in the statement that adds, which no other process can
//! change before the commit. Deleting a group or removing members takes one
//! version and stamps it on every row it turns into a tombstone, in the same
//! statement. Member lists are sent as arrays (`UNNEST`), whatever their
//! size.

use std::collections::HashMap;

use async_trait::async_trait;
use tokio_postgres::Row;

use super::messages::{big, Checked};
use super::PostgresStorage;
use crate::storage::groups::{Group, GroupResult, GroupStore, Member};
use crate::storage::messages::Channel;
use crate::storage::{Result, StorageError};

/// A group's own columns (its member count is counted beside them).
const GROUP_COLUMNS: &str = "group_id, name, data, created_at, updated_at";

/// A group from `r`: [`GROUP_COLUMNS`], then the member count.
fn group_from_row(r: &Row) -> Checked<Group> {
    let data: String = r.get(2);
    // Group data was JSON when it was stored; text that no longer reads is
    // an error, not a group whose data became `null`.
    let data = serde_json::from_str(&data)
        .map_err(|e| StorageError::Database(format!("chat_groups.data is not JSON: {e}")))?;
    Ok(Group {
        group_id: r.get(0),
        name: r.get(1),
        data,
        member_count: r.get::<_, i64>(5) as u64,
        created_at: r.get(3),
        updated_at: r.get(4),
    })
}

/// Each user once, as adding the list one member at a time leaves them: in
/// the place and with the join time of their first entry, with the role of
/// their last (a multi-row upsert cannot touch one row twice).
fn distinct_members(members: Vec<Member>) -> Vec<Member> {
    let mut at: HashMap<String, usize> = HashMap::with_capacity(members.len());
    let mut out: Vec<Member> = Vec::with_capacity(members.len());
    for m in members {
        match at.get(&m.user_id) {
            Some(&i) => out[i].role = m.role,
            None => {
                at.insert(m.user_id.clone(), out.len());
                out.push(m);
            }
        }
    }
    out
}

/// The member columns as arrays for `UNNEST`.
fn member_arrays(members: &[Member]) -> (Vec<&str>, Vec<&str>, Vec<i64>) {
    (
        members.iter().map(|m| m.user_id.as_str()).collect(),
        members.iter().map(|m| m.role.as_str()).collect(),
        members.iter().map(|m| m.joined_at).collect(),
    )
}

#[async_trait]
impl GroupStore for PostgresStorage {
    async fn group_create(
        &self,
        group: Group,
        members: Vec<Member>,
        max_members: usize,
    ) -> Result<GroupResult<Group>> {
        self.write(move |t| {
            Box::pin(async move {
                let members = distinct_members(members);
                if max_members > 0 && members.len() > max_members {
                    // A taken id answers `Exists` before any limit.
                    let stmt = t
                        .prepare_cached(
                            "SELECT EXISTS (SELECT 1 FROM chat_groups WHERE group_id = $1)",
                        )
                        .await?;
                    let exists: bool = t.query_one(&stmt, &[&group.group_id]).await?.get(0);
                    return Ok(Ok(if exists {
                        GroupResult::Exists
                    } else {
                        GroupResult::TooManyMembers { limit: max_members }
                    }));
                }
                // Members are added only when the group row was: every path
                // removes a group's members with it, so the upserted ones are
                // all of them.
                let stmt = t
                    .prepare_cached(&format!(
                        "WITH g AS (
                             INSERT INTO chat_groups ({GROUP_COLUMNS})
                             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (group_id) DO NOTHING
                             RETURNING {GROUP_COLUMNS}
                         ),
                         m AS (
                             INSERT INTO group_members (group_id, user_id, role, joined_at)
                             SELECT g.group_id, u.user_id, u.role, u.joined_at
                             FROM g, UNNEST($5::text[], $6::text[], $7::bigint[])
                                  AS u(user_id, role, joined_at)
                             ON CONFLICT (group_id, user_id) DO UPDATE SET role = excluded.role
                             RETURNING 1
                         )
                         SELECT {GROUP_COLUMNS}, (SELECT COUNT(*) FROM m) FROM g"
                    ))
                    .await?;
                let (users, roles, joined) = member_arrays(&members);
                let row = t
                    .query_opt(
                        &stmt,
                        &[
                            &group.group_id,
                            &group.name,
                            &group.data.to_string(),
                            &group.created_at,
                            &users,
                            &roles,
                            &joined,
                        ],
                    )
                    .await?;
                Ok(match row {
                    Some(r) => group_from_row(&r).map(GroupResult::Ok),
                    None => Ok(GroupResult::Exists),
                })
            })
        })
        .await?
    }

    async fn group_get(&self, group_id: &str) -> Result<Option<Group>> {
        let rows = self
            .read_once(
                &format!(
                    "SELECT {GROUP_COLUMNS},
                            (SELECT COUNT(*) FROM group_members m WHERE m.group_id = g.group_id)
                     FROM chat_groups g WHERE group_id = $1"
                ),
                &[&group_id],
            )
            .await?;
        rows.first().map(group_from_row).transpose()
    }

    async fn group_update(
        &self,
        group_id: &str,
        name: Option<String>,
        data: Option<serde_json::Value>,
    ) -> Result<GroupResult<Group>> {
        let gid = group_id.to_string();
        self.write(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(&format!(
                        "UPDATE chat_groups g SET name = COALESCE($2, name),
                                data = COALESCE($3, data), updated_at = $4
                         WHERE group_id = $1
                         RETURNING {GROUP_COLUMNS},
                             (SELECT COUNT(*) FROM group_members m WHERE m.group_id = g.group_id)"
                    ))
                    .await?;
                let data = data.map(|d| d.to_string());
                let row = t
                    .query_opt(&stmt, &[&gid, &name, &data, &crate::now_ms()])
                    .await?;
                Ok(match row {
                    Some(r) => group_from_row(&r).map(GroupResult::Ok),
                    None => Ok(GroupResult::UnknownGroup),
                })
            })
        })
        .await?
    }

    async fn group_delete(&self, group_id: &str) -> Result<bool> {
        let gid = group_id.to_string();
        self.write(move |t| {
            Box::pin(async move {
                // One version for the deletion, stamped on every member's
                // row that becomes a tombstone; members, messages and the
                // channel go with the group.
                let stmt = t
                    .prepare_cached(
                        "WITH g AS (DELETE FROM chat_groups WHERE group_id = $1 RETURNING group_id),
                         v AS (
                             UPDATE counters SET value = value + 1
                             WHERE name = 'version' AND EXISTS (SELECT 1 FROM g)
                             RETURNING value
                         ),
                         tombs AS (
                             UPDATE conversations SET state = 2, unread = 0, read_seq = last_seq,
                                    version = (SELECT value FROM v), updated_at = $3
                             WHERE channel = $2 AND state <> 2 AND EXISTS (SELECT 1 FROM v)
                         ),
                         members AS (
                             DELETE FROM group_members WHERE group_id = $1 AND EXISTS (SELECT 1 FROM g)
                         ),
                         history AS (
                             DELETE FROM messages WHERE channel = $2 AND EXISTS (SELECT 1 FROM g)
                         ),
                         chan AS (
                             DELETE FROM channels WHERE channel = $2 AND EXISTS (SELECT 1 FROM g)
                         )
                         SELECT EXISTS (SELECT 1 FROM g)",
                    )
                    .await?;
                let channel = Channel::group(&gid).key;
                let deleted: bool = t
                    .query_one(&stmt, &[&gid, &channel, &crate::now_ms()])
                    .await?
                    .get(0);
                Ok(deleted)
            })
        })
        .await
    }

    async fn group_add_members(
        &self,
        group_id: &str,
        members: Vec<Member>,
        max_members: usize,
    ) -> Result<GroupResult<Vec<String>>> {
        let gid = group_id.to_string();
        self.write(move |t| {
            Box::pin(async move {
                let members = distinct_members(members);
                // The count and the new members are read in the statement
                // that adds them (one snapshot, under the write lock), so no
                // concurrent addition can push the group past the limit.
                let stmt = t
                    .prepare_cached(
                        "WITH g AS (SELECT 1 FROM chat_groups WHERE group_id = $1),
                         wanted AS (
                             SELECT * FROM UNNEST($2::text[], $3::text[], $4::bigint[])
                                 WITH ORDINALITY AS u(user_id, role, joined_at, n)
                         ),
                         fresh AS (
                             SELECT user_id, n FROM wanted w WHERE NOT EXISTS (
                                 SELECT 1 FROM group_members m
                                 WHERE m.group_id = $1 AND m.user_id = w.user_id)
                         ),
                         ok AS (
                             SELECT 1 FROM g WHERE $5::bigint = 0
                                 OR (SELECT COUNT(*) FROM group_members WHERE group_id = $1)
                                    + (SELECT COUNT(*) FROM fresh) <= $5::bigint
                         ),
                         added AS (
                             INSERT INTO group_members (group_id, user_id, role, joined_at)
                             SELECT $1::text, user_id, role, joined_at FROM wanted
                             WHERE EXISTS (SELECT 1 FROM ok)
                             ON CONFLICT (group_id, user_id) DO UPDATE SET role = excluded.role
                         ),
                         touched AS (
                             UPDATE chat_groups SET updated_at = $6
                             WHERE group_id = $1 AND EXISTS (SELECT 1 FROM ok)
                         )
                         SELECT EXISTS (SELECT 1 FROM g), EXISTS (SELECT 1 FROM ok),
                                ARRAY(SELECT user_id FROM fresh ORDER BY n)",
                    )
                    .await?;
                let (users, roles, joined) = member_arrays(&members);
                let limit = big(max_members as u64);
                let row = t
                    .query_one(
                        &stmt,
                        &[&gid, &users, &roles, &joined, &limit, &crate::now_ms()],
                    )
                    .await?;
                Ok(if !row.get::<_, bool>(0) {
                    GroupResult::UnknownGroup
                } else if !row.get::<_, bool>(1) {
                    GroupResult::TooManyMembers { limit: max_members }
                } else {
                    GroupResult::Ok(row.get(2))
                })
            })
        })
        .await
    }

    async fn group_remove_members(
        &self,
        group_id: &str,
        users: Vec<String>,
    ) -> Result<GroupResult<Vec<String>>> {
        let gid = group_id.to_string();
        self.write(move |t| {
            Box::pin(async move {
                let mut seen = std::collections::HashSet::with_capacity(users.len());
                let users: Vec<String> = users
                    .into_iter()
                    .filter(|u| seen.insert(u.clone()))
                    .collect();
                // One version when anyone was removed, stamped on their rows
                // of the group as they become tombstones.
                let stmt = t
                    .prepare_cached(
                        "WITH g AS (SELECT 1 FROM chat_groups WHERE group_id = $1),
                         gone AS (
                             DELETE FROM group_members WHERE group_id = $1 AND user_id = ANY($2)
                             RETURNING user_id
                         ),
                         v AS (
                             UPDATE counters SET value = value + 1
                             WHERE name = 'version' AND EXISTS (SELECT 1 FROM gone)
                             RETURNING value
                         ),
                         tombs AS (
                             UPDATE conversations SET state = 2, unread = 0, read_seq = last_seq,
                                    version = (SELECT value FROM v), updated_at = $4
                             WHERE channel = $3 AND state <> 2
                               AND user_id IN (SELECT user_id FROM gone)
                         ),
                         touched AS (
                             UPDATE chat_groups SET updated_at = $4
                             WHERE group_id = $1 AND EXISTS (SELECT 1 FROM gone)
                         )
                         SELECT EXISTS (SELECT 1 FROM g),
                                ARRAY(SELECT u.user_id
                                      FROM UNNEST($2::text[]) WITH ORDINALITY AS u(user_id, n)
                                      WHERE u.user_id IN (SELECT user_id FROM gone) ORDER BY u.n)",
                    )
                    .await?;
                let channel = Channel::group(&gid).key;
                let row = t
                    .query_one(&stmt, &[&gid, &users, &channel, &crate::now_ms()])
                    .await?;
                Ok(if row.get::<_, bool>(0) {
                    GroupResult::Ok(row.get(1))
                } else {
                    GroupResult::UnknownGroup
                })
            })
        })
        .await
    }

    async fn group_members(
        &self,
        group_id: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<GroupResult<Vec<Member>>> {
        // One statement: no row at all when the group is unknown, one row of
        // NULLs when it has no members past `after`.
        let rows = self
            .read_once(
                "SELECT m.user_id, m.role, m.joined_at FROM chat_groups g
                 LEFT JOIN LATERAL (
                     SELECT user_id, role, joined_at FROM group_members
                     WHERE group_id = g.group_id AND user_id > $2 ORDER BY user_id LIMIT $3
                 ) m ON true
                 WHERE g.group_id = $1
                 ORDER BY m.user_id",
                &[&group_id, &after.unwrap_or_default(), &big(limit as u64)],
            )
            .await?;
        if rows.is_empty() {
            return Ok(GroupResult::UnknownGroup);
        }
        Ok(GroupResult::Ok(
            rows.iter()
                .filter_map(|r| {
                    Some(Member {
                        user_id: r.get::<_, Option<String>>(0)?,
                        role: r.get(1),
                        joined_at: r.get(2),
                    })
                })
                .collect(),
        ))
    }

    async fn group_member_ids(&self, group_id: &str) -> Result<GroupResult<Vec<String>>> {
        let rows = self
            .read_once(
                "SELECT ARRAY(SELECT user_id FROM group_members m
                              WHERE m.group_id = g.group_id ORDER BY user_id)
                 FROM chat_groups g WHERE group_id = $1",
                &[&group_id],
            )
            .await?;
        Ok(match rows.first() {
            Some(r) => GroupResult::Ok(r.get(0)),
            None => GroupResult::UnknownGroup,
        })
    }
}
