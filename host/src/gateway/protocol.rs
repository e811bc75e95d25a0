//! The JSON frame protocol of `GET /v1/ws` (documented in `docs/protocol.md`).
//!
//! Every frame is a JSON object in a text message with a `type` field.
//! This module parses client frames and builds server frames: the answers,
//! and every [`Push`] the delivery seam hands a connection
//! ([`push_frame`]). It is the one place domain values become wire text;
//! it holds no state and touches no socket.
//!
//! It also holds the one size relation of server frames ([`frame_limit`]):
//! the socket's write buffer is sized from it at the upgrade, pages
//! (`messages`, `conversations`) are cut to fit it, and a payload is never
//! larger than its payload limit, so every frame the server builds can be
//! written.

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::config::Config;
use crate::delivery::{ControlPush, Push};
use crate::json::{self, MAX_DEPTH};
use crate::messaging::conversations::{ListPage, ListQuery};
use crate::messaging::{render, SyncPage, SyncQuery};
use crate::storage::controls::Priority;
use crate::storage::messages::StoredMessage;

/// The smallest limit on a server frame: 1 MiB, the largest message that
/// common WebSocket clients accept by default (Python `websockets`, for one).
pub const MIN_FRAME_LIMIT: usize = 1 << 20;

/// Room kept in a frame for what it holds beside its payload or page items:
/// field names, ids (at most 128 bytes each, escaped), times, cursors.
pub const ENVELOPE: usize = 8 * 1024;

/// What the socket's write buffer holds beside one frame: the frame header
/// and the pong and close replies tungstenite may have queued.
pub const WRITE_SLACK: usize = 4 * 1024;

/// The largest text frame the server writes under `cfg` (documented in
/// `docs/protocol.md`, "Limits"): room for the largest payload (message or
/// control), the echo of a client frame's `id` (at most one client message)
/// and two envelopes, and never less than [`MIN_FRAME_LIMIT`]. Pages are cut
/// to fit it; one item always fits.
pub fn frame_limit(cfg: &Config) -> usize {
    let payload = cfg
        .messaging
        .max_payload_size
        .max(cfg.control.max_payload_size);
    MIN_FRAME_LIMIT.max(
        payload
            .saturating_add(cfg.gateway.max_message_size)
            .saturating_add(2 * ENVELOPE),
    )
}

/// The write buffer a connection gets at the upgrade: one frame of
/// [`frame_limit`] and the slack.
pub fn write_buffer_size(cfg: &Config) -> usize {
    frame_limit(cfg).saturating_add(WRITE_SLACK)
}

/// The largest frame a connection whose write buffer is `buffer` bytes can
/// take (the inverse of [`write_buffer_size`]).
pub fn frame_limit_of_buffer(buffer: usize) -> usize {
    buffer.saturating_sub(WRITE_SLACK)
}

/// The bytes a page's items may take in a frame of at most `frame_limit`
/// bytes that echoes `id`.
pub fn page_budget(frame_limit: usize, id: Option<&Value>) -> usize {
    let id_len = id.map_or(0, |v| v.to_string().len());
    frame_limit.saturating_sub(ENVELOPE).saturating_sub(id_len)
}

/// A frame from the client, as far as this module understands it.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// Application-level heartbeat for clients (browsers) that cannot see WebSocket pings.
    Ping { id: Option<Value> },
    /// Authentication after the upgrade, when the upgrade request carried no token.
    Auth { token: String, id: Option<Value> },
    /// Sends a message.
    Send { frame: SendFrame, id: Option<Value> },
    /// Acknowledges received messages (and, later, controls).
    Ack { frame: AckFrame, id: Option<Value> },
    /// Asks for messages after or before a position.
    Sync { query: SyncQuery, id: Option<Value> },
    /// Asks for the conversation list, or the changes since a version.
    SyncConversations { query: ListQuery, id: Option<Value> },
    /// Marks a conversation read.
    Read { frame: ReadFrame, id: Option<Value> },
    /// Deletes (`hide: false`) or hides a conversation for this user.
    RemoveConversation {
        frame: ChannelFrame,
        hide: bool,
        id: Option<Value>,
    },
    /// A frame type this gateway does not handle.
    Unknown { kind: String, id: Option<Value> },
}

/// The fields of a `send` frame.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendFrame {
    pub channel_type: String,
    pub channel_id: String,
    pub payload: Box<RawValue>,
    #[serde(default)]
    pub client_msg_id: Option<String>,
}

impl PartialEq for SendFrame {
    fn eq(&self, o: &Self) -> bool {
        self.channel_type == o.channel_type
            && self.channel_id == o.channel_id
            && self.payload.get() == o.payload.get()
            && self.client_msg_id == o.client_msg_id
    }
}

/// The fields of an `ack` frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckFrame {
    /// Messages received, by id.
    #[serde(default)]
    pub message_ids: Vec<String>,
    /// Everything up to this version was received.
    #[serde(default)]
    pub version: Option<u64>,
    /// A control message received (its receipt, when it asked for one).
    #[serde(default)]
    pub control_id: Option<String>,
}

/// The fields of a `read` frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFrame {
    pub channel_type: String,
    pub channel_id: String,
    /// Read up to this sequence number; the last message when absent.
    #[serde(default)]
    pub seq: Option<u64>,
}

/// A frame naming one conversation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelFrame {
    pub channel_type: String,
    pub channel_id: String,
}

impl ClientFrame {
    /// The frame's `id`, echoed by its answer.
    pub fn id(&self) -> Option<&Value> {
        match self {
            ClientFrame::Ping { id }
            | ClientFrame::Auth { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::Ack { id, .. }
            | ClientFrame::Sync { id, .. }
            | ClientFrame::SyncConversations { id, .. }
            | ClientFrame::Read { id, .. }
            | ClientFrame::RemoveConversation { id, .. }
            | ClientFrame::Unknown { id, .. } => id.as_ref(),
        }
    }
}

/// A `send` frame as it arrives, read straight from the text so that the
/// payload is kept byte for byte as the client wrote it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendWire {
    #[serde(rename = "type")]
    _kind: IgnoredAny,
    #[serde(default, rename = "id")]
    _id: IgnoredAny,
    channel_type: String,
    channel_id: String,
    payload: Box<RawValue>,
    #[serde(default)]
    client_msg_id: Option<String>,
}

/// Only the `id` of a frame; every other field is skipped without being
/// parsed (serde_json skips iteratively, at any depth).
#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<Value>,
}

/// Why a text message is not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
    /// The frame's `id`, when it could be read.
    pub id: Option<Value>,
}

/// Reads a frame's fields, less `type` and `id`.
fn fields<T: DeserializeOwned>(
    mut value: Value,
    kind: &str,
    id: &Option<Value>,
) -> Result<T, FrameError> {
    if let Some(obj) = value.as_object_mut() {
        obj.remove("type");
        obj.remove("id");
    }
    serde_json::from_value(value).map_err(|e| FrameError {
        code: "malformed_frame",
        message: format!("`{kind}` frame: {e}"),
        id: id.clone(),
    })
}

/// Parses one client text message. A frame nested deeper than
/// [`MAX_DEPTH`] (its own object counting as 1) is refused with `too_deep`
/// before it is parsed.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let err = |message: String, id: Option<Value>| FrameError {
        code: "malformed_frame",
        message,
        id,
    };
    if let Err(e) = json::check_depth(text, MAX_DEPTH) {
        let id = serde_json::from_str::<IdOnly>(text).ok().and_then(|f| f.id);
        return Err(FrameError {
            code: "too_deep",
            message: format!("frame: {e}"),
            id,
        });
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| err(format!("frame is not valid JSON: {e}"), None))?;
    let Some(obj) = value.as_object() else {
        return Err(err("frame must be a JSON object".into(), None));
    };
    let id = obj.get("id").cloned();
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(err("`type` must be a string".into(), id)),
        None => return Err(err("frame has no `type` field".into(), id)),
    };
    Ok(match kind.as_str() {
        "ping" => ClientFrame::Ping { id },
        "auth" => match obj.get("token") {
            Some(Value::String(token)) => ClientFrame::Auth {
                token: token.clone(),
                id,
            },
            _ => return Err(err("`auth` frame needs a string `token`".into(), id)),
        },
        "send" => {
            // Read again from the text itself, so the payload is stored as the client wrote it.
            let wire: SendWire = serde_json::from_str(text)
                .map_err(|e| err(format!("`send` frame: {e}"), id.clone()))?;
            let frame = SendFrame {
                channel_type: wire.channel_type,
                channel_id: wire.channel_id,
                payload: wire.payload,
                client_msg_id: wire.client_msg_id,
            };
            ClientFrame::Send { frame, id }
        }
        "ack" => ClientFrame::Ack {
            frame: fields(value, &kind, &id)?,
            id,
        },
        "sync" => ClientFrame::Sync {
            query: fields(value, &kind, &id)?,
            id,
        },
        "sync_conversations" => ClientFrame::SyncConversations {
            query: fields(value, &kind, &id)?,
            id,
        },
        "read" => ClientFrame::Read {
            frame: fields(value, &kind, &id)?,
            id,
        },
        "delete_conversation" | "hide_conversation" => ClientFrame::RemoveConversation {
            frame: fields(value, &kind, &id)?,
            hide: kind == "hide_conversation",
            id,
        },
        _ => ClientFrame::Unknown { kind, id },
    })
}

fn with_id(mut frame: Value, id: Option<&Value>) -> String {
    if let (Some(id), Some(obj)) = (id, frame.as_object_mut()) {
        obj.insert("id".into(), id.clone());
    }
    frame.to_string()
}

/// `error` frame; `id` echoes the client frame's id when it had one.
pub fn error_frame(code: &str, message: &str, id: Option<&Value>) -> String {
    with_id(
        json!({ "type": "error", "code": code, "message": message }),
        id,
    )
}

/// `error` frame sent instead of a frame of `size` bytes that this
/// connection cannot write (`limit`).
pub fn frame_too_large(size: usize, limit: usize, id: Option<&Value>) -> String {
    error_frame(
        "frame_too_large",
        &format!(
            "the answer is {size} bytes, more than this connection's frame limit of {limit}; \
             reconnect to get the limits in force now"
        ),
        id,
    )
}

/// A server frame of `kind` made of `body`'s fields, answering frame `id`.
pub fn reply_frame(kind: &str, mut body: Value, id: Option<&Value>) -> String {
    if let Some(obj) = body.as_object_mut() {
        obj.insert("type".into(), Value::String(kind.to_string()));
    }
    with_id(body, id)
}

/// A frame of `kind` answering frame `id`, made of `body`'s fields.
#[derive(Serialize)]
struct Framed<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    #[serde(flatten)]
    body: &'a T,
}

fn framed<T: Serialize>(kind: &'static str, body: &T, id: Option<&Value>) -> String {
    render::text_of(&Framed { kind, id, body })
}

/// The `messages` frame: a sync page answering frame `id`.
pub fn messages_frame(page: &SyncPage, id: Option<&Value>) -> String {
    framed("messages", page, id)
}

/// The `conversations` frame: a conversation page answering frame `id`.
pub fn conversations_frame(page: &ListPage, id: Option<&Value>) -> String {
    framed("conversations", page, id)
}

/// The frame of a push, as `viewer`'s connections get it.
pub fn push_frame(push: &Push, viewer: &str) -> String {
    match push {
        Push::Message(m) => message_frame(m, viewer),
        Push::ConversationChanged(body) => {
            let mut frame = body.clone();
            if let Some(obj) = frame.as_object_mut() {
                obj.insert("type".into(), json!("conversations"));
                obj.insert("event".into(), json!("changed"));
            }
            frame.to_string()
        }
        Push::Control(c) => control_frame(c),
    }
}

/// The `message` frame of a committed message, for `viewer`.
pub fn message_frame(m: &StoredMessage, viewer: &str) -> String {
    render::text_of(&render::message_view(m, viewer, Some("message")))
}

#[derive(Serialize)]
struct ControlFrame<'a> {
    #[serde(rename = "type")]
    frame_type: &'static str,
    control_id: &'a str,
    kind: &'a str,
    payload: &'a RawValue,
    priority: Priority,
    receipt: bool,
    persisted: bool,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    redelivery: bool,
}

/// The `control` frame, its payload embedded as stored.
pub fn control_frame(c: &ControlPush) -> String {
    render::text_of(&ControlFrame {
        frame_type: "control",
        control_id: &c.control_id,
        kind: &c.kind,
        payload: &c.payload,
        priority: c.priority,
        receipt: c.receipt,
        persisted: c.persisted,
        created_at: crate::rfc3339_ms(c.created_at),
        expires_at: c.expires_at.map(crate::rfc3339_ms),
        redelivery: c.redelivery,
    })
}

/// `meta` frame answering an application `ping`.
pub fn heartbeat_frame(id: Option<&Value>) -> String {
    with_id(
        json!({ "type": "meta", "event": "heartbeat", "server_time": crate::now_ms() }),
        id,
    )
}

/// `meta` frame sent once a connection is open.
pub fn connect_frame(
    connection_id: &str,
    user_id: &str,
    device_id: &str,
    ping_interval_ms: u64,
    pong_timeout_ms: u64,
) -> String {
    json!({
        "type": "meta",
        "event": "connect",
        "connection_id": connection_id,
        "user_id": user_id,
        "device_id": device_id,
        "server_time": crate::now_ms(),
        "heartbeat": { "ping_interval_ms": ping_interval_ms, "pong_timeout_ms": pong_timeout_ms },
    })
    .to_string()
}

/// `meta` frame telling the client why the server is closing its connection.
/// `event` is `disable`, `shutdown` or `disconnect`.
pub fn closing_frame(event: &str, reason: &str, code: u16, message: &str) -> String {
    json!({
        "type": "meta",
        "event": event,
        "reason": reason,
        "code": code,
        "message": message,
        "server_time": crate::now_ms(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(input: &str, expect: Result<ClientFrame, &str>) {
        let got = parse_client_frame(input);
        match (got, expect) {
            (Ok(g), Ok(e)) => assert_eq!(g, e),
            (Err(g), Err(code)) => assert_eq!(g.code, code, "{}", g.message),
            (g, e) => panic!("{input}: got {g:?}, expected {e:?}"),
        }
    }

    #[test]
    fn parses_frames() {
        check(r#"{"type":"ping"}"#, Ok(ClientFrame::Ping { id: None }));
        check(
            r#"{"type":"ping","id":7}"#,
            Ok(ClientFrame::Ping { id: Some(json!(7)) }),
        );
        check(
            r#"{"type":"auth","token":"t"}"#,
            Ok(ClientFrame::Auth {
                token: "t".into(),
                id: None,
            }),
        );
        check(
            r#"{"type":"teleport"}"#,
            Ok(ClientFrame::Unknown {
                kind: "teleport".into(),
                id: None,
            }),
        );
        check(r#"{"type":"send","id":1}"#, Err("malformed_frame"));
        check(
            r#"{"type":"send","channel_type":"person","channel_id":"bob","payload":{},"colour":1}"#,
            Err("malformed_frame"),
        );
        check(
            r#"{"type":"sync","after_sequence":3}"#,
            Err("malformed_frame"),
        );
        check(
            r#"{"type":"read","channel_id":"g"}"#,
            Err("malformed_frame"),
        );
        check("{", Err("malformed_frame"));
        check("[]", Err("malformed_frame"));
        check(r#"{"id":1}"#, Err("malformed_frame"));
        check(r#"{"type":3}"#, Err("malformed_frame"));
        check(r#"{"type":"auth"}"#, Err("malformed_frame"));
    }

    #[test]
    fn send_frames_keep_the_payload_and_the_id() {
        let frame = parse_client_frame(
            r#"{"type":"send","id":"a1","channel_type":"group","channel_id":"g1","client_msg_id":"c1","payload":{"text":"hi","n":[1,2]}}"#,
        )
        .unwrap();
        let ClientFrame::Send { frame, id } = frame else {
            panic!("not a send: {frame:?}")
        };
        assert_eq!(id, Some(json!("a1")));
        assert_eq!(frame.channel_id, "g1");
        assert_eq!(frame.client_msg_id.as_deref(), Some("c1"));
        assert_eq!(
            serde_json::from_str::<Value>(frame.payload.get()).unwrap(),
            json!({"text": "hi", "n": [1, 2]})
        );
        // An error on a frame with an id echoes it.
        let e = parse_client_frame(r#"{"type":"sync","id":9,"limit":"x"}"#).unwrap_err();
        assert_eq!(e.id, Some(json!(9)));
    }

    #[test]
    fn send_payloads_are_kept_as_written() {
        let text = r#"{"type":"send","id":2,"channel_type":"person","channel_id":"bob","payload":{"z": 1.50, "a":[1,"\u00e9"]}}"#;
        let ClientFrame::Send { frame, .. } = parse_client_frame(text).unwrap() else {
            panic!("not a send")
        };
        assert_eq!(frame.payload.get(), r#"{"z": 1.50, "a":[1,"\u00e9"]}"#);
    }

    #[test]
    fn frames_deeper_than_the_limit_are_refused_before_parsing() {
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        // The frame's own object is one level; 129 levels would also break serde_json.
        for depth in [MAX_DEPTH, 128, 500] {
            let text = format!(
                r#"{{"type":"send","id":"d1","channel_type":"person","channel_id":"bob","payload":{}}}"#,
                nest(depth)
            );
            let e = parse_client_frame(&text).unwrap_err();
            assert_eq!((e.code, e.id), ("too_deep", Some(json!("d1"))), "{depth}");
        }
        let text = format!(
            r#"{{"type":"send","channel_type":"person","channel_id":"bob","payload":{}}}"#,
            nest(MAX_DEPTH - 1)
        );
        assert!(parse_client_frame(&text).is_ok());
    }

    #[test]
    fn the_frame_limit_holds_the_largest_payload_and_an_echoed_id() {
        let mut cfg = Config::default();
        assert_eq!(frame_limit(&cfg), MIN_FRAME_LIMIT);
        cfg.messaging.max_payload_size = 4 << 20;
        let limit = frame_limit(&cfg);
        assert_eq!(
            limit,
            (4 << 20) + cfg.gateway.max_message_size + 2 * ENVELOPE
        );
        assert_eq!(frame_limit_of_buffer(write_buffer_size(&cfg)), limit);
        // One item of the largest payload fits a page that echoes the largest id.
        let id = json!("x".repeat(cfg.gateway.max_message_size - 16));
        assert!(page_budget(limit, Some(&id)) >= (4 << 20) + ENVELOPE - 16);
    }

    #[test]
    fn answers_are_framed_with_type_and_id_first_and_raw_items_kept() {
        #[derive(Serialize)]
        struct Page {
            #[serde(skip_serializing_if = "Option::is_none")]
            channel_id: Option<String>,
            items: Vec<Box<RawValue>>,
            more: bool,
        }
        let page = Page {
            channel_id: None,
            items: vec![RawValue::from_string(r#"{"z": 1.50}"#.into()).unwrap()],
            more: true,
        };
        assert_eq!(
            framed("messages", &page, Some(&json!(7))),
            r#"{"type":"messages","id":7,"items":[{"z": 1.50}],"more":true}"#
        );
        assert_eq!(
            framed("messages", &page, None),
            r#"{"type":"messages","items":[{"z": 1.50}],"more":true}"#
        );
    }

    #[test]
    fn pushes_render_as_their_frames() {
        let changed = Push::ConversationChanged(json!({"version": 3, "removed": []}));
        assert_eq!(
            push_frame(&changed, "alice"),
            r#"{"event":"changed","removed":[],"type":"conversations","version":3}"#
        );
        let control = Push::Control(ControlPush {
            control_id: "ctl_1".into(),
            kind: "k".into(),
            payload: RawValue::from_string(r#"{"a": 1}"#.into()).unwrap(),
            priority: Priority::High,
            receipt: true,
            persisted: false,
            created_at: 0,
            expires_at: None,
            redelivery: false,
        });
        assert_eq!(
            push_frame(&control, "alice"),
            r#"{"type":"control","control_id":"ctl_1","kind":"k","payload":{"a": 1},"priority":"high","receipt":true,"persisted":false,"created_at":"1970-01-01T00:00:00.000Z"}"#
        );
    }
}
