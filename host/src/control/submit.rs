//! [`Control::submit`]: one control request, in the steps it goes through —
//! the request's own checks, its targets, the `control-handler` chain, the
//! record, the pushes, the answer. Each step is a function of its own; the
//! walk in `submit` reads top to bottom.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use super::{Control, ControlBody, ControlError, Reliability, Targets};
use crate::config::{Config, ControlConfig, OnError};
use crate::delivery::{ControlPush, Lane, Push};
use crate::json::{self, MAX_DEPTH};
use crate::plugins::bindings::exports::plugboard::plugin::control_handler as ch;
use crate::storage::controls::{
    Deliverable, Existing, NewControl, NewTarget, Priority, TargetState,
};
use crate::storage::groups::GroupResult;

/// Most bytes of a `kind`.
const MAX_KIND: usize = 128;

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

impl TargetResult {
    fn rejected(user_id: String, reason: String) -> TargetResult {
        TargetResult {
            user_id,
            status: "rejected",
            devices: None,
            reason: Some(reason),
        }
    }
}

/// What the request's own fields come to once checked.
struct Checked {
    persist: bool,
    ttl: Option<Duration>,
    /// What tells a repeat from another request with the same idempotency key.
    request_hash: String,
}

/// The control as the steps shape it: targets resolved, then rewritten
/// and retargeted by the handler chain.
struct Plan {
    id: String,
    payload: String,
    priority: Priority,
    targets: Vec<String>,
    /// Payloads of single targets, set by a handler.
    per_target: HashMap<String, String>,
    rejected: Vec<TargetResult>,
}

/// What the record step leaves for the pushes.
struct Recorded {
    /// Unix ms.
    created_at: i64,
    expires_at: Option<i64>,
    /// Targets online when the control was recorded (their rows are pending).
    online: HashSet<String>,
}

impl Control {
    /// Handles one control request; the answer is the API's JSON.
    pub async fn submit(&self, body: ControlBody) -> Result<Value, ControlError> {
        let cfg = self.config.load();
        let checked = check_request(&body, &cfg.control)?;
        if let Some(key) = &body.idempotency_key {
            let existing = self
                .controls
                .control_by_key(key, &checked.request_hash)
                .await?;
            if let Some(existing) = existing {
                return existing_answer(key, existing);
            }
        }
        let (targets, rejected) = self.resolve_targets(&body.targets, &cfg).await?;
        let mut plan = Plan {
            id: crate::new_id("ctl"),
            payload: body.payload.get().to_string(),
            priority: body.priority.unwrap_or(Priority::Normal),
            targets,
            per_target: HashMap::new(),
            rejected,
        };
        self.run_chain(&body, &checked, &mut plan, &cfg).await?;
        let recorded = match self.record(&body, checked, &plan).await? {
            Ok(recorded) => recorded,
            Err(existing) => {
                let which = body.idempotency_key.as_deref().unwrap_or(&plan.id);
                return existing_answer(which, existing);
            }
        };
        let results = self.deliver(&body, &plan, &recorded).await?;
        let answer = answer(&body, &plan, &recorded, results);
        // Kept only where a repeat can ask for it.
        if body.idempotency_key.is_some() {
            self.controls
                .control_answered(&plan.id, answer.to_string())
                .await?;
        }
        self.metrics.controls.inc();
        Ok(answer)
    }

    /// Resolves `targets` to user ids (and those rejected on the way),
    /// without the system user.
    async fn resolve_targets(
        &self,
        t: &Targets,
        cfg: &Config,
    ) -> Result<(Vec<String>, Vec<TargetResult>), ControlError> {
        let c = &cfg.control;
        let too_many = |count: usize| ControlError::TooManyTargets {
            count,
            limit: c.max_targets,
        };
        let mut rejected: Vec<TargetResult> = Vec::new();
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
                return Err(too_many(users.len()));
            }
            for u in users {
                check_user("targets.users", u)?;
            }
            targets = dedupe(users.iter().cloned());
        }
        if let Some(group) = &t.group {
            check_user("targets.group", group)?;
            let members = match self.groups.group_member_ids(group).await? {
                GroupResult::Ok(m) => m,
                _ => return Err(ControlError::UnknownGroup(group.clone())),
            };
            targets = match &t.members {
                None => members,
                Some(subset) => {
                    if subset.len() > c.max_targets {
                        return Err(too_many(subset.len()));
                    }
                    let all: HashSet<&str> = members.iter().map(String::as_str).collect();
                    let mut kept = Vec::new();
                    for u in dedupe(subset.iter().cloned()) {
                        check_user("targets.members", &u)?;
                        if all.contains(u.as_str()) {
                            kept.push(u);
                        } else {
                            let reason = format!("not a member of group `{group}`");
                            rejected.push(TargetResult::rejected(u, reason));
                        }
                    }
                    kept
                }
            };
        }
        if t.online == Some(true) {
            let mut online: Vec<String> = self.delivery.online_users().await.into_iter().collect();
            online.sort();
            targets = online;
        }
        if targets.len() > c.max_targets {
            return Err(too_many(targets.len()));
        }
        refuse_system_user(&mut targets, &mut rejected, &cfg.messaging.system_user);
        Ok((targets, rejected))
    }

    /// Runs the `control-handler` chain in order over `plan`. A handler may
    /// rewrite the payload and priority, retarget (targets it drops are
    /// rejected), give single targets their own payload, or reject the
    /// whole request (`control.rejected` is recorded). A failing handler is
    /// skipped under fail-open and refuses the request under fail-closed.
    async fn run_chain(
        &self,
        body: &ControlBody,
        checked: &Checked,
        plan: &mut Plan,
        cfg: &Config,
    ) -> Result<(), ControlError> {
        let c = &cfg.control;
        let system_user = cfg.messaging.system_user.as_str();
        for name in self.plugins.chain("control-handler") {
            let request = ch::ControlRequest {
                id: plan.id.clone(),
                kind: body.kind.clone(),
                payload: plan.payload.clone(),
                priority: wit_priority(plan.priority),
                targets: plan.targets.clone(),
                group_id: body.targets.group.clone(),
                persist: checked.persist,
                ttl_ms: checked.ttl.map(|d| d.as_millis() as u64),
                receipt: body.receipt,
            };
            let decision = self.plugins.control(&name, &request).await.and_then(|d| {
                check_plan(&d, c.max_payload_size)
                    .map(|()| d)
                    .map_err(crate::plugins::CallFailure::Malformed)
            });
            match decision {
                Ok(ch::Decision::Deliver(delivery)) => {
                    plan.payload = delivery.payload;
                    plan.priority = from_wit(delivery.priority);
                    let planned: Vec<String> =
                        dedupe(delivery.targets.iter().map(|d| d.user_id.clone()));
                    let kept: HashSet<&str> = planned.iter().map(String::as_str).collect();
                    for u in &plan.targets {
                        if !kept.contains(u.as_str()) {
                            plan.per_target.remove(u);
                            let reason = format!("removed by control handler `{name}`");
                            plan.rejected
                                .push(TargetResult::rejected(u.clone(), reason));
                        }
                    }
                    for d in delivery.targets {
                        if let Some(p) = d.payload {
                            plan.per_target.insert(d.user_id, p);
                        }
                    }
                    if planned.len() > c.max_targets {
                        return Err(ControlError::TooManyTargets {
                            count: planned.len(),
                            limit: c.max_targets,
                        });
                    }
                    plan.targets = planned;
                    refuse_system_user(&mut plan.targets, &mut plan.rejected, system_user);
                    plan.per_target.remove(system_user);
                }
                Ok(ch::Decision::Reject(reason)) => {
                    tracing::info!(control_id = %plan.id, kind = %body.kind, plugin = %name, reason = %reason,
                        "control rejected by its handler");
                    let event = crate::events::control_rejected(
                        &plan.id,
                        &body.kind,
                        &name,
                        &reason,
                        plan.targets.len(),
                    );
                    self.outbox.append_events(vec![event]).await?;
                    self.wakeup.wake();
                    return Err(ControlError::Rejected {
                        control_id: plan.id.clone(),
                        plugin: name,
                        reason,
                    });
                }
                Err(failure) => match self.plugins.on_error(&name, "control-handler") {
                    OnError::FailOpen => {
                        tracing::warn!(plugin = %name, control_id = %plan.id, error = %failure,
                        "control handler failed; fail-open: the request goes on without it")
                    }
                    OnError::FailClosed => {
                        tracing::warn!(plugin = %name, control_id = %plan.id, error = %failure,
                            "control handler failed; fail-closed: the request is refused");
                        return Err(ControlError::HandlerFailed {
                            plugin: name,
                            reason: failure.to_string(),
                        });
                    }
                },
            }
        }
        Ok(())
    }

    /// Records the control and every target's state in one transaction:
    /// pending for targets online now (or for all, when persisted), offline
    /// for the others, rejected with the reason. `Err(existing)` when its
    /// idempotency key was taken meanwhile.
    async fn record(
        &self,
        body: &ControlBody,
        checked: Checked,
        plan: &Plan,
    ) -> Result<Result<Recorded, Existing>, ControlError> {
        let now = crate::now_ms();
        let online: HashSet<String> = self.delivery.online_among(&plan.targets).await;
        let mut rows: Vec<NewTarget> = plan
            .targets
            .iter()
            .map(|u| NewTarget {
                user_id: u.clone(),
                payload: plan.per_target.get(u).cloned(),
                state: if online.contains(u) || checked.persist {
                    TargetState::Pending
                } else {
                    TargetState::Offline
                },
                reason: None,
            })
            .collect();
        rows.extend(plan.rejected.iter().map(|r| NewTarget {
            user_id: r.user_id.clone(),
            payload: None,
            state: TargetState::Rejected,
            reason: r.reason.clone(),
        }));
        let expires_at = checked.ttl.map(|d| now + d.as_millis() as i64);
        let control = NewControl {
            id: plan.id.clone(),
            kind: body.kind.clone(),
            payload: plan.payload.clone(),
            priority: plan.priority,
            persist: checked.persist,
            expires_at,
            receipt: body.receipt,
            idempotency_key: body.idempotency_key.clone(),
            request_hash: checked.request_hash,
            created_at: now,
            targets: rows,
        };
        Ok(self
            .controls
            .control_create(control)
            .await?
            .map(|()| Recorded {
                created_at: now,
                expires_at,
                online,
            }))
    }

    /// Pushes the recorded control to the targets that were online, then
    /// records in one transaction who got it (`control.delivered` each) and
    /// who was online but took it nowhere (an online-only control becomes
    /// offline for them). Returns each target's result.
    async fn deliver(
        &self,
        body: &ControlBody,
        plan: &Plan,
        recorded: &Recorded,
    ) -> Result<Vec<TargetResult>, ControlError> {
        let persist = body.reliability == Reliability::Persisted;
        // The push of every target without a payload of its own.
        let shared = Deliverable {
            control_id: plan.id.clone(),
            user_id: String::new(),
            kind: body.kind.clone(),
            payload: plan.payload.clone(),
            priority: plan.priority,
            persist,
            receipt: body.receipt,
            created_at: recorded.created_at,
            expires_at: recorded.expires_at,
            redelivery: false,
        };
        let unreadable =
            |e: serde_json::Error| ControlError::Unreadable(plan.id.clone(), e.to_string());
        let shared_push = Push::Control(ControlPush::of(&shared).map_err(unreadable)?);
        let lane = Lane::of(plan.priority);
        let mut results = Vec::with_capacity(plan.targets.len() + plan.rejected.len());
        let mut delivered = Vec::new();
        let mut unreached = Vec::new();
        for u in &plan.targets {
            let own;
            let push = match plan.per_target.get(u) {
                Some(p) => {
                    let mine = Deliverable {
                        user_id: u.clone(),
                        payload: p.clone(),
                        ..shared.clone()
                    };
                    own = Push::Control(ControlPush::of(&mine).map_err(unreadable)?);
                    &own
                }
                None => &shared_push,
            };
            let was_online = recorded.online.contains(u);
            let devices = if was_online {
                self.delivery.to_user(u, push, lane, None).await
            } else {
                0
            };
            if devices > 0 {
                delivered.push(u.clone());
                results.push(TargetResult {
                    user_id: u.clone(),
                    status: "delivered",
                    devices: Some(devices),
                    reason: None,
                });
            } else {
                if was_online {
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
            let events = crate::events::control_delivered();
            self.controls
                .control_delivered(&plan.id, delivered, unreached, events)
                .await?;
            self.wakeup.wake();
        }
        results.extend(plan.rejected.iter().cloned());
        Ok(results)
    }
}

/// Checks the request's own fields: `kind`, the payload's size and depth,
/// the time-to-live against the reliability, the idempotency key.
fn check_request(body: &ControlBody, c: &ControlConfig) -> Result<Checked, ControlError> {
    if body.kind.is_empty() || body.kind.len() > MAX_KIND || body.kind.chars().any(char::is_control)
    {
        return Err(ControlError::BadRequest(format!(
            "`kind` must be 1 to {MAX_KIND} bytes without control characters"
        )));
    }
    check_payload(body.payload.get(), c.max_payload_size)?;
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
    let request_hash = fingerprint(body);
    if let Some(key) = &body.idempotency_key {
        if key.is_empty() || key.len() > 128 {
            return Err(ControlError::BadRequest(
                "`idempotency_key` must be 1 to 128 bytes".into(),
            ));
        }
    }
    Ok(Checked {
        persist,
        ttl,
        request_hash,
    })
}

/// The answer of a recorded and delivered control.
fn answer(
    body: &ControlBody,
    plan: &Plan,
    recorded: &Recorded,
    results: Vec<TargetResult>,
) -> Value {
    let count = |s: &str| results.iter().filter(|r| r.status == s).count();
    json!({
        "control_id": plan.id,
        "kind": body.kind,
        "priority": plan.priority,
        "reliability": body.reliability,
        "receipt": body.receipt,
        "expires_at": recorded.expires_at.map(crate::rfc3339_ms),
        "duplicate": false,
        "summary": {
            "targets": results.len(),
            "delivered": count("delivered"),
            "stored": count("stored"),
            "offline": count("offline"),
            "rejected": count("rejected"),
        },
        "results": results,
    })
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
    rejected.push(TargetResult::rejected(
        system_user.to_string(),
        format!(
            "`{system_user}` is the system user (messaging.system_user); it cannot be a target"
        ),
    ));
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
fn existing_answer(which: &str, existing: Existing) -> Result<Value, ControlError> {
    match existing {
        Existing::Answered(answer) => repeat(which, &answer),
        Existing::InProgress => Err(ControlError::InProgress),
        Existing::OtherRequest => Err(ControlError::IdempotencyKeyReused),
    }
}

/// The stored answer of an earlier request with the same idempotency key.
fn repeat(which: &str, answer: &str) -> Result<Value, ControlError> {
    let mut v: Value = serde_json::from_str(answer)
        .map_err(|e| ControlError::Unreadable(which.to_string(), e.to_string()))?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("duplicate".into(), Value::Bool(true));
    }
    Ok(v)
}

fn dedupe(ids: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.filter(|u| seen.insert(u.clone())).collect()
}
