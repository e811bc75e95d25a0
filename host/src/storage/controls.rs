//! Business control messages: one row per control and one per (control,
//! target user).
//!
//! A target row's `state`:
//! - `pending`: to deliver (a persisted control waiting for the user, or an
//!   online delivery in progress);
//! - `delivered`: pushed to at least one connection (a persisted control
//!   with a receipt is sent again at each connect until acked or expired);
//! - `acked`: the client acknowledged it;
//! - `expired`: a persisted control whose time-to-live passed undelivered;
//! - `offline`: an online-only control whose user had no connection;
//! - `rejected`: refused for this target (e.g. not a member of the group).
//!
//! Properties every engine keeps: **idempotency keys are unique** (of two
//! concurrent creates with one key, one records the control and the other
//! gets `Err(Existing)`); a target's state only moves forward (pending →
//! delivered → acked, pending → expired or offline), and each move writes
//! its event once, also when a receipt, a redelivery and the expiry task
//! race.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{NewEvent, Result};

/// Delivery priority: lower sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub(crate) fn code(self) -> i64 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub(crate) fn from_code(code: i64) -> Priority {
        match code {
            0 => Priority::High,
            2 => Priority::Low,
            _ => Priority::Normal,
        }
    }
}

/// The fate of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    Pending,
    Delivered,
    Acked,
    Expired,
    Offline,
    Rejected,
}

impl TargetState {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Delivered => "delivered",
            TargetState::Acked => "acked",
            TargetState::Expired => "expired",
            TargetState::Offline => "offline",
            TargetState::Rejected => "rejected",
        }
    }
}

/// One target of a new control.
#[derive(Debug, Clone)]
pub struct NewTarget {
    pub user_id: String,
    /// A payload for this user only (JSON text).
    pub payload: Option<String>,
    pub state: TargetState,
    /// Why it was rejected.
    pub reason: Option<String>,
}

/// A control to record.
#[derive(Debug, Clone)]
pub struct NewControl {
    /// `ctl_…`.
    pub id: String,
    pub kind: String,
    /// JSON text.
    pub payload: String,
    pub priority: Priority,
    pub persist: bool,
    /// Unix ms after which a persisted control is no longer delivered.
    pub expires_at: Option<i64>,
    pub receipt: bool,
    pub idempotency_key: Option<String>,
    /// A hash of the request, to tell a repeat from another request that
    /// reuses its idempotency key.
    pub request_hash: String,
    /// Unix ms.
    pub created_at: i64,
    pub targets: Vec<NewTarget>,
}

/// A control to push to one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliverable {
    pub control_id: String,
    pub user_id: String,
    pub kind: String,
    /// This user's payload (JSON text).
    pub payload: String,
    pub priority: Priority,
    pub persist: bool,
    pub receipt: bool,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    /// Already delivered once (sent again because no receipt came).
    pub redelivery: bool,
}

/// What an idempotency key already names.
#[derive(Debug, Clone)]
pub enum Existing {
    /// The answer given to the first request.
    Answered(String),
    /// The first request is still being handled.
    InProgress,
    /// The key names a request with another hash.
    OtherRequest,
}

/// Builds the events of targets reaching a state.
pub type TargetEvents = Box<dyn Fn(&Deliverable) -> NewEvent + Send>;

/// The durable control contract.
#[async_trait]
pub trait ControlStore: Send + Sync + 'static {
    /// What the idempotency key already names, if anything, for a request
    /// with `request_hash`.
    async fn control_by_key(&self, key: &str, request_hash: &str) -> Result<Option<Existing>>;

    /// Records a control and its targets in one transaction. `Err(existing)`
    /// when its idempotency key was taken meanwhile.
    async fn control_create(
        &self,
        control: NewControl,
    ) -> Result<std::result::Result<(), Existing>>;

    /// Stores the answer given for a control (for idempotent repeats).
    async fn control_answered(&self, control_id: &str, answer: String) -> Result<()>;

    /// Marks targets delivered and writes an event for each (those that were
    /// pending); targets in `unreached` that are not persisted become `offline`.
    async fn control_delivered(
        &self,
        control_id: &str,
        delivered: Vec<String>,
        unreached: Vec<String>,
        events: TargetEvents,
    ) -> Result<()>;

    /// Persisted controls to push to a user who connects: pending ones, and
    /// delivered ones still waiting for their receipt; unexpired; by
    /// priority, then age.
    async fn controls_for_user(&self, user_id: &str, now: i64) -> Result<Vec<Deliverable>>;

    /// Marks pushed persisted controls delivered (events for first deliveries).
    async fn controls_redelivered(
        &self,
        user_id: &str,
        control_ids: Vec<String>,
        events: TargetEvents,
    ) -> Result<()>;

    /// Records a receipt. Returns the target when it was waiting for one
    /// (its event is written), `None` otherwise (unknown, not asked, already acked).
    async fn control_ack(
        &self,
        control_id: &str,
        user_id: &str,
        events: TargetEvents,
    ) -> Result<Option<Deliverable>>;

    /// Expires persisted targets still pending after their time-to-live, with
    /// an event each. Returns how many.
    async fn controls_expire(&self, now: i64, limit: usize, events: TargetEvents) -> Result<usize>;
}
