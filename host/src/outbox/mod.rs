//! Webhook delivery from the durable outbox.
//!
//! Events are written to the outbox by [`crate::storage`] in the same
//! transaction as the change that caused them; this module is the only reader.
//! One [`worker`] per configured endpoint moves new events into that
//! endpoint's delivery queue, sends them signed per Standard Webhooks,
//! retries on the configured schedule with jitter, honours `Retry-After`,
//! keeps per-user order, and disables an endpoint that answers 410 or fails
//! for too long, saying so in the log, the metrics and the admin API.
//! Nothing is dropped: a delivery that exhausts its retries is kept as
//! `failed` and can be queued again through the admin API.
//!
//! Gateway processes sharing one database each run a worker per endpoint,
//! and one at a time delivers it: the one whose process holds the
//! endpoint's [`lease`]. The endpoint's state (disabled, re-enabled, failed
//! deliveries put back) is in storage, so the admin API of any process
//! changes it for the worker that delivers, and every process shows it.

pub mod lease;
pub mod sign;
pub mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{OutboxConfig, WebhookConfig};
use crate::metrics::{EndpointLabel, Metrics};
use crate::storage::{EndpointState, OutboxStore, StorageError};

/// Wakes the delivery workers when new events were committed. Waking is
/// level-triggered (a counter in a watch channel), so a wake-up that comes
/// while a worker is busy is not lost.
#[derive(Clone)]
pub struct Wakeup(Arc<watch::Sender<u64>>);

impl Default for Wakeup {
    fn default() -> Self {
        Wakeup(Arc::new(watch::channel(0).0))
    }
}

impl Wakeup {
    pub fn wake(&self) {
        self.0.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// What the workers share.
pub(crate) struct Shared {
    pub storage: Arc<dyn OutboxStore>,
    pub metrics: Arc<Metrics>,
    pub wakeup: Wakeup,
    pub client: reqwest::Client,
    pub settings: ArcSwap<OutboxConfig>,
    /// Formatter plugins named by endpoints.
    pub plugins: Option<Arc<crate::plugins::PluginRegistry>>,
    /// Who this process is to the endpoints' delivery leases.
    pub holder: String,
}

/// A holder id for the endpoints' delivery leases: the node id, and what
/// tells this start of the process from any other.
pub fn lease_holder(node_id: &str) -> String {
    format!("{node_id}/{}", ulid::Ulid::new())
}

struct WorkerHandle {
    config: Arc<ArcSwap<WebhookConfig>>,
    /// Set when the endpoint is disabled at run time (410, continuous
    /// failure, the admin API): this process's view of the shared state,
    /// which the worker follows from storage.
    disabled: Arc<AtomicBool>,
    /// Whether this process holds the endpoint's delivery lease.
    leading: lease::LeaseWatch,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// An endpoint as shown by `GET /admin/webhooks`.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub name: String,
    pub url: String,
    pub events: Vec<String>,
    pub enabled_in_config: bool,
    pub disabled: bool,
    pub disabled_at: Option<String>,
    pub disabled_reason: Option<String>,
    pub failing_since: Option<String>,
    pub pending: i64,
    pub failed: i64,
    pub delivered_total: i64,
    pub skipped_total: i64,
    pub oldest_pending_at: Option<String>,
    pub last_error: Option<String>,
    /// The holder of the endpoint's delivery lease (`<node_id>/<run>`), or
    /// `None` while no process holds it.
    pub leader: Option<String>,
    /// When that lease ends unless renewed.
    pub lease_until: Option<String>,
}

/// `disabled_reason` of an endpoint disabled through the admin API.
pub const ADMIN_DISABLED: &str = "disabled through the admin API";

/// What `enable` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Enable {
    Enabled,
    /// Cleared the run-time disable, but the config has `enabled = false`.
    StillDisabledInConfig,
    Unknown,
}

/// The delivery service: one worker per endpoint, reconciled on reload.
pub struct Outbox {
    shared: Arc<Shared>,
    workers: Mutex<HashMap<String, WorkerHandle>>,
    maintenance: CancellationToken,
}

impl Outbox {
    /// `holder` names this process to the endpoints' delivery leases
    /// ([`lease_holder`]): unique to this start of this node.
    pub fn new(
        storage: Arc<dyn OutboxStore>,
        metrics: Arc<Metrics>,
        wakeup: Wakeup,
        settings: OutboxConfig,
        plugins: Option<Arc<crate::plugins::PluginRegistry>>,
        holder: String,
    ) -> anyhow::Result<Outbox> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("plugboard/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Outbox {
            shared: Arc::new(Shared {
                storage,
                metrics,
                wakeup,
                client,
                settings: ArcSwap::from_pointee(settings),
                plugins,
                holder,
            }),
            workers: Mutex::new(HashMap::new()),
            maintenance: CancellationToken::new(),
        })
    }

    /// Tells the delivery workers that new events were committed.
    pub fn wake(&self) {
        self.shared.wakeup.wake();
    }

    /// Starts the background pruning of delivered events.
    pub fn start_maintenance(self: &Arc<Self>) {
        let this = self.clone();
        let stop = self.maintenance.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
                let names = this.names();
                if let Err(e) = this.shared.storage.outbox_prune(names).await {
                    tracing::warn!(error = %e, "outbox pruning failed");
                }
            }
        });
    }

    fn names(&self) -> Vec<String> {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Applies the endpoint list and delivery settings: starts workers for new
    /// endpoints, updates changed ones in place, stops removed ones (their
    /// queued deliveries stay in storage and resume if the name comes back).
    ///
    /// A new endpoint is registered in storage before this returns, so every
    /// event committed afterwards reaches it, even if its worker has not run yet.
    pub async fn reconcile(
        &self,
        endpoints: &[WebhookConfig],
        settings: &OutboxConfig,
    ) -> Result<(), StorageError> {
        let added: Vec<&WebhookConfig> = {
            let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            endpoints
                .iter()
                .filter(|e| !workers.contains_key(&e.name))
                .collect()
        };
        let mut registered = HashMap::new();
        for ep in added {
            let state = self.shared.storage.endpoint_register(&ep.name).await?;
            registered.insert(ep.name.clone(), state);
        }
        self.shared.settings.store(Arc::new(settings.clone()));
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|name, w| {
            let keep = endpoints.iter().any(|e| &e.name == name);
            if !keep {
                tracing::info!(endpoint = %name, "webhook endpoint removed from config; its queue is kept");
                w.stop.cancel();
            }
            keep
        });
        for ep in endpoints {
            let label = EndpointLabel {
                endpoint: ep.name.clone(),
            };
            if let Some(w) = workers.get(&ep.name) {
                if **w.config.load() != *ep {
                    tracing::info!(endpoint = %ep.name, "webhook endpoint updated");
                    w.config.store(Arc::new(ep.clone()));
                }
            } else if let Some(state) = registered.remove(&ep.name) {
                let config = Arc::new(ArcSwap::from_pointee(ep.clone()));
                let disabled = Arc::new(AtomicBool::new(false));
                let stop = CancellationToken::new();
                let lease = lease::Lease::start(self.shared.clone(), config.clone());
                let leading = lease.watch();
                let task = tokio::spawn(worker::run(
                    self.shared.clone(),
                    state,
                    config.clone(),
                    disabled.clone(),
                    lease,
                    stop.clone(),
                ));
                workers.insert(
                    ep.name.clone(),
                    WorkerHandle {
                        config,
                        disabled,
                        leading,
                        stop,
                        task,
                    },
                );
            }
            let off = !ep.enabled
                || workers
                    .get(&ep.name)
                    .is_some_and(|w| w.disabled.load(Ordering::Relaxed));
            self.shared
                .metrics
                .webhook_endpoint_disabled
                .get_or_create(&label)
                .set(i64::from(off));
        }
        self.shared.wakeup.wake();
        Ok(())
    }

    /// Re-enables an endpoint disabled at run time; its backlog is sent again.
    pub async fn enable(&self, name: &str) -> Result<Enable, StorageError> {
        let Some((disabled, in_config)) = self.handle_flag(name) else {
            return Ok(Enable::Unknown);
        };
        self.shared
            .storage
            .endpoint_set_disabled(name, None, crate::now_ms())
            .await?;
        disabled.store(false, Ordering::Release);
        self.shared
            .metrics
            .webhook_endpoint_disabled
            .get_or_create(&EndpointLabel {
                endpoint: name.to_string(),
            })
            .set(i64::from(!in_config));
        tracing::info!(endpoint = %name, "webhook endpoint re-enabled");
        self.shared.wakeup.wake();
        Ok(if in_config {
            Enable::Enabled
        } else {
            Enable::StillDisabledInConfig
        })
    }

    /// Disables an endpoint at run time, as a 410 would: nothing is sent
    /// (by whichever process delivers it) until it is re-enabled, and its
    /// events keep queueing. An endpoint already disabled keeps its first
    /// reason. `false` for an endpoint not in the config.
    pub async fn disable(&self, name: &str) -> Result<bool, StorageError> {
        let Some((disabled, _)) = self.handle_flag(name) else {
            return Ok(false);
        };
        self.shared
            .storage
            .endpoint_set_disabled(name, Some(ADMIN_DISABLED.to_string()), crate::now_ms())
            .await?;
        if !disabled.swap(true, Ordering::AcqRel) {
            tracing::warn!(endpoint = %name, "webhook endpoint disabled through the admin API; its events are kept until it is re-enabled");
        }
        self.shared
            .metrics
            .webhook_endpoint_disabled
            .get_or_create(&EndpointLabel {
                endpoint: name.to_string(),
            })
            .set(1);
        Ok(true)
    }

    /// Queues an endpoint's failed deliveries again. Returns how many, or
    /// `None` for an endpoint not in the config.
    pub async fn retry_failed(&self, name: &str) -> Result<Option<usize>, StorageError> {
        if self.handle_flag(name).is_none() {
            return Ok(None);
        }
        let n = self
            .shared
            .storage
            .endpoint_retry_failed(name, crate::now_ms())
            .await?;
        self.shared.wakeup.wake();
        Ok(Some(n))
    }

    /// The run-time disabled flag and the config's `enabled` of an endpoint.
    fn handle_flag(&self, name: &str) -> Option<(Arc<AtomicBool>, bool)> {
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers
            .get(name)
            .map(|w| (w.disabled.clone(), w.config.load().enabled))
    }

    /// State and counts of every configured endpoint; also refreshes the
    /// gauges. Storage that is unavailable is an error (the counts are
    /// unknown); any other failure to read an endpoint shows it empty.
    pub async fn views(&self) -> Result<Vec<EndpointView>, StorageError> {
        let configs: Vec<(WebhookConfig, bool)> = {
            let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<_> = workers
                .values()
                .map(|w| {
                    (
                        (**w.config.load()).clone(),
                        w.disabled.load(Ordering::Acquire),
                    )
                })
                .collect();
            v.sort_by(|a, b| a.0.name.cmp(&b.0.name));
            v
        };
        let mut out = Vec::new();
        let mut depth = 0;
        for (cfg, runtime_disabled) in configs {
            // The shared state when it reads; this process's view if not.
            let (state, runtime_disabled) =
                match self.shared.storage.endpoint_state(&cfg.name).await {
                    Ok(Some(state)) => {
                        let disabled = state.disabled_at.is_some();
                        (state, disabled)
                    }
                    Ok(None) => (EndpointState::default(), runtime_disabled),
                    Err(e) if e.is_unavailable() => return Err(e),
                    Err(_) => (EndpointState::default(), runtime_disabled),
                };
            let label = EndpointLabel {
                endpoint: cfg.name.clone(),
            };
            let m = &self.shared.metrics;
            m.webhook_pending.get_or_create(&label).set(state.pending);
            m.webhook_failed.get_or_create(&label).set(state.failed);
            let disabled = runtime_disabled || !cfg.enabled;
            m.webhook_endpoint_disabled
                .get_or_create(&label)
                .set(i64::from(disabled));
            depth += state.pending;
            let ts = |v: Option<i64>| v.map(crate::rfc3339_ms);
            out.push(EndpointView {
                disabled,
                name: cfg.name,
                url: crate::config::redact_url(&cfg.url),
                events: cfg.events,
                enabled_in_config: cfg.enabled,
                disabled_at: ts(state.disabled_at),
                disabled_reason: state.disabled_reason,
                failing_since: ts(state.failing_since),
                pending: state.pending,
                failed: state.failed,
                delivered_total: state.delivered_total,
                skipped_total: state.skipped_total,
                oldest_pending_at: ts(state.oldest_pending_at),
                last_error: state.last_error,
                leader: state.lease_holder,
                lease_until: ts(state.lease_until),
            });
        }
        self.shared.metrics.outbox_depth.set(depth);
        Ok(out)
    }

    /// Waits until every enabled endpoint this process delivers (holds the
    /// lease of) has nothing due or in flight, or `limit` passes. Returns
    /// what is still outstanding. What another process delivers is left to
    /// it.
    pub async fn flush(&self, limit: Duration) -> i64 {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let names: Vec<String> = {
                let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
                workers
                    .iter()
                    .filter(|(_, w)| {
                        w.config.load().enabled
                            && !w.disabled.load(Ordering::Acquire)
                            && w.leading.holds()
                    })
                    .map(|(n, _)| n.clone())
                    .collect()
            };
            self.shared.wakeup.wake();
            let left = self
                .shared
                .storage
                .deliveries_outstanding(names, crate::now_ms())
                .await
                .unwrap_or(i64::MAX);
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every worker and releases its endpoint's delivery lease, so
    /// another process takes over at once. In-flight requests are
    /// abandoned; they are sent again once their claims' leases end (SQLite
    /// also voids those when it next opens; PostgreSQL, shared with live
    /// processes, does not).
    pub async fn stop(&self) {
        self.maintenance.cancel();
        let handles: Vec<WorkerHandle> = {
            let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            workers.drain().map(|(_, w)| w).collect()
        };
        for h in &handles {
            h.stop.cancel();
        }
        for h in handles {
            let _ = h.task.await;
        }
    }
}
