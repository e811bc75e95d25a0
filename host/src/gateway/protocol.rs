//! The JSON frame protocol of `GET /v1/ws` (documented in `docs/protocol.md`).
//!
//! Every frame is a JSON object in a text message with a `type` field.
//! This module parses client frames and builds server frames; it holds no
//! state and touches no socket.

use serde::Deserialize;
use serde_json::{json, Value};

/// A frame from the client, as far as this module understands it.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// Application-level heartbeat for clients (browsers) that cannot see WebSocket pings.
    Ping { id: Option<Value> },
    /// Authentication after the upgrade, when the upgrade request carried no token.
    Auth { token: String, id: Option<Value> },
    /// A frame type this gateway does not handle.
    Unknown { kind: String, id: Option<Value> },
}

/// Why a text message is not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<Value>,
    id: Option<Value>,
    token: Option<Value>,
}

/// Parses one client text message.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| FrameError {
        code: "malformed_frame",
        message: format!("frame is not valid JSON: {e}"),
    })?;
    if !value.is_object() {
        return Err(FrameError {
            code: "malformed_frame",
            message: "frame must be a JSON object".into(),
        });
    }
    let env: Envelope = serde_json::from_value(value).map_err(|e| FrameError {
        code: "malformed_frame",
        message: e.to_string(),
    })?;
    let kind = match env.kind {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(FrameError {
                code: "malformed_frame",
                message: "`type` must be a string".into(),
            })
        }
        None => {
            return Err(FrameError {
                code: "malformed_frame",
                message: "frame has no `type` field".into(),
            })
        }
    };
    Ok(match kind.as_str() {
        "ping" => ClientFrame::Ping { id: env.id },
        "auth" => match env.token {
            Some(Value::String(token)) => ClientFrame::Auth { token, id: env.id },
            _ => {
                return Err(FrameError {
                    code: "malformed_frame",
                    message: "`auth` frame needs a string `token`".into(),
                })
            }
        },
        _ => ClientFrame::Unknown { kind, id: env.id },
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
            r#"{"type":"send"}"#,
            Ok(ClientFrame::Unknown {
                kind: "send".into(),
                id: None,
            }),
        );
        check("{", Err("malformed_frame"));
        check("[]", Err("malformed_frame"));
        check(r#"{"id":1}"#, Err("malformed_frame"));
        check(r#"{"type":3}"#, Err("malformed_frame"));
        check(r#"{"type":"auth"}"#, Err("malformed_frame"));
    }
}
