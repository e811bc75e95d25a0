//! The webhook event catalogue: every event type the gateway writes, the
//! order key each is delivered under, and the builders of their `data`
//! (documented in `docs/webhooks.md`, "Event types").
//!
//! | type | written by | order key |
//! |---|---|---|
//! | `connection.opened`, `connection.closed` | the lifecycle, with the session row | the user id |
//! | `user.online`, `user.offline` | the lifecycle, from presence counted in that transaction | the user id |
//! | `message.created` | a send, with the message | the channel key |
//! | `control.delivered`, `control.acked`, `control.expired` | control delivery, receipts, expiry, with the target row | the user id |
//! | `control.rejected` | a control refused by its handler chain | the control id |
//! | `service.enabled`, `service.disabled` | start, reload, shutdown | [`service_order_key`] of the node |
//!
//! Builders return [`NewEvent`]s (or the closures the storage contract takes
//! to build them inside its transaction); callers hand them to storage and
//! never spell an event type or a `data` field themselves. Event ids are
//! `evt_…` ULIDs. The list here is also the one config validation checks
//! `[[webhooks]] events` filters against.

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::delivery::CloseReason;
use crate::storage::controls::{Deliverable, TargetEvents};
use crate::storage::messages::{ChannelType, StoredMessage};
use crate::storage::{event_data, NewEvent, Presence, SessionEvents, SessionRecord};

/// Every event type, as named in the envelope's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    ConnectionOpened,
    ConnectionClosed,
    UserOnline,
    UserOffline,
    MessageCreated,
    ControlDelivered,
    ControlAcked,
    ControlExpired,
    ControlRejected,
    ServiceEnabled,
    ServiceDisabled,
}

/// What an event type's order key is: events of one key are delivered in
/// the order they were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKey {
    User,
    Channel,
    Control,
    Node,
}

impl EventType {
    /// Every type, in the order docs/webhooks.md lists them.
    pub const ALL: [EventType; 11] = [
        EventType::ConnectionOpened,
        EventType::ConnectionClosed,
        EventType::UserOnline,
        EventType::UserOffline,
        EventType::MessageCreated,
        EventType::ControlDelivered,
        EventType::ControlAcked,
        EventType::ControlExpired,
        EventType::ControlRejected,
        EventType::ServiceEnabled,
        EventType::ServiceDisabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ConnectionOpened => "connection.opened",
            EventType::ConnectionClosed => "connection.closed",
            EventType::UserOnline => "user.online",
            EventType::UserOffline => "user.offline",
            EventType::MessageCreated => "message.created",
            EventType::ControlDelivered => "control.delivered",
            EventType::ControlAcked => "control.acked",
            EventType::ControlExpired => "control.expired",
            EventType::ControlRejected => "control.rejected",
            EventType::ServiceEnabled => "service.enabled",
            EventType::ServiceDisabled => "service.disabled",
        }
    }

    pub fn order_key(self) -> OrderKey {
        match self {
            EventType::ConnectionOpened
            | EventType::ConnectionClosed
            | EventType::UserOnline
            | EventType::UserOffline
            | EventType::ControlDelivered
            | EventType::ControlAcked
            | EventType::ControlExpired => OrderKey::User,
            EventType::MessageCreated => OrderKey::Channel,
            EventType::ControlRejected => OrderKey::Control,
            EventType::ServiceEnabled | EventType::ServiceDisabled => OrderKey::Node,
        }
    }
}

/// The names of every event type.
pub fn type_names() -> impl Iterator<Item = &'static str> {
    EventType::ALL.iter().map(|t| t.as_str())
}

fn event(kind: EventType, order_key: &str, created_at: i64, data: Value) -> NewEvent {
    event_raw(kind, order_key, created_at, event_data(&data))
}

fn event_raw(kind: EventType, order_key: &str, created_at: i64, data: Box<RawValue>) -> NewEvent {
    NewEvent {
        id: crate::new_id("evt"),
        event_type: kind.as_str().to_string(),
        order_key: order_key.to_string(),
        created_at,
        data,
    }
}

/// How a connection ended, as `connection.closed` and `user.offline` tell it.
#[derive(Debug, Clone)]
pub struct CloseInfo {
    pub reason: CloseReason,
    pub code: u16,
    pub message: String,
}

/// The events of an open: `connection.opened`, and `user.online` when it
/// is the user's first connection (presence counted in the transaction).
pub fn session_opened() -> SessionEvents {
    Arc::new(|r: &SessionRecord, p: Presence| {
        let now = crate::now_ms();
        let mut out = vec![event(
            EventType::ConnectionOpened,
            &r.user_id,
            now,
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
                EventType::UserOnline,
                &r.user_id,
                now,
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
    })
}

/// The events of a close: `connection.closed`, and `user.offline` when it
/// was the user's last connection. `closed_at` is when the connection
/// ended (unix ms); `None` takes the time of the transaction.
pub fn session_closed(info: CloseInfo, closed_at: Option<i64>) -> SessionEvents {
    Arc::new(move |r: &SessionRecord, p: Presence| {
        let now = crate::now_ms();
        let closed_at = closed_at.unwrap_or(now);
        let mut out = vec![event(
            EventType::ConnectionClosed,
            &r.user_id,
            now,
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
                EventType::UserOffline,
                &r.user_id,
                now,
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

/// `message.created` of a committed message; `channel_id` is the channel
/// as the sender named it. The payload goes into the event as stored.
pub fn message_created(m: &StoredMessage, channel_id: &str) -> NewEvent {
    /// The fields in the order the docs list them; the payload goes in as
    /// stored, without being parsed again.
    #[derive(Serialize)]
    struct Data<'a> {
        message_id: &'a str,
        channel_type: ChannelType,
        channel_id: &'a str,
        sender: &'a str,
        system: bool,
        seq: u64,
        version: u64,
        client_msg_id: Option<&'a str>,
        payload: &'a RawValue,
        created_at: String,
    }
    let data = Data {
        message_id: &m.id,
        channel_type: m.channel.kind,
        channel_id,
        sender: &m.sender,
        system: m.system,
        seq: m.seq,
        version: m.version,
        client_msg_id: m.client_msg_id.as_deref(),
        payload: &m.payload,
        created_at: crate::rfc3339_ms(m.created_at),
    };
    event_raw(
        EventType::MessageCreated,
        &m.channel.key,
        m.created_at,
        event_data(&data),
    )
}

/// One event per target of `kind` (one of the control target events);
/// `extra` fields are added to each.
fn control_target(kind: EventType, extra: Option<Value>) -> TargetEvents {
    Box::new(move |t: &Deliverable| {
        let mut data = json!({
            "control_id": t.control_id,
            "kind": t.kind,
            "user_id": t.user_id,
            "priority": t.priority,
            "persisted": t.persist,
            "receipt": t.receipt,
        });
        if let (Some(Value::Object(more)), Some(obj)) = (&extra, data.as_object_mut()) {
            for (k, v) in more {
                obj.insert(k.clone(), v.clone());
            }
        }
        event(kind, &t.user_id, crate::now_ms(), data)
    })
}

/// `control.delivered`: a target first received a control.
pub fn control_delivered() -> TargetEvents {
    control_target(EventType::ControlDelivered, None)
}

/// `control.acked`: a target's client acknowledged a control, from this
/// device and connection.
pub fn control_acked(device_id: &str, connection_id: &str) -> TargetEvents {
    let extra = json!({ "device_id": device_id, "connection_id": connection_id });
    control_target(EventType::ControlAcked, Some(extra))
}

/// `control.expired`: a persisted control's time-to-live passed undelivered.
pub fn control_expired() -> TargetEvents {
    control_target(EventType::ControlExpired, None)
}

/// `control.rejected`: the handler `plugin` rejected control `control_id`
/// of `kind`, which had `targets` targets then.
pub fn control_rejected(
    control_id: &str,
    kind: &str,
    plugin: &str,
    reason: &str,
    targets: usize,
) -> NewEvent {
    event(
        EventType::ControlRejected,
        control_id,
        crate::now_ms(),
        json!({
            "control_id": control_id, "kind": kind, "plugin": plugin, "reason": reason,
            "targets": targets,
        }),
    )
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

/// `service.enabled` (`enabled`) or `service.disabled` of node `node_id`.
pub fn service(enabled: bool, node_id: &str, reason: ServiceReason) -> NewEvent {
    let kind = if enabled {
        EventType::ServiceEnabled
    } else {
        EventType::ServiceDisabled
    };
    event(
        kind,
        &service_order_key(node_id),
        crate::now_ms(),
        json!({ "node": node_id, "reason": reason.as_str() }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::controls::Priority;
    use crate::storage::messages::Channel;

    /// The event types docs/webhooks.md documents: the names in the
    /// headings of its "Event types" section, in order.
    fn documented() -> Vec<String> {
        let doc = include_str!("../../docs/webhooks.md");
        let section = doc
            .split("\n## Event types\n")
            .nth(1)
            .expect("docs/webhooks.md has an `Event types` section");
        let section = section.split("\n## ").next().unwrap_or_default();
        section
            .lines()
            .filter_map(|l| l.strip_prefix("### "))
            .flat_map(|heading| {
                heading
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn the_catalogue_lists_what_the_webhook_reference_documents() {
        let ours: Vec<String> = type_names().map(str::to_string).collect();
        assert_eq!(ours, documented());
    }

    #[test]
    fn the_service_order_key_is_no_user_id() {
        let key = service_order_key("edge-1");
        assert!(!crate::auth::valid_id(&key), "{key:?}");
        assert_ne!(service_order_key("a"), service_order_key("b"));
    }

    /// An event's data, parsed.
    fn data_of(e: &NewEvent) -> Value {
        serde_json::from_str(e.data.get()).expect("event data is JSON")
    }

    /// The event is in the catalogue, has an event id, and is ordered by
    /// what its type declares (the builders below use user `alice`, group
    /// `team`, control `ctl_1` and node `edge-1`).
    #[track_caller]
    fn check(e: &NewEvent) {
        let kind = EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == e.event_type)
            .unwrap_or_else(|| panic!("{} is not in the catalogue", e.event_type));
        assert!(e.id.starts_with("evt_"), "{}", e.id);
        let expected = match kind.order_key() {
            OrderKey::User => "alice",
            OrderKey::Channel => "g:team",
            OrderKey::Control => "ctl_1",
            OrderKey::Node => "\u{1f}service:edge-1",
        };
        assert_eq!(
            e.order_key,
            expected,
            "{} is ordered by {:?}",
            e.event_type,
            kind.order_key()
        );
    }

    #[test]
    fn every_builder_uses_the_order_key_its_type_declares() {
        let record = SessionRecord {
            connection_id: "conn_1".into(),
            user_id: "alice".into(),
            device_id: "phone".into(),
            node_id: "edge-1".into(),
            opened_at: 1_000,
            remote_addr: "127.0.0.1:1".into(),
        };
        let first = Presence {
            connections: 1,
            devices: 1,
        };
        let opened = session_opened()(&record, first);
        assert_eq!(opened.len(), 2, "connection.opened and user.online");
        let info = CloseInfo {
            reason: CloseReason::Kicked,
            code: 4002,
            message: "bye".into(),
        };
        let closed = session_closed(info, Some(3_500))(&record, Presence::default());
        assert_eq!(closed.len(), 2, "connection.closed and user.offline");
        assert_eq!(data_of(&closed[0])["duration_ms"], 2_500);
        assert_eq!(data_of(&closed[1])["reason"], "kicked");
        let target = Deliverable {
            control_id: "ctl_1".into(),
            user_id: "alice".into(),
            kind: "k".into(),
            payload: "{}".into(),
            priority: Priority::High,
            persist: true,
            receipt: true,
            created_at: 0,
            expires_at: None,
            redelivery: false,
        };
        let acked = control_acked("phone", "conn_1")(&target);
        assert_eq!(data_of(&acked)["device_id"], "phone");
        let message = StoredMessage {
            id: "msg_1".into(),
            channel: Channel::group("team"),
            sender: "alice".into(),
            system: false,
            seq: 1,
            version: 1,
            client_msg_id: None,
            payload: RawValue::from_string(r#"{"text": "hi", "n": 1.50}"#.into()).unwrap(),
            created_at: 0,
        };
        let mut all = Vec::new();
        all.extend(opened);
        all.extend(closed);
        let created = message_created(&message, "team");
        // The payload goes in as stored, byte for byte.
        assert!(
            created
                .data
                .get()
                .contains(r#""payload":{"text": "hi", "n": 1.50}"#),
            "{}",
            created.data.get()
        );
        assert_eq!(data_of(&created)["payload"]["text"], "hi");
        assert_eq!(data_of(&created)["client_msg_id"], Value::Null);
        all.push(created);
        all.push(control_delivered()(&target));
        all.push(acked);
        all.push(control_expired()(&target));
        all.push(control_rejected("ctl_1", "k", "rules", "no", 1));
        all.push(service(true, "edge-1", ServiceReason::Start));
        all.push(service(false, "edge-1", ServiceReason::Shutdown));
        for e in &all {
            check(e);
        }
        // Every type has a builder.
        for t in EventType::ALL {
            assert!(all.iter().any(|e| e.event_type == t.as_str()), "{t:?}");
        }
    }
}
