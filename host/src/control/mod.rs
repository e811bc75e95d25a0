//! Business control messages: targeted, prioritised, optionally persistent
//! pushes from the business server, with receipts.
//!
//! A request goes one way: validate → idempotency check → resolve targets
//! (users, a group or part of it, every online user) → the
//! `control-handler` plugin chain (validate, rewrite, retarget, reject) →
//! one transaction records the control and every target's state → `control`
//! frames to the online targets (high priority ahead of queued traffic) →
//! one transaction marks them delivered with `control.delivered` events →
//! the answer, which is also stored for idempotent repeats.
//!
//! Persisted controls wait in storage for their users: a connection that
//! opens gets them in priority, then time order ([`deliver_pending`]); the
//! expiry task ends those past their time-to-live with `control.expired`.
//!
//! Not here: HTTP authentication, signatures and rate limits
//! ([`crate::http::control`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::config::OnError;
use crate::gateway::LiveSession;
use crate::http::ApiError;
use crate::json::{self, TooDeep, MAX_DEPTH};
use crate::plugins::bindings::exports::plugboard::plugin::control_handler as ch;
use crate::server::App;
use crate::storage::controls::{
    Deliverable, Existing, NewControl, NewTarget, Priority, TargetEvents, TargetState,
};
use crate::storage::groups::GroupResult;
use crate::storage::{NewEvent, StorageError};

/// Most bytes of a `kind`.
const MAX_KIND: usize = 128;

/// Why a control request was refused; each has a stable code.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("the payload is {size} bytes; control.max_payload_size is {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("the payload is {0}")]
    TooDeep(#[from] TooDeep),
    /// A stored answer of an earlier request that no longer reads as JSON.
    #[error("the stored answer for `{0}` cannot be read back: {1}")]
    Unreadable(String, String),
    #[error("{count} targets; control.max_targets is {limit}")]
    TooManyTargets { count: usize, limit: usize },
    #[error("no group `{0}`")]
    UnknownGroup(String),
    #[error("rejected by control handler `{plugin}`: {reason}")]
    Rejected {
        control_id: String,
        plugin: String,
        reason: String,
    },
    #[error("control handler `{plugin}` failed and its policy is fail-closed: {reason}")]
    HandlerFailed { plugin: String, reason: String },
    #[error("a request with this idempotency key is still being handled")]
    InProgress,
    #[error(
        "this idempotency key was used for a different request; use a new key for a new request"
    )]
    IdempotencyKeyReused,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let (status, code) = match &e {
            ControlError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ControlError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ControlError::TooDeep(_) => (StatusCode::UNPROCESSABLE_ENTITY, "too_deep"),
            ControlError::Unreadable(..) => return ApiError::internal(e),
            ControlError::TooManyTargets { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_many_targets")
            }
            ControlError::UnknownGroup(_) => (StatusCode::NOT_FOUND, "unknown_channel"),
            ControlError::Rejected { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
            ControlError::HandlerFailed { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "control_handler_failed")
            }
            ControlError::InProgress => (StatusCode::CONFLICT, "in_progress"),
            ControlError::IdempotencyKeyReused => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
            ControlError::Storage(s) => return ApiError::internal(s),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// Whom a request targets: exactly one of the three.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// These users.
    #[serde(default)]
    pub users: Option<Vec<String>>,
    /// This group's members…
    #[serde(default)]
    pub group: Option<String>,
    /// …or only these of its members.
    #[serde(default)]
    pub members: Option<Vec<String>>,
    /// Every user with an open connection on this node.
    #[serde(default)]
    pub online: Option<bool>,
}

/// Delivered only to devices online now, or also stored until the user connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Reliability {
    #[default]
    Online,
    Persisted,
}

/// `POST /v1/control`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlBody {
    pub kind: String,
    pub payload: Box<RawValue>,
    pub targets: Targets,
    #[serde(default)]
    pub priority: Option<Priority>,
    #[serde(default)]
    pub reliability: Reliability,
    /// Time-to-live of a persisted control, in milliseconds.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// Clients must acknowledge it (`ack` with `control_id`).
    #[serde(default)]
    pub receipt: bool,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// One target's outcome, as answered.
#[derive(Debug, Clone, Serialize)]
struct TargetResult {
    user_id: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    devices: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

fn wit_priority(p: Priority) -> ch::Priority {
    match p {
        Priority::High => ch::Priority::High,
        Priority::Normal => ch::Priority::Normal,
        Priority::Low => ch::Priority::Low,
    }
}

fn from_wit(p: ch::Priority) -> Priority {
    match p {
        ch::Priority::High => Priority::High,
        ch::Priority::Normal => Priority::Normal,
        ch::Priority::Low => Priority::Low,
    }
}

fn check_user(field: &str, id: &str) -> Result<(), ControlError> {
    crate::auth::check_id(field, id).map_err(ControlError::BadRequest)
}

/// The limits every control payload meets, from the API or from a plugin:
/// at most `control.max_payload_size` bytes and [`MAX_DEPTH`] levels.
fn check_payload(payload: &str, limit: usize) -> Result<(), ControlError> {
    if payload.len() > limit {
        return Err(ControlError::PayloadTooLarge {
            size: payload.len(),
            limit,
        });
    }
    json::check_depth(payload, MAX_DEPTH)?;
    Ok(())
}

/// Checks every payload of a handler's plan against the API's limits. A
/// plan that breaks them is a failed call of that handler (its `on_error`
/// policy decides), as any other output outside the contract.
fn check_plan(decision: &ch::Decision, limit: usize) -> Result<(), String> {
    let ch::Decision::Deliver(plan) = decision else {
        return Ok(());
    };
    check_payload(&plan.payload, limit).map_err(|e| format!("the plan's payload: {e}"))?;
    for t in &plan.targets {
        if let Some(p) = &t.payload {
            check_payload(p, limit)
                .map_err(|e| format!("the plan's payload for `{}`: {e}", t.user_id))?;
        }
    }
    Ok(())
}

/// Moves the system user out of `targets` into `rejected`: it never has a
/// connection, and a control to it would be stored for nobody.
fn refuse_system_user(
    targets: &mut Vec<String>,
    rejected: &mut Vec<TargetResult>,
    system_user: &str,
) {
    let Some(at) = targets.iter().position(|u| u == system_user) else {
        return;
    };
    targets.remove(at);
    rejected.push(TargetResult {
        user_id: system_user.to_string(),
        status: "rejected",
        devices: None,
        reason: Some(format!(
            "`{system_user}` is the system user (messaging.system_user); it cannot be a target"
        )),
    });
}

/// Handles one control request; the answer is JSON for the API.
pub async fn submit(app: &App, body: ControlBody) -> Result<(StatusCode, Value), ControlError> {
    let cfg = app.config();
    let c = &cfg.control;
    if body.kind.is_empty() || body.kind.len() > MAX_KIND || body.kind.chars().any(char::is_control)
    {
        return Err(ControlError::BadRequest(format!(
            "`kind` must be 1 to {MAX_KIND} bytes without control characters"
        )));
    }
    let payload = body.payload.get().to_string();
    check_payload(&payload, c.max_payload_size)?;
    let persist = body.reliability == Reliability::Persisted;
    let ttl = match (persist, body.ttl_ms) {
        (false, Some(_)) => {
            return Err(ControlError::BadRequest(
                "`ttl_ms` applies to persisted controls (`\"reliability\": \"persisted\"`)".into(),
            ))
        }
        (false, None) => None,
        (true, None) => Some(c.default_ttl),
        (true, Some(0)) => {
            return Err(ControlError::BadRequest(
                "`ttl_ms` must be greater than zero".into(),
            ))
        }
        (true, Some(ms)) => {
            let ttl = Duration::from_millis(ms);
            if ttl > c.max_ttl {
                return Err(ControlError::BadRequest(format!(
                    "`ttl_ms` is longer than control.max_ttl ({} ms)",
                    c.max_ttl.as_millis()
                )));
            }
            Some(ttl)
        }
    };
    let request_hash = fingerprint(&body);
    if let Some(key) = &body.idempotency_key {
        if key.is_empty() || key.len() > 128 {
            return Err(ControlError::BadRequest(
                "`idempotency_key` must be 1 to 128 bytes".into(),
            ));
        }
        if let Some(existing) = app
            .storage
            .controls
            .control_by_key(key, &request_hash)
            .await?
        {
            return existing_answer(key, existing);
        }
    }

    // Resolve the targets.
    let mut rejected: Vec<TargetResult> = Vec::new();
    let t = &body.targets;
    let named = [t.users.is_some(), t.group.is_some(), t.online == Some(true)]
        .iter()
        .filter(|x| **x)
        .count();
    if named != 1 || (t.members.is_some() && t.group.is_none()) || t.online == Some(false) {
        return Err(ControlError::BadRequest(
            "`targets` names exactly one of `users`, `group` (optionally with `members`) or `\"online\": true`".into(),
        ));
    }
    let mut targets: Vec<String> = Vec::new();
    if let Some(users) = &t.users {
        if users.len() > c.max_targets {
            return Err(ControlError::TooManyTargets {
                count: users.len(),
                limit: c.max_targets,
            });
        }
        for u in users {
            check_user("targets.users", u)?;
        }
        targets = dedupe(users.iter().cloned());
    }
    if let Some(group) = &t.group {
        check_user("targets.group", group)?;
        let members = match app.storage.groups.group_member_ids(group).await? {
            GroupResult::Ok(m) => m,
            _ => return Err(ControlError::UnknownGroup(group.clone())),
        };
        targets = match &t.members {
            None => members,
            Some(subset) => {
                if subset.len() > c.max_targets {
                    return Err(ControlError::TooManyTargets {
                        count: subset.len(),
                        limit: c.max_targets,
                    });
                }
                let all: HashSet<&str> = members.iter().map(String::as_str).collect();
                let mut kept = Vec::new();
                for u in dedupe(subset.iter().cloned()) {
                    check_user("targets.members", &u)?;
                    if all.contains(u.as_str()) {
                        kept.push(u);
                    } else {
                        rejected.push(TargetResult {
                            user_id: u,
                            status: "rejected",
                            devices: None,
                            reason: Some(format!("not a member of group `{group}`")),
                        });
                    }
                }
                kept
            }
        };
    }
    if t.online == Some(true) {
        targets = dedupe(app.registry.all().iter().map(|s| s.user_id.clone()));
    }
    if targets.len() > c.max_targets {
        return Err(ControlError::TooManyTargets {
            count: targets.len(),
            limit: c.max_targets,
        });
    }
    let system_user = cfg.messaging.system_user.as_str();
    refuse_system_user(&mut targets, &mut rejected, system_user);

    // The control-handler chain.
    let id = crate::new_id("ctl");
    let mut payload = payload;
    let mut priority = body.priority.unwrap_or(Priority::Normal);
    let mut per_target: HashMap<String, String> = HashMap::new();
    for name in app.plugins.chain("control-handler") {
        let request = ch::ControlRequest {
            id: id.clone(),
            kind: body.kind.clone(),
            payload: payload.clone(),
            priority: wit_priority(priority),
            targets: targets.clone(),
            group_id: t.group.clone(),
            persist,
            ttl_ms: ttl.map(|d| d.as_millis() as u64),
            receipt: body.receipt,
        };
        let decision = app.plugins.control(&name, &request).await.and_then(|d| {
            check_plan(&d, c.max_payload_size)
                .map(|()| d)
                .map_err(crate::plugins::CallFailure::Malformed)
        });
        match decision {
            Ok(ch::Decision::Deliver(plan)) => {
                payload = plan.payload;
                priority = from_wit(plan.priority);
                let planned: Vec<String> = dedupe(plan.targets.iter().map(|d| d.user_id.clone()));
                let kept: HashSet<&str> = planned.iter().map(String::as_str).collect();
                for u in &targets {
                    if !kept.contains(u.as_str()) {
                        per_target.remove(u);
                        rejected.push(TargetResult {
                            user_id: u.clone(),
                            status: "rejected",
                            devices: None,
                            reason: Some(format!("removed by control handler `{name}`")),
                        });
                    }
                }
                for d in plan.targets {
                    if let Some(p) = d.payload {
                        per_target.insert(d.user_id, p);
                    }
                }
                if planned.len() > c.max_targets {
                    return Err(ControlError::TooManyTargets {
                        count: planned.len(),
                        limit: c.max_targets,
                    });
                }
                targets = planned;
                refuse_system_user(&mut targets, &mut rejected, system_user);
                per_target.remove(system_user);
            }
            Ok(ch::Decision::Reject(reason)) => {
                tracing::info!(control_id = %id, kind = %body.kind, plugin = %name, reason = %reason,
                    "control rejected by its handler");
                let event = NewEvent {
                    id: crate::new_id("evt"),
                    event_type: "control.rejected".into(),
                    order_key: id.clone(),
                    created_at: crate::now_ms(),
                    data: json!({
                        "control_id": id, "kind": body.kind, "plugin": name, "reason": reason,
                        "targets": targets.len(),
                    }),
                };
                app.storage.outbox.append_events(vec![event]).await?;
                app.outbox.wake();
                return Err(ControlError::Rejected {
                    control_id: id,
                    plugin: name,
                    reason,
                });
            }
            Err(failure) => match app.plugins.on_error(&name, "control-handler") {
                OnError::FailOpen => {
                    tracing::warn!(plugin = %name, control_id = %id, error = %failure,
                    "control handler failed; fail-open: the request goes on without it")
                }
                OnError::FailClosed => {
                    tracing::warn!(plugin = %name, control_id = %id, error = %failure,
                        "control handler failed; fail-closed: the request is refused");
                    return Err(ControlError::HandlerFailed {
                        plugin: name,
                        reason: failure.to_string(),
                    });
                }
            },
        }
    }

    // Record every target's state, then push to the online ones.
    let now = crate::now_ms();
    let online: HashMap<String, Vec<Arc<LiveSession>>> = targets
        .iter()
        .map(|u| (u.clone(), app.registry.user_sessions(u)))
        .collect();
    let mut rows: Vec<NewTarget> = targets
        .iter()
        .map(|u| {
            let is_online = online.get(u).is_some_and(|s| !s.is_empty());
            NewTarget {
                user_id: u.clone(),
                payload: per_target.get(u).cloned(),
                state: if is_online || persist {
                    TargetState::Pending
                } else {
                    TargetState::Offline
                },
                reason: None,
            }
        })
        .collect();
    rows.extend(rejected.iter().map(|r| NewTarget {
        user_id: r.user_id.clone(),
        payload: None,
        state: TargetState::Rejected,
        reason: r.reason.clone(),
    }));
    let control = NewControl {
        id: id.clone(),
        kind: body.kind.clone(),
        payload: payload.clone(),
        priority,
        persist,
        expires_at: ttl.map(|d| now + d.as_millis() as i64),
        receipt: body.receipt,
        idempotency_key: body.idempotency_key.clone(),
        request_hash,
        created_at: now,
        targets: rows,
    };
    let expires_at = control.expires_at;
    if let Err(existing) = app.storage.controls.control_create(control).await? {
        return existing_answer(body.idempotency_key.as_deref().unwrap_or(&id), existing);
    }

    let mut results: Vec<TargetResult> = Vec::with_capacity(targets.len() + rejected.len());
    let mut delivered = Vec::new();
    let mut unreached = Vec::new();
    // The frame for every target without a payload of its own.
    let shared = Deliverable {
        control_id: id.clone(),
        user_id: String::new(),
        kind: body.kind.clone(),
        payload: payload.clone(),
        priority,
        persist,
        receipt: body.receipt,
        created_at: now,
        expires_at,
        redelivery: false,
    };
    let unreadable = |e: serde_json::Error| ControlError::Unreadable(id.clone(), e.to_string());
    let shared_frame = control_frame(&shared).map_err(unreadable)?;
    for u in &targets {
        let sessions = online.get(u).map(Vec::as_slice).unwrap_or_default();
        let frame = match per_target.get(u) {
            Some(p) => control_frame(&Deliverable {
                user_id: u.clone(),
                payload: p.clone(),
                ..shared.clone()
            })
            .map_err(unreadable)?,
            None => shared_frame.clone(),
        };
        let devices = push(sessions, &frame, priority);
        if devices > 0 {
            delivered.push(u.clone());
            results.push(TargetResult {
                user_id: u.clone(),
                status: "delivered",
                devices: Some(devices),
                reason: None,
            });
        } else {
            if !sessions.is_empty() {
                unreached.push(u.clone());
            }
            results.push(TargetResult {
                user_id: u.clone(),
                status: if persist { "stored" } else { "offline" },
                devices: None,
                reason: None,
            });
        }
    }
    if !delivered.is_empty() || !unreached.is_empty() {
        app.storage
            .controls
            .control_delivered(&id, delivered, unreached, events("control.delivered", None))
            .await?;
        app.outbox.wake();
    }
    results.extend(rejected);
    let count = |s: &str| results.iter().filter(|r| r.status == s).count();
    let answer = json!({
        "control_id": id,
        "kind": body.kind,
        "priority": priority,
        "reliability": body.reliability,
        "receipt": body.receipt,
        "expires_at": expires_at.map(crate::rfc3339_ms),
        "duplicate": false,
        "summary": {
            "targets": results.len(),
            "delivered": count("delivered"),
            "stored": count("stored"),
            "offline": count("offline"),
            "rejected": count("rejected"),
        },
        "results": results,
    });
    // Kept only where a repeat can ask for it.
    if body.idempotency_key.is_some() {
        app.storage
            .controls
            .control_answered(&id, answer.to_string())
            .await?;
    }
    app.metrics.controls.inc();
    Ok((StatusCode::OK, answer))
}

/// What makes two requests with one idempotency key the same request:
/// every field but the key, with the payload as a JSON value (its spacing
/// and key order do not count), hashed.
fn fingerprint(body: &ControlBody) -> String {
    use sha2::{Digest, Sha256};
    let raw = body.payload.get();
    let payload = serde_json::from_str::<Value>(raw)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| raw.to_string());
    let t = &body.targets;
    let canonical = json!({
        "kind": body.kind,
        "payload": payload,
        "targets": {"users": t.users, "group": t.group, "members": t.members, "online": t.online},
        "priority": body.priority,
        "reliability": body.reliability,
        "ttl_ms": body.ttl_ms,
        "receipt": body.receipt,
    });
    crate::hex(&Sha256::digest(canonical.to_string().as_bytes()))
}

/// The answer to a request whose idempotency key is already taken (`which`
/// names it in an error).
fn existing_answer(which: &str, existing: Existing) -> Result<(StatusCode, Value), ControlError> {
    match existing {
        Existing::Answered(answer) => repeat(which, &answer),
        Existing::InProgress => Err(ControlError::InProgress),
        Existing::OtherRequest => Err(ControlError::IdempotencyKeyReused),
    }
}

/// The stored answer of an earlier request with the same idempotency key.
fn repeat(which: &str, answer: &str) -> Result<(StatusCode, Value), ControlError> {
    let mut v: Value = serde_json::from_str(answer)
        .map_err(|e| ControlError::Unreadable(which.to_string(), e.to_string()))?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("duplicate".into(), Value::Bool(true));
    }
    Ok((StatusCode::OK, v))
}

fn dedupe(ids: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.filter(|u| seen.insert(u.clone())).collect()
}

/// Queues `frame` on every session; returns how many took it.
fn push(sessions: &[Arc<LiveSession>], frame: &Message, priority: Priority) -> usize {
    sessions
        .iter()
        .filter(|s| {
            if priority == Priority::High {
                s.push_urgent(frame.clone()).is_ok()
            } else {
                s.push(frame.clone()).is_ok()
            }
        })
        .count()
}

#[derive(Serialize)]
struct ControlFrame<'a> {
    #[serde(rename = "type")]
    frame_type: &'static str,
    control_id: &'a str,
    kind: &'a str,
    payload: &'a RawValue,
    priority: Priority,
    receipt: bool,
    persisted: bool,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    redelivery: bool,
}

/// The `control` frame of one deliverable, its payload embedded as stored.
/// Stored payloads were JSON when accepted; one that no longer reads is an
/// error, never a frame with a `null` payload.
pub fn control_frame(d: &Deliverable) -> Result<Message, serde_json::Error> {
    let frame = ControlFrame {
        frame_type: "control",
        control_id: &d.control_id,
        kind: &d.kind,
        payload: serde_json::from_str::<&RawValue>(&d.payload)?,
        priority: d.priority,
        receipt: d.receipt,
        persisted: d.persist,
        created_at: crate::rfc3339_ms(d.created_at),
        expires_at: d.expires_at.map(crate::rfc3339_ms),
        redelivery: d.redelivery,
    };
    Ok(Message::text(crate::messaging::render::text_of(&frame)))
}

/// Builds one event per target of `event_type`; `extra` fields are added.
fn events(event_type: &'static str, extra: Option<Value>) -> TargetEvents {
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
        NewEvent {
            id: crate::new_id("evt"),
            event_type: event_type.into(),
            order_key: t.user_id.clone(),
            created_at: crate::now_ms(),
            data,
        }
    })
}

/// Pushes a newly opened session the persisted controls waiting for its
/// user, in priority then time order, and records them delivered.
pub async fn deliver_pending(app: Arc<App>, session: Arc<LiveSession>) {
    let user = session.user_id.clone();
    let pending = match app
        .storage
        .controls
        .controls_for_user(&user, crate::now_ms())
        .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(user_id = %user, error = %e, "cannot read persisted controls; they are delivered at the next connect");
            return;
        }
    };
    if pending.is_empty() {
        return;
    }
    let mut sent = Vec::new();
    for d in &pending {
        let frame = match control_frame(d) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(control_id = %d.control_id, user_id = %user, error = %e,
                    "a persisted control's stored payload does not read as JSON; it stays undelivered");
                continue;
            }
        };
        if push(std::slice::from_ref(&session), &frame, d.priority) == 1 {
            sent.push(d.control_id.clone());
        }
    }
    if sent.is_empty() {
        return;
    }
    match app
        .storage
        .controls
        .controls_redelivered(&user, sent, events("control.delivered", None))
        .await
    {
        Ok(()) => app.outbox.wake(),
        Err(e) => tracing::error!(user_id = %user, error = %e, "cannot record delivered controls"),
    }
}

/// Records a client's receipt for a control.
pub async fn ack(app: &App, session: &LiveSession, control_id: &str) {
    let extra = json!({
        "device_id": session.device_id,
        "connection_id": session.connection_id,
    });
    match app
        .storage
        .controls
        .control_ack(
            control_id,
            &session.user_id,
            events("control.acked", Some(extra)),
        )
        .await
    {
        Ok(Some(_)) => {
            app.metrics.control_acks.inc();
            app.outbox.wake();
        }
        Ok(None) => {
            tracing::debug!(control_id, user_id = %session.user_id, "ack for a control that awaits no receipt")
        }
        Err(e) => tracing::error!(control_id, error = %e, "cannot record a control receipt"),
    }
}

/// Starts the task that expires persisted controls past their time-to-live.
pub fn start_expiry(app: &Arc<App>) {
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        loop {
            let Some(app) = weak.upgrade() else { return };
            let interval = app.config().control.expiry_interval;
            loop {
                match app
                    .storage
                    .controls
                    .controls_expire(crate::now_ms(), 1000, events("control.expired", None))
                    .await
                {
                    Ok(0) => break,
                    Ok(n) => {
                        app.metrics.controls_expired.inc_by(n as u64);
                        app.outbox.wake();
                        if n < 1000 {
                            break;
                        }
                    }
                    Err(StorageError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "expiring persisted controls failed");
                        break;
                    }
                }
            }
            drop(app);
            tokio::time::sleep(interval).await;
        }
    });
}
