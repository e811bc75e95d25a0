//! MessageStore on PostgreSQL: the semantics of the SQLite engine
//! (`storage/sqlite/messages.rs`), column for column, on a database that
//! several gateway processes share.
//!
//! **Order.** Every write here runs in a writer batch, after the batch took
//! the write lock ([`super::WRITE_LOCK`]), at `READ COMMITTED`: each
//! statement sees every transaction that committed before the lock was
//! granted (PostgreSQL makes a commit visible before it releases the
//! transaction's locks). The version counter (a row of `counters`, not a
//! sequence: a sequence's value shows before the transaction that drew it
//! commits, so a reader could pin a version whose rows it cannot see yet)
//! and each channel's `last_seq` are read and advanced by those statements,
//! so both follow commit order across processes: seqs are 1, 2, 3… per
//! channel, and a user's versions increase in commit order. A failing job
//! rolls back to its savepoint, counter and seq included, so nothing leaves
//! a gap. Client message ids are checked in the same statement, under the
//! same lock, so of two concurrent duplicates the second finds the first
//! (the unique index `messages_dedup` backs this up).
//!
//! **Round trips.** An append is two statements: one that deduplicates,
//! checks the group, advances the counter and the channel, inserts the
//! message and upserts every member's conversation row (members read from
//! `group_members` inside the statement: one statement for any group size),
//! and [`super::insert_events`] with the `message.created` event built from
//! the seq and version the first returned. A row change is two statements
//! (the row with the read position and unread count it would get, then the
//! update with its version); pruning is one.
//!
//! **Text.** PostgreSQL text cannot hold U+0000, which SQLite stores: client
//! message ids are kept as their bytes (`bytea`), so any id deduplicates as
//! it does on SQLite; a preview is stored without its U+0000 characters.
//!
//! **Reads** run in one `REPEATABLE READ` snapshot ([`PostgresStorage::read`]),
//! their independent statements pipelined on the connection; a read of one
//! statement runs alone on a pooled connection.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use futures_util::future::try_join;
use serde_json::value::RawValue;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{insert_events, map_err, map_pool_err, PostgresStorage, Transaction};
use crate::storage::messages::{
    Appended, Channel, ChannelType, ConversationPage, ConversationRow, EventBuilder, LastMessage,
    MessagePage, MessageRange, MessageStore, NewMessage, OnAppend, RowChange, RowState,
    SendRejected, StoredMessage, SyncRefused,
};
use crate::storage::{Result, StorageError};

type Result2<T, E> = std::result::Result<T, E>;

/// What a job or a read hands back: besides the driver's errors (mapped by
/// the writer and `read`), a stored text that does not read is an error of
/// its own, found while converting rows.
pub(super) type Checked<T> = std::result::Result<T, StorageError>;

type PgResult<T> = std::result::Result<T, tokio_postgres::Error>;

pub(super) const MESSAGE_COLUMNS: &str =
    "channel, type, id, sender, system, seq, version, client_msg_id, payload, created_at";

const ROW_COLUMNS: &str = "user_id, channel, type, peer, state, unread, read_seq, version, \
     updated_at, last_id, last_seq, last_sender, last_preview, last_at";

/// A number of the contract as a BIGINT (numbers past `i64::MAX` mean "past
/// everything").
pub(super) fn big(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

/// A limit that also fetches one more row, to tell whether there are more.
fn limit_and_one(limit: usize) -> i64 {
    big((limit as u64).saturating_add(1))
}

/// A message from `r`, whose columns are [`MESSAGE_COLUMNS`] from `at` on.
pub(super) fn message_from_row(r: &Row, at: usize) -> Checked<StoredMessage> {
    let payload: String = r.get(at + 8);
    Ok(StoredMessage {
        channel: Channel::from_key(ChannelType::from_code(r.get(at + 1)), r.get(at)),
        id: r.get(at + 2),
        sender: r.get(at + 3),
        system: r.get(at + 4),
        seq: r.get::<_, i64>(at + 5) as u64,
        version: r.get::<_, i64>(at + 6) as u64,
        client_msg_id: match r.get::<_, Option<&[u8]>>(at + 7) {
            Some(bytes) => Some(String::from_utf8(bytes.to_vec()).map_err(|e| {
                StorageError::Database(format!("messages.client_msg_id is not UTF-8: {e}"))
            })?),
            None => None,
        },
        // Stored as JSON text; text that no longer reads is an error naming
        // the column, never a silent `null`.
        payload: RawValue::from_string(payload)
            .map_err(|e| StorageError::Database(format!("messages.payload is not JSON: {e}")))?,
        created_at: r.get(at + 9),
    })
}

fn messages_from_rows(rows: &[Row]) -> Checked<Vec<StoredMessage>> {
    rows.iter().map(|r| message_from_row(r, 0)).collect()
}

/// A conversation row from `r`, whose first columns are [`ROW_COLUMNS`].
fn conversation_from_row(r: &Row) -> ConversationRow {
    let last_message = r.get::<_, Option<String>>(9).map(|id| LastMessage {
        id,
        seq: r.get::<_, i64>(10) as u64,
        sender: r.get::<_, Option<String>>(11).unwrap_or_default(),
        preview: r.get::<_, Option<String>>(12).unwrap_or_default(),
        created_at: r.get::<_, Option<i64>>(13).unwrap_or_default(),
    });
    ConversationRow {
        user_id: r.get(0),
        channel: Channel::from_key(ChannelType::from_code(r.get(2)), r.get(1)),
        channel_id: r.get(3),
        state: RowState::from_code(r.get(4)),
        unread: r.get::<_, i64>(5) as u64,
        read_seq: r.get::<_, i64>(6) as u64,
        version: r.get::<_, i64>(7) as u64,
        updated_at: r.get(8),
        last_message,
    }
}

/// The append statement of a channel kind. Parameters: `$1` channel key,
/// `$2` sender, `$3` client message id, `$4` system, `$5` type code, `$6`
/// message id, `$7` payload, `$8` created at, `$9` preview; then `$10` the
/// group id (groups) or `$10` users and `$11` their peers (person channels).
///
/// Answers one row: status (0 appended, 1 duplicate, 2 unknown group, 3 not
/// a member), the version and seq taken, the member ids (groups, in id
/// order), then the duplicate's [`MESSAGE_COLUMNS`].
///
/// Everything happens only when the status is 0; the sub-statements share
/// one snapshot (under the write lock, nothing else changes meanwhile). A
/// member's own message leaves their row read; a deleted row comes back
/// with this message as its only unread one.
fn append_sql(kind: ChannelType) -> String {
    let (status, members, member_ids) = match kind {
        ChannelType::Group => (
            "CASE WHEN EXISTS (SELECT 1 FROM dup) THEN 1
                  WHEN NOT EXISTS (SELECT 1 FROM chat_groups WHERE group_id = $10::text) THEN 2
                  WHEN NOT $4::boolean AND NOT EXISTS (SELECT 1 FROM group_members
                       WHERE group_id = $10::text AND user_id = $2::text) THEN 3
                  ELSE 0 END",
            "SELECT user_id, $10::text AS peer FROM group_members WHERE group_id = $10::text",
            "CASE WHEN chk.status = 0 THEN ARRAY(SELECT user_id FROM members ORDER BY user_id) END",
        ),
        ChannelType::Person => (
            "CASE WHEN EXISTS (SELECT 1 FROM dup) THEN 1 ELSE 0 END",
            "SELECT * FROM UNNEST($10::text[], $11::text[]) AS u(user_id, peer)",
            "NULL::text[]",
        ),
    };
    format!(
        "WITH dup AS (
             SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE $3::bytea IS NOT NULL AND sender = $2::text AND client_msg_id = $3::bytea
         ),
         chk AS (SELECT {status} AS status),
         members AS ({members}),
         v AS (
             UPDATE counters SET value = value + 1
             WHERE name = 'version' AND (SELECT status FROM chk) = 0
             RETURNING value
         ),
         s AS (
             INSERT INTO channels (channel, type, last_seq)
             SELECT $1::text, $5::bigint, 1 FROM chk WHERE chk.status = 0
             ON CONFLICT (channel) DO UPDATE SET last_seq = channels.last_seq + 1
             RETURNING last_seq
         ),
         m AS (
             INSERT INTO messages ({MESSAGE_COLUMNS})
             SELECT $1::text, $5::bigint, $6::text, $2::text, $4::boolean, s.last_seq, v.value,
                    $3::bytea, $7::text, $8::bigint
             FROM s, v
         ),
         c AS (
             INSERT INTO conversations ({ROW_COLUMNS})
             SELECT u.user_id, $1::text, $5::bigint, u.peer, 0,
                    CASE WHEN u.user_id = $2::text THEN 0 ELSE 1 END,
                    CASE WHEN u.user_id = $2::text THEN s.last_seq ELSE s.last_seq - 1 END,
                    v.value, $8::bigint, $6::text, s.last_seq, $2::text, $9::text, $8::bigint
             FROM members u, s, v
             ON CONFLICT (user_id, channel) DO UPDATE SET
                 unread = CASE WHEN excluded.user_id = $2::text THEN 0
                               WHEN conversations.state = 2 THEN 1
                               ELSE conversations.unread + 1 END,
                 read_seq = CASE WHEN excluded.user_id = $2::text THEN excluded.last_seq
                                 WHEN conversations.state = 2 THEN excluded.last_seq - 1
                                 ELSE conversations.read_seq END,
                 state = 0, version = excluded.version, updated_at = excluded.updated_at,
                 last_id = excluded.last_id, last_seq = excluded.last_seq,
                 last_sender = excluded.last_sender, last_preview = excluded.last_preview,
                 last_at = excluded.last_at
         )
         SELECT chk.status, (SELECT value FROM v), (SELECT last_seq FROM s), {member_ids}, dup.*
         FROM chk LEFT JOIN dup ON true"
    )
}

static APPEND_GROUP: LazyLock<String> = LazyLock::new(|| append_sql(ChannelType::Group));
static APPEND_PERSON: LazyLock<String> = LazyLock::new(|| append_sql(ChannelType::Person));

async fn append(
    t: &Transaction<'_>,
    m: NewMessage,
    event: EventBuilder,
) -> PgResult<Checked<Result2<Appended, SendRejected>>> {
    let kind = m.channel.kind.code();
    let cid = client_msg_id(&m);
    let preview = storable(&m.preview);
    let common: [&(dyn ToSql + Sync); 9] = [
        &m.channel.key,
        &m.sender,
        &cid,
        &m.system,
        &kind,
        &m.id,
        &m.payload.get(),
        &m.created_at,
        &preview,
    ];
    let (row, persons) = match m.channel.kind {
        ChannelType::Group => {
            let gid = m.channel.group_id().unwrap_or_default();
            let stmt = t.prepare_cached(&APPEND_GROUP).await?;
            let mut params = common.to_vec();
            params.push(&gid);
            (t.query_one(&stmt, &params).await?, None)
        }
        ChannelType::Person => {
            let Some((a, b)) = m.channel.persons() else {
                // Not a channel anyone can be in: like the SQLite engine, a
                // retry still finds its first message; nothing is written.
                return match find_duplicate(t, &m).await? {
                    Some(found) => Ok(found.map(Ok)),
                    None => Ok(Ok(Err(SendRejected::UnknownGroup))),
                };
            };
            let users: Vec<String> = if a == b {
                vec![a.to_string()]
            } else {
                vec![a.to_string(), b.to_string()]
            };
            let peers: Vec<String> = users.iter().map(|u| m.channel.id_for(u)).collect();
            let stmt = t.prepare_cached(&APPEND_PERSON).await?;
            let mut params = common.to_vec();
            params.push(&users);
            params.push(&peers);
            let row = t.query_one(&stmt, &params).await?;
            (row, Some(users))
        }
    };
    match row.get::<_, i32>(0) {
        1 => Ok(message_from_row(&row, 4).map(|message| {
            Ok(Appended {
                message,
                duplicate: true,
                members: Arc::new(Vec::new()),
            })
        })),
        2 => Ok(Ok(Err(SendRejected::UnknownGroup))),
        3 => Ok(Ok(Err(SendRejected::NotMember))),
        _ => {
            let version: i64 = row.get(1);
            let seq: i64 = row.get(2);
            let members = match persons {
                Some(users) => users,
                None => row.get::<_, Option<Vec<String>>>(3).unwrap_or_default(),
            };
            let message = StoredMessage {
                id: m.id,
                channel: m.channel,
                sender: m.sender,
                system: m.system,
                seq: seq as u64,
                version: version as u64,
                client_msg_id: m.client_msg_id,
                payload: m.payload,
                created_at: m.created_at,
            };
            insert_events(t, &[event(&message)]).await?;
            Ok(Ok(Ok(Appended {
                message,
                duplicate: false,
                members: Arc::new(members),
            })))
        }
    }
}

/// The client message id as stored: its bytes (`bytea`, since PostgreSQL
/// text cannot hold U+0000 and the id is the sender's, whatever it holds).
fn client_msg_id(m: &NewMessage) -> Option<&[u8]> {
    m.client_msg_id.as_deref().map(str::as_bytes)
}

/// Display text as PostgreSQL text can hold it: without U+0000 (a preview
/// shows nothing for it anyway).
fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', ""))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// The sender's earlier message with this client message id, as a duplicate.
async fn find_duplicate(
    t: &Transaction<'_>,
    m: &NewMessage,
) -> PgResult<Option<Checked<Appended>>> {
    let Some(cid) = client_msg_id(m) else {
        return Ok(None);
    };
    let stmt = t
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender = $1 AND client_msg_id = $2"
        ))
        .await?;
    Ok(t.query_opt(&stmt, &[&m.sender, &cid]).await?.map(|r| {
        message_from_row(&r, 0).map(|message| Appended {
            message,
            duplicate: true,
            members: Arc::new(Vec::new()),
        })
    }))
}

/// The current version and the user's floor (the newest pruned version).
const HEAD_SQL: &str = "SELECT (SELECT value FROM counters WHERE name = 'version'),
            (SELECT floor FROM conversation_floors WHERE user_id = $1)";

/// The current version, and whether a delta from `since` cannot be served:
/// older than the floor, or newer than any version handed out.
fn reset_needed(head: &Row, since: u64) -> (u64, bool) {
    let current = head.get::<_, Option<i64>>(0).unwrap_or(0) as u64;
    let floor = head.get::<_, Option<i64>>(1).unwrap_or(0) as u64;
    (current, since != 0 && (since < floor || since > current))
}

/// Whether `user` may read a group channel: `SELECT` the group's existence
/// and the membership (`$1` group id, `$2` user).
const ACCESS_SQL: &str = "SELECT EXISTS (SELECT 1 FROM chat_groups WHERE group_id = $1),
            EXISTS (SELECT 1 FROM group_members WHERE group_id = $1 AND user_id = $2)";

fn access_from_row(r: &Row) -> Result2<(), SyncRefused> {
    if !r.get::<_, bool>(0) {
        Err(SyncRefused::UnknownGroup)
    } else if !r.get::<_, bool>(1) {
        Err(SyncRefused::NotMember)
    } else {
        Ok(())
    }
}

/// The up to `$2` newest messages of each channel in `$1`, oldest first.
const LAST_MESSAGES_SQL: &str = "SELECT m.channel, m.type, m.id, m.sender, m.system, m.seq,
            m.version, m.client_msg_id, m.payload, m.created_at
     FROM UNNEST($1::text[]) AS c(channel)
     CROSS JOIN LATERAL (SELECT * FROM messages WHERE channel = c.channel
                         ORDER BY seq DESC LIMIT $2) m
     ORDER BY m.channel, m.seq";

impl PostgresStorage {
    /// One statement on a pooled connection, outside any transaction (a
    /// statement is its own snapshot).
    pub(super) async fn read_once(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let conn = self.pool.get().await.map_err(map_pool_err)?;
        let stmt = conn.prepare_cached(sql).await.map_err(map_err)?;
        conn.query(&stmt, params).await.map_err(map_err)
    }
}

#[async_trait]
impl MessageStore for PostgresStorage {
    async fn append_message(
        &self,
        message: NewMessage,
        event: EventBuilder,
        on_append: OnAppend,
    ) -> Result<Result2<Appended, SendRejected>> {
        self.write_hooked(
            move |t| Box::pin(append(t, message, event)),
            // On the writer, after the commit, in the order the jobs ran:
            // this process's appends of a channel in seq order.
            move |r: &Checked<Result2<Appended, SendRejected>>| {
                if let Ok(Ok(a)) = r {
                    if !a.duplicate {
                        on_append(a);
                    }
                }
            },
        )
        .await?
    }

    async fn messages(
        &self,
        user: &str,
        range: MessageRange,
        limit: usize,
    ) -> Result<Result2<MessagePage, SyncRefused>> {
        if let MessageRange::After { channel, .. } | MessageRange::Before { channel, .. } = &range {
            if channel.kind == ChannelType::Person {
                match channel.persons() {
                    Some((a, b)) if a == user || b == user => {}
                    _ => return Ok(Err(SyncRefused::NotMember)),
                }
            }
        }
        let user = user.to_string();
        let backwards = matches!(range, MessageRange::Before { .. });
        let page = self
            .read(move |t| {
                Box::pin(async move {
                    let take = limit_and_one(limit);
                    // The check and the page, pipelined: the page is dropped
                    // when the check refuses.
                    let (check, rows) = match &range {
                        MessageRange::After { channel, seq }
                        | MessageRange::Before { channel, seq } => {
                            let sql = if backwards {
                                format!(
                                    "SELECT {MESSAGE_COLUMNS} FROM messages
                                     WHERE channel = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
                                )
                            } else {
                                format!(
                                    "SELECT {MESSAGE_COLUMNS} FROM messages
                                     WHERE channel = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                                )
                            };
                            let seq = big(*seq);
                            let page = t.prepare_cached(&sql).await?;
                            let params: [&(dyn ToSql + Sync); 3] = [&channel.key, &seq, &take];
                            let rows = t.query(&page, &params);
                            match channel.group_id() {
                                Some(gid) if channel.kind == ChannelType::Group => {
                                    let access = t.prepare_cached(ACCESS_SQL).await?;
                                    let (access, rows) =
                                        try_join(t.query_one(&access, &[&gid, &user]), rows)
                                            .await?;
                                    (access_from_row(&access), rows)
                                }
                                _ if channel.kind == ChannelType::Group => {
                                    (Err(SyncRefused::UnknownGroup), Vec::new())
                                }
                                _ => (Ok(()), rows.await?),
                            }
                        }
                        MessageRange::UserAfter { version } => {
                            let head = t.prepare_cached(HEAD_SQL).await?;
                            // Read diffusion: the channels whose rows changed
                            // after the version are the only ones that can
                            // hold newer messages.
                            let page = t
                                .prepare_cached(
                                    "SELECT m.channel, m.type, m.id, m.sender, m.system, m.seq,
                                            m.version, m.client_msg_id, m.payload, m.created_at
                                     FROM conversations c
                                     JOIN messages m ON m.channel = c.channel AND m.version > $2
                                     WHERE c.user_id = $1 AND c.version > $2
                                       AND (c.type = 0 OR EXISTS (SELECT 1 FROM group_members g
                                            WHERE g.group_id = c.peer AND g.user_id = $1))
                                     ORDER BY m.version LIMIT $3",
                                )
                                .await?;
                            let since = big(*version);
                            let (head, rows) = try_join(
                                t.query_one(&head, &[&user]),
                                t.query(&page, &[&user, &since, &take]),
                            )
                            .await?;
                            match reset_needed(&head, *version) {
                                (current, true) => {
                                    (Err(SyncRefused::ResetRequired { current }), Vec::new())
                                }
                                _ => (Ok(()), rows),
                            }
                        }
                    };
                    Ok(check.map(|()| rows))
                })
            })
            .await?;
        let rows = match page {
            Ok(rows) => rows,
            Err(refused) => return Ok(Err(refused)),
        };
        let mut messages = messages_from_rows(&rows)?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        if backwards {
            messages.reverse();
        }
        Ok(Ok(MessagePage { messages, more }))
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
        self.read(move |t| {
            Box::pin(async move {
                let after = after_key.unwrap_or_default();
                // A full sync lists live rows; a delta lists every changed row.
                let sql = if since == 0 {
                    format!(
                        "SELECT {ROW_COLUMNS} FROM conversations
                         WHERE user_id = $1 AND channel > $2 AND state = 0 AND version > $3
                         ORDER BY channel LIMIT $4"
                    )
                } else {
                    format!(
                        "SELECT {ROW_COLUMNS} FROM conversations
                         WHERE user_id = $1 AND channel > $2 AND version > $3
                         ORDER BY channel LIMIT $4"
                    )
                };
                let (head, page) =
                    try_join(t.prepare_cached(HEAD_SQL), t.prepare_cached(&sql)).await?;
                let (head, rows) = try_join(
                    t.query_one(&head, &[&user]),
                    t.query(&page, &[&user, &after, &big(since), &limit_and_one(limit)]),
                )
                .await?;
                let (current, reset) = reset_needed(&head, since);
                if reset {
                    return Ok(Ok(Err(SyncRefused::ResetRequired { current })));
                }
                let high = high.unwrap_or(current);
                let mut rows: Vec<ConversationRow> =
                    rows.iter().map(conversation_from_row).collect();
                let more = rows.len() > limit;
                rows.truncate(limit);
                let next_key = if more {
                    rows.last().map(|r| r.channel.key.clone())
                } else {
                    None
                };
                // The last messages of every live row in one statement.
                let live: Vec<&str> = rows
                    .iter()
                    .filter(|r| r.state == RowState::Live)
                    .map(|r| r.channel.key.as_str())
                    .collect();
                let mut newest: HashMap<String, Vec<StoredMessage>> = HashMap::new();
                if last_n > 0 && !live.is_empty() {
                    let stmt = t.prepare_cached(LAST_MESSAGES_SQL).await?;
                    for r in t.query(&stmt, &[&live, &big(last_n as u64)]).await? {
                        match message_from_row(&r, 0) {
                            Ok(m) => newest.entry(m.channel.key.clone()).or_default().push(m),
                            Err(e) => return Ok(Err(e)),
                        }
                    }
                }
                let messages = rows
                    .iter()
                    .map(|r| match r.state {
                        RowState::Live => newest.remove(&r.channel.key).unwrap_or_default(),
                        _ => Vec::new(),
                    })
                    .collect();
                Ok(Ok(Ok(ConversationPage {
                    version: high,
                    rows,
                    messages,
                    next_key,
                })))
            })
        })
        .await?
    }

    async fn change_conversation(
        &self,
        user: &str,
        channel: Channel,
        change: RowChange,
    ) -> Result<Option<ConversationRow>> {
        let user = user.to_string();
        self.write(move |t| {
            Box::pin(async move {
                // The row, and for a read receipt the read position it would
                // move to and the messages of others after it.
                let up_to = match change {
                    RowChange::Read(up_to) => up_to.map(big),
                    _ => None,
                };
                let counting = matches!(change, RowChange::Read(_));
                let stmt = t
                    .prepare_cached(&format!(
                        "SELECT {ROW_COLUMNS}, r.new_read_seq,
                                CASE WHEN $3 AND state <> 2 THEN
                                    (SELECT COUNT(*) FROM messages m WHERE m.channel = $2
                                     AND m.seq > r.new_read_seq AND m.sender <> $1)
                                END
                         FROM conversations,
                              LATERAL (SELECT CASE WHEN last_id IS NULL THEN 0 ELSE last_seq END
                                       AS last) l,
                              LATERAL (SELECT GREATEST(read_seq,
                                              LEAST(COALESCE($4::bigint, l.last), l.last))
                                       AS new_read_seq) r
                         WHERE user_id = $1 AND channel = $2"
                    ))
                    .await?;
                let Some(found) = t
                    .query_opt(&stmt, &[&user, &channel.key, &counting, &up_to])
                    .await?
                else {
                    return Ok(None);
                };
                let row = conversation_from_row(&found);
                let last_seq = row.last_message.as_ref().map(|m| m.seq).unwrap_or(0);
                let (state, read_seq, unread) = match change {
                    RowChange::Read(_) => {
                        if row.state == RowState::Deleted {
                            return Ok(None);
                        }
                        let read_seq = found.get::<_, i64>(14) as u64;
                        let unread = found.get::<_, Option<i64>>(15).unwrap_or(0) as u64;
                        (row.state, read_seq, unread)
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
                let stmt = t
                    .prepare_cached(&format!(
                        "WITH v AS (UPDATE counters SET value = value + 1 WHERE name = 'version'
                                    RETURNING value)
                         UPDATE conversations SET state = $3, read_seq = $4, unread = $5,
                                version = (SELECT value FROM v), updated_at = $6
                         WHERE user_id = $1 AND channel = $2
                         RETURNING {ROW_COLUMNS}"
                    ))
                    .await?;
                let updated = t
                    .query_opt(
                        &stmt,
                        &[
                            &user,
                            &channel.key,
                            &state.code(),
                            &big(read_seq),
                            &big(unread),
                            &crate::now_ms(),
                        ],
                    )
                    .await?;
                Ok(updated.as_ref().map(conversation_from_row))
            })
        })
        .await
    }

    async fn prune_conversations(&self, older_than_ms: i64) -> Result<usize> {
        self.write(move |t| {
            Box::pin(async move {
                let stmt = t
                    .prepare_cached(
                        "WITH gone AS (
                             DELETE FROM conversations WHERE state = 2 AND updated_at < $1
                             RETURNING user_id, version
                         ),
                         floors AS (
                             INSERT INTO conversation_floors (user_id, floor)
                             SELECT user_id, MAX(version) FROM gone GROUP BY user_id
                             ON CONFLICT (user_id) DO UPDATE
                                 SET floor = GREATEST(conversation_floors.floor, excluded.floor)
                         )
                         SELECT COUNT(*) FROM gone",
                    )
                    .await?;
                let n: i64 = t.query_one(&stmt, &[&older_than_ms]).await?.get(0);
                Ok(n as usize)
            })
        })
        .await
    }

    async fn current_version(&self) -> Result<u64> {
        let rows = self
            .read_once("SELECT value FROM counters WHERE name = 'version'", &[])
            .await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
    }
}
