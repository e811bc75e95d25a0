//! Conversation lists: incremental, paginated sync and per-user changes
//! (mark read, hide, delete), each passed through the `conversation-filter`
//! chain with the viewer before anyone sees it.
//!
//! Sync model (docs/conversations.md): a client holds a version. A sync from
//! version V returns the rows that changed after V — live ones under
//! `conversations`, deleted, hidden and filtered-out ones under `removed` —
//! in pages ordered by channel, and the version to hold afterwards. The
//! cursor pins that version and the page position: a row changing during
//! the pages is either met later in key order (with its newest state) or
//! already passed (and then changed after the pinned version, so the next
//! sync returns it); no row appears twice in one sync and none is missed.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{channel_type, check_id, render, MessagingError};
use crate::config::OnError;
use crate::plugins::bindings::exports::plugboard::plugin::conversation_filter as cf;
use crate::server::App;
use crate::storage::messages::{
    Channel, ChannelType, ConversationRow, LastMessage, RowChange, RowState, StoredMessage,
    SyncRefused,
};

/// A conversation sync request (frame fields and API query parameters).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The version the client holds (0 or absent: a full sync).
    pub since_version: Option<u64>,
    /// From the previous page's answer; carries the sync's version and position.
    pub cursor: Option<String>,
    pub limit: Option<usize>,
    /// Newest messages to include per conversation.
    pub last_messages: Option<usize>,
}

/// What a cursor holds.
#[derive(Serialize, Deserialize)]
struct Cursor {
    /// The version the whole sync reports.
    h: u64,
    /// The version it syncs from.
    s: u64,
    /// The last channel key of the previous page.
    k: String,
}

fn encode_cursor(c: &Cursor) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(c).unwrap_or_default())
}

fn decode_cursor(text: &str) -> Result<Cursor, MessagingError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            MessagingError::BadRequest(
                "`cursor` is not a cursor this gateway gave out; start the sync again".into(),
            )
        })
}

/// Answers one page of `user`'s conversation sync (JSON: the
/// `conversations` frame without `type` and `id`).
pub async fn list(
    app: &App,
    user: &str,
    device: Option<&str>,
    q: &ListQuery,
) -> Result<Value, MessagingError> {
    let started = std::time::Instant::now();
    let cfg = app.config();
    let c = &cfg.conversations;
    let cursor = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let since = match (&cursor, q.since_version) {
        (Some(cur), Some(s)) if s != cur.s => {
            return Err(MessagingError::BadRequest(format!(
                "`since_version` {s} differs from the cursor's ({}); leave it out when passing a cursor",
                cur.s
            )))
        }
        (Some(cur), _) => cur.s,
        (None, s) => s.unwrap_or(0),
    };
    let limit = q.limit.unwrap_or(c.default_limit).clamp(1, c.max_limit);
    let last_n = q
        .last_messages
        .unwrap_or(c.default_last_messages)
        .min(c.max_last_messages);
    let page = app
        .messages
        .conversations(
            user,
            since,
            cursor.as_ref().map(|c| c.h),
            cursor.map(|c| c.k),
            limit,
            last_n,
        )
        .await?
        .map_err(|e| match e {
            SyncRefused::ResetRequired { current } => {
                MessagingError::ResetRequired { since, current }
            }
            _ => MessagingError::BadRequest("conversation sync refused".into()),
        })?;
    let mut live = Vec::new();
    let mut removed = Vec::new();
    for (row, messages) in page.rows.into_iter().zip(page.messages) {
        match row.state {
            RowState::Live => live.push((row, messages)),
            RowState::Hidden => removed.push(render::removed_json(&row, "hidden")),
            RowState::Deleted => removed.push(render::removed_json(&row, "deleted")),
        }
    }
    let (kept, dropped) = apply_filters(app, user, device, live).await?;
    // A full sync starts from nothing, so what the filter hid needs no mention.
    if since > 0 {
        removed.extend(dropped.iter().map(|r| render::removed_json(r, "filtered")));
    }
    let conversations: Vec<Value> = kept
        .iter()
        .map(|(row, messages)| {
            render::conversation_json(row, (last_n > 0).then_some(messages.as_slice()))
        })
        .collect();
    let next = page.next_key.map(|k| {
        encode_cursor(&Cursor {
            h: page.version,
            s: since,
            k,
        })
    });
    app.metrics
        .conversation_sync_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(json!({
        "version": page.version,
        "conversations": conversations,
        "removed": removed,
        "more": next.is_some(),
        "cursor": next,
    }))
}

fn to_wit(row: &ConversationRow) -> cf::Conversation {
    cf::Conversation {
        channel_id: row.channel_id.clone(),
        channel_type: match row.channel.kind {
            ChannelType::Person => cf::ChannelType::Person,
            ChannelType::Group => cf::ChannelType::Group,
        },
        unread: row.unread.min(u32::MAX as u64) as u32,
        version: row.version,
        updated_at_ms: row.updated_at,
        last_message: row.last_message.as_ref().map(|m| cf::MessageSummary {
            message_id: m.id.clone(),
            seq: m.seq,
            sender: m.sender.clone(),
            preview: m.preview.clone(),
        }),
    }
}

/// Applies what a plugin may rewrite: unread count, last message, time.
fn apply_rewrite(row: &mut ConversationRow, c: cf::Conversation) {
    row.unread = c.unread as u64;
    row.updated_at = c.updated_at_ms;
    let created_at = row
        .last_message
        .as_ref()
        .map(|m| m.created_at)
        .unwrap_or(row.updated_at);
    row.last_message = c.last_message.map(|m| LastMessage {
        id: m.message_id,
        seq: m.seq,
        sender: m.sender,
        preview: m.preview,
        created_at,
    });
}

type Kept = Vec<(ConversationRow, Vec<StoredMessage>)>;

/// Runs the filter chain in order. A failing plugin is skipped when its
/// policy is fail-open; fail-closed refuses the whole answer.
async fn apply_filters(
    app: &App,
    user: &str,
    device: Option<&str>,
    mut rows: Kept,
) -> Result<(Kept, Vec<ConversationRow>), MessagingError> {
    let mut dropped = Vec::new();
    if rows.is_empty() {
        return Ok((rows, dropped));
    }
    let chain = app.plugins.chain("conversation-filter");
    if chain.is_empty() {
        return Ok((rows, dropped));
    }
    let viewer = cf::Viewer {
        user_id: user.to_string(),
        device_id: device.map(str::to_string),
    };
    for name in chain {
        if rows.is_empty() {
            break;
        }
        let input: Vec<cf::Conversation> = rows.iter().map(|(r, _)| to_wit(r)).collect();
        match app.plugins.filter(&name, &viewer, &input).await {
            Ok(verdicts) => {
                let mut next = Vec::with_capacity(rows.len());
                for ((mut row, messages), verdict) in rows.into_iter().zip(verdicts) {
                    match verdict {
                        cf::Verdict::Keep => next.push((row, messages)),
                        cf::Verdict::Drop => dropped.push(row),
                        cf::Verdict::Rewrite(c) => {
                            apply_rewrite(&mut row, c);
                            next.push((row, messages));
                        }
                    }
                }
                rows = next;
            }
            Err(failure) => match app.plugins.on_error(&name, "conversation-filter") {
                OnError::FailOpen => {
                    tracing::warn!(plugin = %name, user_id = %user, error = %failure,
                        "conversation filter failed; fail-open: the list goes on unfiltered by it");
                }
                OnError::FailClosed => {
                    tracing::warn!(plugin = %name, user_id = %user, error = %failure,
                        "conversation filter failed; fail-closed: the list is refused");
                    return Err(MessagingError::FilterFailed {
                        plugin: name,
                        reason: failure.to_string(),
                    });
                }
            },
        }
    }
    Ok((rows, dropped))
}

/// Applies a change to one of `user`'s conversations, tells the user's
/// other connections, and answers the change (JSON as a `conversations`
/// frame body).
pub async fn change(
    app: &App,
    user: &str,
    device: Option<&str>,
    origin: Option<&str>,
    kind: &str,
    channel_id: &str,
    change: RowChange,
) -> Result<Value, MessagingError> {
    let kind = channel_type(kind)?;
    check_id("channel_id", channel_id)?;
    let channel = Channel::addressed(user, kind, channel_id);
    let Some(row) = app
        .messages
        .change_conversation(user, channel, change)
        .await?
    else {
        return Err(MessagingError::UnknownConversation {
            user: user.to_string(),
            kind: kind.as_str(),
            id: channel_id.to_string(),
        });
    };
    let body = change_body(app, user, device, row.clone()).await?;
    // Every other device learns the new state; a filter failure there only
    // skips the push (those devices see it at their next sync).
    let others: Vec<_> = app
        .registry
        .user_sessions(user)
        .into_iter()
        .filter(|s| Some(s.connection_id.as_str()) != origin)
        .collect();
    if !others.is_empty() {
        if let Ok(mut push) = change_body(app, user, None, row).await {
            if let Some(obj) = push.as_object_mut() {
                obj.insert("type".into(), json!("conversations"));
                obj.insert("event".into(), json!("changed"));
            }
            let frame = Message::text(push.to_string());
            for s in others {
                let _ = s.push(frame.clone());
            }
        }
    }
    Ok(body)
}

async fn change_body(
    app: &App,
    user: &str,
    device: Option<&str>,
    row: ConversationRow,
) -> Result<Value, MessagingError> {
    let version = row.version;
    let (conversations, removed) = match row.state {
        RowState::Live => {
            let (kept, dropped) = apply_filters(app, user, device, vec![(row, Vec::new())]).await?;
            (
                kept.iter()
                    .map(|(r, _)| render::conversation_json(r, None))
                    .collect::<Vec<_>>(),
                dropped
                    .iter()
                    .map(|r| render::removed_json(r, "filtered"))
                    .collect::<Vec<_>>(),
            )
        }
        RowState::Hidden => (vec![], vec![render::removed_json(&row, "hidden")]),
        RowState::Deleted => (vec![], vec![render::removed_json(&row, "deleted")]),
    };
    Ok(json!({
        "version": version,
        "conversations": conversations,
        "removed": removed,
        "more": false,
        "cursor": null,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            h: 42,
            s: 7,
            k: "p:a\u{1f}b".into(),
        };
        let back = decode_cursor(&encode_cursor(&c)).unwrap();
        assert_eq!((back.h, back.s, back.k.as_str()), (42, 7, "p:a\u{1f}b"));
        assert!(decode_cursor("not a cursor").is_err());
        assert!(decode_cursor("").is_err());
    }
}
