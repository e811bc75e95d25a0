//! The SQLite implementation of [`MessageStore`]: channels, messages,
//! groups and conversation rows, on the same writer thread and read
//! connections as the rest of [`SqliteStorage`].
//!
//! A message is one write job: deduplicate by (sender, client message id),
//! check the group and membership, take the next version and the channel's
//! next sequence number, insert the message, upsert every member's
//! conversation row and append `message.created`. Jobs run in the writer's
//! group commit, so many messages share one fsync.
//!
//! Reads that answer one request run inside one read transaction, so the
//! version they report and the rows they return come from one snapshot.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::value::RawValue;

use super::{insert_events, SqliteStorage};
use crate::storage::groups::{Group, GroupResult, GroupStore, Member};
use crate::storage::messages::{
    Appended, Channel, ChannelType, ConversationPage, ConversationRow, EventBuilder, LastMessage,
    MessagePage, MessageRange, MessageStore, NewMessage, OnAppend, RowChange, RowState,
    SendRejected, StoredMessage, SyncRefused,
};
use crate::storage::Result;

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO counters (name, value) VALUES ('version', 0);

CREATE TABLE IF NOT EXISTS channels (
    channel  TEXT PRIMARY KEY,
    type     INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS messages (
    channel       TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    id            TEXT NOT NULL,
    type          INTEGER NOT NULL,
    sender        TEXT NOT NULL,
    system        INTEGER NOT NULL,
    client_msg_id TEXT,
    payload       TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages(id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedup ON messages(sender, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_version ON messages(channel, version);

CREATE TABLE IF NOT EXISTS chat_groups (
    group_id   TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS group_members (
    group_id  TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    role      TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS group_members_by_user ON group_members(user_id);

CREATE TABLE IF NOT EXISTS conversations (
    user_id      TEXT NOT NULL,
    channel      TEXT NOT NULL,
    type         INTEGER NOT NULL,
    peer         TEXT NOT NULL,
    state        INTEGER NOT NULL,       -- 0 live, 1 hidden, 2 deleted
    unread       INTEGER NOT NULL,
    read_seq     INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    last_id      TEXT,
    last_seq     INTEGER NOT NULL,
    last_sender  TEXT,
    last_preview TEXT,
    last_at      INTEGER,
    PRIMARY KEY (user_id, channel)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS conversations_by_version ON conversations(user_id, version);
CREATE INDEX IF NOT EXISTS conversations_by_channel ON conversations(channel);

CREATE TABLE IF NOT EXISTS conversation_floors (
    user_id TEXT PRIMARY KEY,
    floor   INTEGER NOT NULL
) WITHOUT ROWID;
"#;

const MESSAGE_COLUMNS: &str =
    "channel, type, id, sender, system, seq, version, client_msg_id, payload, created_at";

const ROW_COLUMNS: &str = "user_id, channel, type, peer, state, unread, read_seq, version, \
     updated_at, last_id, last_seq, last_sender, last_preview, last_at";

fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        channel: Channel::from_key(ChannelType::from_code(r.get(1)?), r.get(0)?),
        id: r.get(2)?,
        sender: r.get(3)?,
        system: r.get(4)?,
        seq: r.get::<_, i64>(5)? as u64,
        version: r.get::<_, i64>(6)? as u64,
        client_msg_id: r.get(7)?,
        payload: raw_json(r, 8)?,
        created_at: r.get(9)?,
    })
}

/// A stored JSON text column as a raw value. Text that is not JSON (a
/// damaged row) is a read error naming the column, never a silent `null`.
fn raw_json(r: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<Box<RawValue>> {
    let text: String = r.get(column)?;
    RawValue::from_string(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn conversation_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConversationRow> {
    let last_id: Option<String> = r.get(9)?;
    let last_message = match last_id {
        Some(id) => Some(LastMessage {
            id,
            seq: r.get::<_, i64>(10)? as u64,
            sender: r.get::<_, Option<String>>(11)?.unwrap_or_default(),
            preview: r.get::<_, Option<String>>(12)?.unwrap_or_default(),
            created_at: r.get::<_, Option<i64>>(13)?.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(ConversationRow {
        user_id: r.get(0)?,
        channel: Channel::from_key(ChannelType::from_code(r.get(2)?), r.get(1)?),
        channel_id: r.get(3)?,
        state: RowState::from_code(r.get(4)?),
        unread: r.get::<_, i64>(5)? as u64,
        read_seq: r.get::<_, i64>(6)? as u64,
        version: r.get::<_, i64>(7)? as u64,
        updated_at: r.get(8)?,
        last_message,
    })
}

/// Takes the next version (once per operation).
fn next_version(conn: &Connection) -> rusqlite::Result<u64> {
    conn.prepare_cached(
        "UPDATE counters SET value = value + 1 WHERE name = 'version' RETURNING value",
    )?
    .query_row([], |r| r.get::<_, i64>(0))
    .map(|v| v as u64)
}

fn current_version(conn: &Connection) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT value FROM counters WHERE name = 'version'")?
        .query_row([], |r| r.get::<_, i64>(0))
        .map(|v| v as u64)
}

fn group_exists(conn: &Connection, group_id: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM chat_groups WHERE group_id = ?1)")?
        .query_row(params![group_id], |r| r.get(0))
}

fn is_member(conn: &Connection, group_id: &str, user: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM group_members WHERE group_id = ?1 AND user_id = ?2)",
    )?
    .query_row(params![group_id, user], |r| r.get(0))
}

fn member_ids(conn: &Connection, group_id: &str) -> rusqlite::Result<Vec<String>> {
    conn.prepare_cached("SELECT user_id FROM group_members WHERE group_id = ?1")?
        .query_map(params![group_id], |r| r.get(0))?
        .collect()
}

fn member_count(conn: &Connection, group_id: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT COUNT(*) FROM group_members WHERE group_id = ?1")?
        .query_row(params![group_id], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

/// Whether `user` may read `channel`: a participant of a person channel, a
/// member of an existing group.
fn check_access(
    conn: &Connection,
    user: &str,
    channel: &Channel,
) -> rusqlite::Result<Result2<(), SyncRefused>> {
    match channel.kind {
        ChannelType::Person => match channel.persons() {
            Some((a, b)) if a == user || b == user => Ok(Ok(())),
            _ => Ok(Err(SyncRefused::NotMember)),
        },
        ChannelType::Group => {
            let gid = channel.group_id().unwrap_or_default();
            if !group_exists(conn, gid)? {
                Ok(Err(SyncRefused::UnknownGroup))
            } else if !is_member(conn, gid, user)? {
                Ok(Err(SyncRefused::NotMember))
            } else {
                Ok(Ok(()))
            }
        }
    }
}

type Result2<T, E> = std::result::Result<T, E>;

fn group_of(conn: &Connection, group_id: &str) -> rusqlite::Result<Option<Group>> {
    let row = conn
        .prepare_cached(
            "SELECT group_id, name, data, created_at, updated_at FROM chat_groups WHERE group_id = ?1",
        )?
        .query_row(params![group_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .optional()?;
    let Some((group_id, name, data, created_at, updated_at)) = row else {
        return Ok(None);
    };
    // Group data was JSON when it was stored; text that no longer reads is
    // an error, not a group whose data became `null`.
    let data = serde_json::from_str(&data).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let member_count = member_count(conn, &group_id)?;
    Ok(Some(Group {
        group_id,
        name,
        data,
        member_count,
        created_at,
        updated_at,
    }))
}

/// Marks every listed user's row of `channel` deleted at `version`.
fn tombstone_rows(
    conn: &Connection,
    channel: &str,
    users: Option<&[String]>,
    version: u64,
    now: i64,
) -> rusqlite::Result<()> {
    match users {
        None => {
            conn.prepare_cached(
                "UPDATE conversations SET state = 2, unread = 0, read_seq = last_seq,
                 version = ?2, updated_at = ?3 WHERE channel = ?1 AND state <> 2",
            )?
            .execute(params![channel, version as i64, now])?;
        }
        Some(users) => {
            let mut stmt = conn.prepare_cached(
                "UPDATE conversations SET state = 2, unread = 0, read_seq = last_seq,
                 version = ?3, updated_at = ?4 WHERE user_id = ?1 AND channel = ?2 AND state <> 2",
            )?;
            for u in users {
                stmt.execute(params![u, channel, version as i64, now])?;
            }
        }
    }
    Ok(())
}

/// Each user id of `members` once.
fn distinct_users(members: &[Member]) -> std::collections::HashSet<&str> {
    members.iter().map(|m| m.user_id.as_str()).collect()
}

fn insert_members(
    conn: &Connection,
    group_id: &str,
    members: &[Member],
) -> rusqlite::Result<Vec<String>> {
    let mut existed = conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM group_members WHERE group_id = ?1 AND user_id = ?2)",
    )?;
    let mut upsert = conn.prepare_cached(
        "INSERT INTO group_members (group_id, user_id, role, joined_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (group_id, user_id) DO UPDATE SET role = excluded.role",
    )?;
    let mut added = Vec::new();
    for m in members {
        let was: bool = existed.query_row(params![group_id, m.user_id], |r| r.get(0))?;
        upsert.execute(params![group_id, m.user_id, m.role, m.joined_at])?;
        if !was {
            added.push(m.user_id.clone());
        }
    }
    Ok(added)
}

fn append(
    conn: &Connection,
    m: NewMessage,
    event: EventBuilder,
) -> rusqlite::Result<Result2<Appended, SendRejected>> {
    if let Some(cid) = &m.client_msg_id {
        let existing = conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender = ?1 AND client_msg_id = ?2"
            ))?
            .query_row(params![m.sender, cid], message_from_row)
            .optional()?;
        if let Some(message) = existing {
            return Ok(Ok(Appended {
                message,
                duplicate: true,
                members: Arc::new(Vec::new()),
            }));
        }
    }
    let members: Vec<String> = match m.channel.kind {
        ChannelType::Group => {
            let gid = m.channel.group_id().unwrap_or_default();
            if !group_exists(conn, gid)? {
                return Ok(Err(SendRejected::UnknownGroup));
            }
            if !m.system && !is_member(conn, gid, &m.sender)? {
                return Ok(Err(SendRejected::NotMember));
            }
            member_ids(conn, gid)?
        }
        ChannelType::Person => match m.channel.persons() {
            Some((a, b)) if a == b => vec![a.to_string()],
            Some((a, b)) => vec![a.to_string(), b.to_string()],
            None => return Ok(Err(SendRejected::UnknownGroup)),
        },
    };
    let version = next_version(conn)?;
    let seq: i64 = conn
        .prepare_cached(
            "INSERT INTO channels (channel, type, last_seq) VALUES (?1, ?2, 1)
             ON CONFLICT (channel) DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq",
        )?
        .query_row(params![m.channel.key, m.channel.kind.code()], |r| r.get(0))?;
    conn.prepare_cached(&format!(
        "INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    ))?
    .execute(params![
        m.channel.key,
        m.channel.kind.code(),
        m.id,
        m.sender,
        m.system,
        seq,
        version as i64,
        m.client_msg_id,
        m.payload.get(),
        m.created_at
    ])?;
    // A member's own message leaves their row read; a deleted row comes back
    // with this message as its only unread one.
    let mut upsert = conn.prepare_cached(
        "INSERT INTO conversations (user_id, channel, type, peer, state, unread, read_seq, version,
             updated_at, last_id, last_seq, last_sender, last_preview, last_at)
         VALUES (?1, ?2, ?3, ?4, 0, CASE WHEN ?10 THEN 0 ELSE 1 END,
                 CASE WHEN ?10 THEN ?7 ELSE ?7 - 1 END, ?5, ?6, ?8, ?7, ?9, ?11, ?6)
         ON CONFLICT (user_id, channel) DO UPDATE SET
             unread = CASE WHEN ?10 THEN 0 WHEN conversations.state = 2 THEN 1
                           ELSE conversations.unread + 1 END,
             read_seq = CASE WHEN ?10 THEN excluded.last_seq
                             WHEN conversations.state = 2 THEN excluded.last_seq - 1
                             ELSE conversations.read_seq END,
             state = 0, version = excluded.version, updated_at = excluded.updated_at,
             last_id = excluded.last_id, last_seq = excluded.last_seq,
             last_sender = excluded.last_sender, last_preview = excluded.last_preview,
             last_at = excluded.last_at",
    )?;
    for user in &members {
        let peer = m.channel.id_for(user);
        upsert.execute(params![
            user,
            m.channel.key,
            m.channel.kind.code(),
            peer,
            version as i64,
            m.created_at,
            seq,
            m.id,
            m.sender,
            *user == m.sender,
            m.preview
        ])?;
    }
    let message = StoredMessage {
        id: m.id,
        channel: m.channel,
        sender: m.sender,
        system: m.system,
        seq: seq as u64,
        version,
        client_msg_id: m.client_msg_id,
        payload: m.payload,
        created_at: m.created_at,
    };
    insert_events(conn, &[event(&message)])?;
    Ok(Ok(Appended {
        message,
        duplicate: false,
        members: Arc::new(members),
    }))
}

fn conversation_row(
    conn: &Connection,
    user: &str,
    channel: &str,
) -> rusqlite::Result<Option<ConversationRow>> {
    conn.prepare_cached(&format!(
        "SELECT {ROW_COLUMNS} FROM conversations WHERE user_id = ?1 AND channel = ?2"
    ))?
    .query_row(params![user, channel], conversation_from_row)
    .optional()
}

fn last_messages(
    conn: &Connection,
    channel: &str,
    n: usize,
) -> rusqlite::Result<Vec<StoredMessage>> {
    let mut out: Vec<StoredMessage> = conn
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE channel = ?1 ORDER BY seq DESC LIMIT ?2"
        ))?
        .query_map(params![channel, n as i64], message_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    out.reverse();
    Ok(out)
}

/// Whether a delta from `since` can be served; the current version otherwise.
fn reset_needed(conn: &Connection, user: &str, since: u64) -> rusqlite::Result<Option<u64>> {
    let current = current_version(conn)?;
    if since == 0 {
        return Ok(None);
    }
    let floor: i64 = conn
        .prepare_cached("SELECT floor FROM conversation_floors WHERE user_id = ?1")?
        .query_row(params![user], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    if since < floor as u64 || since > current {
        Ok(Some(current))
    } else {
        Ok(None)
    }
}

#[async_trait]
impl MessageStore for SqliteStorage {
    async fn append_message(
        &self,
        message: NewMessage,
        event: EventBuilder,
        on_append: OnAppend,
    ) -> Result<Result2<Appended, SendRejected>> {
        self.write_hooked(
            move |conn| append(conn, message, event),
            move |r: &Result2<Appended, SendRejected>| {
                if let Ok(a) = r {
                    if !a.duplicate {
                        on_append(a);
                    }
                }
            },
        )
        .await
    }

    async fn messages(
        &self,
        user: &str,
        range: MessageRange,
        limit: usize,
    ) -> Result<Result2<MessagePage, SyncRefused>> {
        let user = user.to_string();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let mut messages: Vec<StoredMessage> = match &range {
                MessageRange::After { channel, seq } => {
                    if let Err(e) = check_access(&tx, &user, channel)? {
                        return Ok(Err(e));
                    }
                    tx.prepare_cached(&format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE channel = ?1 AND seq > ?2
                         ORDER BY seq LIMIT ?3"
                    ))?
                    .query_map(
                        // Past i64::MAX nothing is after: clamped, not wrapped
                        // to a negative seq that everything is after.
                        params![
                            channel.key,
                            (*seq).min(i64::MAX as u64) as i64,
                            limit as i64 + 1
                        ],
                        message_from_row,
                    )?
                    .collect::<rusqlite::Result<_>>()?
                }
                MessageRange::Before { channel, seq } => {
                    if let Err(e) = check_access(&tx, &user, channel)? {
                        return Ok(Err(e));
                    }
                    tx.prepare_cached(&format!(
                        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE channel = ?1 AND seq < ?2
                         ORDER BY seq DESC LIMIT ?3"
                    ))?
                    .query_map(
                        params![
                            channel.key,
                            (*seq).min(i64::MAX as u64) as i64,
                            limit as i64 + 1
                        ],
                        message_from_row,
                    )?
                    .collect::<rusqlite::Result<_>>()?
                }
                MessageRange::UserAfter { version } => {
                    if let Some(current) = reset_needed(&tx, &user, *version)? {
                        return Ok(Err(SyncRefused::ResetRequired { current }));
                    }
                    // Read diffusion: the channels whose rows changed after the
                    // version are the only ones that can hold newer messages.
                    tx.prepare_cached(
                        "SELECT m.channel, m.type, m.id, m.sender, m.system, m.seq, m.version,
                                m.client_msg_id, m.payload, m.created_at
                         FROM conversations c
                         JOIN messages m ON m.channel = c.channel AND m.version > ?2
                         WHERE c.user_id = ?1 AND c.version > ?2
                           AND (c.type = 0 OR EXISTS (SELECT 1 FROM group_members g
                                WHERE g.group_id = c.peer AND g.user_id = ?1))
                         ORDER BY m.version LIMIT ?3",
                    )?
                    .query_map(
                        params![user, *version as i64, limit as i64 + 1],
                        message_from_row,
                    )?
                    .collect::<rusqlite::Result<_>>()?
                }
            };
            let more = messages.len() > limit;
            messages.truncate(limit);
            if matches!(range, MessageRange::Before { .. }) {
                messages.reverse();
            }
            Ok(Ok(MessagePage { messages, more }))
        })
        .await
    }

    async fn conversations(
        &self,
        user: &str,
        since: u64,
        high: Option<u64>,
        after_key: Option<String>,
        limit: usize,
        last_n: usize,
    ) -> Result<Result2<ConversationPage, SyncRefused>> {
        let user = user.to_string();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            if let Some(current) = reset_needed(&tx, &user, since)? {
                return Ok(Err(SyncRefused::ResetRequired { current }));
            }
            let high = match high {
                Some(h) => h,
                None => current_version(&tx)?,
            };
            let after = after_key.unwrap_or_default();
            // A full sync lists live rows; a delta lists every changed row.
            let sql = if since == 0 {
                format!(
                    "SELECT {ROW_COLUMNS} FROM conversations
                     WHERE user_id = ?1 AND channel > ?2 AND state = 0 AND version > ?3
                     ORDER BY channel LIMIT ?4"
                )
            } else {
                format!(
                    "SELECT {ROW_COLUMNS} FROM conversations
                     WHERE user_id = ?1 AND channel > ?2 AND version > ?3
                     ORDER BY channel LIMIT ?4"
                )
            };
            let mut rows: Vec<ConversationRow> = tx
                .prepare_cached(&sql)?
                .query_map(
                    params![user, after, since as i64, limit as i64 + 1],
                    conversation_from_row,
                )?
                .collect::<rusqlite::Result<_>>()?;
            let more = rows.len() > limit;
            rows.truncate(limit);
            let next_key = if more {
                rows.last().map(|r| r.channel.key.clone())
            } else {
                None
            };
            let mut messages = Vec::with_capacity(rows.len());
            for r in &rows {
                if last_n > 0 && r.state == RowState::Live {
                    messages.push(last_messages(&tx, &r.channel.key, last_n)?);
                } else {
                    messages.push(Vec::new());
                }
            }
            Ok(Ok(ConversationPage {
                version: high,
                rows,
                messages,
                next_key,
            }))
        })
        .await
    }

    async fn change_conversation(
        &self,
        user: &str,
        channel: Channel,
        change: RowChange,
    ) -> Result<Option<ConversationRow>> {
        let user = user.to_string();
        self.write(move |conn| {
            let Some(row) = conversation_row(conn, &user, &channel.key)? else {
                return Ok(None);
            };
            let last_seq = row.last_message.as_ref().map(|m| m.seq).unwrap_or(0);
            let now = crate::now_ms();
            let (state, read_seq, unread) = match change {
                RowChange::Read(up_to) => {
                    if row.state == RowState::Deleted {
                        return Ok(None);
                    }
                    let target = up_to.unwrap_or(last_seq).min(last_seq);
                    let read_seq = row.read_seq.max(target);
                    let unread: i64 = conn
                        .prepare_cached(
                            "SELECT COUNT(*) FROM messages WHERE channel = ?1 AND seq > ?2 AND sender <> ?3",
                        )?
                        .query_row(params![channel.key, read_seq as i64, user], |r| r.get(0))?;
                    (row.state, read_seq, unread as u64)
                }
                RowChange::Hide => {
                    if row.state == RowState::Deleted {
                        return Ok(None);
                    }
                    (RowState::Hidden, row.read_seq, row.unread)
                }
                RowChange::Delete => (RowState::Deleted, last_seq, 0),
            };
            if state == row.state && read_seq == row.read_seq && unread == row.unread {
                return Ok(Some(row));
            }
            let version = next_version(conn)?;
            conn.prepare_cached(
                "UPDATE conversations SET state = ?3, read_seq = ?4, unread = ?5, version = ?6,
                 updated_at = ?7 WHERE user_id = ?1 AND channel = ?2",
            )?
            .execute(params![
                user,
                channel.key,
                state.code(),
                read_seq as i64,
                unread as i64,
                version as i64,
                now
            ])?;
            conversation_row(conn, &user, &channel.key)
        })
        .await
    }

    async fn prune_conversations(&self, older_than_ms: i64) -> Result<usize> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO conversation_floors (user_id, floor)
                 SELECT user_id, MAX(version) FROM conversations
                 WHERE state = 2 AND updated_at < ?1 GROUP BY user_id
                 ON CONFLICT (user_id) DO UPDATE SET floor = MAX(floor, excluded.floor)",
            )?
            .execute(params![older_than_ms])?;
            conn.prepare_cached("DELETE FROM conversations WHERE state = 2 AND updated_at < ?1")?
                .execute(params![older_than_ms])
        })
        .await
    }

    async fn current_version(&self) -> Result<u64> {
        self.read(current_version).await
    }
}

#[async_trait]
impl GroupStore for SqliteStorage {
    async fn group_create(
        &self,
        group: Group,
        members: Vec<Member>,
        max_members: usize,
    ) -> Result<GroupResult<Group>> {
        self.write(move |conn| {
            if group_exists(conn, &group.group_id)? {
                return Ok(GroupResult::Exists);
            }
            // Users count, not entries: a user named twice is one member.
            if max_members > 0 && distinct_users(&members).len() > max_members {
                return Ok(GroupResult::TooManyMembers { limit: max_members });
            }
            conn.prepare_cached(
                "INSERT INTO chat_groups (group_id, name, data, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?4)",
            )?
            .execute(params![
                group.group_id,
                group.name,
                group.data.to_string(),
                group.created_at
            ])?;
            insert_members(conn, &group.group_id, &members)?;
            Ok(match group_of(conn, &group.group_id)? {
                Some(g) => GroupResult::Ok(g),
                None => GroupResult::UnknownGroup,
            })
        })
        .await
    }

    async fn group_get(&self, group_id: &str) -> Result<Option<Group>> {
        let gid = group_id.to_string();
        self.read(move |conn| group_of(conn, &gid)).await
    }

    async fn group_update(
        &self,
        group_id: &str,
        name: Option<String>,
        data: Option<serde_json::Value>,
    ) -> Result<GroupResult<Group>> {
        let gid = group_id.to_string();
        self.write(move |conn| {
            if !group_exists(conn, &gid)? {
                return Ok(GroupResult::UnknownGroup);
            }
            conn.prepare_cached(
                "UPDATE chat_groups SET name = COALESCE(?2, name), data = COALESCE(?3, data),
                 updated_at = ?4 WHERE group_id = ?1",
            )?
            .execute(params![
                gid,
                name,
                data.map(|d| d.to_string()),
                crate::now_ms()
            ])?;
            Ok(match group_of(conn, &gid)? {
                Some(g) => GroupResult::Ok(g),
                None => GroupResult::UnknownGroup,
            })
        })
        .await
    }

    async fn group_delete(&self, group_id: &str) -> Result<bool> {
        let gid = group_id.to_string();
        self.write(move |conn| {
            if !group_exists(conn, &gid)? {
                return Ok(false);
            }
            let channel = Channel::group(&gid).key;
            let version = next_version(conn)?;
            tombstone_rows(conn, &channel, None, version, crate::now_ms())?;
            conn.execute(
                "DELETE FROM group_members WHERE group_id = ?1",
                params![gid],
            )?;
            conn.execute("DELETE FROM messages WHERE channel = ?1", params![channel])?;
            conn.execute("DELETE FROM channels WHERE channel = ?1", params![channel])?;
            conn.execute("DELETE FROM chat_groups WHERE group_id = ?1", params![gid])?;
            Ok(true)
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
        self.write(move |conn| {
            if !group_exists(conn, &gid)? {
                return Ok(GroupResult::UnknownGroup);
            }
            if max_members > 0 {
                let mut fresh = 0usize;
                for user in distinct_users(&members) {
                    if !is_member(conn, &gid, user)? {
                        fresh += 1;
                    }
                }
                if member_count(conn, &gid)? as usize + fresh > max_members {
                    return Ok(GroupResult::TooManyMembers { limit: max_members });
                }
            }
            let added = insert_members(conn, &gid, &members)?;
            conn.execute(
                "UPDATE chat_groups SET updated_at = ?2 WHERE group_id = ?1",
                params![gid, crate::now_ms()],
            )?;
            Ok(GroupResult::Ok(added))
        })
        .await
    }

    async fn group_remove_members(
        &self,
        group_id: &str,
        users: Vec<String>,
    ) -> Result<GroupResult<Vec<String>>> {
        let gid = group_id.to_string();
        self.write(move |conn| {
            if !group_exists(conn, &gid)? {
                return Ok(GroupResult::UnknownGroup);
            }
            let mut removed = Vec::new();
            {
                let mut delete = conn.prepare_cached(
                    "DELETE FROM group_members WHERE group_id = ?1 AND user_id = ?2",
                )?;
                for u in &users {
                    if delete.execute(params![gid, u])? > 0 {
                        removed.push(u.clone());
                    }
                }
            }
            if !removed.is_empty() {
                let version = next_version(conn)?;
                let now = crate::now_ms();
                tombstone_rows(
                    conn,
                    &Channel::group(&gid).key,
                    Some(&removed),
                    version,
                    now,
                )?;
                conn.execute(
                    "UPDATE chat_groups SET updated_at = ?2 WHERE group_id = ?1",
                    params![gid, now],
                )?;
            }
            Ok(GroupResult::Ok(removed))
        })
        .await
    }

    async fn group_members(
        &self,
        group_id: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<GroupResult<Vec<Member>>> {
        let gid = group_id.to_string();
        self.read(move |conn| {
            if !group_exists(conn, &gid)? {
                return Ok(GroupResult::UnknownGroup);
            }
            let members = conn
                .prepare_cached(
                    "SELECT user_id, role, joined_at FROM group_members
                     WHERE group_id = ?1 AND user_id > ?2 ORDER BY user_id LIMIT ?3",
                )?
                .query_map(params![gid, after.unwrap_or_default(), limit as i64], |r| {
                    Ok(Member {
                        user_id: r.get(0)?,
                        role: r.get(1)?,
                        joined_at: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(GroupResult::Ok(members))
        })
        .await
    }

    async fn group_member_ids(&self, group_id: &str) -> Result<GroupResult<Vec<String>>> {
        let gid = group_id.to_string();
        self.read(move |conn| {
            if !group_exists(conn, &gid)? {
                return Ok(GroupResult::UnknownGroup);
            }
            Ok(GroupResult::Ok(member_ids(conn, &gid)?))
        })
        .await
    }
}
