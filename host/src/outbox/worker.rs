//! The delivery worker of one endpoint.
//!
//! Loop: move new outbox events into the endpoint's queue, claim what is
//! due (at most one event per user at a time, so per-user order holds),
//! send each claim as one signed request (a batch when `batch_max > 1`),
//! settle the outcome in storage, and sleep until the next wake-up, the next
//! due retry, or a new event. Up to `outbox.max_in_flight` requests run at
//! once, each for different users.
//!
//! The worker works only while its process holds the endpoint's delivery
//! lease ([`super::lease`]): without it, it neither fans out nor claims, and
//! a lease lost mid-way stops the next claim (requests already claimed are
//! finished and settled; their claims keep them to this worker). Endpoint
//! state is shared through storage: before each claim round the worker
//! reads whether the endpoint is disabled (by another process's worker or
//! admin API as well as this one's), and its rounds also follow the
//! lease's renewals, so what another process recorded (events, a
//! re-enable, failed deliveries put back) is picked up within a renewal
//! period even when nothing wakes this process.
//!
//! While storage is unavailable the worker does not spin or stop: it waits
//! with a growing backoff (up to the idle period), ignoring wake-ups, and
//! picks up where the queue stands once storage answers again. Nothing is
//! lost meanwhile: events are in storage or were never written, and a
//! delivery whose outcome could not be settled is sent again after its
//! lease lapses (at-least-once).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::lease::Lease;
use super::sign::sign;
use super::Shared;
use crate::config::{OnError, OutboxConfig, WebhookConfig};
use crate::metrics::{EndpointLabel, EndpointOutcomeLabel};
use crate::plugins::bindings::exports::plugboard::plugin::webhook_formatter as wf;
use crate::storage::{ClaimedEvent, EndpointState, EventFilter, Settlement, StorageError};
use crate::unavailable::Backoff;

/// Longest the worker sleeps without checking storage.
const MAX_IDLE: Duration = Duration::from_secs(5);
/// The first wait after storage was found unavailable; doubling up to `MAX_IDLE`.
const OUTAGE_FIRST: Duration = Duration::from_millis(100);
/// Outbox rows considered per fan-out step.
const FANOUT_STEP: usize = 1000;

pub(crate) async fn run(
    shared: Arc<Shared>,
    state: EndpointState,
    config: Arc<ArcSwap<WebhookConfig>>,
    disabled: Arc<AtomicBool>,
    lease: Lease,
    stop: CancellationToken,
) {
    let name = config.load().name.clone();
    if let Some(reason) = &state.disabled_reason {
        tracing::warn!(endpoint = %name, reason = %reason, "webhook endpoint is disabled; re-enable it through the admin API");
        disabled.store(true, Ordering::Release);
        shared
            .metrics
            .webhook_endpoint_disabled
            .get_or_create(&EndpointLabel {
                endpoint: name.clone(),
            })
            .set(1);
    }
    let mut wake = shared.wakeup.subscribe();
    let mut leading = lease.watch();
    let mut inflight: JoinSet<Finished> = JoinSet::new();
    let mut linger_until: Option<tokio::time::Instant> = None;
    let mut outage = Backoff::new(OUTAGE_FIRST, MAX_IDLE);
    let endpoint = EndpointLabel {
        endpoint: name.clone(),
    };
    // Requests answered since the last round, settled in the next one.
    let mut finished: Vec<Finished> = Vec::new();
    loop {
        // Set by a step that found storage unavailable.
        let mut unavailable: Option<StorageError> = None;
        // Reap every finished request: `len` counts them until joined, and
        // the select below joins at most one per turn, so under a stream of
        // wake-ups finished requests would hold their slots.
        while let Some(done) = inflight.try_join_next() {
            finished.extend(done.ok());
        }
        let cfg = config.load_full();
        let settings = shared.settings.load_full();
        // Another process's worker delivers this endpoint meanwhile.
        let leads = leading.holds();
        let lingering = linger_until.is_some_and(|t| t > tokio::time::Instant::now());
        if !lingering && cfg.enabled && leads {
            // The shared state: disabled or re-enabled by any process.
            match shared.storage.endpoint_disabled(&name).await {
                Ok(reason) => follow_disabled(&shared, &name, &disabled, reason),
                Err(e) if e.is_unavailable() => unavailable = Some(e),
                Err(e) => {
                    tracing::error!(endpoint = %name, error = %e, "cannot read whether the endpoint is disabled");
                }
            }
        }
        let claims = !lingering
            && unavailable.is_none()
            && cfg.enabled
            && !disabled.load(Ordering::Acquire)
            && leads;
        // 1. Settle what was answered, 2. move new events into this
        // endpoint's queue, 3. claim what is due. The three are queued
        // for the writer at once, in this order (join3 polls its futures
        // in argument order, and each storage call queues its write on its
        // first poll), so that they usually share one transaction: under
        // load a round costs one commit wait, not three. A round that
        // settles a failure settles first and claims after, so that a 410
        // or a failing streak can disable the endpoint before anything
        // more is claimed for it.
        let all_ok = finished
            .iter()
            .all(|f| matches!(f.outcome, Outcome::Success | Outcome::Skipped));
        let settling = settle(
            &shared,
            &cfg,
            &settings,
            &disabled,
            &endpoint,
            std::mem::take(&mut finished),
        );
        let fanning = async {
            if leads {
                fan_out(&shared, &name, &cfg).await
            } else {
                None
            }
        };
        let per_request = cfg.batch_max.max(1);
        // One claim for every free request slot: while the storage writer
        // is busy each write waits for a commit, so claiming slot by slot
        // would starve the endpoint.
        let free = settings.max_in_flight.saturating_sub(inflight.len());
        let claiming = async {
            if !claims || free == 0 {
                return None;
            }
            let now = crate::now_ms();
            let claimed_until =
                now + (settings.request_timeout + Duration::from_secs(5)).as_millis() as i64;
            Some(
                shared
                    .storage
                    .deliveries_claim(&name, now, per_request * free, claimed_until)
                    .await,
            )
        };
        let (fanned, claimed) = if all_ok {
            let ((), fanned, claimed) =
                futures_util::future::join3(settling, fanning, claiming).await;
            (fanned, claimed)
        } else {
            settling.await;
            let fanned = fanning.await;
            // The round's settlements may have disabled the endpoint.
            let claimed = if disabled.load(Ordering::Acquire) {
                None
            } else {
                claiming.await
            };
            (fanned, claimed)
        };
        if let Some(e) = fanned {
            unavailable = Some(e);
        }
        let mut idle = MAX_IDLE;
        if lingering {
            idle = linger_until
                .unwrap()
                .saturating_duration_since(tokio::time::Instant::now());
        }
        match claimed {
            Some(Ok(claimed)) => {
                // Claims hold at most one event per user, so any chunk is a
                // valid batch.
                let mut claimed = claimed.into_iter().peekable();
                while claimed.peek().is_some() {
                    let chunk: Vec<ClaimedEvent> = claimed.by_ref().take(per_request).collect();
                    inflight.spawn(deliver(shared.clone(), cfg.clone(), chunk));
                }
            }
            Some(Err(e)) if e.is_unavailable() => unavailable = Some(e),
            Some(Err(e)) => {
                tracing::error!(endpoint = %name, error = %e, "cannot claim deliveries");
            }
            None => {}
        }
        if claims && unavailable.is_none() {
            match shared.storage.deliveries_next_due(&name).await {
                Ok(Some(next)) => {
                    let wait = (next - crate::now_ms()).max(0) as u64;
                    idle = idle.min(Duration::from_millis(wait));
                }
                Ok(None) => {}
                Err(e) if e.is_unavailable() => unavailable = Some(e),
                Err(_) => {}
            }
        }
        if !lingering {
            linger_until = None;
        }
        // While storage is unavailable: wait longer each time, and let no
        // wake-up cut the wait short.
        let backing_off = match unavailable {
            Some(e) => {
                idle = outage.failed();
                if outage.failures() == 1 {
                    tracing::warn!(endpoint = %name, error = %e,
                        "storage unavailable: webhook delivery waits for it and tries again");
                }
                true
            }
            None => {
                if outage.failures() > 0 {
                    tracing::info!(endpoint = %name, "storage answers again: webhook delivery resumes");
                    outage.reset();
                }
                false
            }
        };
        // 3. Wait for something to do.
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(done) = inflight.join_next(), if !inflight.is_empty() => finished.extend(done.ok()),
            changed = wake.changed(), if !backing_off => {
                if changed.is_err() {
                    break;
                }
                // A batching endpoint lets a batch fill before claiming it.
                if cfg.batch_max > 1 && !cfg.batch_linger.is_zero() && linger_until.is_none() {
                    linger_until = Some(tokio::time::Instant::now() + cfg.batch_linger);
                }
            }
            // Taken, renewed or lost: a renewal is also the turn at which
            // what other processes recorded is picked up.
            Ok(()) = leading.changed() => {}
            _ = tokio::time::sleep(idle), if inflight.len() < settings.max_in_flight => {}
        }
    }
    inflight.abort_all();
    // What was answered before the stop is recorded; aborted requests are
    // sent again once their claims lapse.
    while let Some(done) = inflight.join_next().await {
        finished.extend(done.ok());
    }
    if !finished.is_empty() {
        let cfg = config.load_full();
        let settings = shared.settings.load_full();
        settle(&shared, &cfg, &settings, &disabled, &endpoint, finished).await;
    }
    // After the flush (shutdown) or removal: another process takes over now.
    lease.end().await;
}

/// Moves new outbox events into the endpoint's queue, a step at a time
/// until it is caught up. Returns the error if storage is unavailable.
async fn fan_out(shared: &Shared, name: &str, cfg: &Arc<WebhookConfig>) -> Option<StorageError> {
    let accepts = {
        let cfg = cfg.clone();
        Arc::new(move |t: &str| cfg.accepts(t)) as EventFilter
    };
    loop {
        match shared
            .storage
            .endpoint_fanout(name, accepts.clone(), FANOUT_STEP)
            .await
        {
            Ok(n) if n == FANOUT_STEP => {}
            Ok(_) => return None,
            Err(e) if e.is_unavailable() => return Some(e),
            Err(e) => {
                tracing::error!(endpoint = %name, error = %e, "webhook fan-out failed");
                return None;
            }
        }
    }
}

/// Applies the disabled state read from storage (`reason`) to the worker's
/// flag and gauge; a change there was made by another process (this one's
/// own changes set the flag as they record them).
fn follow_disabled(shared: &Shared, name: &str, disabled: &AtomicBool, reason: Option<String>) {
    let now = reason.is_some();
    if disabled.swap(now, Ordering::AcqRel) == now {
        return;
    }
    shared
        .metrics
        .webhook_endpoint_disabled
        .get_or_create(&EndpointLabel {
            endpoint: name.to_string(),
        })
        .set(i64::from(now));
    match reason {
        Some(reason) => tracing::warn!(endpoint = %name, reason = %reason,
            "webhook endpoint was disabled by another gateway process; delivery stops, its events are kept"),
        None => tracing::info!(endpoint = %name,
            "webhook endpoint was re-enabled by another gateway process; delivery resumes"),
    }
}

/// A request that was answered (or decided without sending), to be
/// settled in the worker's next round.
struct Finished {
    /// The `webhook-id` it was sent under.
    id: String,
    events: Vec<ClaimedEvent>,
    outcome: Outcome,
}

/// What one request came to.
enum Outcome {
    Success,
    Gone,
    /// The formatter declined the event for this endpoint.
    Skipped,
    Failure {
        label: &'static str,
        error: String,
        retry_after: Option<Duration>,
    },
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn envelope(e: &ClaimedEvent) -> String {
    format!(
        r#"{{"id":{},"type":{},"timestamp":{},"data":{}}}"#,
        json_str(&e.id),
        json_str(&e.event_type),
        json_str(&crate::rfc3339_ms(e.created_at)),
        e.data
    )
}

/// The webhook id and body of a request carrying `events`.
pub fn request_body(events: &[ClaimedEvent], endpoint_batches: bool) -> (String, String) {
    if !endpoint_batches && events.len() == 1 {
        return (events[0].id.clone(), envelope(&events[0]));
    }
    let first = &events[0];
    let id = format!("bat_{}", first.id.trim_start_matches("evt_"));
    let items: Vec<String> = events.iter().map(envelope).collect();
    let body = format!(
        r#"{{"id":{},"type":"batch","timestamp":{},"data":{{"events":[{}]}}}}"#,
        json_str(&id),
        json_str(&crate::rfc3339_ms(crate::now_ms())),
        items.join(",")
    );
    (id, body)
}

fn parse_retry_after(v: &reqwest::header::HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Formats and sends one claimed request; the outcome is settled by the
/// worker's next round.
async fn deliver(
    shared: Arc<Shared>,
    cfg: Arc<WebhookConfig>,
    events: Vec<ClaimedEvent>,
) -> Finished {
    let settings = shared.settings.load_full();
    let (id, default_body) = request_body(&events, cfg.batch_max > 1);
    let endpoint = EndpointLabel {
        endpoint: cfg.name.clone(),
    };
    let mut request = Prepared {
        url: cfg.url.clone(),
        content_type: reqwest::header::HeaderValue::from_static("application/json"),
        headers: Vec::new(),
        body: default_body.into_bytes(),
    };
    let mut early = None;
    if let (Some(formatter), Some(plugins)) = (&cfg.formatter, &shared.plugins) {
        // Validation keeps formatters to endpoints without batching: one event.
        let e = &events[0];
        let event = wf::Event {
            id: e.id.clone(),
            event_type: e.event_type.clone(),
            timestamp_ms: e.created_at,
            data: e.data.clone(),
            endpoint: cfg.name.clone(),
        };
        match plugins.format(formatter, &event, &cfg.url).await {
            Ok(None) => early = Some(Outcome::Skipped),
            Ok(Some(req)) => {
                request.url = req.url;
                request.content_type = req.content_type;
                request.headers = req.headers;
                request.body = req.body;
            }
            Err(failure) => match plugins.on_error(formatter, "webhook-formatter") {
                OnError::FailOpen => tracing::warn!(
                    endpoint = %cfg.name, plugin = %formatter, webhook_id = %id, error = %failure,
                    "formatter failed; sending the default body (on_error = fail-open)"
                ),
                OnError::FailClosed => {
                    early = Some(Outcome::Failure {
                        label: "formatter_failed",
                        error: format!("formatter `{formatter}` failed: {failure}"),
                        retry_after: None,
                    })
                }
            },
        }
    }
    let outcome = match early {
        Some(outcome) => outcome,
        None => send(&shared, &settings, &endpoint, &id, request, &cfg.key()).await,
    };
    let label = match &outcome {
        Outcome::Success => "success",
        Outcome::Gone => "gone",
        Outcome::Skipped => "skipped",
        Outcome::Failure { label, .. } => label,
    };
    shared
        .metrics
        .webhook_attempts
        .get_or_create(&EndpointOutcomeLabel {
            endpoint: cfg.name.clone(),
            outcome: label.to_string(),
        })
        .inc();
    Finished {
        id,
        events,
        outcome,
    }
}

/// The request about to be signed and sent.
struct Prepared {
    url: String,
    content_type: reqwest::header::HeaderValue,
    headers: Vec<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    body: Vec<u8>,
}

/// Signs and sends one request; classifies the answer.
async fn send(
    shared: &Shared,
    settings: &OutboxConfig,
    endpoint: &EndpointLabel,
    id: &str,
    request: Prepared,
    key: &[u8],
) -> Outcome {
    let timestamp = crate::now_ms() / 1000;
    let signature = sign(key, id, timestamp, &request.body);
    let started = Instant::now();
    let mut builder = shared
        .client
        .post(&request.url)
        .timeout(settings.request_timeout);
    for (name, value) in request.headers {
        builder = builder.header(name, value);
    }
    let result = builder
        .header(reqwest::header::CONTENT_TYPE, request.content_type)
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(request.body)
        .send()
        .await;
    shared
        .metrics
        .webhook_latency_seconds
        .get_or_create(endpoint)
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(resp) if resp.status().is_success() => Outcome::Success,
        Ok(resp) if resp.status() == reqwest::StatusCode::GONE => Outcome::Gone,
        Ok(resp) => {
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(parse_retry_after);
            Outcome::Failure {
                label: if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    "rate_limited"
                } else {
                    "http_error"
                },
                error: format!("HTTP {status}"),
                retry_after,
            }
        }
        Err(e) => {
            // reqwest names the URL in its errors, and the URL may carry
            // credentials; the error goes to `last_error` and the log.
            let shown = e
                .url()
                .and_then(|u| reqwest::Url::parse(&crate::config::redact_url(u.as_str())).ok());
            let e = match shown {
                Some(url) => e.with_url(url),
                None => e.without_url(),
            };
            Outcome::Failure {
                label: if e.is_timeout() {
                    "timeout"
                } else {
                    "network_error"
                },
                error: format!("request failed: {}", error_chain(&e)),
                retry_after: None,
            }
        }
    }
}

/// Records the outcomes of a round's finished requests in one storage
/// write (see [`settlements`]), then the lag of what was delivered and,
/// when the endpoint answered 410 or has failed for `disable_after`, that
/// it is disabled.
async fn settle(
    shared: &Shared,
    cfg: &WebhookConfig,
    settings: &OutboxConfig,
    disabled: &AtomicBool,
    endpoint: &EndpointLabel,
    finished: Vec<Finished>,
) {
    if finished.is_empty() {
        return;
    }
    let now = crate::now_ms();
    let (planned, disable_reason) = settlements(cfg, settings, &finished, now);
    let skipped: usize = finished
        .iter()
        .filter(|f| matches!(f.outcome, Outcome::Skipped))
        .count();
    if skipped > 0 {
        shared
            .metrics
            .webhook_skipped
            .get_or_create(endpoint)
            .inc_by(skipped as u64);
    }
    let settled = shared
        .storage
        .deliveries_settle_all(&cfg.name, planned, now)
        .await;
    match settled {
        Ok(failing_since) => {
            {
                let lag = shared
                    .metrics
                    .webhook_event_lag_seconds
                    .get_or_create(endpoint);
                for f in finished
                    .iter()
                    .filter(|f| matches!(f.outcome, Outcome::Success))
                {
                    for e in &f.events {
                        lag.observe(((now - e.created_at).max(0) as f64) / 1000.0);
                    }
                }
            }
            let reason = disable_reason
                .or_else(|| failing_too_long(failing_since, now, settings.disable_after));
            if let Some(reason) = reason {
                if !disabled.load(Ordering::Acquire) {
                    // Recorded before the flag flips, so whoever sees the
                    // endpoint disabled also sees why.
                    if let Err(e) = shared
                        .storage
                        .endpoint_set_disabled(&cfg.name, Some(reason.clone()), now)
                        .await
                    {
                        tracing::error!(endpoint = %cfg.name, error = %e, "cannot record endpoint as disabled");
                    }
                    if !disabled.swap(true, Ordering::AcqRel) {
                        tracing::error!(endpoint = %cfg.name, reason = %reason, "webhook endpoint disabled; its events are kept until it is re-enabled");
                        shared
                            .metrics
                            .webhook_endpoint_disabled
                            .get_or_create(endpoint)
                            .set(1);
                    }
                }
            }
        }
        Err(e) => {
            let ids: Vec<&str> = finished.iter().map(|f| f.id.as_str()).collect();
            tracing::error!(
                endpoint = %cfg.name, webhook_ids = ?ids, error = %e,
                "cannot record delivery outcomes; those deliveries will be attempted again"
            );
        }
    }
}

/// The storage settlements of a round: every delivered event in one
/// entry, every skipped one in another, then each failed request's own
/// (each event on its own attempt count: in a batch, an event on its last
/// retry may fail for good while a fresh one is retried). Also the reason
/// to disable the endpoint, if one answered 410 Gone.
fn settlements(
    cfg: &WebhookConfig,
    settings: &OutboxConfig,
    finished: &[Finished],
    now: i64,
) -> (Vec<(Settlement, Vec<i64>)>, Option<String>) {
    let seqs_of = |outcome: fn(&Outcome) -> bool| -> Vec<i64> {
        finished
            .iter()
            .filter(|f| outcome(&f.outcome))
            .flat_map(|f| f.events.iter().map(|e| e.seq))
            .collect()
    };
    let mut planned: Vec<(Settlement, Vec<i64>)> = Vec::new();
    let delivered = seqs_of(|o| matches!(o, Outcome::Success));
    if !delivered.is_empty() {
        planned.push((Settlement::Delivered, delivered));
    }
    let skipped = seqs_of(|o| matches!(o, Outcome::Skipped));
    if !skipped.is_empty() {
        planned.push((Settlement::Skipped, skipped));
    }
    let mut disable_reason = None;
    for Finished {
        id,
        events,
        outcome,
    } in finished
    {
        match outcome {
            Outcome::Success | Outcome::Skipped => {}
            Outcome::Gone => {
                planned.push((
                    Settlement::Hold {
                        error: "HTTP 410 Gone".into(),
                    },
                    events.iter().map(|e| e.seq).collect(),
                ));
                disable_reason = Some("the endpoint answered 410 Gone".to_string());
            }
            Outcome::Failure {
                error, retry_after, ..
            } => {
                let (exhausted, retry): (Vec<&ClaimedEvent>, Vec<&ClaimedEvent>) = events
                    .iter()
                    .partition(|e| e.attempts as usize >= settings.retry_schedule.len());
                if !exhausted.is_empty() {
                    tracing::warn!(
                        endpoint = %cfg.name, webhook_id = %id, events = exhausted.len(), error = %error,
                        "webhook delivery failed after its last retry; kept as failed"
                    );
                    planned.push((
                        Settlement::Failed {
                            error: error.clone(),
                        },
                        exhausted.iter().map(|e| e.seq).collect(),
                    ));
                }
                if !retry.is_empty() {
                    // Retry n waits retry_schedule[n - 1]; a batch waits for its oldest event's next delay.
                    let n = retry.iter().map(|e| e.attempts as usize).max().unwrap_or(0);
                    let delay = retry_delay(settings, n, *retry_after);
                    tracing::debug!(endpoint = %cfg.name, webhook_id = %id, error = %error, retry_in = ?delay, "webhook delivery failed; will retry");
                    planned.push((
                        Settlement::Retry {
                            next_at: now + delay.as_millis() as i64,
                            error: error.clone(),
                        },
                        retry.iter().map(|e| e.seq).collect(),
                    ));
                }
            }
        }
    }
    (planned, disable_reason)
}

/// The wait before retry `n + 1` of a delivery that failed after `n`
/// retries: the schedule's entry, jittered, raised to the receiver's
/// `Retry-After` (at most `max_retry_after`). `n` is below the schedule's
/// length: a delivery past it is kept as failed instead.
fn retry_delay(settings: &OutboxConfig, n: usize, retry_after: Option<Duration>) -> Duration {
    let delay = jittered(settings.retry_schedule[n], settings.jitter);
    match retry_after {
        Some(ra) => delay.max(ra.min(settings.max_retry_after)),
        None => delay,
    }
}

/// Why an endpoint failing since `failing_since` is disabled at `now`
/// (unix ms), once it has failed for `disable_after`; `None` before that.
fn failing_too_long(
    failing_since: Option<i64>,
    now: i64,
    disable_after: Duration,
) -> Option<String> {
    failing_since
        .filter(|since| now - since >= disable_after.as_millis() as i64)
        .map(|since| {
            format!(
                "failing continuously since {} (outbox.disable_after = {})",
                crate::rfc3339_ms(since),
                humantime::format_duration(disable_after)
            )
        })
}

fn jittered(base: Duration, jitter: f64) -> Duration {
    if base.is_zero() || jitter == 0.0 {
        return base;
    }
    let factor = rand::thread_rng().gen_range((1.0 - jitter)..=(1.0 + jitter));
    base.mul_f64(factor)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(schedule_ms: &[u64], jitter: f64, max_retry_after: Duration) -> OutboxConfig {
        OutboxConfig {
            retry_schedule: schedule_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            jitter,
            max_retry_after,
            ..OutboxConfig::default()
        }
    }

    #[track_caller]
    fn check_delay(n: usize, retry_after_s: Option<u64>, expect: Duration) {
        let s = settings(&[100, 2_000, 30_000], 0.0, Duration::from_secs(60));
        let got = retry_delay(&s, n, retry_after_s.map(Duration::from_secs));
        assert_eq!(
            got,
            expect,
            "retry {} with Retry-After {retry_after_s:?}",
            n + 1
        );
    }

    #[test]
    fn retry_n_waits_its_schedule_entry_raised_to_retry_after_up_to_the_cap() {
        let ms = Duration::from_millis;
        check_delay(0, None, ms(100));
        check_delay(1, None, ms(2_000));
        check_delay(2, None, ms(30_000));
        // Retry-After only lengthens the wait.
        check_delay(1, Some(1), ms(2_000));
        check_delay(0, Some(0), ms(100));
        check_delay(0, Some(7), ms(7_000));
        check_delay(2, Some(45), ms(45_000));
        // Cut to outbox.max_retry_after (60s here).
        check_delay(0, Some(3_600), ms(60_000));
        check_delay(2, Some(u64::MAX / 1_000_000), ms(60_000));
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_zero_means_none() {
        let base = Duration::from_millis(1_000);
        assert_eq!(jittered(base, 0.0), base);
        assert_eq!(jittered(Duration::ZERO, 0.5), Duration::ZERO);
        for jitter in [0.1, 0.5, 1.0] {
            let (low, high) = (base.mul_f64(1.0 - jitter), base.mul_f64(1.0 + jitter));
            let draws: Vec<Duration> = (0..2_000).map(|_| jittered(base, jitter)).collect();
            for d in &draws {
                assert!((low..=high).contains(d), "{d:?} outside {low:?}..={high:?}");
            }
            // The factor is drawn, not fixed: both halves of the range occur.
            assert!(draws.iter().any(|d| *d < base) && draws.iter().any(|d| *d > base));
        }
    }

    #[test]
    fn retry_after_is_a_floor_under_jitter() {
        let s = settings(&[1_000], 0.5, Duration::from_secs(3_600));
        for _ in 0..500 {
            let d = retry_delay(&s, 0, Some(Duration::from_secs(2)));
            assert_eq!(
                d,
                Duration::from_secs(2),
                "jitter never goes below Retry-After"
            );
            let d = retry_delay(&s, 0, None);
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1_500));
        }
    }

    #[track_caller]
    fn check_retry_after(header: &[u8], expect: Option<Duration>) {
        let value = reqwest::header::HeaderValue::from_bytes(header).unwrap();
        assert_eq!(
            parse_retry_after(&value),
            expect,
            "{:?}",
            String::from_utf8_lossy(header)
        );
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        check_retry_after(b"120", Some(Duration::from_secs(120)));
        check_retry_after(b" 7 ", Some(Duration::from_secs(7)));
        check_retry_after(b"0", Some(Duration::ZERO));
        // A date in the past: retry now.
        check_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT", Some(Duration::ZERO));
        for refused in [&b"-5"[..], b"soon", b"", b"1.5", b"12 s", b"\xff\xfe"] {
            check_retry_after(refused, None);
        }
        // A date an hour ahead: about an hour (the date has whole seconds).
        let at = std::time::SystemTime::now() + Duration::from_secs(3_600);
        let value = reqwest::header::HeaderValue::from_str(&httpdate::fmt_http_date(at)).unwrap();
        let wait = parse_retry_after(&value).unwrap();
        assert!(
            wait > Duration::from_secs(3_590) && wait <= Duration::from_secs(3_600),
            "{wait:?}"
        );
    }

    #[test]
    fn an_endpoint_is_disabled_once_it_has_failed_for_disable_after() {
        let minute = Duration::from_secs(60);
        let now = 1_767_225_600_000; // 2026-01-01T00:00:00.000Z
        assert_eq!(failing_too_long(None, now, minute), None);
        assert_eq!(failing_too_long(Some(now), now, minute), None);
        assert_eq!(failing_too_long(Some(now - 59_999), now, minute), None);
        assert_eq!(
            failing_too_long(Some(now - 60_000), now, minute).as_deref(),
            Some("failing continuously since 2025-12-31T23:59:00.000Z (outbox.disable_after = 1m)")
        );
        assert!(failing_too_long(Some(0), now, minute).is_some());
    }

    fn event(seq: i64, id: &str, data: &str) -> ClaimedEvent {
        ClaimedEvent {
            seq,
            id: id.into(),
            event_type: "connection.opened".into(),
            order_key: format!("user{seq}"),
            created_at: 1_767_225_600_000,
            data: data.into(),
            attempts: 0,
        }
    }

    #[test]
    fn one_event_is_sent_as_its_envelope_and_a_batching_endpoint_always_gets_a_batch() {
        let e = event(1, "evt_01A", r#"{"user_id":"alice"}"#);
        let (id, body) = request_body(std::slice::from_ref(&e), false);
        assert_eq!(id, "evt_01A");
        assert_eq!(
            body,
            r#"{"id":"evt_01A","type":"connection.opened","timestamp":"2026-01-01T00:00:00.000Z","data":{"user_id":"alice"}}"#
        );
        let envelope: serde_json::Value = serde_json::from_str(&body).unwrap();

        let second = event(2, "evt_01B", r#"{"user_id":"bob"}"#);
        for (events, batches) in [(vec![e.clone()], true), (vec![e.clone(), second], true)] {
            let (id, body) = request_body(&events, batches);
            assert_eq!(id, "bat_01A", "named after its first event");
            let batch: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                (batch["id"].as_str(), batch["type"].as_str()),
                (Some("bat_01A"), Some("batch"))
            );
            let inner = batch["data"]["events"].as_array().unwrap();
            assert_eq!(inner.len(), events.len());
            assert_eq!(inner[0], envelope, "each event keeps its own envelope");
        }
    }

    #[test]
    fn envelope_fields_are_json_escaped() {
        let mut e = event(1, "evt_\"x\"\n", "{}");
        e.event_type = "a\\b".into();
        let (_, body) = request_body(&[e], false);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["id"].as_str(), v["type"].as_str()),
            (Some("evt_\"x\"\n"), Some("a\\b"))
        );
    }

    #[test]
    fn error_chain_names_every_cause() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|l| l as _)
            }
        }
        let e = Layer(
            "error sending request",
            Some(Box::new(Layer(
                "connect",
                Some(Box::new(Layer("connection refused", None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "error sending request: connect: connection refused"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
