//! The JSON frame protocol of `GET /v1/ws` (documented in `docs/protocol.md`).
//!
//! Every frame is a JSON object in a text message with a `type` field.
//! This module parses client frames and builds server frames; it holds no
//! state and touches no socket.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::messaging::conversations::ListQuery;
use crate::messaging::SyncQuery;

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

/// Parses one client text message.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let err = |message: String, id: Option<Value>| FrameError {
        code: "malformed_frame",
        message,
        id,
    };
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
            // Serialised again without `type` and `id`, so the payload can be kept as raw JSON text.
            let mut frame: Value = value;
            if let Some(o) = frame.as_object_mut() {
                o.remove("type");
                o.remove("id");
            }
            let text = frame.to_string();
            let frame: SendFrame = serde_json::from_str(&text)
                .map_err(|e| err(format!("`send` frame: {e}"), id.clone()))?;
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

/// A server frame of `kind` made of `body`'s fields, answering frame `id`.
pub fn reply_frame(kind: &str, mut body: Value, id: Option<&Value>) -> String {
    if let Some(obj) = body.as_object_mut() {
        obj.insert("type".into(), Value::String(kind.to_string()));
    }
    with_id(body, id)
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
}
