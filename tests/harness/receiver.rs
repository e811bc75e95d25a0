//! A real HTTP webhook receiver on 127.0.0.1:0.
//!
//! It records every request, verifies each signature with the
//! `standardwebhooks` crate (an implementation independent of the
//! gateway's), and answers as the test tells it: 2xx, an error status, 410,
//! or 429 with `Retry-After`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;
use tokio::sync::Notify;

/// A webhook secret for tests (`whsec_` + base64 of 24 bytes).
pub const SECRET: &str = "whsec_dGVzdC1zZWNyZXQtMDEyMzQ1Njc4OWFiY2Rl";

/// How the receiver answers.
#[derive(Clone, Debug)]
pub enum Reply {
    Status(u16),
    RetryAfter(u16, u64),
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub webhook_id: String,
    pub signature_ok: bool,
    pub answered: u16,
    pub at: Instant,
    pub body: Value,
}

/// One event from a request answered with 2xx (batches are expanded).
#[derive(Clone, Debug)]
pub struct Delivered {
    pub webhook_id: String,
    pub id: String,
    pub event_type: String,
    pub data: Value,
}

impl Delivered {
    pub fn str(&self, field: &str) -> &str {
        self.data[field].as_str().unwrap_or_default()
    }
    pub fn code(&self) -> u64 {
        self.data["code"].as_u64().unwrap_or(0)
    }
}

#[derive(Default)]
struct Inner {
    attempts: Vec<Attempt>,
    delivered: Vec<Delivered>,
}

struct Shared {
    inner: Mutex<Inner>,
    reply: Mutex<Reply>,
    notify: Notify,
    verifier: standardwebhooks::Webhook,
}

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    shared: Arc<Shared>,
    pub url: String,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_with_secret(SECRET).await
    }

    /// A receiver that verifies signatures made with `secret`.
    pub async fn start_with_secret(secret: &str) -> Receiver {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            reply: Mutex::new(Reply::Status(200)),
            notify: Notify::new(),
            verifier: standardwebhooks::Webhook::new(secret).expect("valid test secret"),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            shared,
            url: format!("http://{addr}/hooks"),
        }
    }

    /// Sets how the receiver answers from now on.
    pub fn reply(&self, reply: Reply) {
        *self.shared.reply.lock().unwrap() = reply;
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.shared.inner.lock().unwrap().attempts.clone()
    }

    /// Events from successful requests, in the order they arrived.
    pub fn delivered(&self) -> Vec<Delivered> {
        self.shared.inner.lock().unwrap().delivered.clone()
    }

    /// Events about one connection, in arrival order.
    pub fn for_connection(&self, connection_id: &str) -> Vec<Delivered> {
        self.delivered()
            .into_iter()
            .filter(|d| d.str("connection_id") == connection_id)
            .collect()
    }

    /// Events about one user, in arrival order.
    pub fn for_user(&self, user_id: &str) -> Vec<Delivered> {
        self.delivered()
            .into_iter()
            .filter(|d| d.str("user_id") == user_id)
            .collect()
    }

    /// Waits until `check` over the delivered events returns `Some`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[Delivered]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            if let Some(v) = check(&self.shared.inner.lock().unwrap().delivered) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen: Vec<String> = self
                    .delivered()
                    .iter()
                    .map(|d| format!("{} {} {}", d.event_type, d.str("user_id"), d.str("reason")))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; delivered so far: {seen:#?}"
                );
            }
        }
    }

    /// Waits for the `connection.closed` event of a connection and returns it.
    pub async fn closed_event(&self, connection_id: &str) -> Delivered {
        let id = connection_id.to_string();
        self.wait_for(&format!("connection.closed of {id}"), crate::WAIT, |ds| {
            ds.iter()
                .find(|d| d.event_type == "connection.closed" && d.str("connection_id") == id)
                .cloned()
        })
        .await
    }

    /// Asserts the webhook stream holds exactly one opened and one closed
    /// event (distinct event ids) for the connection; returns the closed one.
    pub async fn assert_exactly_once(&self, connection_id: &str) -> Delivered {
        let closed = self.closed_event(connection_id).await;
        let events = self.for_connection(connection_id);
        let mut ids: Vec<(&str, &str)> = events
            .iter()
            .filter(|d| d.event_type.starts_with("connection."))
            .map(|d| (d.event_type.as_str(), d.id.as_str()))
            .collect();
        ids.sort();
        ids.dedup();
        let opened = ids
            .iter()
            .filter(|(t, _)| *t == "connection.opened")
            .count();
        let closed_n = ids
            .iter()
            .filter(|(t, _)| *t == "connection.closed")
            .count();
        assert_eq!(
            (opened, closed_n),
            (1, 1),
            "connection {connection_id}: expected one opened and one closed event, got {events:#?}"
        );
        closed
    }

    /// Requests whose signature did not verify.
    pub fn bad_signatures(&self) -> usize {
        self.attempts().iter().filter(|a| !a.signature_ok).count()
    }
}

async fn handle(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature_ok = shared.verifier.verify(&body, &headers).is_ok();
    let webhook_id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = shared.reply.lock().unwrap().clone();
    let (status, retry_after) = match reply {
        Reply::Status(s) => (s, None),
        Reply::RetryAfter(s, secs) => (s, Some(secs)),
    };
    // A request with a bad signature is refused, as a real receiver would.
    let status = if signature_ok { status } else { 401 };
    {
        let mut inner = shared.inner.lock().unwrap();
        inner.attempts.push(Attempt {
            webhook_id: webhook_id.clone(),
            signature_ok,
            answered: status,
            at: Instant::now(),
            body: json.clone(),
        });
        if (200..300).contains(&status) {
            let events: Vec<Value> = if json["type"] == "batch" {
                json["data"]["events"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            } else {
                vec![json.clone()]
            };
            for e in events {
                inner.delivered.push(Delivered {
                    webhook_id: webhook_id.clone(),
                    id: e["id"].as_str().unwrap_or_default().to_string(),
                    event_type: e["type"].as_str().unwrap_or_default().to_string(),
                    data: e["data"].clone(),
                });
            }
        }
    }
    shared.notify.notify_waiters();
    let mut resp = StatusCode::from_u16(status).unwrap().into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    resp
}
