//! What nodes send each other over NATS, as JSON.
//!
//! Everything here arrives from the network, so it is parsed like any
//! other outside input: bounded by the NATS server's `max_payload` (the
//! client refuses larger messages), and an envelope that does not parse is
//! counted and dropped, never half-applied. Pushes travel as domain values
//! and are rendered by the receiving node, as `delivery::Push` promises.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::delivery::{CloseReason, Connection, ControlPush, Lane, Push};
use crate::storage::controls::Priority;
use crate::storage::messages::{Appended, Channel, ChannelType, StoredMessage};

/// A committed message as it crosses to the other nodes (one per message,
/// whatever the group's size: every node fans it out to its own sessions).
#[derive(Debug, Serialize, Deserialize)]
pub struct WireMessage {
    pub id: String,
    pub channel_type: ChannelType,
    pub channel_key: String,
    pub sender: String,
    pub system: bool,
    pub seq: u64,
    pub version: u64,
    pub client_msg_id: Option<String>,
    pub payload: Box<RawValue>,
    pub created_at: i64,
    /// `None` when the list did not fit the NATS payload limit: the
    /// receiver reads the group's members from the database.
    pub members: Option<Vec<String>>,
}

impl WireMessage {
    pub fn of(a: &Appended, with_members: bool) -> WireMessage {
        WireMessage::message(&a.message, with_members.then(|| a.members.as_ref().clone()))
    }

    fn message(m: &StoredMessage, members: Option<Vec<String>>) -> WireMessage {
        WireMessage {
            id: m.id.clone(),
            channel_type: m.channel.kind,
            channel_key: m.channel.key.clone(),
            sender: m.sender.clone(),
            system: m.system,
            seq: m.seq,
            version: m.version,
            client_msg_id: m.client_msg_id.clone(),
            payload: m.payload.clone(),
            created_at: m.created_at,
            members,
        }
    }

    pub fn stored(&self) -> StoredMessage {
        StoredMessage {
            id: self.id.clone(),
            channel: Channel::from_key(self.channel_type, self.channel_key.clone()),
            sender: self.sender.clone(),
            system: self.system,
            seq: self.seq,
            version: self.version,
            client_msg_id: self.client_msg_id.clone(),
            payload: self.payload.clone(),
            created_at: self.created_at,
        }
    }
}

/// What goes on the cluster's fan-out subject. `n` numbers a publisher's
/// frames (per incarnation), so a receiver knows when it missed some.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FanoutFrame {
    Message {
        node: String,
        incarnation: String,
        n: u64,
        message: WireMessage,
    },
    /// Sent every second with the publisher's last `n`, so a lost last
    /// frame is noticed too.
    Beat {
        node: String,
        incarnation: String,
        n: u64,
    },
}

/// A push as it crosses.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WirePush {
    Message {
        message: WireMessage,
    },
    ConversationChanged {
        body: Value,
    },
    Control {
        control_id: String,
        kind: String,
        payload: Box<RawValue>,
        priority: Priority,
        receipt: bool,
        persisted: bool,
        created_at: i64,
        expires_at: Option<i64>,
        redelivery: bool,
    },
}

impl WirePush {
    pub fn of(push: &Push) -> WirePush {
        match push {
            Push::Message(m) => WirePush::Message {
                message: WireMessage::message(m, None),
            },
            Push::ConversationChanged(body) => WirePush::ConversationChanged { body: body.clone() },
            Push::Control(c) => WirePush::Control {
                control_id: c.control_id.clone(),
                kind: c.kind.clone(),
                payload: c.payload.clone(),
                priority: c.priority,
                receipt: c.receipt,
                persisted: c.persisted,
                created_at: c.created_at,
                expires_at: c.expires_at,
                redelivery: c.redelivery,
            },
        }
    }

    pub fn push(self) -> Push {
        match self {
            WirePush::Message { message } => Push::Message(Arc::new(message.stored())),
            WirePush::ConversationChanged { body } => Push::ConversationChanged(body),
            WirePush::Control {
                control_id,
                kind,
                payload,
                priority,
                receipt,
                persisted,
                created_at,
                expires_at,
                redelivery,
            } => Push::Control(ControlPush {
                control_id,
                kind,
                payload,
                priority,
                receipt,
                persisted,
                created_at,
                expires_at,
                redelivery,
            }),
        }
    }
}

/// A lane as it crosses.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireLane {
    Normal,
    Urgent,
}

impl From<Lane> for WireLane {
    fn from(l: Lane) -> WireLane {
        match l {
            Lane::Normal => WireLane::Normal,
            Lane::Urgent => WireLane::Urgent,
        }
    }
}

impl From<WireLane> for Lane {
    fn from(l: WireLane) -> Lane {
        match l {
            WireLane::Normal => Lane::Normal,
            WireLane::Urgent => Lane::Urgent,
        }
    }
}

/// A request one node makes of another (on the other's own subject).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Online {
        user: Option<String>,
    },
    OnlineAmong {
        users: Vec<String>,
    },
    OnlineUsers,
    ToUser {
        user: String,
        push: WirePush,
        lane: WireLane,
        except: Option<String>,
    },
    ToConnection {
        user: String,
        connection_id: String,
        push: WirePush,
        lane: WireLane,
    },
    KickUser {
        user: String,
        device: Option<String>,
        /// A [`CloseReason::as_str`].
        reason: String,
        message: String,
    },
    KickConnection {
        user: String,
        connection_id: String,
        reason: String,
        message: String,
    },
    /// Re-read the config file, as `POST /admin/reload` does.
    Reload,
    /// Load plugin `name` from its stored upload (another node took it).
    PluginLoad {
        name: String,
    },
    /// Load plugin `name`'s current version again.
    PluginReload {
        name: String,
    },
    /// Unload plugin `name` (its upload is removed already).
    PluginUnload {
        name: String,
    },
    /// This node's plugin views.
    Plugins,
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Connections {
        connections: Vec<Connection>,
    },
    Users {
        users: Vec<String>,
    },
    Count {
        count: usize,
    },
    Ids {
        ids: Vec<String>,
    },
    Done {
        done: bool,
    },
    /// A report whose shape belongs to the operation (reload, plugins).
    Report {
        report: Value,
    },
    /// The request could not be served (it names why).
    Error {
        error: String,
    },
}

/// A close reason as it crosses; an unknown one is an error, not a default.
pub fn close_reason(text: &str) -> Result<CloseReason, String> {
    CloseReason::parse(text).ok_or_else(|| format!("unknown close reason {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appended() -> Appended {
        Appended {
            message: StoredMessage {
                id: "msg_1".into(),
                channel: Channel::group("g1"),
                sender: "alice".into(),
                system: false,
                seq: 7,
                version: 42,
                client_msg_id: Some("c1".into()),
                payload: RawValue::from_string(r#"{"text": "hi", "n": [1, 2]}"#.into()).unwrap(),
                created_at: 1,
            },
            duplicate: false,
            members: Arc::new(vec!["alice".into(), "bob".into()]),
        }
    }

    #[test]
    fn a_routed_message_arrives_byte_for_byte() {
        let frame = FanoutFrame::Message {
            node: "node-a".into(),
            incarnation: "i1".into(),
            n: 3,
            message: WireMessage::of(&appended(), true),
        };
        let bytes = serde_json::to_vec(&frame).unwrap();
        let FanoutFrame::Message { n, message, .. } = serde_json::from_slice(&bytes).unwrap()
        else {
            panic!("not a message frame");
        };
        assert_eq!(n, 3);
        let stored = message.stored();
        assert_eq!(stored.payload.get(), r#"{"text": "hi", "n": [1, 2]}"#);
        assert_eq!(stored.channel, Channel::group("g1"));
        assert_eq!((stored.seq, stored.version), (7, 42));
        assert_eq!(message.members.unwrap(), vec!["alice", "bob"]);
        let without = WireMessage::of(&appended(), false);
        assert!(without.members.is_none());
    }

    #[test]
    fn a_control_push_crosses_as_it_was() {
        let push = Push::Control(ControlPush {
            control_id: "ctl_1".into(),
            kind: "card".into(),
            payload: RawValue::from_string(r#"{"a":1}"#.into()).unwrap(),
            priority: Priority::High,
            receipt: true,
            persisted: false,
            created_at: 5,
            expires_at: Some(9),
            redelivery: false,
        });
        let request = Request::ToUser {
            user: "bob".into(),
            push: WirePush::of(&push),
            lane: Lane::Urgent.into(),
            except: None,
        };
        let bytes = serde_json::to_vec(&request).unwrap();
        let Request::ToUser { push, lane, .. } = serde_json::from_slice(&bytes).unwrap() else {
            panic!("not a push request");
        };
        assert_eq!(Lane::from(lane), Lane::Urgent);
        let Push::Control(c) = push.push() else {
            panic!("not a control");
        };
        assert_eq!(c.payload.get(), r#"{"a":1}"#);
        assert_eq!(c.priority, Priority::High);
        assert_eq!(c.expires_at, Some(9));
    }

    #[test]
    fn every_close_reason_crosses() {
        for r in CloseReason::ALL {
            assert_eq!(close_reason(r.as_str()), Ok(r));
        }
        assert!(close_reason("no_such").is_err());
    }
}
