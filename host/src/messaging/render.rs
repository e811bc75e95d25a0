//! JSON views of messages and conversations, shared by client frames and the
//! server API (a frame is the API body plus `type` and `id`).
//!
//! Every view is for one viewer: a person channel's `channel_id` is the
//! other user as the viewer sees it. A message's payload is embedded as the
//! raw text it was stored as, never parsed again on the way out, so what a
//! client gets is byte for byte what was accepted.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::storage::messages::{ChannelType, ConversationRow, LastMessage, StoredMessage};

/// A message as clients and the API see it.
#[derive(Serialize)]
pub struct MessageView<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub frame_type: Option<&'static str>,
    pub message_id: &'a str,
    pub channel_type: ChannelType,
    pub channel_id: String,
    pub sender: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
    pub seq: u64,
    pub version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<&'a str>,
    pub payload: &'a RawValue,
    pub created_at: String,
}

pub fn message_view<'a>(
    m: &'a StoredMessage,
    viewer: &str,
    frame_type: Option<&'static str>,
) -> MessageView<'a> {
    MessageView {
        frame_type,
        message_id: &m.id,
        channel_type: m.channel.kind,
        channel_id: m.channel.id_for(viewer),
        sender: &m.sender,
        system: m.system,
        seq: m.seq,
        version: m.version,
        client_msg_id: m.client_msg_id.as_deref(),
        payload: &m.payload,
        created_at: crate::rfc3339_ms(m.created_at),
    }
}

/// JSON text of a view. The views hold only strings, numbers, booleans and
/// raw JSON, which serde_json always writes, so this cannot fail.
pub fn text_of<T: Serialize>(view: &T) -> String {
    serde_json::to_string(view).expect("views of strings, numbers and raw JSON always serialise")
}

/// A view as one raw JSON value, to measure and embed in a page.
pub fn raw_of<T: Serialize>(view: &T) -> Box<RawValue> {
    RawValue::from_string(text_of(view)).expect("serde_json writes JSON")
}

/// One message of a page for `viewer`, as raw JSON.
pub fn message_raw(m: &StoredMessage, viewer: &str) -> Box<RawValue> {
    raw_of(&message_view(m, viewer, None))
}

/// How many items, taken in the order given, fit in `budget` bytes with a
/// separator each; always at least one, so that a page always moves on (a
/// single item fits every frame by the payload limits).
pub fn fitting(sizes: impl Iterator<Item = usize>, budget: usize) -> usize {
    let mut used = 0usize;
    let mut n = 0usize;
    for size in sizes {
        let next = used.saturating_add(size + 1);
        if n > 0 && next > budget {
            break;
        }
        used = next;
        n += 1;
    }
    n
}

#[derive(Serialize)]
struct LastMessageView<'a> {
    message_id: &'a str,
    seq: u64,
    sender: &'a str,
    preview: &'a str,
    created_at: String,
}

fn last_message_view(m: &LastMessage) -> LastMessageView<'_> {
    LastMessageView {
        message_id: &m.id,
        seq: m.seq,
        sender: &m.sender,
        preview: &m.preview,
        created_at: crate::rfc3339_ms(m.created_at),
    }
}

/// One conversation of a list as clients and the API see it.
#[derive(Serialize)]
struct ConversationView<'a> {
    channel_type: ChannelType,
    channel_id: &'a str,
    unread: u64,
    read_seq: u64,
    version: u64,
    updated_at: String,
    last_message: Option<LastMessageView<'a>>,
    /// Its newest messages (oldest first), only when the caller asked for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<&'a [Box<RawValue>]>,
}

fn conversation_view<'a>(
    row: &'a ConversationRow,
    messages: Option<&'a [Box<RawValue>]>,
) -> ConversationView<'a> {
    ConversationView {
        channel_type: row.channel.kind,
        channel_id: &row.channel_id,
        unread: row.unread,
        read_seq: row.read_seq,
        version: row.version,
        updated_at: crate::rfc3339_ms(row.updated_at),
        last_message: row.last_message.as_ref().map(last_message_view),
        messages,
    }
}

/// One conversation of a list as raw JSON; `messages` (raw message views)
/// only when the caller asked for them.
pub fn conversation_raw(
    row: &ConversationRow,
    messages: Option<&[Box<RawValue>]>,
) -> Box<RawValue> {
    raw_of(&conversation_view(row, messages))
}

/// One conversation without messages, as a JSON value.
pub fn conversation_json(row: &ConversationRow) -> Value {
    json!(conversation_view(row, None))
}

/// An entry of a list's `removed`: the viewer no longer sees this conversation.
pub fn removed_json(row: &ConversationRow, reason: &str) -> Value {
    json!({
        "channel_type": row.channel.kind,
        "channel_id": row.channel_id,
        "version": row.version,
        "reason": reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_counts_whole_items_and_always_one() {
        assert_eq!(fitting([10, 10, 10].into_iter(), 33), 3);
        assert_eq!(fitting([10, 10, 10].into_iter(), 32), 2);
        assert_eq!(fitting([100, 1].into_iter(), 10), 1);
        assert_eq!(fitting(std::iter::empty(), 10), 0);
    }
}
