//! JSON views of messages and conversations, shared by client frames and the
//! server API (a frame is the API body plus `type` and `id`).
//!
//! Every view is for one viewer: a person channel's `channel_id` is the
//! other user as the viewer sees it.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::storage::messages::{ChannelType, ConversationRow, LastMessage, StoredMessage};

/// A message as clients and the API see it. The payload is embedded as
/// stored, without being parsed again.
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

/// The stored payload as a raw JSON value (stored payloads were validated
/// when sent; a damaged one shows as `null` rather than failing the frame).
fn raw_payload(text: &str) -> &RawValue {
    serde_json::from_str::<&RawValue>(text)
        .unwrap_or_else(|_| serde_json::from_str::<&RawValue>("null").expect("`null` is JSON"))
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
        payload: raw_payload(&m.payload),
        created_at: crate::rfc3339_ms(m.created_at),
    }
}

/// The `message` frame pushed to `viewer`'s connections.
pub fn message_frame(m: &StoredMessage, viewer: &str) -> String {
    serde_json::to_string(&message_view(m, viewer, Some("message"))).unwrap_or_else(|_| "{}".into())
}

/// Messages as a JSON array value for `viewer`.
pub fn messages_json(messages: &[StoredMessage], viewer: &str) -> Value {
    Value::Array(
        messages
            .iter()
            .map(|m| serde_json::to_value(message_view(m, viewer, None)).unwrap_or(Value::Null))
            .collect(),
    )
}

fn last_message_json(m: &LastMessage) -> Value {
    json!({
        "message_id": m.id,
        "seq": m.seq,
        "sender": m.sender,
        "preview": m.preview,
        "created_at": crate::rfc3339_ms(m.created_at),
    })
}

/// One conversation of a list; `messages` only when the caller asked for them.
pub fn conversation_json(row: &ConversationRow, messages: Option<&[StoredMessage]>) -> Value {
    let mut v = json!({
        "channel_type": row.channel.kind,
        "channel_id": row.channel_id,
        "unread": row.unread,
        "read_seq": row.read_seq,
        "version": row.version,
        "updated_at": crate::rfc3339_ms(row.updated_at),
        "last_message": row.last_message.as_ref().map(last_message_json),
    });
    if let (Some(messages), Some(obj)) = (messages, v.as_object_mut()) {
        obj.insert("messages".into(), messages_json(messages, &row.user_id));
    }
    v
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
