//! The one door to live sessions: the [`Delivery`] trait and the domain
//! values that go through it.
//!
//! Everything outside the gateway that reaches a client connection — the
//! fan-out of committed messages, conversation changes pushed to a user's
//! other devices, control messages, kicks, drains, and the question "who is
//! online here" — calls this trait. Callers hand it domain values
//! ([`Push`], a committed message); turning them into frames is the
//! implementation's business (today `gateway::protocol` renders them and
//! each session task writes them), so `messaging` and `control` never see
//! a socket or a wire format.
//!
//! Two implementations: `gateway::local::LocalDelivery`, the sessions of
//! this node (the gateway's registry) and the ordered fan-out shards; and,
//! in cluster mode, `cluster::delivery::ClusterDelivery`, which does the
//! same on this node and carries every operation to the other nodes over
//! NATS (see its module docs for what crosses and how order is kept).
//!
//! Guarantees every implementation keeps:
//! - **One order per channel.** [`Delivery::fan_out`] is called by the
//!   storage writer right after each commit, in commit order; messages of
//!   one channel reach every connection in the order of those calls, which
//!   is `seq` order. It never blocks (the writer thread is waiting).
//! - **Bounded queues.** Each connection has two bounded queues of
//!   `gateway.outbound_queue` frames: normal and urgent. A push to a full
//!   queue is not taken, and the connection is closed as a slow consumer
//!   (4004); nothing waits for a slow client. A message frame not taken is
//!   counted as dropped (the client catches up with `sync`).
//! - **The urgent lane** ([`Lane::Urgent`]) is written before anything
//!   waiting in the normal one (high-priority controls use it); within a
//!   lane, frames go out in the order they were pushed.
//! - **Nothing here is durable.** A push reaches the connections live at the
//!   moment it is made; what must survive a missed push (messages, persisted
//!   controls) is in storage first, and clients catch up from there. The
//!   trait never touches storage.
//! - **Closing is a request.** Kicks and drains ask a connection's session
//!   task to close; the task records the close and finishes the handshake.
//! - **Answers cover the cluster.** What returns a count or a list (pushes
//!   to a user, kicks, who is online) is asynchronous, because in cluster
//!   mode it waits for the other nodes' answers (bounded by
//!   `cluster.request_timeout`: a node that does not answer in time counts
//!   as having none of the user's connections). `fan_out` and `close_all`
//!   only queue and return at once; `close_all` drains this node only.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::storage::controls::{Deliverable, Priority};
use crate::storage::messages::{Appended, StoredMessage};

/// Which of a connection's two queues a push goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Normal,
    /// Written before anything waiting in the normal lane.
    Urgent,
}

impl Lane {
    /// The lane of a control of `priority`: high goes first.
    pub fn of(priority: Priority) -> Lane {
        match priority {
            Priority::High => Lane::Urgent,
            Priority::Normal | Priority::Low => Lane::Normal,
        }
    }
}

/// Something to show a user's live connections, as a domain value. The
/// implementation renders it for the user it goes to (a person channel
/// names the other user as its `channel_id`).
#[derive(Debug, Clone)]
pub enum Push {
    /// A committed message (the `message` frame).
    Message(Arc<StoredMessage>),
    /// One of the user's conversations changed on another device: the
    /// change's answer (a one-row conversation page: `version`,
    /// `conversations`, `removed`), already through the filter chain (the
    /// `conversations` frame with `"event": "changed"`).
    ConversationChanged(Value),
    /// A business control message (the `control` frame).
    Control(ControlPush),
}

/// A control as its target's connections get it.
#[derive(Debug, Clone)]
pub struct ControlPush {
    pub control_id: String,
    pub kind: String,
    /// Checked to be JSON when the push was made, so rendering cannot fail.
    pub payload: Box<RawValue>,
    pub priority: Priority,
    pub receipt: bool,
    pub persisted: bool,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub expires_at: Option<i64>,
    /// Sent again because no receipt came.
    pub redelivery: bool,
}

impl ControlPush {
    /// The push of one stored deliverable. Stored payloads were JSON when
    /// accepted; one that no longer reads is an error, never a frame with a
    /// `null` payload.
    pub fn of(d: &Deliverable) -> Result<ControlPush, serde_json::Error> {
        Ok(ControlPush {
            control_id: d.control_id.clone(),
            kind: d.kind.clone(),
            payload: RawValue::from_string(d.payload.clone())?,
            priority: d.priority,
            receipt: d.receipt,
            persisted: d.persist,
            created_at: d.created_at,
            expires_at: d.expires_at,
            redelivery: d.redelivery,
        })
    }
}

/// A live connection, as `GET /admin/connections` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connection {
    pub connection_id: String,
    /// The node holding it.
    pub node_id: String,
    pub user_id: String,
    pub device_id: String,
    pub remote_addr: String,
    /// When it was admitted (RFC 3339).
    pub opened_at: String,
    /// Its open is recorded (false while the session task records it).
    pub open: bool,
    /// Frames waiting in its normal queue.
    pub queued_frames: usize,
}

/// Every way a connection can end. The string form is the `reason` field of
/// `connection.closed`; `code` is the WebSocket close code.
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
    /// Cluster mode: the node holding it lost its lease (killed, frozen or
    /// cut off from the database); closed by a surviving node (1006).
    NodeLost,
    /// Cluster mode: this node could not renew its lease in time, so it
    /// closed its clients before the lease ran out (1012: connect again,
    /// to another node).
    LeaseLost,
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
            CloseReason::NodeLost => "node_lost",
            CloseReason::LeaseLost => "lease_lost",
            CloseReason::ServerError => "server_error",
        }
    }

    /// The close code sent (and recorded) when the server ends the connection
    /// for this reason. For `ClientClose` the client's own code is recorded instead.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::ClientClose => 1000,
            CloseReason::Abnormal | CloseReason::GatewayCrash | CloseReason::NodeLost => 1006,
            CloseReason::ProtocolError => 1002,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::MessageTooBig => 1009,
            CloseReason::HeartbeatTimeout => 4000,
            CloseReason::TokenExpired => 4001,
            CloseReason::Kicked => 4002,
            CloseReason::Replaced => 4003,
            CloseReason::SlowConsumer => 4004,
            CloseReason::ServiceDisabled | CloseReason::LeaseLost => 1012,
            CloseReason::Shutdown => 1001,
            CloseReason::ServerError => 1011,
        }
    }

    /// Every reason, for parsing and for tests.
    pub const ALL: [CloseReason; 16] = [
        CloseReason::ClientClose,
        CloseReason::Abnormal,
        CloseReason::ProtocolError,
        CloseReason::InvalidUtf8,
        CloseReason::MessageTooBig,
        CloseReason::HeartbeatTimeout,
        CloseReason::TokenExpired,
        CloseReason::Kicked,
        CloseReason::Replaced,
        CloseReason::SlowConsumer,
        CloseReason::ServiceDisabled,
        CloseReason::Shutdown,
        CloseReason::GatewayCrash,
        CloseReason::NodeLost,
        CloseReason::LeaseLost,
        CloseReason::ServerError,
    ];

    /// The reason whose [`CloseReason::as_str`] is `text`.
    pub fn parse(text: &str) -> Option<CloseReason> {
        CloseReason::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// The `event` of the `meta` frame that announces this close, if one is sent.
    pub fn meta_event(self) -> Option<&'static str> {
        match self {
            CloseReason::ServiceDisabled | CloseReason::LeaseLost => Some("disable"),
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

/// The door to live sessions (see the module docs for its guarantees).
/// Object-safe: the server holds one as `Arc<dyn Delivery>`.
#[async_trait::async_trait]
pub trait Delivery: Send + Sync + 'static {
    /// Queues a committed message for every live connection of its
    /// members, except `origin` (the sending connection, which gets a
    /// `sendack` instead). Called on the storage writer in commit order;
    /// must not block.
    fn fan_out(&self, message: Appended, origin: Option<String>);

    /// Pushes to every live connection of `user` but `except`. Returns how
    /// many connections took it.
    async fn to_user(&self, user: &str, push: &Push, lane: Lane, except: Option<&str>) -> usize;

    /// Pushes to one connection of `user`. False when it is gone or did not
    /// take it.
    async fn to_connection(&self, user: &str, connection_id: &str, push: &Push, lane: Lane)
        -> bool;

    /// Asks `user`'s connections (only those of `device`, when given) to
    /// close for `reason`, telling them `message`. Returns the connection
    /// ids asked (a connection already closing is not asked again).
    async fn kick_user(
        &self,
        user: &str,
        device: Option<&str>,
        reason: CloseReason,
        message: &str,
    ) -> Vec<String>;

    /// Asks one connection of `user` to close. False when it is gone or
    /// already closing.
    async fn kick_connection(
        &self,
        user: &str,
        connection_id: &str,
        reason: CloseReason,
        message: &str,
    ) -> bool;

    /// Asks every connection of this node to close (a drain): the live
    /// sessions and the connections still waiting for their `auth` frame.
    /// Returns how many were asked. Call it after the state that refuses new connections is
    /// set, so that a connection that comes later finds itself refused.
    fn close_all(&self, reason: CloseReason, message: &str) -> usize;

    /// The live connections: `user`'s, or everyone's.
    async fn online(&self, user: Option<&str>) -> Vec<Connection>;

    /// Every user with a live connection.
    async fn online_users(&self) -> std::collections::HashSet<String>;

    /// Which of `users` have a live connection.
    async fn online_among(&self, users: &[String]) -> std::collections::HashSet<String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_priority_takes_the_urgent_lane() {
        assert_eq!(Lane::of(Priority::High), Lane::Urgent);
        assert_eq!(Lane::of(Priority::Normal), Lane::Normal);
        assert_eq!(Lane::of(Priority::Low), Lane::Normal);
    }

    #[test]
    fn a_control_push_refuses_a_payload_that_is_not_json() {
        let mut d = Deliverable {
            control_id: "ctl_1".into(),
            user_id: "u".into(),
            kind: "k".into(),
            payload: r#"{"a": [1, 2]}"#.into(),
            priority: Priority::Normal,
            persist: false,
            receipt: false,
            created_at: 0,
            expires_at: None,
            redelivery: false,
        };
        let push = ControlPush::of(&d).unwrap();
        assert_eq!(push.payload.get(), r#"{"a": [1, 2]}"#, "kept as stored");
        d.payload = "{not json".into();
        assert!(ControlPush::of(&d).is_err());
    }

    /// The trait stays usable as `Arc<dyn Delivery>`.
    #[allow(dead_code)]
    fn object_safe(d: Arc<dyn Delivery>) -> Arc<dyn Delivery> {
        d
    }
}
