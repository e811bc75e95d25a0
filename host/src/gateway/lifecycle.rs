//! The lifecycle state machine: how a connection's open and close become
//! durable events, and the closed set of reasons a connection ends.
//!
//! A connection is *open* once the upgrade succeeded, the client
//! authenticated and [`Lifecycle::record_open`] committed. From then on
//! exactly one [`Lifecycle::record_close`] takes effect: the session row is
//! the guard (closing deletes it, and a close that finds no row writes
//! nothing), so a close racing a crash recovery or a shutdown sweep still
//! yields one `connection.closed`. Presence (`user.online` / `user.offline`)
//! is counted from the session rows inside the same transaction.
//!
//! The WebSocket service itself has a lifecycle too: `service.enabled` when
//! it starts accepting (at start, or a reload that turns it on) and
//! `service.disabled` when it stops (a reload that turns it off, or a
//! graceful shutdown). Those events belong to no user, so they are ordered
//! under [`service_order_key`], a key no user id can be.

use std::sync::Arc;

use serde_json::json;

use crate::metrics::Metrics;
use crate::outbox::Wakeup;
use crate::storage::{
    NewEvent, OutboxStore, Presence, SessionEvents, SessionRecord, SessionStore, StorageError,
};

/// Every way an open connection can end. The string form is the `reason`
/// field of `connection.closed`; `code` is the WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client sent a close frame (its code is recorded).
    ClientClose,
    /// TCP reset or EOF without a close frame (1006).
    Abnormal,
    /// The client broke the WebSocket protocol (1002).
    ProtocolError,
    /// A text message was not valid UTF-8 (1007).
    InvalidUtf8,
    /// A frame or message exceeded the configured limit (1009).
    MessageTooBig,
    /// No sign of life within `pong_timeout` after a ping (4000).
    HeartbeatTimeout,
    /// The token's `exp` passed (4001).
    TokenExpired,
    /// `POST /v1/users/{uid}/kick` (4002).
    Kicked,
    /// Displaced by the multi-device policy (4003).
    Replaced,
    /// The outbound queue filled up or a write timed out (4004).
    SlowConsumer,
    /// The WebSocket service was disabled by a config reload (1012).
    ServiceDisabled,
    /// The gateway shut down gracefully (1001).
    Shutdown,
    /// The gateway died with the connection open; closed at the next start (1006).
    GatewayCrash,
    /// An internal error ended the connection (1011).
    ServerError,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClose => "client_close",
            CloseReason::Abnormal => "abnormal",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Kicked => "kicked",
            CloseReason::Replaced => "replaced",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::ServiceDisabled => "service_disabled",
            CloseReason::Shutdown => "shutdown",
            CloseReason::GatewayCrash => "gateway_crash",
            CloseReason::ServerError => "server_error",
        }
    }

    /// The close code sent (and recorded) when the server ends the connection
    /// for this reason. For `ClientClose` the client's own code is recorded instead.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::ClientClose => 1000,
            CloseReason::Abnormal | CloseReason::GatewayCrash => 1006,
            CloseReason::ProtocolError => 1002,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::MessageTooBig => 1009,
            CloseReason::HeartbeatTimeout => 4000,
            CloseReason::TokenExpired => 4001,
            CloseReason::Kicked => 4002,
            CloseReason::Replaced => 4003,
            CloseReason::SlowConsumer => 4004,
            CloseReason::ServiceDisabled => 1012,
            CloseReason::Shutdown => 1001,
            CloseReason::ServerError => 1011,
        }
    }

    /// The `event` of the `meta` frame that announces this close, if one is sent.
    pub fn meta_event(self) -> Option<&'static str> {
        match self {
            CloseReason::ServiceDisabled => Some("disable"),
            CloseReason::Shutdown => Some("shutdown"),
            CloseReason::HeartbeatTimeout
            | CloseReason::TokenExpired
            | CloseReason::Kicked
            | CloseReason::Replaced
            | CloseReason::SlowConsumer
            | CloseReason::ServerError => Some("disconnect"),
            _ => None,
        }
    }
}

/// Why the WebSocket service started or stopped accepting connections: the
/// `reason` of `service.enabled` and `service.disabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceReason {
    /// The gateway started with `gateway.enabled = true`.
    Start,
    /// A config reload changed `gateway.enabled`.
    Reload,
    /// A graceful shutdown began.
    Shutdown,
}

impl ServiceReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceReason::Start => "start",
            ServiceReason::Reload => "reload",
            ServiceReason::Shutdown => "shutdown",
        }
    }
}

/// The order key of a node's service events. It starts with a control
/// character, which user ids cannot hold (`auth::valid_id`), and channel
/// keys and control ids never start with, so these events never wait behind,
/// or hold up, anyone's connection, message or control events.
pub fn service_order_key(node_id: &str) -> String {
    format!("\u{1f}service:{node_id}")
}

/// How a connection ended, as recorded.
#[derive(Debug, Clone)]
pub struct CloseInfo {
    pub reason: CloseReason,
    pub code: u16,
    pub message: String,
}

/// Records opens and closes. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    storage: Arc<dyn SessionStore>,
    /// For the service events, which no session change carries.
    outbox: Arc<dyn OutboxStore>,
    metrics: Arc<Metrics>,
    wakeup: Wakeup,
    node_id: String,
}

fn event(event_type: &str, order_key: &str, data: serde_json::Value) -> NewEvent {
    NewEvent {
        id: crate::new_id("evt"),
        event_type: event_type.to_string(),
        order_key: order_key.to_string(),
        created_at: crate::now_ms(),
        data,
    }
}

impl Lifecycle {
    pub fn new(
        storage: Arc<dyn SessionStore>,
        outbox: Arc<dyn OutboxStore>,
        metrics: Arc<Metrics>,
        wakeup: Wakeup,
        node_id: String,
    ) -> Self {
        Lifecycle {
            storage,
            outbox,
            metrics,
            wakeup,
            node_id,
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Records an open connection with `connection.opened` (and `user.online`
    /// for the user's first connection). The connection is open once this returns Ok.
    pub async fn record_open(
        &self,
        connection_id: &str,
        user_id: &str,
        device_id: &str,
        remote_addr: &str,
    ) -> Result<Presence, StorageError> {
        let record = SessionRecord {
            connection_id: connection_id.to_string(),
            user_id: user_id.to_string(),
            device_id: device_id.to_string(),
            node_id: self.node_id.clone(),
            opened_at: crate::now_ms(),
            remote_addr: remote_addr.to_string(),
        };
        let events: SessionEvents = Arc::new(|r: &SessionRecord, p: Presence| {
            let mut out = vec![event(
                "connection.opened",
                &r.user_id,
                json!({
                    "connection_id": r.connection_id,
                    "user_id": r.user_id,
                    "device_id": r.device_id,
                    "node_id": r.node_id,
                    "remote_addr": r.remote_addr,
                    "opened_at": crate::rfc3339_ms(r.opened_at),
                }),
            )];
            if p.connections == 1 {
                out.push(event(
                    "user.online",
                    &r.user_id,
                    json!({
                        "user_id": r.user_id,
                        "connection_id": r.connection_id,
                        "device_id": r.device_id,
                        "devices": p.devices,
                        "connections": p.connections,
                    }),
                ));
            }
            out
        });
        let presence = self.storage.open_session(record, events).await?;
        self.metrics.lifecycle("opened", "open");
        self.metrics.connections_open.inc();
        self.wakeup.wake();
        Ok(presence)
    }

    /// Records the end of a connection. Returns false (and records nothing)
    /// when it was already recorded as closed.
    pub async fn record_close(
        &self,
        connection_id: &str,
        info: &CloseInfo,
    ) -> Result<bool, StorageError> {
        let closed = self
            .storage
            .close_session(connection_id, close_events(info.clone()))
            .await?;
        if closed.is_some() {
            self.metrics.lifecycle("closed", info.reason.as_str());
            self.metrics.connections_open.dec();
            self.wakeup.wake();
        }
        Ok(closed.is_some())
    }

    /// Records `service.enabled` (`enabled`) or `service.disabled` for this
    /// node; durable when it returns.
    pub async fn record_service(
        &self,
        enabled: bool,
        reason: ServiceReason,
    ) -> Result<(), StorageError> {
        let event_type = if enabled {
            "service.enabled"
        } else {
            "service.disabled"
        };
        let data = json!({ "node": self.node_id, "reason": reason.as_str() });
        let key = service_order_key(&self.node_id);
        self.outbox
            .append_events(vec![event(event_type, &key, data)])
            .await?;
        self.wakeup.wake();
        Ok(())
    }

    /// Closes every session this node left open when it died. Run once at
    /// start-up, before the listener accepts anything.
    pub async fn recover_crashed(&self) -> Result<usize, StorageError> {
        let info = CloseInfo {
            reason: CloseReason::GatewayCrash,
            code: CloseReason::GatewayCrash.code(),
            message:
                "the gateway stopped without closing this connection; closed at the next start"
                    .into(),
        };
        let n = self
            .storage
            .close_node_sessions(&self.node_id, close_events(info))
            .await?;
        if n > 0 {
            self.metrics
                .lifecycle_events
                .get_or_create(&crate::metrics::LifecycleLabel {
                    event: "closed".into(),
                    reason: CloseReason::GatewayCrash.as_str().into(),
                })
                .inc_by(n as u64);
            self.wakeup.wake();
        }
        Ok(n)
    }
}

fn close_events(info: CloseInfo) -> SessionEvents {
    Arc::new(move |r: &SessionRecord, p: Presence| {
        let closed_at = crate::now_ms();
        let mut out = vec![event(
            "connection.closed",
            &r.user_id,
            json!({
                "connection_id": r.connection_id,
                "user_id": r.user_id,
                "device_id": r.device_id,
                "node_id": r.node_id,
                "remote_addr": r.remote_addr,
                "opened_at": crate::rfc3339_ms(r.opened_at),
                "closed_at": crate::rfc3339_ms(closed_at),
                "duration_ms": (closed_at - r.opened_at).max(0),
                "reason": info.reason.as_str(),
                "code": info.code,
                "message": info.message,
            }),
        )];
        if p.connections == 0 {
            out.push(event(
                "user.offline",
                &r.user_id,
                json!({
                    "user_id": r.user_id,
                    "connection_id": r.connection_id,
                    "device_id": r.device_id,
                    "reason": info.reason.as_str(),
                    "devices": 0,
                    "connections": 0,
                }),
            ));
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_order_key_is_no_user_id() {
        let key = service_order_key("edge-1");
        assert!(!crate::auth::valid_id(&key), "{key:?}");
        assert_ne!(service_order_key("a"), service_order_key("b"));
    }
}
