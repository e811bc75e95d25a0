//! The session task: the one owner of a client socket.
//!
//! It records the open, then loops over: close requests from the rest of the
//! gateway, the token's expiry, server pings and the pong deadline, frames
//! queued for the client, and frames from the client. Whatever ends the loop
//! becomes exactly one recorded close; only then does the task finish the
//! close handshake (sending a `meta` frame and a close frame with a real
//! code when the server ends it) and keep reading until the peer closes or
//! `close_timeout` passes. tungstenite only queues its close and pong
//! replies, so the task reads to the end instead of stopping at the first
//! close frame; after a protocol error, when tungstenite reads no more, the
//! socket's [`Tap`] reads on to the client's close. A connection upgraded
//! without a token gets here through [`super::auth_frame`] first.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::lifecycle::{CloseReason, Closed};
use super::protocol::{self, ClientFrame};
use super::registry::{CloseCommand, Displaced, LiveSession, Queues};
use super::wire::Tap;
use super::Gateway;
use crate::events::CloseInfo;
use crate::messaging::{MessagingError, SendRequest};
use crate::storage::messages::RowChange;
use crate::storage::StorageError;

pub type WsStream = WebSocketStream<Tap<TokioIo<Upgraded>>>;

/// A session admitted by the registry, waiting to be opened.
pub struct Admitted {
    pub live: Arc<LiveSession>,
    pub outbound: Queues,
    pub close: oneshot::Receiver<CloseCommand>,
    /// Unix seconds when the token expires.
    pub token_exp: Option<u64>,
    /// What the multi-device policy displaces once this one is open.
    pub displaces: Displaced,
}

/// How the main loop ended.
pub(super) enum End {
    /// The client sent a close frame.
    Client { code: u16, reason: String },
    /// The server decided to close (request, timer).
    Server {
        reason: CloseReason,
        message: String,
    },
    /// The client broke a rule the server answers with a close code.
    Violation {
        reason: CloseReason,
        message: String,
    },
    /// The socket is gone.
    Abnormal { message: String },
}

/// Runs an admitted session until it is closed. The caller already did
/// the upgrade and authentication; nothing is recorded before this.
pub async fn run(gw: Arc<Gateway>, mut ws: WsStream, adm: Admitted) {
    let Admitted {
        live,
        mut outbound,
        mut close,
        token_exp,
        displaces,
    } = adm;
    let started = StdInstant::now();
    if let Err(e) = gw
        .lifecycle
        .record_open(
            &live.connection_id,
            &live.user_id,
            &live.device_id,
            &live.remote_addr,
        )
        .await
    {
        gw.registry.remove(&live);
        if matches!(e, StorageError::Commit(_)) {
            // The commit's answer was lost: the open may have been recorded.
            // A queued close writes `connection.closed` if it was, and
            // nothing if it was not, so the lifecycle stays exactly-once.
            gw.lifecycle.queue_close(
                &live.connection_id,
                CloseInfo {
                    reason: CloseReason::ServerError,
                    code: CloseReason::ServerError.code(),
                    message: "the open could not be confirmed by storage".to_string(),
                },
                crate::now_ms(),
            );
        }
        return refuse_unrecorded(&gw, &mut ws, &live, e).await;
    }
    live.mark_opened();
    // Persisted controls waiting for this user go out once the loop runs.
    tokio::spawn(
        gw.control
            .clone()
            .deliver_pending(live.user_id.clone(), live.connection_id.clone()),
    );
    gw.metrics
        .open_latency_seconds
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        connection_id = %live.connection_id, user_id = %live.user_id,
        device_id = %live.device_id, remote = %live.remote_addr, "connection opened"
    );
    let replaced = format!(
        "replaced by connection {} of the same user",
        live.connection_id
    );
    for victim in &displaces.local {
        victim.request_close(CloseReason::Replaced, replaced.clone());
    }
    for id in &displaces.elsewhere {
        gw.delivery()
            .kick_connection(&live.user_id, id, CloseReason::Replaced, &replaced)
            .await;
    }

    let cfg = gw.config();
    let connect = protocol::connect_frame(
        &live.connection_id,
        &live.user_id,
        &live.device_id,
        cfg.gateway.ping_interval.as_millis() as u64,
        cfg.gateway.pong_timeout.as_millis() as u64,
    );
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    // Tokens are accepted up to `token_leeway` past `exp`, so they expire then too.
    let expiry = token_exp
        .map(|exp| {
            instant_of_unix(exp.saturating_add(crate::auth::leeway_secs(cfg.auth.token_leeway)))
        })
        .unwrap_or(far);
    let mut next_ping = Instant::now() + cfg.gateway.ping_interval;
    let mut pong_deadline: Option<Instant> = None;

    let end = match send(&mut ws, Message::text(connect), cfg.gateway.write_timeout).await {
        Err(end) => end,
        Ok(()) => loop {
            tokio::select! {
                biased;
                cmd = &mut close => {
                    break match cmd {
                        Ok(c) => End::Server { reason: c.reason, message: c.message },
                        Err(_) => End::Server { reason: CloseReason::ServerError, message: "session handle dropped".into() },
                    };
                }
                _ = sleep_until(expiry) => {
                    break End::Server { reason: CloseReason::TokenExpired, message: "the token expired".into() };
                }
                _ = sleep_until(pong_deadline.unwrap_or(far)) => {
                    break End::Server {
                        reason: CloseReason::HeartbeatTimeout,
                        message: "no answer to ping within the heartbeat timeout".into(),
                    };
                }
                _ = sleep_until(next_ping) => {
                    // Heartbeat settings are read at each ping, so a reload applies to live connections.
                    let g = gw.config().gateway.clone();
                    let now = Instant::now();
                    if pong_deadline.is_none() {
                        pong_deadline = Some(now + g.pong_timeout);
                    }
                    next_ping = now + g.ping_interval;
                    if let Err(end) = send(&mut ws, Message::Ping(Default::default()), g.write_timeout).await {
                        break end;
                    }
                }
                frame = outbound.urgent.recv() => {
                    let Some(frame) = frame else { continue };
                    if let Err(end) = send(&mut ws, frame, gw.config().gateway.write_timeout).await {
                        break end;
                    }
                }
                frame = outbound.normal.recv() => {
                    let Some(frame) = frame else { continue };
                    if let Err(end) = send(&mut ws, frame, gw.config().gateway.write_timeout).await {
                        break end;
                    }
                }
                msg = ws.next() => {
                    match msg {
                        None => break End::Abnormal { message: "connection ended without a close frame".into() },
                        Some(Err(e)) => break map_error(e),
                        Some(Ok(msg)) => {
                            // Any frame is a sign of life.
                            pong_deadline = None;
                            if let Err(end) = handle_message(&gw, &live, &mut ws, msg).await {
                                break end;
                            }
                        }
                    }
                }
            }
        },
    };

    let (reason, code, message) = match &end {
        End::Client { code, reason } => (CloseReason::ClientClose, *code, reason.clone()),
        End::Server { reason, message } | End::Violation { reason, message } => {
            (*reason, reason.code(), message.clone())
        }
        End::Abnormal { message } => (CloseReason::Abnormal, 1006, message.clone()),
    };
    let info = CloseInfo {
        reason,
        code,
        message: message.clone(),
    };
    match gw.lifecycle.close(&live.connection_id, info).await {
        Closed::Recorded => tracing::info!(
            connection_id = %live.connection_id, user_id = %live.user_id,
            reason = reason.as_str(), code, detail = %message, "connection closed"
        ),
        Closed::AlreadyClosed => {
            tracing::debug!(connection_id = %live.connection_id, "close already recorded")
        }
        Closed::Queued(e) => tracing::error!(
            connection_id = %live.connection_id, user_id = %live.user_id,
            reason = reason.as_str(), code, error = %e,
            "cannot record closed connection yet; it is recorded once storage takes it"
        ),
    }
    gw.registry.remove(&live);

    let g = gw.config().gateway.clone();
    match end {
        End::Client { .. } => {}
        End::Server { reason, message } => {
            if let Some(event) = reason.meta_event() {
                let frame = protocol::closing_frame(event, reason.as_str(), code, &message);
                let _ = send(&mut ws, Message::text(frame), g.write_timeout).await;
            }
            let _ = send(&mut ws, close_message(code, &message), g.write_timeout).await;
        }
        End::Violation { message, .. } => {
            let _ = send(&mut ws, close_message(code, &message), g.write_timeout).await;
        }
        End::Abnormal { .. } => return,
    }
    drain(&mut ws, g.close_timeout).await;
}

/// Handles one frame from an open connection.
async fn handle_message(
    gw: &Gateway,
    live: &LiveSession,
    ws: &mut WsStream,
    msg: Message,
) -> Result<(), End> {
    let write_timeout = gw.config().gateway.write_timeout;
    match msg {
        Message::Text(text) => {
            let reply = match protocol::parse_client_frame(text.as_str()) {
                Ok(frame) => {
                    let limit = frame_limit(ws);
                    let id = frame.id().cloned();
                    handle_frame(gw, live, frame, limit).await.map(|reply| {
                        if reply.len() <= limit {
                            return reply;
                        }
                        gw.metrics.frame_error("frame_too_large");
                        protocol::frame_too_large(reply.len(), limit, id.as_ref())
                    })
                }
                Err(e) => {
                    gw.metrics.frame_error(e.code);
                    Some(protocol::error_frame(e.code, &e.message, e.id.as_ref()))
                }
            };
            match reply {
                Some(reply) => send(ws, Message::text(reply), write_timeout).await,
                None => Ok(()),
            }
        }
        Message::Binary(_) => {
            gw.metrics.frame_error("binary_not_supported");
            let reply = protocol::error_frame(
                "binary_not_supported",
                "binary frames are not supported: send JSON in text frames",
                None,
            );
            send(ws, Message::text(reply), write_timeout).await
        }
        Message::Close(frame) => Err(End::Client {
            code: frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005),
            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
        }),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
    }
}

/// Answers one parsed client frame (`None`: no answer). Pages are cut to
/// fit `limit`, the largest frame this connection can write.
async fn handle_frame(
    gw: &Gateway,
    live: &LiveSession,
    frame: ClientFrame,
    limit: usize,
) -> Option<String> {
    let metrics = &gw.metrics;
    let count = |k: &str| metrics.frames_received.get_or_create(&kind(k)).inc();
    let failed = |e: MessagingError, id: Option<&serde_json::Value>| error_reply(gw, e, id);
    let user = live.user_id.as_str();
    let device = Some(live.device_id.as_str());
    Some(match frame {
        ClientFrame::Ping { id } => {
            count("ping");
            protocol::heartbeat_frame(id.as_ref())
        }
        ClientFrame::Auth { id, .. } => {
            count("auth");
            metrics.frame_error("already_authenticated");
            protocol::error_frame(
                "already_authenticated",
                "this connection is already authenticated",
                id.as_ref(),
            )
        }
        ClientFrame::Send { frame, id } => {
            count("send");
            let req = SendRequest {
                sender: live.user_id.clone(),
                system: false,
                channel_type: &frame.channel_type,
                channel_id: &frame.channel_id,
                payload: &frame.payload,
                client_msg_id: frame.client_msg_id.as_deref(),
                origin: Some(live.connection_id.clone()),
            };
            match gw.messaging.send(req).await {
                Ok(ack) => {
                    let outcome = if ack.duplicate { "duplicate" } else { "sent" };
                    metrics.message("ws", outcome);
                    protocol::reply_frame("sendack", ack.json(), id.as_ref())
                }
                Err(e) => {
                    metrics.message("ws", e.code());
                    failed(e, id.as_ref())
                }
            }
        }
        ClientFrame::Ack { frame, id } => {
            count("ack");
            metrics
                .messages_acked
                .inc_by(frame.message_ids.len().max(frame.version.map_or(0, |_| 1)) as u64);
            let control_id = frame.control_id.as_deref()?;
            return ack_control(gw, live, control_id, id.as_ref()).await;
        }
        ClientFrame::Sync { query, id } => {
            count("sync");
            let budget = protocol::page_budget(limit, id.as_ref());
            match gw.messaging.sync_page(user, &query, budget).await {
                Ok(page) => protocol::messages_frame(&page, id.as_ref()),
                Err(e) => failed(e, id.as_ref()),
            }
        }
        ClientFrame::SyncConversations { query, id } => {
            count("sync_conversations");
            let budget = protocol::page_budget(limit, id.as_ref());
            match gw.messaging.list_page(user, device, &query, budget).await {
                Ok(page) => protocol::conversations_frame(&page, id.as_ref()),
                Err(e) => failed(e, id.as_ref()),
            }
        }
        ClientFrame::Read { frame, id } => {
            count("read");
            let change = RowChange::Read(frame.seq);
            let (kind, channel) = (&frame.channel_type, &frame.channel_id);
            return Some(change_conversation(gw, live, kind, channel, change, id).await);
        }
        ClientFrame::RemoveConversation { frame, hide, id } => {
            let (label, change) = if hide {
                ("hide_conversation", RowChange::Hide)
            } else {
                ("delete_conversation", RowChange::Delete)
            };
            count(label);
            let (kind, channel) = (&frame.channel_type, &frame.channel_id);
            return Some(change_conversation(gw, live, kind, channel, change, id).await);
        }
        ClientFrame::Unknown { kind: k, id } => {
            count("unknown");
            metrics.frame_error("unknown_type");
            protocol::error_frame(
                "unknown_type",
                &format!("frame type `{k}` is not supported by this gateway"),
                id.as_ref(),
            )
        }
    })
}

/// Answers `read`, `hide_conversation` and `delete_conversation`.
async fn change_conversation(
    gw: &Gateway,
    live: &LiveSession,
    kind: &str,
    channel: &str,
    change: RowChange,
    id: Option<serde_json::Value>,
) -> String {
    let device = Some(live.device_id.as_str());
    let origin = Some(live.connection_id.as_str());
    let user = &live.user_id;
    match gw
        .messaging
        .change(user, device, origin, kind, channel, change)
        .await
    {
        Ok(body) => protocol::reply_frame("conversations", body, id.as_ref()),
        Err(e) => error_reply(gw, e, id.as_ref()),
    }
}

/// Records the receipt of an `ack` naming a control. An `ack` has no
/// answer, except an `error` frame `storage_unavailable` when storage could
/// not take the receipt (the client acks again); other failures are only
/// logged.
async fn ack_control(
    gw: &Gateway,
    live: &LiveSession,
    control_id: &str,
    id: Option<&serde_json::Value>,
) -> Option<String> {
    let (user, device, connection) = (&live.user_id, &live.device_id, &live.connection_id);
    match gw.control.ack(user, device, connection, control_id).await {
        Ok(_) => None,
        Err(e) if e.is_unavailable() => {
            tracing::warn!(control_id, error = %e, "storage unavailable: a control receipt was refused");
            let (code, message) = crate::unavailable::refusal(&e).unwrap_or_default();
            gw.metrics.frame_error(code);
            Some(protocol::error_frame(code, message, id))
        }
        Err(e) => {
            tracing::error!(control_id, error = %e, "cannot record a control receipt");
            None
        }
    }
}

/// The `error` frame answering a refused messaging request, counted.
fn error_reply(gw: &Gateway, e: MessagingError, id: Option<&serde_json::Value>) -> String {
    gw.metrics.frame_error(e.code());
    protocol::error_frame(e.code(), &e.public_message(), id)
}

/// Refuses a connection whose open storage did not record (nothing was
/// written, so it never opened): counted and told why. Storage that is
/// unavailable gets an `error` frame `storage_unavailable` and close 1013
/// (try again later); any other failure close 1011.
async fn refuse_unrecorded(gw: &Gateway, ws: &mut WsStream, live: &LiveSession, e: StorageError) {
    tracing::error!(connection_id = %live.connection_id, error = %e, "cannot record open connection; refusing it");
    let g = gw.config().gateway.clone();
    if e.is_unavailable() {
        gw.metrics.handshake_failed(crate::unavailable::CODE);
        let frame =
            protocol::error_frame(crate::unavailable::CODE, crate::unavailable::MESSAGE, None);
        let _ = send(ws, Message::text(frame), g.write_timeout).await;
        let _ = send(
            ws,
            close_message(1013, "storage unavailable"),
            g.write_timeout,
        )
        .await;
    } else {
        gw.metrics.handshake_failed("storage_error");
        let _ = send(
            ws,
            close_message(1011, "storage unavailable"),
            g.write_timeout,
        )
        .await;
    }
    drain(ws, g.close_timeout).await;
}

fn kind(k: &str) -> crate::metrics::FrameLabel {
    crate::metrics::FrameLabel {
        kind: k.to_string(),
    }
}

pub(super) fn map_error(e: WsError) -> End {
    match e {
        WsError::Capacity(c) => End::Violation {
            reason: CloseReason::MessageTooBig,
            message: c.to_string(),
        },
        WsError::Utf8 => End::Violation {
            reason: CloseReason::InvalidUtf8,
            message: "text message is not valid UTF-8".into(),
        },
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Abnormal {
            message: "connection reset without a close frame".into(),
        },
        WsError::Protocol(p) => End::Violation {
            reason: CloseReason::ProtocolError,
            message: p.to_string(),
        },
        WsError::Io(io) => End::Abnormal {
            message: format!("connection lost: {io}"),
        },
        WsError::ConnectionClosed | WsError::AlreadyClosed => End::Abnormal {
            message: "connection ended without a close frame".into(),
        },
        other => End::Violation {
            reason: CloseReason::ProtocolError,
            message: other.to_string(),
        },
    }
}

/// The largest text frame this connection can write, from the write buffer
/// it got at the upgrade.
fn frame_limit(ws: &WsStream) -> usize {
    protocol::frame_limit_of_buffer(ws.get_config().max_write_buffer_size)
}

/// Writes one message within the write timeout. A failed or slow write ends
/// the session. A text frame larger than the connection can write (a pushed
/// frame built after a reload raised a payload limit past what this
/// connection was opened with) is replaced by an `error` frame: a frame the
/// server built never ends the connection.
pub(super) async fn send(ws: &mut WsStream, msg: Message, limit: Duration) -> Result<(), End> {
    let room = frame_limit(ws);
    let msg = match msg {
        Message::Text(t) if t.len() > room => {
            tracing::warn!(
                bytes = t.len(),
                limit = room,
                "a server frame is larger than this connection can write; an error frame goes instead"
            );
            Message::text(protocol::frame_too_large(t.len(), room, None))
        }
        other => other,
    };
    match timeout(limit, ws.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Abnormal {
            message: format!("write failed: {e}"),
        }),
        Err(_) => Err(End::Server {
            reason: CloseReason::SlowConsumer,
            message: "a write to the client timed out".into(),
        }),
    }
}

/// A close frame with `code` and `reason` cut to the 123 bytes a close frame allows.
pub fn close_message(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason[..end].to_string().into(),
    }))
}

/// Reads (and discards) until the peer finishes the close handshake, the
/// stream ends, or `limit` passes. Reading is what flushes tungstenite's
/// queued close reply. tungstenite's stream ends at its first error (a
/// protocol violation, or one that came while draining); the tap then reads
/// on, from the frame boundary it followed, to the client's close frame, so
/// the client can read the server's close frame and answer it instead of
/// meeting a reset.
pub async fn drain(ws: &mut WsStream, limit: Duration) {
    let _ = timeout(limit, async {
        while let Some(Ok(_)) = ws.next().await {}
        // After a completed handshake the tap has seen the close: this returns at once.
        ws.get_mut().read_until_close().await;
    })
    .await;
}

fn instant_of_unix(secs: u64) -> Instant {
    let now_ms = crate::now_ms().max(0) as u64;
    let at_ms = secs.saturating_mul(1000);
    Instant::now() + Duration::from_millis(at_ms.saturating_sub(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::error::CapacityError;

    /// How an `End` closes: (recorded reason, close code the server sends
    /// or `None` when it sends none, message).
    fn closing(end: End) -> (&'static str, Option<u16>, String) {
        match end {
            End::Client { code, reason } => ("client_close", Some(code), reason),
            End::Server { reason, message } | End::Violation { reason, message } => {
                (reason.as_str(), Some(reason.code()), message)
            }
            End::Abnormal { message } => ("abnormal", None, message),
        }
    }

    #[track_caller]
    fn check_error(error: WsError, expect: (&str, Option<u16>, &str)) {
        let (reason, code, message) = closing(map_error(error));
        assert_eq!((reason, code, message.as_str()), expect);
    }

    #[test]
    fn read_errors_map_to_the_documented_close_causes() {
        check_error(
            WsError::Capacity(CapacityError::MessageTooLong {
                size: 70_000,
                max_size: 65_536,
            }),
            (
                "message_too_big",
                Some(1009),
                "Message too long: 70000 > 65536",
            ),
        );
        check_error(
            WsError::Utf8,
            (
                "invalid_utf8",
                Some(1007),
                "text message is not valid UTF-8",
            ),
        );
        check_error(
            WsError::Protocol(ProtocolError::UnmaskedFrameFromClient),
            (
                "protocol_error",
                Some(1002),
                &ProtocolError::UnmaskedFrameFromClient.to_string(),
            ),
        );
        check_error(
            WsError::AttackAttempt,
            (
                "protocol_error",
                Some(1002),
                &WsError::AttackAttempt.to_string(),
            ),
        );
        // The socket is gone: nothing is sent, the close is recorded as 1006.
        check_error(
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
            ("abnormal", None, "connection reset without a close frame"),
        );
        check_error(
            WsError::Io(std::io::ErrorKind::ConnectionReset.into()),
            ("abnormal", None, "connection lost: connection reset"),
        );
        for gone in [WsError::ConnectionClosed, WsError::AlreadyClosed] {
            check_error(
                gone,
                ("abnormal", None, "connection ended without a close frame"),
            );
        }
    }

    #[test]
    fn server_ends_carry_the_code_and_meta_event_of_the_close_code_table() {
        // protocol.md, "Close codes": reason, code, `meta` frame first.
        for (reason, name, code, meta) in [
            (
                CloseReason::HeartbeatTimeout,
                "heartbeat_timeout",
                4000,
                Some("disconnect"),
            ),
            (
                CloseReason::TokenExpired,
                "token_expired",
                4001,
                Some("disconnect"),
            ),
            (CloseReason::Kicked, "kicked", 4002, Some("disconnect")),
            (CloseReason::Replaced, "replaced", 4003, Some("disconnect")),
            (
                CloseReason::SlowConsumer,
                "slow_consumer",
                4004,
                Some("disconnect"),
            ),
            (
                CloseReason::ServiceDisabled,
                "service_disabled",
                1012,
                Some("disable"),
            ),
            (CloseReason::Shutdown, "shutdown", 1001, Some("shutdown")),
            (
                CloseReason::ServerError,
                "server_error",
                1011,
                Some("disconnect"),
            ),
            (CloseReason::ProtocolError, "protocol_error", 1002, None),
            (CloseReason::InvalidUtf8, "invalid_utf8", 1007, None),
            (CloseReason::MessageTooBig, "message_too_big", 1009, None),
        ] {
            let end = End::Server {
                reason,
                message: String::new(),
            };
            assert_eq!(closing(end), (name, Some(code), String::new()));
            assert_eq!(reason.meta_event(), meta, "{name}");
        }
    }

    #[track_caller]
    fn check_close(code: u16, reason: &str, expect_reason: &str) {
        match close_message(code, reason) {
            Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), code);
                assert_eq!(frame.reason.as_str(), expect_reason);
                assert!(frame.reason.len() <= 123);
            }
            other => panic!("not a close frame: {other:?}"),
        }
    }

    #[test]
    fn close_reasons_are_cut_to_123_bytes_on_a_character_boundary() {
        check_close(4003, "replaced", "replaced");
        check_close(1000, "", "");
        let long = "x".repeat(200);
        check_close(1011, &long, &long[..123]);
        check_close(4002, &"x".repeat(123), &"x".repeat(123));
        // Two-byte characters: 123 falls inside the 62nd, so 61 remain.
        check_close(4002, &"é".repeat(100), &"é".repeat(61));
        // A four-byte character straddling the limit is dropped whole.
        let straddling = format!("{}😀tail", "x".repeat(121));
        check_close(4002, &straddling, &"x".repeat(121));
    }

    #[tokio::test]
    async fn token_expiry_becomes_a_deadline_from_now() {
        let now_s = (crate::now_ms() / 1000) as u64;
        let start = Instant::now();
        // Already past: due at once.
        for past in [now_s - 3_600, now_s - 1, 0] {
            let due = instant_of_unix(past);
            assert!(due >= start && due <= Instant::now(), "{past}");
        }
        // In the future: that far from now (`exp` has whole seconds, and
        // the clocks move on a little between the reads).
        let due = instant_of_unix(now_s + 60) - start;
        assert!(
            due > Duration::from_secs(58) && due <= Duration::from_secs(61),
            "{due:?}"
        );
    }

    #[tokio::test]
    async fn a_far_expiry_is_a_far_deadline_not_a_panic() {
        let start = Instant::now();
        assert!(instant_of_unix(u64::MAX) > start + Duration::from_secs(365 * 24 * 3600));
    }
}
