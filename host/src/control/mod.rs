//! Business control messages: targeted, prioritised, optionally persistent
//! pushes from the business server, with receipts.
//!
//! A request goes one way ([`Control::submit`], in [`submit`]): validate →
//! idempotency check → resolve targets (users, a group or part of it, every
//! online user) → the `control-handler` plugin chain (validate, rewrite,
//! retarget, reject) → one transaction records the control and every
//! target's state → pushes to the online targets through the delivery seam
//! (high priority on the urgent lane, ahead of queued traffic) → one
//! transaction marks them delivered with `control.delivered` events → the
//! answer, which is also stored for idempotent repeats.
//!
//! Persisted controls wait in storage for their users: a connection that
//! opens gets them in priority, then time order ([`Control::deliver_pending`]);
//! the expiry task ends those past their time-to-live with `control.expired`.
//!
//! Everything goes through the [`Control`] service, which holds only what
//! these flows use. Not here: HTTP authentication, signatures, rate limits
//! and the HTTP form of errors (`http::control`), frames (`gateway::protocol`).

mod submit;

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config;
use crate::delivery::{ControlPush, Delivery, Lane, Push};
use crate::json::TooDeep;
use crate::metrics::Metrics;
use crate::outbox::Wakeup;
use crate::plugins::PluginRegistry;
use crate::storage::controls::Priority;
use crate::storage::{ControlStore, GroupStore, OutboxStore, StorageError};
use crate::unavailable::Backoff;

/// Targets expired per storage call by the expiry task.
const EXPIRE_STEP: usize = 1000;
/// Waits of a connection's persisted-control delivery while storage is
/// unavailable: from the first to the longest, for as long as it is open.
const PENDING_RETRY_FIRST: Duration = Duration::from_millis(500);
const PENDING_RETRY_MAX: Duration = Duration::from_secs(15);

/// Why a control request was refused; each has a stable code (given at the
/// HTTP edge, `http::control`).
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

/// What the control flows use: the config in force, the control, group and
/// outbox stores, the delivery seam, the control-handler chain, metrics,
/// and the webhook workers' wake-up. Shared as `Arc<Control>`.
pub struct Control {
    config: config::Handle,
    controls: Arc<dyn ControlStore>,
    /// To resolve group targets.
    groups: Arc<dyn GroupStore>,
    /// For `control.rejected`, which no target row carries.
    outbox: Arc<dyn OutboxStore>,
    delivery: Arc<dyn Delivery>,
    plugins: Arc<PluginRegistry>,
    metrics: Arc<Metrics>,
    wakeup: Wakeup,
}

impl Control {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: config::Handle,
        controls: Arc<dyn ControlStore>,
        groups: Arc<dyn GroupStore>,
        outbox: Arc<dyn OutboxStore>,
        delivery: Arc<dyn Delivery>,
        plugins: Arc<PluginRegistry>,
        metrics: Arc<Metrics>,
        wakeup: Wakeup,
    ) -> Control {
        Control {
            config,
            controls,
            groups,
            outbox,
            delivery,
            plugins,
            metrics,
            wakeup,
        }
    }

    /// Pushes a newly opened connection the persisted controls waiting for
    /// its user, in priority then time order, and records them delivered.
    /// While storage is unavailable it waits and tries again, for as long
    /// as the connection is open; other failures leave the controls for
    /// the user's next connection.
    pub async fn deliver_pending(self: Arc<Self>, user: String, connection_id: String) {
        let mut backoff = Backoff::new(PENDING_RETRY_FIRST, PENDING_RETRY_MAX);
        let pending = loop {
            match self
                .controls
                .controls_for_user(&user, crate::now_ms())
                .await
            {
                Ok(p) => break p,
                Err(e) if e.is_unavailable() && self.is_online(&user, &connection_id).await => {
                    let wait = backoff.failed();
                    if backoff.failures() == 1 {
                        tracing::warn!(user_id = %user, connection_id = %connection_id, error = %e,
                            "storage unavailable: persisted controls wait until it is back");
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::error!(user_id = %user, error = %e, "cannot read persisted controls; they are delivered at the next connect");
                    return;
                }
            }
        };
        let mut sent = Vec::new();
        for d in &pending {
            let push = match ControlPush::of(d) {
                Ok(p) => Push::Control(p),
                Err(e) => {
                    tracing::error!(control_id = %d.control_id, user_id = %user, error = %e,
                        "a persisted control's stored payload does not read as JSON; it stays undelivered");
                    continue;
                }
            };
            let lane = Lane::of(d.priority);
            if self
                .delivery
                .to_connection(&user, &connection_id, &push, lane)
                .await
            {
                sent.push(d.control_id.clone());
            }
        }
        if sent.is_empty() {
            return;
        }
        backoff.reset();
        loop {
            let events = crate::events::control_delivered();
            match self
                .controls
                .controls_redelivered(&user, sent.clone(), events)
                .await
            {
                Ok(()) => {
                    self.wakeup.wake();
                    return;
                }
                // Pushed but not recorded: the controls stay pending and
                // come again at the next connect; recording them is worth
                // waiting for, but not past the connection.
                Err(e) if e.is_unavailable() && self.is_online(&user, &connection_id).await => {
                    tokio::time::sleep(backoff.failed()).await;
                }
                Err(e) => {
                    tracing::error!(user_id = %user, error = %e, "cannot record delivered controls");
                    return;
                }
            }
        }
    }

    async fn is_online(&self, user: &str, connection_id: &str) -> bool {
        self.delivery
            .online(Some(user))
            .await
            .iter()
            .any(|c| c.connection_id == connection_id)
    }

    /// Records a client's receipt for a control. `Ok(false)`: nothing to
    /// record (unknown, not asked for, already acked).
    pub async fn ack(
        &self,
        user: &str,
        device_id: &str,
        connection_id: &str,
        control_id: &str,
    ) -> Result<bool, StorageError> {
        let events = crate::events::control_acked(device_id, connection_id);
        match self.controls.control_ack(control_id, user, events).await? {
            Some(_) => {
                self.metrics.control_acks.inc();
                self.wakeup.wake();
                Ok(true)
            }
            None => {
                tracing::debug!(control_id, user_id = %user, "ack for a control that awaits no receipt");
                Ok(false)
            }
        }
    }

    /// Starts the task that expires persisted controls past their
    /// time-to-live, every `control.expiry_interval` while the service
    /// exists. A failed pass (storage unavailable, say) is logged and tried
    /// again at the next one.
    pub fn start_expiry(self: &Arc<Self>) {
        let weak: Weak<Control> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(this) = weak.upgrade() else { return };
                let interval = this.config.load().control.expiry_interval;
                loop {
                    let events = crate::events::control_expired();
                    match this
                        .controls
                        .controls_expire(crate::now_ms(), EXPIRE_STEP, events)
                        .await
                    {
                        Ok(0) => break,
                        Ok(n) => {
                            this.metrics.controls_expired.inc_by(n as u64);
                            this.wakeup.wake();
                            if n < EXPIRE_STEP {
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
                drop(this);
                tokio::time::sleep(interval).await;
            }
        });
    }
}
