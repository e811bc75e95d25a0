//! A real HTTP webhook receiver on 127.0.0.1:0.
//!
//! It records every request (method, path, query, headers and body),
//! verifies each signature with the `standardwebhooks` crate (an
//! implementation independent of the gateway's), and answers as the test
//! tells it: 2xx, an error status, 410, or 429 with `Retry-After`.
//!
//! A request whose signature does not verify fails the test that owns the
//! receiver, whatever that test looks at: every helper that waits for
//! deliveries panics as soon as one is recorded, and the last clone of a
//! `Receiver` to be dropped panics if one was recorded at all (unless the
//! test said it expects them with [`Receiver::allow_bad_signatures`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
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
    /// The body as JSON (`Null` when it is not JSON: see `raw_body`).
    pub body: Value,
    pub method: Method,
    /// The path, percent-encoding kept as sent (`/hooks/onebot`).
    pub path: String,
    /// The raw query string without `?`, if the request had one.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub raw_body: Bytes,
}

impl Attempt {
    /// A header's value as text (`None` if absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of a header, in the order sent.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// The query as decoded (key, value) pairs, in order, repeats kept.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        let query = self.query.as_deref().unwrap_or_default();
        reqwest::Url::parse(&format!("http://receiver/?{query}"))
            .map(|u| {
                u.query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }
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
    /// Answers used, one per request, before `reply` (see `reply_next`).
    next_replies: Mutex<std::collections::VecDeque<Reply>>,
    notify: Notify,
    verifier: standardwebhooks::Webhook,
    /// Set by a test that sends badly signed requests on purpose.
    bad_signatures_allowed: AtomicBool,
}

impl Shared {
    /// Panics if a request with a bad signature was recorded (and the test
    /// did not say it expects them).
    fn check_signatures(&self) {
        if self.bad_signatures_allowed.load(Ordering::Relaxed) {
            return;
        }
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let bad: Vec<String> = inner
            .attempts
            .iter()
            .filter(|a| !a.signature_ok)
            .map(|a| {
                format!(
                    "{} {}{} webhook-id={:?} webhook-timestamp={:?} webhook-signature={:?}",
                    a.method,
                    a.path,
                    a.query
                        .as_deref()
                        .map(|q| format!("?{q}"))
                        .unwrap_or_default(),
                    a.webhook_id,
                    a.header("webhook-timestamp"),
                    a.header("webhook-signature"),
                )
            })
            .collect();
        drop(inner);
        if !bad.is_empty() {
            panic!(
                "the receiver got {} request(s) whose signature does not verify: {bad:#?}",
                bad.len()
            );
        }
    }
}

/// Checks the signatures once more when the test lets go of its receiver.
struct SignatureGuard(Arc<Shared>);

impl Drop for SignatureGuard {
    fn drop(&mut self) {
        // A test that already failed keeps its own message (and a second
        // panic while unwinding would abort the process).
        if !std::thread::panicking() {
            self.0.check_signatures();
        }
    }
}

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    shared: Arc<Shared>,
    /// Dropped with the last clone; the server task holds only `shared`.
    _guard: Arc<SignatureGuard>,
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
            next_replies: Mutex::new(Default::default()),
            notify: Notify::new(),
            verifier: standardwebhooks::Webhook::new(secret).expect("valid test secret"),
            bad_signatures_allowed: AtomicBool::new(false),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            _guard: Arc::new(SignatureGuard(shared.clone())),
            shared,
            url: format!("http://{addr}/hooks"),
        }
    }

    /// `host:port` the receiver listens on.
    pub fn authority(&self) -> &str {
        let rest = self.url.trim_start_matches("http://");
        rest.split('/').next().unwrap_or(rest)
    }

    /// Sets how the receiver answers from now on.
    pub fn reply(&self, reply: Reply) {
        *self.shared.reply.lock().unwrap() = reply;
    }

    /// Answers the next request with `reply`, then goes back to the answer
    /// set by `reply` (queued answers are used in the order given).
    pub fn reply_next(&self, reply: Reply) {
        self.shared.next_replies.lock().unwrap().push_back(reply);
    }

    /// For a test that sends badly signed requests on purpose: they no
    /// longer fail the test.
    pub fn allow_bad_signatures(&self) {
        self.shared
            .bad_signatures_allowed
            .store(true, Ordering::Relaxed);
    }

    /// Every request so far, in arrival order (the same as `requests`).
    pub fn attempts(&self) -> Vec<Attempt> {
        self.shared.inner.lock().unwrap().attempts.clone()
    }

    /// Every request so far, in arrival order: method, path, query,
    /// headers and body, whatever it was answered.
    pub fn requests(&self) -> Vec<Attempt> {
        self.attempts()
    }

    /// Waits until `check` over every request so far returns `Some`.
    pub async fn wait_for_requests<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[Attempt]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            self.shared.check_signatures();
            if let Some(v) = check(&self.shared.inner.lock().unwrap().attempts) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen: Vec<String> = self
                    .attempts()
                    .iter()
                    .map(|a| format!("{} {} -> {}", a.method, a.path, a.answered))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; requests so far: {seen:#?}"
                );
            }
        }
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
            self.shared.check_signatures();
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
    ///
    /// The count is taken only once the gateways that deliver here have
    /// nothing left for this receiver (see `wait_settled`), so a duplicate
    /// recorded after the first close is counted too.
    pub async fn assert_exactly_once(&self, connection_id: &str) -> Delivered {
        let closed = self.closed_event(connection_id).await;
        self.wait_settled().await;
        self.shared.check_signatures();
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

    /// Waits until every running test gateway that has an enabled endpoint
    /// pointing here reports nothing pending for it in `GET /admin/webhooks`
    /// (on two reads in a row, with no delivery in between), so that
    /// everything those gateways recorded so far has reached this receiver.
    pub async fn wait_settled(&self) {
        let me = self.authority().to_string();
        let http = reqwest::Client::new();
        for addr in crate::gateway::running_addrs() {
            let deadline = tokio::time::Instant::now() + crate::WAIT;
            let mut last: Option<Vec<(String, i64)>> = None;
            loop {
                let Some(view) = endpoints_here(&http, &addr, &me).await else {
                    break; // That gateway is gone or does not answer.
                };
                if view.is_empty() {
                    break;
                }
                let settled = view.iter().all(|(_, pending)| *pending == 0);
                if settled && last.as_ref() == Some(&view) {
                    break;
                }
                last = settled.then_some(view.clone());
                if tokio::time::Instant::now() >= deadline {
                    panic!(
                        "the gateway on {addr} still has deliveries pending for {me} after {:?}: {view:?}",
                        crate::WAIT
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Requests whose signature did not verify.
    pub fn bad_signatures(&self) -> usize {
        self.attempts().iter().filter(|a| !a.signature_ok).count()
    }
}

/// `(endpoint name + delivered_total, pending)` of the enabled endpoints of
/// the gateway on `addr` whose URL points at `authority`; `None` if the
/// gateway does not answer.
async fn endpoints_here(
    http: &reqwest::Client,
    addr: &str,
    authority: &str,
) -> Option<Vec<(String, i64)>> {
    let resp = http
        .get(format!("http://{addr}/admin/webhooks"))
        .bearer_auth(crate::gateway::ADMIN_TOKEN)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let view: Value = resp.json().await.ok()?;
    let points_here = |url: &str| {
        url.contains(&format!("//{authority}/")) || url.contains(&format!("@{authority}/"))
    };
    Some(
        view["endpoints"]
            .as_array()?
            .iter()
            .filter(|e| e["disabled"] != true)
            .filter(|e| e["url"].as_str().is_some_and(points_here))
            .map(|e| {
                (
                    format!("{} {}", e["name"], e["delivered_total"]),
                    e["pending"].as_i64().unwrap_or(-1),
                )
            })
            .collect(),
    )
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let signature_ok = shared.verifier.verify(&body, &headers).is_ok();
    let webhook_id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let queued = shared.next_replies.lock().unwrap().pop_front();
    let reply = queued.unwrap_or_else(|| shared.reply.lock().unwrap().clone());
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
            method,
            path: uri.path().to_string(),
            query: uri.query().map(str::to_string),
            headers: headers.clone(),
            raw_body: body.clone(),
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
