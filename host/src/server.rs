//! Wiring: starts a gateway on a given listener, reloads its config, and
//! shuts it down in order.
//!
//! Start-up: open storage, close out sessions a crash left open, start the
//! webhook workers, record `service.enabled`, then accept. Shutdown: refuse
//! new upgrades (503), record `service.disabled`, tell every client why and
//! close it (1001; connections still waiting for their `auth` frame too),
//! wait a bounded time for the close handshakes, stop accepting, flush the
//! outbox within a bound, stop the workers. Whatever is not delivered stays
//! in storage for the next start.
//!
//! The listener and the shutdown trigger are arguments, so tests run the
//! real server on port 0 and stop it on demand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::auth::Secrets;
use crate::cluster::delivery::{ClusterDelivery, NodeOps};
use crate::cluster::lease::Lease;
use crate::cluster::sequencer::Sequencer;
use crate::cluster::Subjects;
use crate::config::{self, Config};
use crate::control::Control;
use crate::delivery::{CloseReason, Delivery};
use crate::events::ServiceReason;
use crate::gateway::local::LocalDelivery;
use crate::gateway::{
    Gateway, Lifecycle, Registry, DISABLED_MESSAGE, LEASE_LOST_MESSAGE, SHUTDOWN_MESSAGE,
};
use crate::messaging::Messaging;
use crate::metrics::{Metrics, ReasonLabel};
use crate::outbox::{Outbox, Wakeup};
use crate::plugins::engine::PluginEngine;
use crate::plugins::registry::LoadReport;
use crate::plugins::{Kv, PluginRegistry};
use crate::storage::Backend;

/// One gateway's services, wired. It holds them for the HTTP handlers (the
/// router's state) and does what spans them: reloads and shutdown. The
/// flows themselves live in the services, each holding only what it uses.
pub struct App {
    /// The config in force; replaced whole by a reload.
    config: config::Handle,
    /// Where the config was read from, for reloads (`None`: defaults and environment only).
    config_path: Option<PathBuf>,
    secrets: Arc<ArcSwap<Secrets>>,
    /// Every durable store, of the configured engine (the HTTP edge reads
    /// presence, plugin stores, groups and health straight from it).
    pub storage: Backend,
    /// Per API key request budgets and recent signatures of `POST /v1/control`.
    pub control_guard: crate::http::control::Guard,
    /// The one door to live sessions (kicks, drains, who is online).
    pub delivery: Arc<dyn Delivery>,
    /// Client connections: upgrades, sessions, the lifecycle.
    pub gateway: Arc<Gateway>,
    pub messaging: Arc<Messaging>,
    pub control: Arc<Control>,
    pub metrics: Arc<Metrics>,
    pub outbox: Arc<Outbox>,
    pub plugins: Arc<PluginRegistry>,
    /// Cluster mode: this node's lease and the cross-node delivery.
    pub cluster: Option<ClusterNode>,
    /// Keeps the plugins-folder watcher alive.
    _watcher: Option<notify::RecommendedWatcher>,
    /// Serialises reloads.
    reload_lock: tokio::sync::Mutex<()>,
}

/// A node's part in a cluster.
pub struct ClusterNode {
    pub lease: Arc<Lease>,
    pub delivery: Arc<ClusterDelivery>,
}

/// What a reload did.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    pub applied: bool,
    /// Keys that changed but need a restart; their old values stay in force.
    pub restart_required: Vec<&'static str>,
    pub websocket_enabled: bool,
    /// Connections told to close because the service was disabled (those
    /// waiting for their `auth` frame included).
    pub drained: usize,
    pub webhook_endpoints: usize,
    /// Plugins loaded or reloaded because their config changed.
    pub plugins_loaded: Vec<LoadReport>,
}

impl App {
    pub fn config(&self) -> Arc<Config> {
        self.config.load()
    }

    pub fn secrets(&self) -> Arc<Secrets> {
        self.secrets.load_full()
    }

    /// Records `service.enabled` or `service.disabled`. A failure is logged,
    /// not returned: the change it reports has happened either way.
    async fn record_service(&self, enabled: bool, reason: ServiceReason) {
        if let Err(e) = self.gateway.lifecycle.record_service(enabled, reason).await {
            tracing::error!(
                enabled, reason = reason.as_str(), error = %e,
                "cannot record the WebSocket service event"
            );
        }
    }

    /// Re-reads the config and applies what can change live.
    pub async fn reload(&self) -> anyhow::Result<ReloadReport> {
        let _guard = self.reload_lock.lock().await;
        let result = self.reload_inner().await;
        let label = ReasonLabel {
            reason: if result.is_ok() { "ok" } else { "error" }.into(),
        };
        self.metrics.config_reloads.get_or_create(&label).inc();
        match &result {
            Ok(r) => tracing::info!(
                restart_required = ?r.restart_required, websocket_enabled = r.websocket_enabled,
                drained = r.drained, "config reloaded"
            ),
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "config reload refused; the old config stays in force"
                )
            }
        }
        result
    }

    async fn reload_inner(&self) -> anyhow::Result<ReloadReport> {
        let old = self.config();
        let mut new = Config::load(self.config_path.as_deref())?;
        let restart_required = old.restart_required_changes(&new);
        new.data_dir = old.data_dir.clone();
        new.node_id = old.node_id.clone();
        new.cluster = old.cluster.clone();
        new.storage = old.storage.clone();
        new.server = old.server.clone();
        new.log = old.log.clone();
        let secrets = Secrets::resolve(&new, |text| println!("{text}"))?;
        let was_enabled = old.gateway.enabled;
        let enabled = new.gateway.enabled;
        let endpoints = new.webhooks.len();
        // Plugins first: an endpoint may name a formatter the reload adds.
        let plugins_loaded = self.plugins.apply(&new, false).await?;
        self.outbox.reconcile(&new.webhooks, &new.outbox).await?;
        self.secrets.store(Arc::new(secrets));
        self.config.store(new);
        let drained = if was_enabled && !enabled {
            tracing::warn!("WebSocket service disabled by reload; draining every connection");
            self.record_service(false, ServiceReason::Reload).await;
            self.delivery
                .close_all(CloseReason::ServiceDisabled, DISABLED_MESSAGE)
        } else {
            if !was_enabled && enabled {
                tracing::info!("WebSocket service re-enabled by reload");
                self.record_service(true, ServiceReason::Reload).await;
            }
            0
        };
        Ok(ReloadReport {
            applied: true,
            restart_required,
            websocket_enabled: enabled,
            drained,
            webhook_endpoints: endpoints,
            plugins_loaded,
        })
    }
}

/// What this node does when another node asks it to reload or to load
/// a plugin (see `cluster::delivery::NodeOps`).
struct AppOps(std::sync::Weak<App>);

#[async_trait::async_trait]
impl NodeOps for AppOps {
    async fn reload(&self) -> serde_json::Value {
        let Some(app) = self.0.upgrade() else {
            return serde_json::json!({"applied": false, "error": "shutting down"});
        };
        match app.reload().await {
            Ok(report) => serde_json::to_value(report).unwrap_or_default(),
            Err(e) => serde_json::json!({"applied": false, "error": format!("{e:#}")}),
        }
    }

    async fn plugin_load(&self, name: &str) -> serde_json::Value {
        let Some(app) = self.0.upgrade() else {
            return serde_json::json!({"error": "shutting down"});
        };
        match app.plugins.load_stored(name).await {
            Ok(report) => serde_json::to_value(report).unwrap_or_default(),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        }
    }

    async fn plugin_reload(&self, name: &str) -> serde_json::Value {
        let Some(app) = self.0.upgrade() else {
            return serde_json::json!({"error": "shutting down"});
        };
        match app.plugins.reload(name).await {
            Ok(report) => serde_json::to_value(report).unwrap_or_default(),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        }
    }

    async fn plugin_unload(&self, name: &str) -> serde_json::Value {
        let Some(app) = self.0.upgrade() else {
            return serde_json::json!({"error": "shutting down"});
        };
        match app.plugins.unload(name).await {
            Ok(_) => serde_json::json!({"name": name, "loaded": false}),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        }
    }

    async fn plugins(&self) -> serde_json::Value {
        let Some(app) = self.0.upgrade() else {
            return serde_json::Value::Null;
        };
        serde_json::to_value(app.plugins.views(0)).unwrap_or_default()
    }
}

/// A running gateway.
pub struct Server {
    app: Arc<App>,
    local_addr: SocketAddr,
    stop_accepting: CancellationToken,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts a gateway on `listener` with `config`.
    pub async fn start(
        mut config: Config,
        config_path: Option<PathBuf>,
        listener: TcpListener,
    ) -> anyhow::Result<Server> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data_dir {}: {e}", config.data_dir.display())
        })?;
        if let Some(cluster) = &config.cluster {
            config.node_id = crate::cluster::resolve_node_id(cluster, &config.data_dir)?;
        }
        let local_addr = listener.local_addr()?;
        let secrets = Secrets::resolve(&config, |text| println!("{text}"))?;
        let metrics = Arc::new(Metrics::new());
        let storage =
            crate::storage::open(&config.storage, &config.data_dir, Some(metrics.clone())).await?;
        let wakeup = Wakeup::default();
        // In cluster mode the lease comes first: crash recovery below closes
        // this node id's sessions, which must not belong to a live process.
        let lease = match &config.cluster {
            Some(c) => {
                let store = storage.cluster.clone().ok_or_else(|| {
                    anyhow::anyhow!(
                        "cluster mode needs a storage engine that nodes share (PostgreSQL)"
                    )
                })?;
                Some(
                    Lease::join(
                        store,
                        c,
                        &config.node_id,
                        &local_addr.to_string(),
                        metrics.clone(),
                        wakeup.clone(),
                    )
                    .await?,
                )
            }
            None => None,
        };
        let lifecycle = Lifecycle::start(
            storage.sessions.clone(),
            storage.outbox.clone(),
            metrics.clone(),
            wakeup.clone(),
            config.node_id.clone(),
        );
        let engine = PluginEngine::new(Some(config.plugin_cache_dir()))?;
        let plugins = Arc::new(PluginRegistry::new(
            engine,
            Arc::new(Kv::Storage(storage.kv.clone())),
            storage.plugin_store.clone(),
            metrics.clone(),
            &config,
        ));
        // A plugin that cannot load stops the start: better now than at the first event.
        plugins.apply(&config, true).await?;
        let watcher = plugins.start_watcher();
        // Endpoints are registered before anything can write an event, so a
        // new endpoint also receives the events of the crash recovery below.
        let outbox = Arc::new(Outbox::new(
            storage.outbox.clone(),
            metrics.clone(),
            wakeup.clone(),
            config.outbox.clone(),
            Some(plugins.clone()),
            crate::outbox::lease_holder(&config.node_id),
        )?);
        outbox.reconcile(&config.webhooks, &config.outbox).await?;
        outbox.start_maintenance();
        let recovered = lifecycle.recover_crashed().await?;
        if recovered > 0 {
            tracing::warn!(
                count = recovered,
                "closed connections left open by a previous run that did not shut down cleanly"
            );
        }
        let header_read_timeout = config.server.header_read_timeout;
        let enabled = config.gateway.enabled;
        let config = config::Handle::new(config);
        let secrets = Arc::new(ArcSwap::from_pointee(secrets));
        let registry = Arc::new(Registry::new(&config.load().node_id));
        let local = Arc::new(LocalDelivery::start(registry.clone(), metrics.clone()));
        let (delivery, cluster): (Arc<dyn Delivery>, Option<ClusterNode>) = match lease {
            None => (local, None),
            Some(lease) => {
                let cfg = config.load();
                let c = cfg.cluster.clone().unwrap_or_default();
                let store = storage.cluster.clone().ok_or_else(|| {
                    anyhow::anyhow!("cluster mode needs a storage engine that nodes share")
                })?;
                let sequencer = Arc::new(Sequencer::start(
                    local.clone(),
                    store,
                    storage.groups.clone(),
                    c.gap_wait,
                    metrics.clone(),
                ));
                let resync = Arc::downgrade(&sequencer);
                let nats = crate::cluster::connect_nats(&c, &cfg.node_id, move |event| {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            if let Some(s) = resync.upgrade() {
                                s.resync();
                            }
                        }
                        async_nats::Event::Disconnected => tracing::warn!(
                            "lost the connection to NATS; other nodes' messages are read back from the database once it is back"
                        ),
                        other => tracing::warn!(event = %other, "NATS"),
                    }
                })
                .await?;
                let cluster_delivery = ClusterDelivery::start(
                    local,
                    sequencer,
                    nats,
                    Subjects::new(&c.subject_prefix),
                    lease.clone(),
                    storage.groups.clone(),
                    lease.incarnation().to_string(),
                    c.request_timeout,
                    metrics.clone(),
                )
                .await?;
                (
                    cluster_delivery.clone() as Arc<dyn Delivery>,
                    Some(ClusterNode {
                        lease,
                        delivery: cluster_delivery,
                    }),
                )
            }
        };
        let messaging = Arc::new(Messaging::new(
            config.clone(),
            storage.messages.clone(),
            delivery.clone(),
            plugins.clone(),
            metrics.clone(),
            wakeup.clone(),
        ));
        let control = Arc::new(Control::new(
            config.clone(),
            storage.controls.clone(),
            storage.groups.clone(),
            storage.outbox.clone(),
            delivery.clone(),
            plugins.clone(),
            metrics.clone(),
            wakeup,
        ));
        let gateway = Arc::new(Gateway::new(
            config.clone(),
            secrets.clone(),
            registry,
            lifecycle,
            metrics.clone(),
            messaging.clone(),
            control.clone(),
            delivery.clone(),
        ));
        messaging.start_maintenance();
        control.start_expiry();
        let control_guard = match (&cluster, &storage.cluster) {
            (Some(_), Some(store)) => crate::http::control::Guard::shared(store.clone()),
            _ => crate::http::control::Guard::default(),
        };
        let app = Arc::new(App {
            config,
            config_path,
            secrets,
            storage,
            control_guard,
            delivery,
            gateway,
            messaging,
            control,
            metrics,
            outbox,
            plugins,
            cluster,
            _watcher: watcher,
            reload_lock: tokio::sync::Mutex::new(()),
        });
        if let Some(c) = &app.cluster {
            c.delivery.set_ops(Arc::new(AppOps(Arc::downgrade(&app))));
            let weak = Arc::downgrade(&app);
            c.lease.start(Arc::new(move |fenced| {
                let Some(app) = weak.upgrade() else { return };
                app.gateway.set_fenced(fenced);
                if fenced {
                    let asked = app
                        .delivery
                        .close_all(CloseReason::LeaseLost, LEASE_LOST_MESSAGE);
                    tracing::warn!(
                        connections = asked,
                        "fenced: asked every connection to close"
                    );
                }
            }));
        }
        if enabled {
            // Before the first accept: `service.enabled` comes before any
            // connection event of this run.
            app.gateway
                .lifecycle
                .record_service(true, ServiceReason::Start)
                .await?;
        }
        let stop_accepting = CancellationToken::new();
        let accept_task = tokio::spawn(accept_loop(
            listener,
            crate::http::router(app.clone()),
            header_read_timeout,
            stop_accepting.clone(),
        ));
        tracing::info!(addr = %local_addr, "plugboard listening");
        Ok(Server {
            app,
            local_addr,
            stop_accepting,
            accept_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Graceful shutdown, bounded by `shutdown.drain_timeout` and
    /// `shutdown.outbox_flush_timeout`.
    pub async fn shutdown(self) {
        let app = self.app;
        let cfg = app.config();
        let gw = &app.gateway;
        let was_accepting = gw.accepting_connections();
        gw.begin_shutdown();
        if was_accepting {
            // Durable before anything else of the shutdown, so it is sent
            // by the flush below or, if the receiver is down, after the next start.
            app.record_service(false, ServiceReason::Shutdown).await;
        }
        let asked = app
            .delivery
            .close_all(CloseReason::Shutdown, SHUTDOWN_MESSAGE);
        tracing::info!(
            connections = asked,
            "shutting down: closing every connection"
        );
        gw.sessions().close();
        if tokio::time::timeout(cfg.shutdown.drain_timeout, gw.sessions().wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = gw.sessions().len(),
                "drain timeout passed before every close handshake completed"
            );
        }
        // Sessions still registered did not get to record their close, and
        // closes storage did not take yet are tried once more; what is left
        // is closed out by the next start's crash recovery.
        let flush = tokio::time::timeout(cfg.shutdown.outbox_flush_timeout, gw.close_remaining());
        match flush.await {
            Ok(0) => {}
            Ok(left) => tracing::warn!(
                left,
                "storage did not take some connection closes; they are recorded at the next start"
            ),
            Err(_) => tracing::warn!(
                "recording the last connection closes timed out; what is left is recorded at the next start"
            ),
        }
        self.stop_accepting.cancel();
        let _ = self.accept_task.await;
        let left = app.outbox.flush(cfg.shutdown.outbox_flush_timeout).await;
        if left > 0 {
            tracing::warn!(
                outstanding = left,
                "outbox not fully delivered before shutdown; the rest is sent after the next start"
            );
        }
        app.outbox.stop().await;
        if let Some(c) = &app.cluster {
            c.lease.leave().await;
        }
        tracing::info!("shutdown complete");
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: axum::Router,
    header_read_timeout: Duration,
    stop: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let stop = stop.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(remote = %remote, error = %e, "HTTP connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), connections.wait()).await;
}
