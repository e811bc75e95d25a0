//! The `control-handler` hook's types: the [`ControlRequest`] from the
//! business server and the [`Decision`] on it. Plain mirrors of the WIT
//! interface.

/// Delivery priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Ahead of queued normal traffic.
    High,
    /// In order with other traffic.
    Normal,
    /// After everything else that is queued.
    Low,
}

/// A control request from the business server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRequest {
    /// `ctl_…`, the control id.
    pub id: String,
    /// The business kind, e.g. `profile.changed`.
    pub kind: String,
    /// The payload as JSON text.
    pub payload: String,
    /// The requested priority.
    pub priority: Priority,
    /// Target user ids (after group expansion, when a group was named).
    pub targets: Vec<String>,
    /// The group named as the target, if any.
    pub group_id: Option<String>,
    /// Whether undelivered targets get it when they next connect.
    pub persist: bool,
    /// How long a persisted control stays deliverable, in milliseconds.
    pub ttl_ms: Option<u64>,
    /// Whether clients must acknowledge it.
    pub receipt: bool,
}

impl ControlRequest {
    /// The plan that delivers this request as it came: its payload and
    /// priority, to each of its targets.
    pub fn unchanged_plan(&self) -> Plan {
        Plan {
            payload: self.payload.clone(),
            priority: self.priority,
            targets: self
                .targets
                .iter()
                .map(|user_id| Delivery {
                    user_id: user_id.clone(),
                    payload: None,
                })
                .collect(),
        }
    }
}

/// One target of a delivery plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The user to deliver to.
    pub user_id: String,
    /// A payload for this user only (JSON text); the plan's payload otherwise.
    pub payload: Option<String>,
}

/// What to deliver, to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The payload (JSON text).
    pub payload: String,
    /// The priority.
    pub priority: Priority,
    /// The targets; may add to or remove from the request's targets.
    pub targets: Vec<Delivery>,
}

/// The plugin's decision on a control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Deliver this plan.
    Deliver(Plan),
    /// Refuse the request; the text is returned to the business server.
    Reject(String),
}

impl Decision {
    /// Deliver `request` as it came (see [`ControlRequest::unchanged_plan`]).
    pub fn deliver_unchanged(request: &ControlRequest) -> Self {
        Self::Deliver(request.unchanged_plan())
    }
}
