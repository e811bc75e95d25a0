//! The `webhook-formatter` hook's types: the [`Event`] a formatter receives,
//! typed views of its `data` for the event types the gateway emits (see
//! `docs/webhooks.md`), and the [`OutgoingRequest`] it returns. Signing,
//! retries and ordering are the gateway's, not the formatter's.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::HookError;

/// The event type names the gateway emits today. More may come in minor
/// versions: a formatter should decline (`Ok(None)`) a type it does not know.
pub mod event_type {
    /// A client connection opened: [`ConnectionOpened`](super::ConnectionOpened).
    pub const CONNECTION_OPENED: &str = "connection.opened";
    /// A connection that had opened ended: [`ConnectionClosed`](super::ConnectionClosed).
    pub const CONNECTION_CLOSED: &str = "connection.closed";
    /// The user went from no open connection to one: [`UserOnline`](super::UserOnline).
    pub const USER_ONLINE: &str = "user.online";
    /// The user's last open connection closed: [`UserOffline`](super::UserOffline).
    pub const USER_OFFLINE: &str = "user.offline";
    /// The WebSocket service of a node started accepting connections (at
    /// start or by a reload): [`ServiceChange`](super::ServiceChange).
    pub const SERVICE_ENABLED: &str = "service.enabled";
    /// The WebSocket service of a node stopped accepting connections (by a
    /// reload or a shutdown): [`ServiceChange`](super::ServiceChange).
    pub const SERVICE_DISABLED: &str = "service.disabled";
}

/// An event as the gateway records it. Mirrors the WIT record `event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `evt_…`: the event id, which is also the webhook id.
    pub id: String,
    /// The event type, e.g. `connection.opened` (see [`event_type`]).
    pub event_type: String,
    /// When the event happened, in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The event's `data` object as JSON text (see `docs/webhooks.md`).
    pub data: String,
    /// The name of the webhook endpoint this request is for.
    pub endpoint: String,
}

impl Event {
    /// The `data` object parsed as JSON, or [`HookError::InvalidInput`] if it
    /// is not JSON.
    pub fn data_json(&self) -> Result<serde_json::Value, HookError> {
        self.data_as()
    }

    /// The `data` object deserialized into `T`, or [`HookError::InvalidInput`]
    /// naming the event type if it does not fit.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, HookError> {
        serde_json::from_str(&self.data).map_err(|e| {
            HookError::InvalidInput(format!(
                "data of {} event {}: {e}",
                self.event_type, self.id
            ))
        })
    }

    /// The `data` object as the typed payload of its event type, or
    /// [`EventPayload::Other`] for a type this SDK version does not know.
    pub fn payload(&self) -> Result<EventPayload, HookError> {
        Ok(match self.event_type.as_str() {
            event_type::CONNECTION_OPENED => EventPayload::ConnectionOpened(self.data_as()?),
            event_type::CONNECTION_CLOSED => EventPayload::ConnectionClosed(self.data_as()?),
            event_type::USER_ONLINE => EventPayload::UserOnline(self.data_as()?),
            event_type::USER_OFFLINE => EventPayload::UserOffline(self.data_as()?),
            event_type::SERVICE_ENABLED => EventPayload::ServiceEnabled(self.data_as()?),
            event_type::SERVICE_DISABLED => EventPayload::ServiceDisabled(self.data_as()?),
            _ => EventPayload::Other(self.data_json()?),
        })
    }

    /// The event time in whole seconds since the Unix epoch (rounded down).
    pub fn timestamp_secs(&self) -> i64 {
        self.timestamp_ms.div_euclid(1000)
    }
}

/// An event's `data`, typed by its event type. Returned by [`Event::payload`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EventPayload {
    /// `connection.opened`.
    ConnectionOpened(ConnectionOpened),
    /// `connection.closed`.
    ConnectionClosed(ConnectionClosed),
    /// `user.online`.
    UserOnline(UserOnline),
    /// `user.offline`.
    UserOffline(UserOffline),
    /// `service.enabled`.
    ServiceEnabled(ServiceChange),
    /// `service.disabled`.
    ServiceDisabled(ServiceChange),
    /// Another event type: its `data` as JSON.
    Other(serde_json::Value),
}

/// `data` of `connection.opened`: a client connection authenticated and was
/// recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConnectionOpened {
    /// `conn_…`, unique per connection.
    pub connection_id: String,
    /// The token's `sub`.
    pub user_id: String,
    /// The token's `device` claim, else `?device=`, else `"default"`.
    pub device_id: String,
    /// `node_id` of the gateway holding the connection.
    pub node_id: String,
    /// `ip:port` of the TCP peer.
    pub remote_addr: String,
    /// RFC 3339 time the connection opened.
    pub opened_at: String,
}

/// `data` of `connection.closed`: a connection that had opened ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConnectionClosed {
    /// `conn_…`, as in `connection.opened`.
    pub connection_id: String,
    /// The user, as in `connection.opened`.
    pub user_id: String,
    /// The device, as in `connection.opened`.
    pub device_id: String,
    /// The gateway node, as in `connection.opened`.
    pub node_id: String,
    /// The TCP peer, as in `connection.opened`.
    pub remote_addr: String,
    /// RFC 3339 time the connection opened.
    pub opened_at: String,
    /// RFC 3339 time the close was recorded.
    pub closed_at: String,
    /// `closed_at − opened_at` in milliseconds.
    pub duration_ms: u64,
    /// Why it ended, e.g. `client_close`, `heartbeat_timeout`, `replaced`.
    pub reason: String,
    /// The WebSocket close code.
    pub code: u16,
    /// The close reason text.
    pub message: String,
}

/// `data` of `user.online`: the user went from no open connection to one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UserOnline {
    /// The user.
    pub user_id: String,
    /// The connection that brought the user online.
    pub connection_id: String,
    /// Its device.
    pub device_id: String,
    /// Distinct devices connected after the change.
    pub devices: u32,
    /// Open connections after the change.
    pub connections: u32,
}

/// `data` of `user.offline`: the user's last open connection closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UserOffline {
    /// The user.
    pub user_id: String,
    /// The last connection to close.
    pub connection_id: String,
    /// Its device.
    pub device_id: String,
    /// That connection's close `reason`.
    pub reason: String,
    /// Distinct devices connected after the change (0).
    pub devices: u32,
    /// Open connections after the change (0).
    pub connections: u32,
}

/// `data` of `service.enabled` and `service.disabled`: a node's WebSocket
/// service started or stopped accepting connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ServiceChange {
    /// `node_id` of the gateway.
    pub node: String,
    /// Why: `start` or `reload` (enabled), `reload` or `shutdown` (disabled).
    pub reason: String,
}

/// The HTTP request to send for one event. Mirrors the WIT record
/// `outgoing-request`.
///
/// The gateway sets `webhook-*`, `content-type`, `content-length` and `host`
/// itself and refuses a request whose `headers` name one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutgoingRequest {
    /// The request body.
    pub body: Vec<u8>,
    /// The `content-type` header.
    pub content_type: String,
    /// Extra headers, as name and value.
    pub headers: Vec<(String, String)>,
    /// Appended to the endpoint URL's path, e.g. `/onebot/event`.
    pub path_suffix: Option<String>,
    /// Query string (without `?`) added to the endpoint URL.
    pub query: Option<String>,
}

impl OutgoingRequest {
    /// A request with this content type and body, no extra headers, path or
    /// query.
    pub fn new(content_type: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Self {
            body: body.into(),
            content_type: content_type.into(),
            ..Self::default()
        }
    }

    /// A request whose body is `value` as compact JSON, with content type
    /// `application/json`.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, HookError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| HookError::Other(format!("serializing the body: {e}")))?;
        Ok(Self::new("application/json", body))
    }

    /// This request with one more header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// This request with a path suffix (appended to the endpoint URL's path).
    #[must_use]
    pub fn with_path_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.path_suffix = Some(suffix.into());
        self
    }

    /// This request with a query string (without `?`).
    #[must_use]
    pub fn with_query(mut self, query: impl Into<String>) -> Self {
        self.query = Some(query.into());
        self
    }

    /// The value of the first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, for tests and logging.
    pub fn body_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, data: &str) -> Event {
        Event {
            id: "evt_1".into(),
            event_type: event_type.into(),
            timestamp_ms: 1_748_855_643_512,
            data: data.into(),
            endpoint: "business".into(),
        }
    }

    #[test]
    fn typed_payloads() {
        let e = event(
            "user.offline",
            r#"{"connection_id":"conn_1","connections":0,"device_id":"phone","devices":0,"reason":"heartbeat_timeout","user_id":"alice"}"#,
        );
        match e.payload().unwrap() {
            EventPayload::UserOffline(p) => {
                assert_eq!(p.user_id, "alice");
                assert_eq!(p.reason, "heartbeat_timeout");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.timestamp_secs(), 1_748_855_643);
        let other = event("something.new", r#"{"x":1}"#);
        assert_eq!(
            other.payload().unwrap(),
            EventPayload::Other(serde_json::json!({"x": 1}))
        );
        let bad = event("user.online", r#"{"user_id":"alice"}"#);
        assert!(matches!(bad.payload(), Err(HookError::InvalidInput(_))));
    }

    #[test]
    fn request_builders() {
        let r = OutgoingRequest::json(&serde_json::json!({"a": 1}))
            .unwrap()
            .with_header("X-Self-ID", "7")
            .with_query("event=x");
        assert_eq!(r.content_type, "application/json");
        assert_eq!(r.body, br#"{"a":1}"#);
        assert_eq!(r.header("x-self-id"), Some("7"));
        assert_eq!(r.query.as_deref(), Some("event=x"));
    }
}
