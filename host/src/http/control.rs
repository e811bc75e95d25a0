//! `POST /v1/control` (API key): the guards in front of
//! [`crate::control::Control::submit`] — a request budget per API key (token
//! bucket, `429` with `Retry-After`), and, when `control.require_signature`
//! is set, an HMAC-SHA256 signature over the timestamp and the body with
//! replay protection.
//!
//! Signature: `plugboard-timestamp: <unix seconds>` and
//! `plugboard-signature: v1=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>`
//! (several space-separated `v1=` values are accepted, for secret rotation
//! on the sender's side). A sender may add `plugboard-nonce: <id>`; the
//! signed text is then `"<timestamp>.<nonce>.<body>"`, so two requests with
//! the same body in the same second still have different signatures. A
//! timestamp further than `control.signature_tolerance` from the gateway's
//! clock is refused, and a signature already seen within that window is a
//! replay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{ApiBytes, ApiError, BodyKind, Route};
use crate::control::ControlBody;
use crate::server::App;

/// Remembered signatures before expired ones are swept.
const SEEN_SWEEP_AT: usize = 10_000;
/// Most bytes of a `plugboard-nonce`.
const MAX_NONCE: usize = 128;

pub fn routes() -> Vec<Route> {
    vec![Route::new(
        Method::POST,
        "/v1/control",
        BodyKind::Json,
        control,
    )]
}

/// Request budgets per API key and the signatures seen recently. Budgets
/// are in memory, per node: in cluster mode a key may send up to
/// `rate_limit` × the number of nodes it reaches (docs/cluster.md). Seen
/// signatures are in memory on a single node and in the database in
/// cluster mode, so a request replayed to another node is refused too.
#[derive(Default)]
pub struct Guard {
    buckets: Mutex<HashMap<[u8; 32], Bucket>>,
    /// Signature → unix ms until which it is remembered.
    seen: Mutex<HashMap<String, i64>>,
    /// Cluster mode: where every node's seen signatures are.
    shared: Option<Arc<dyn crate::storage::cluster::ClusterStore>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Guard {
    /// A guard whose seen signatures are shared through `store` (cluster mode).
    pub fn shared(store: Arc<dyn crate::storage::cluster::ClusterStore>) -> Guard {
        Guard {
            shared: Some(store),
            ..Guard::default()
        }
    }

    /// Remembers a signature, on every node in cluster mode; `Ok(false)`
    /// if it was already seen (a replay).
    async fn first_use_anywhere(
        &self,
        signature: &str,
        until_ms: i64,
    ) -> Result<bool, crate::storage::StorageError> {
        match &self.shared {
            None => Ok(self.first_use(signature, until_ms)),
            Some(store) => {
                let hash = hex(&Sha256::digest(signature.as_bytes()));
                store.signature_first_use(&hash, until_ms).await
            }
        }
    }

    /// Takes one request from `key`'s budget, or says how long to wait.
    fn take(&self, key: &str, rate: f64, burst: u32) -> Result<(), Duration> {
        let id: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(id).or_insert(Bucket {
            tokens: burst as f64,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst as f64);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    /// Remembers a signature; false if it was already seen (a replay).
    fn first_use(&self, signature: &str, until_ms: i64) -> bool {
        let now = crate::now_ms();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= SEEN_SWEEP_AT {
            seen.retain(|_, until| *until > now);
        }
        match seen.get(signature) {
            Some(until) if *until > now => false,
            _ => {
                seen.insert(signature.to_string(), until_ms);
                true
            }
        }
    }
}

fn count_refusal(app: &App, code: &str) {
    app.metrics
        .control_refusals
        .get_or_create(&crate::metrics::ReasonLabel {
            reason: code.to_string(),
        })
        .inc();
}

fn refuse(app: &App, status: StatusCode, code: &'static str, message: String) -> ApiError {
    count_refusal(app, code);
    ApiError::new(status, code, message)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Checks the signature headers of a request.
async fn verify(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let cfg = app.config();
    let c = &cfg.control;
    let bad = |m: String| refuse(app, StatusCode::UNAUTHORIZED, "bad_signature", m);
    let ts_text = headers
        .get("plugboard-timestamp")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            bad("control.require_signature is set: send `plugboard-timestamp` and `plugboard-signature`".into())
        })?;
    let ts: i64 = ts_text
        .trim()
        .parse()
        .map_err(|_| bad("`plugboard-timestamp` must be unix seconds".into()))?;
    let skew = (crate::now_ms() / 1000 - ts).unsigned_abs();
    if skew > c.signature_tolerance.as_secs() {
        return Err(bad(format!(
            "`plugboard-timestamp` is {skew}s away from the gateway's clock (control.signature_tolerance is {}s)",
            c.signature_tolerance.as_secs()
        )));
    }
    let header = headers
        .get("plugboard-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad("missing `plugboard-signature`".into()))?;
    let nonce = match headers.get("plugboard-nonce") {
        None => None,
        Some(v) => Some(parse_nonce(v).ok_or_else(|| {
            bad(format!(
                "`plugboard-nonce` must be 1 to {MAX_NONCE} characters of A-Z, a-z, 0-9, `-` or `_`"
            ))
        })?),
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(c.signing_secret.as_bytes())
        .expect("HMAC accepts any key length");
    mac.update(ts_text.trim().as_bytes());
    mac.update(b".");
    if let Some(nonce) = nonce {
        mac.update(nonce.as_bytes());
        mac.update(b".");
    }
    mac.update(body);
    let matched = header.split_whitespace().find(|part| {
        part.strip_prefix("v1=")
            .and_then(decode_hex)
            .is_some_and(|sig| mac.clone().verify_slice(&sig).is_ok())
    });
    let Some(signature) = matched else {
        return Err(bad(
            "`plugboard-signature` does not match: expected v1=<hex HMAC-SHA256 of \"<timestamp>.<body>\"> (of \"<timestamp>.<nonce>.<body>\" with `plugboard-nonce`)".into(),
        ));
    };
    let until = (ts + c.signature_tolerance.as_secs() as i64 + 1) * 1000;
    if !app
        .control_guard
        .first_use_anywhere(signature, until)
        .await?
    {
        return Err(refuse(
            app,
            StatusCode::UNAUTHORIZED,
            "replayed_request",
            "this signature was already used; sign every request anew, with a fresh `plugboard-nonce` to send the same body twice within a second".into(),
        ));
    }
    Ok(())
}

/// A nonce header's text, if it is one: a short token, so the signed text
/// `"<timestamp>.<nonce>.<body>"` splits one way only.
fn parse_nonce(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let ok = !text.is_empty()
        && text.len() <= MAX_NONCE
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(text)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

async fn control(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    match handle(&app, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let cfg = app.config();
    let key = crate::auth::bearer_token(headers).unwrap_or_default();
    if let Err(wait) = app
        .control_guard
        .take(key, cfg.control.rate_limit, cfg.control.rate_burst)
    {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        return Err(refuse(
            app,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "this API key may send {} control requests per second (burst {}); retry in {secs}s",
                cfg.control.rate_limit, cfg.control.rate_burst
            ),
        )
        .retry_after(secs));
    }
    if cfg.control.require_signature {
        verify(app, headers, body).await?;
    }
    // Parsed only after the signature is checked: the signature covers the
    // raw bytes, and an unsigned body is not worth parsing.
    let parsed: ControlBody = super::parse_json(headers, body)?;
    match app.control.submit(parsed).await {
        Ok(answer) => Ok((StatusCode::OK, Json(answer)).into_response()),
        Err(e) => {
            let refusal = match &e {
                crate::control::ControlError::Rejected { .. } => Some("rejected"),
                crate::control::ControlError::HandlerFailed { .. } => {
                    Some("control_handler_failed")
                }
                _ => None,
            };
            if let Some(code) = refusal {
                count_refusal(app, code);
            }
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_rate() {
        let g = Guard::default();
        for _ in 0..3 {
            assert!(g.take("k", 1.0, 3).is_ok());
        }
        let wait = g.take("k", 1.0, 3).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::ZERO);
        // Another key has its own budget.
        assert!(g.take("other", 1.0, 3).is_ok());
    }

    #[test]
    fn a_signature_is_used_once() {
        let g = Guard::default();
        let until = crate::now_ms() + 60_000;
        assert!(g.first_use("abc", until));
        assert!(!g.first_use("abc", until));
        assert!(g.first_use("def", until));
        assert_eq!(decode_hex("0aff"), Some(vec![10, 255]));
        assert_eq!(decode_hex("0az"), None);
    }
}
