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
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{channel_type, check_id, render, Messaging, MessagingError};
use crate::config::OnError;
use crate::delivery::{Lane, Push};
use crate::plugins::bindings::exports::plugboard::plugin::conversation_filter as cf;
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

/// One page of a conversation sync, cut to a byte budget. It is written as
/// the `conversations` frame (by `gateway::protocol`) or as the server API's
/// answer ([`ListPage::json`]).
#[derive(Debug, Serialize)]
pub struct ListPage {
    version: u64,
    /// Live conversations, each a raw view (with its messages as stored).
    conversations: Vec<Box<RawValue>>,
    removed: Vec<Value>,
    more: bool,
    cursor: Option<String>,
}

impl ListPage {
    /// The answer of `GET /v1/users/{uid}/conversations`. The API answers a
    /// JSON value, so the last messages' payloads are read again here; one
    /// that does not read is an error, never `null`.
    pub fn json(&self) -> Result<Value, MessagingError> {
        serde_json::to_value(self).map_err(|e| MessagingError::Unreadable {
            what: "a stored message of a conversation page".into(),
            reason: e.to_string(),
        })
    }
}

/// One entry of a page, in channel-key order.
struct Entry {
    key: String,
    item: Item,
}

enum Item {
    /// A live conversation (its index among the kept rows) and its view.
    Live(usize, Box<RawValue>),
    /// An entry of `removed`.
    Removed(Value),
}

impl Entry {
    fn size(&self) -> usize {
        match &self.item {
            Item::Live(_, raw) => raw.get().len(),
            Item::Removed(removed) => removed.to_string().len(),
        }
    }
}

impl Messaging {
    /// Answers one page of `user`'s conversation sync: at most `limit` rows
    /// and, beside that, at most `budget` bytes of entries. The entries are
    /// taken in key order while they fit; the page then ends with `more` and a
    /// cursor after the last one taken. The first entry is always taken, its
    /// last messages cut (oldest first) until it fits, so a page always moves on.
    pub async fn list_page(
        &self,
        user: &str,
        device: Option<&str>,
        q: &ListQuery,
        budget: usize,
    ) -> Result<ListPage, MessagingError> {
        let started = std::time::Instant::now();
        let cfg = self.config.load();
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
        let page = self
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
        let mut entries = Vec::with_capacity(page.rows.len());
        let mut live = Vec::new();
        for (row, messages) in page.rows.into_iter().zip(page.messages) {
            let reason = match row.state {
                RowState::Live => {
                    live.push((row, messages));
                    continue;
                }
                RowState::Hidden => "hidden",
                RowState::Deleted => "deleted",
            };
            entries.push(Entry {
                key: row.channel.key.clone(),
                item: Item::Removed(render::removed_json(&row, reason)),
            });
        }
        let (kept, dropped) = self.apply_filters(user, device, live).await?;
        // A full sync starts from nothing, so what the filter hid needs no mention.
        if since > 0 {
            entries.extend(dropped.iter().map(|r| Entry {
                key: r.channel.key.clone(),
                item: Item::Removed(render::removed_json(r, "filtered")),
            }));
        }
        let views: Vec<Option<Vec<Box<RawValue>>>> = kept
            .iter()
            .map(|(_, messages)| {
                (last_n > 0).then(|| {
                    messages
                        .iter()
                        .map(|m| render::message_raw(m, user))
                        .collect()
                })
            })
            .collect();
        for (i, (row, _)) in kept.iter().enumerate() {
            entries.push(Entry {
                key: row.channel.key.clone(),
                item: Item::Live(i, render::conversation_raw(row, views[i].as_deref())),
            });
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        // The entry opening the page is always taken: cut to fit when it is too large.
        if let Some(Entry {
            item: Item::Live(i, raw),
            ..
        }) = entries.first_mut()
        {
            if let Some(messages) = views[*i].as_deref().filter(|_| raw.get().len() > budget) {
                *raw = conversation_fitting(&kept[*i].0, messages, budget);
            }
        }
        let keep = render::fitting(entries.iter().map(Entry::size), budget);
        let next_key = if keep < entries.len() {
            entries.truncate(keep);
            entries.last().map(|e| e.key.clone())
        } else {
            page.next_key
        };
        let next = next_key.map(|k| {
            encode_cursor(&Cursor {
                h: page.version,
                s: since,
                k,
            })
        });
        let (mut conversations, mut removed) = (Vec::new(), Vec::new());
        for e in entries {
            match e.item {
                Item::Live(_, raw) => conversations.push(raw),
                Item::Removed(r) => removed.push(r),
            }
        }
        self.metrics
            .conversation_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(ListPage {
            version: page.version,
            conversations,
            removed,
            more: next.is_some(),
            cursor: next,
        })
    }
}

/// A live conversation's view with as many of its newest `messages` (raw
/// views, oldest first) as fit `budget`; the client reads the others with
/// a `before_seq` sync.
fn conversation_fitting(
    row: &ConversationRow,
    messages: &[Box<RawValue>],
    budget: usize,
) -> Box<RawValue> {
    let bare = render::conversation_raw(row, Some(&[][..])).get().len();
    let mut room = budget.saturating_sub(bare);
    let mut keep = 0;
    for m in messages.iter().rev() {
        let size = m.get().len() + 1;
        if size > room {
            break;
        }
        room -= size;
        keep += 1;
    }
    render::conversation_raw(row, Some(&messages[messages.len() - keep..]))
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

/// Checks what a filter's rewrites would show: the last message's id and
/// sender must be ids (1 to 128 bytes, no control characters), as every
/// stored one is. A rewrite that breaks this fails the filter's call.
fn check_rewrites(verdicts: &[cf::Verdict]) -> Result<(), String> {
    for (i, v) in verdicts.iter().enumerate() {
        let cf::Verdict::Rewrite(c) = v else { continue };
        if let Some(m) = &c.last_message {
            if !crate::auth::valid_id(&m.message_id) || !crate::auth::valid_id(&m.sender) {
                return Err(format!(
                    "verdict {i} rewrites the last message with an id or sender that is not \
                     1 to 128 bytes without control characters"
                ));
            }
        }
    }
    Ok(())
}

/// Applies what a plugin may rewrite: unread count, last message, time. A
/// rewritten preview is cut to `preview_chars` characters, like every
/// stored one.
fn apply_rewrite(row: &mut ConversationRow, c: cf::Conversation, preview_chars: usize) {
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
        preview: cut_chars(m.preview, preview_chars),
        created_at,
    });
}

/// `text` cut to its first `chars` characters.
fn cut_chars(mut text: String, chars: usize) -> String {
    if let Some((at, _)) = text.char_indices().nth(chars) {
        text.truncate(at);
    }
    text
}

type Kept = Vec<(ConversationRow, Vec<StoredMessage>)>;

impl Messaging {
    /// Runs the filter chain in order. A failing plugin is skipped when its
    /// policy is fail-open; fail-closed refuses the whole answer.
    async fn apply_filters(
        &self,
        user: &str,
        device: Option<&str>,
        mut rows: Kept,
    ) -> Result<(Kept, Vec<ConversationRow>), MessagingError> {
        let mut dropped = Vec::new();
        if rows.is_empty() {
            return Ok((rows, dropped));
        }
        let chain = self.plugins.chain("conversation-filter");
        if chain.is_empty() {
            return Ok((rows, dropped));
        }
        let viewer = cf::Viewer {
            user_id: user.to_string(),
            device_id: device.map(str::to_string),
        };
        let preview_chars = self.config.load().messaging.preview_chars;
        for name in chain {
            if rows.is_empty() {
                break;
            }
            let input: Vec<cf::Conversation> = rows.iter().map(|(r, _)| to_wit(r)).collect();
            let answer = match self.plugins.filter(&name, &viewer, &input).await {
                Ok(verdicts) => check_rewrites(&verdicts).map(|()| verdicts),
                Err(failure) => Err(failure.to_string()),
            };
            match answer {
                Ok(verdicts) => {
                    let mut next = Vec::with_capacity(rows.len());
                    for ((mut row, messages), verdict) in rows.into_iter().zip(verdicts) {
                        match verdict {
                            cf::Verdict::Keep => next.push((row, messages)),
                            cf::Verdict::Drop => dropped.push(row),
                            cf::Verdict::Rewrite(c) => {
                                apply_rewrite(&mut row, c, preview_chars);
                                next.push((row, messages));
                            }
                        }
                    }
                    rows = next;
                }
                Err(failure) => match self.plugins.on_error(&name, "conversation-filter") {
                    OnError::FailOpen => {
                        tracing::warn!(plugin = %name, user_id = %user, error = %failure,
                        "conversation filter failed; fail-open: the list goes on unfiltered by it");
                    }
                    OnError::FailClosed => {
                        tracing::warn!(plugin = %name, user_id = %user, error = %failure,
                        "conversation filter failed; fail-closed: the list is refused");
                        return Err(MessagingError::FilterFailed {
                            plugin: name,
                            reason: failure,
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
        &self,
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
        let Some(row) = self
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
        let body = self.change_body(user, device, row.clone()).await?;
        // Every other device learns the new state; a filter failure there only
        // skips the push (those devices see it at their next sync).
        let others = self
            .delivery
            .online(Some(user))
            .await
            .iter()
            .any(|c| Some(c.connection_id.as_str()) != origin);
        if others {
            if let Ok(push) = self.change_body(user, None, row).await {
                let push = Push::ConversationChanged(push);
                self.delivery
                    .to_user(user, &push, Lane::Normal, origin)
                    .await;
            }
        }
        Ok(body)
    }

    async fn change_body(
        &self,
        user: &str,
        device: Option<&str>,
        row: ConversationRow,
    ) -> Result<Value, MessagingError> {
        let version = row.version;
        let (conversations, removed) = match row.state {
            RowState::Live => {
                let (kept, dropped) = self
                    .apply_filters(user, device, vec![(row, Vec::new())])
                    .await?;
                (
                    kept.iter()
                        .map(|(r, _)| render::conversation_json(r))
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
