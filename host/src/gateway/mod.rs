//! The client WebSocket gateway: the session task that owns each socket,
//! authentication by `auth` frame, the frame protocol (parsing, and
//! rendering every frame the server writes), the registry of live sessions,
//! the single-node implementation of the delivery seam, and the lifecycle
//! state machine that records every open connection's `connection.opened`
//! and `connection.closed` exactly once.
//!
//! Everything a connection needs is the [`Gateway`] service; the HTTP edge
//! (`http::ws`) checks the upgrade request and hands the upgraded socket to
//! it. It does not deliver webhooks (that is [`crate::outbox`]); it only
//! writes events through [`crate::storage`] in the same transaction as the
//! session change.

pub mod auth_frame;
pub mod fanout;
pub mod lifecycle;
pub mod local;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod upgrade;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::auth::Secrets;
use crate::config::{self, Config};
use crate::control::Control;
use crate::delivery::Delivery;
use crate::events::CloseInfo;
use crate::messaging::Messaging;
use crate::metrics::Metrics;
pub use lifecycle::{CloseReason, Lifecycle};
pub use registry::Displaced;
use registry::{Elsewhere, Rejected};
pub use registry::{LiveSession, Registry};
use session::Admitted;

/// The message of a drain by shutdown (the `meta` frame, the close frame).
pub const SHUTDOWN_MESSAGE: &str = "the gateway is shutting down";
/// The message of a drain by a reload that disabled the service.
pub const DISABLED_MESSAGE: &str = "the WebSocket service was disabled by the operator";
/// What clients are told when this node could not renew its cluster lease.
pub const LEASE_LOST_MESSAGE: &str =
    "this node lost its cluster lease; connect again (to another node)";

/// What client connections use: the config and secrets in force, this
/// node's registry, the lifecycle recorder, the messaging and control
/// services the frames call, metrics, and the tracker of session tasks.
pub struct Gateway {
    config: config::Handle,
    /// Replaced whole by a reload (the server stores into it).
    secrets: Arc<ArcSwap<Secrets>>,
    registry: Arc<Registry>,
    pub lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    messaging: Arc<Messaging>,
    control: Arc<Control>,
    /// The door to live sessions, for what the device policy reaches on
    /// other nodes.
    delivery: Arc<dyn Delivery>,
    /// Every upgraded connection's task, so shutdown can wait for them.
    sessions: TaskTracker,
    /// Set once shutdown starts; never cleared.
    shutting_down: AtomicBool,
    /// Cluster mode: set while this node's lease is in doubt.
    fenced: AtomicBool,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: config::Handle,
        secrets: Arc<ArcSwap<Secrets>>,
        registry: Arc<Registry>,
        lifecycle: Lifecycle,
        metrics: Arc<Metrics>,
        messaging: Arc<Messaging>,
        control: Arc<Control>,
        delivery: Arc<dyn Delivery>,
    ) -> Gateway {
        Gateway {
            config,
            secrets,
            registry,
            lifecycle,
            metrics,
            messaging,
            control,
            delivery,
            sessions: TaskTracker::new(),
            shutting_down: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load()
    }

    pub fn secrets(&self) -> Arc<Secrets> {
        self.secrets.load_full()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Why new connections are refused right now, if they are.
    pub fn not_accepting_reason(&self) -> Option<&'static str> {
        if self.shutting_down.load(Ordering::Acquire) {
            Some("the gateway is shutting down")
        } else if self.fenced.load(Ordering::Acquire) {
            Some(LEASE_LOST_MESSAGE)
        } else if !self.config.load().gateway.enabled {
            Some("the WebSocket service is disabled")
        } else {
            None
        }
    }

    pub fn accepting_connections(&self) -> bool {
        self.not_accepting_reason().is_none()
    }

    /// While connections are being drained: why (shutdown or a disabled
    /// service) and the message they are told.
    pub fn drain_reason(&self) -> Option<(CloseReason, &'static str)> {
        if self.shutting_down.load(Ordering::Acquire) {
            Some((CloseReason::Shutdown, SHUTDOWN_MESSAGE))
        } else if self.fenced.load(Ordering::Acquire) {
            Some((CloseReason::LeaseLost, LEASE_LOST_MESSAGE))
        } else if !self.config.load().gateway.enabled {
            Some((CloseReason::ServiceDisabled, DISABLED_MESSAGE))
        } else {
            None
        }
    }

    /// Cluster mode: refuses new connections (and drains those that come
    /// late) while `fenced`. Set before the drain walks the registry.
    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::Release);
    }

    /// This node refuses connections because its cluster lease is in doubt.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// From now on new connections are refused and those that come late
    /// find themselves drained. Set before the drain walks the registry.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Applies the multi-device policy to a new authenticated connection and
    /// registers it (not yet open). The policy counts the user's
    /// connections on every node (in cluster mode the others are asked
    /// first).
    pub async fn admit(
        &self,
        user_id: &str,
        device_id: &str,
        remote: &str,
        token_exp: Option<u64>,
    ) -> Result<Admitted, Rejected> {
        let here = self.registry.node_id().to_string();
        let elsewhere: Vec<Elsewhere> = self
            .delivery
            .online(Some(user_id))
            .await
            .into_iter()
            .filter(|c| c.node_id != here)
            .map(|c| Elsewhere {
                admitted_at: crate::parse_rfc3339_ms(&c.opened_at).unwrap_or(0),
                connection_id: c.connection_id,
                device_id: c.device_id,
            })
            .collect();
        let cfg = self.config();
        let (live, outbound, close) = LiveSession::new(
            crate::new_id("conn"),
            user_id.to_string(),
            device_id.to_string(),
            remote.to_string(),
            cfg.gateway.outbound_queue,
        );
        let displaces = self
            .registry
            .admit(live.clone(), &cfg.gateway.devices, &elsewhere)?;
        // A drain that began after the caller's last check did not see this
        // session in the registry: the drain's flag is set before it looks, so
        // one of the two always reaches the session.
        if let Some((reason, message)) = self.drain_reason() {
            live.request_close(reason, message);
        }
        Ok(Admitted {
            live,
            outbound,
            close,
            token_exp,
            displaces,
        })
    }

    /// The door to live sessions on every node.
    pub fn delivery(&self) -> &Arc<dyn Delivery> {
        &self.delivery
    }

    /// The tracker of session tasks (shutdown closes it and waits).
    pub fn sessions(&self) -> &TaskTracker {
        &self.sessions
    }

    /// At shutdown, after the drain's wait: records the close of every
    /// session still registered (its task did not get to), then tries every
    /// close still waiting for storage once. Returns how many closes are
    /// left; their rows stay, and the next start's crash recovery closes
    /// them.
    pub async fn close_remaining(&self) -> usize {
        let info = CloseInfo {
            reason: CloseReason::Shutdown,
            code: CloseReason::Shutdown.code(),
            message: "the gateway shut down before the close handshake completed".into(),
        };
        let now = crate::now_ms();
        for s in self.registry.all() {
            if s.is_opened() {
                self.lifecycle
                    .queue_close(&s.connection_id, info.clone(), now);
            }
            self.registry.remove(&s);
        }
        self.lifecycle.flush_closes().await
    }
}
