//! The plugins of one gateway: loading from the config, per-plugin circuit
//! breakers and metrics, hot swap (admin API and folder watcher), and the
//! calls the rest of the gateway makes.
//!
//! Swapping replaces an `Arc` in an `ArcSwap`: a call holds the version it
//! started on until it returns, so calls in flight finish on the old version
//! and the next call uses the new one. A new version is compiled off the
//! async runtime and validated (it links against the contract, exports what
//! the config says, instantiates, and its `init` accepts the config) before
//! it replaces the old one; a version that fails any of that is refused and
//! the old one keeps serving.
//!
//! Where a version comes from: a plugin's **current version** is its
//! uploaded version when storage holds one ([`PluginStore`]), else its
//! file. An upload through the admin API is validated, then stored durably,
//! then swapped in: if storage refuses it, nothing is swapped. It stays the
//! current version (at start, on a config reload, on
//! [`PluginRegistry::reload`], on every node sharing the database) until
//! it is replaced by another upload or removed by
//! [`PluginRegistry::unload`]. The plugins folder is the fallback: the
//! folder watcher, a single-node convenience, reloads a changed file only
//! while the serving version came from the file, never over an upload.
//! Another node's upload is loaded with [`PluginRegistry::load_stored`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;

use super::bindings::exports::plugboard::plugin::control_handler as ch;
use super::bindings::exports::plugboard::plugin::conversation_filter as cf;
use super::bindings::exports::plugboard::plugin::webhook_formatter as wf;
use super::bindings::plugboard::plugin::types::LogLevel;
use super::engine::PluginEngine;
use super::instance::{CallFailure, Limits, LoadedPlugin};
use super::logs::{DropCounters, LogDropped, LogLine, PluginLog};
use super::{Kv, PluginContext, PluginError};
use crate::config::{Config, OnError, PluginConfig, PluginRuntimeConfig};
use crate::metrics::{Metrics, PluginHookLabel, PluginLabel, PluginLogLabel, PluginOutcomeLabel};
use crate::storage::plugins::{check_size, StoredPlugin};
use crate::storage::PluginStore;

/// Largest body a formatter may produce.
pub const MAX_FORMATTED_BODY: usize = 4 * 1024 * 1024;

/// Most bytes of recent log lines one plugin shows in the admin view.
pub const VIEW_LOG_BYTES: usize = 64 * 1024;

/// Headers a formatter may not set, in lower case.
const RESERVED_HEADERS: &[&str] = &[
    // The gateway sets these itself.
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "host",
    "user-agent",
    // Credentials: the receiver would take them as the gateway's own.
    "authorization",
    "proxy-authorization",
    // Hop-by-hop and framing headers: they change how the request travels,
    // not what it says.
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

#[derive(Debug, Default)]
struct Breaker {
    consecutive_failures: u32,
    /// Set while open; after it passes, one trial call is let through.
    open_until: Option<Instant>,
    /// A trial call is in flight (half-open): others are still skipped.
    trial: bool,
    trips: u64,
}

/// Where a loaded version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The plugin's `file` in the plugins folder.
    File,
    /// An upload through the admin API (of this node or another one sharing
    /// the storage), kept in storage.
    Upload,
}

/// The source of the serving version, and when it was uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Origin {
    source: Source,
    uploaded_at_ms: Option<i64>,
}

impl Origin {
    const FILE: Origin = Origin {
        source: Source::File,
        uploaded_at_ms: None,
    };

    fn upload(at_ms: i64) -> Origin {
        Origin {
            source: Source::Upload,
            uploaded_at_ms: Some(at_ms),
        }
    }

    fn uploaded_at(&self) -> Option<String> {
        self.uploaded_at_ms.map(crate::rfc3339_ms)
    }
}

/// What a load is asked to load.
enum Want {
    /// The current version: the stored upload if there is one, else the file.
    Current,
    /// The file (the folder watcher, once it checked the source).
    File,
    /// Bytes uploaded now: validated, stored, then swapped in.
    Upload(Vec<u8>),
    /// The stored upload, which must exist (another node uploaded it).
    Stored,
}

/// Bytes to load and where they come from.
struct Candidate {
    bytes: Vec<u8>,
    origin: Origin,
    /// For stored bytes: the SHA-256 recorded with them.
    recorded_sha256: Option<String>,
    /// Store the bytes (an upload) once they are validated, before the swap.
    store: bool,
}

impl Candidate {
    fn stored(s: StoredPlugin) -> Candidate {
        Candidate {
            bytes: s.bytes,
            origin: Origin::upload(s.uploaded_at_ms),
            recorded_sha256: Some(s.sha256),
            store: false,
        }
    }
}

/// One configured plugin and whatever version of it is loaded.
struct Slot {
    settings: ArcSwap<PluginConfig>,
    current: ArcSwapOption<LoadedPlugin>,
    /// Where `current` came from (`None` when nothing is loaded). Locked
    /// while `current` is replaced, so a view sees the two together.
    origin: Mutex<Option<Origin>>,
    log: Arc<PluginLog>,
    breaker: Mutex<Breaker>,
    swaps: AtomicU64,
    last_load_error: Mutex<Option<String>>,
    /// Serialises loads of this plugin.
    loading: tokio::sync::Mutex<()>,
}

/// A request produced by a formatter, checked against the contract.
#[derive(Debug, Clone)]
pub struct FormattedRequest {
    /// Where it goes: the endpoint's URL with the plugin's path suffix and
    /// query, always under the endpoint's path.
    pub url: String,
    pub body: Vec<u8>,
    pub content_type: http::HeaderValue,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// A plugin as shown by `GET /admin/plugins`.
#[derive(Debug, Serialize)]
pub struct PluginView {
    pub name: String,
    pub file: String,
    pub loaded: bool,
    pub sha256: Option<String>,
    /// Where the serving version came from; `null` when not loaded.
    pub source: Option<Source>,
    /// When the serving version was uploaded (RFC 3339), for an upload.
    pub uploaded_at: Option<String>,
    pub wit_version: &'static str,
    pub exports: Vec<&'static str>,
    pub hooks: Vec<String>,
    pub order: i32,
    /// As configured; `null`: each hook's default.
    pub on_error: Option<OnError>,
    pub deadline_ms: u64,
    pub memory_limit: usize,
    pub swaps: u64,
    pub breaker: BreakerView,
    pub pooled_instances: usize,
    pub last_load_error: Option<String>,
    pub recent_logs: Vec<LogLine>,
    /// What the plugin's log dropped since start to stay within its limits.
    pub log_dropped: LogDropped,
}

#[derive(Debug, Serialize)]
pub struct BreakerView {
    pub open: bool,
    pub consecutive_failures: u32,
    pub trips: u64,
    pub open_until: Option<String>,
}

/// What a load did.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub name: String,
    pub sha256: String,
    pub exports: Vec<&'static str>,
    /// Whether the compiled component came from the cache.
    pub cached: bool,
    pub compile_ms: f64,
    /// False when the same bytes were already serving (nothing swapped).
    pub swapped: bool,
    /// Where the version came from.
    pub source: Source,
    /// When it was uploaded (RFC 3339), for an upload.
    pub uploaded_at: Option<String>,
}

/// The plugins of one gateway.
pub struct PluginRegistry {
    engine: Arc<PluginEngine>,
    kv: Arc<Kv>,
    /// Uploaded versions.
    store: Arc<dyn PluginStore>,
    metrics: Arc<Metrics>,
    dir: PathBuf,
    runtime: ArcSwap<PluginRuntimeConfig>,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    /// Plugins some webhook endpoint names as its formatter: every version
    /// of them must export `webhook-formatter`, whatever their `hooks` say.
    formatters: RwLock<std::collections::BTreeSet<String>>,
}

fn limits(p: &PluginConfig, rt: &PluginRuntimeConfig) -> Limits {
    Limits {
        memory: p.memory_limit,
        deadline: p.deadline,
        init_deadline: p.init_deadline,
        max_calls: p.max_calls_per_instance,
        pool_size: rt.pool_size,
    }
}

impl PluginRegistry {
    pub fn new(
        engine: Arc<PluginEngine>,
        kv: Arc<Kv>,
        store: Arc<dyn PluginStore>,
        metrics: Arc<Metrics>,
        config: &Config,
    ) -> Self {
        PluginRegistry {
            engine,
            kv,
            store,
            metrics,
            dir: config.plugins_dir(),
            runtime: ArcSwap::from_pointee(config.plugin_runtime.clone()),
            slots: RwLock::new(BTreeMap::new()),
            formatters: RwLock::new(Default::default()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metric counters of what plugin `name`'s log drops.
    fn log_drop_counters(&self, name: &str) -> DropCounters {
        let counter = |part: &str| {
            self.metrics
                .plugin_log_dropped
                .get_or_create(&PluginLogLabel {
                    plugin: name.to_string(),
                    part: part.to_string(),
                })
                .clone()
        };
        DropCounters {
            lines: counter("line"),
            fields: counter("field"),
            truncated: counter("truncated"),
        }
    }

    fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The hooks a version of `p` must export: its `hooks`, plus
    /// `webhook-formatter` when an endpoint names it as formatter.
    fn required_hooks(&self, p: &PluginConfig) -> Vec<String> {
        let mut hooks = p.hooks.clone();
        let is_formatter = self
            .formatters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&p.name);
        if is_formatter && !hooks.iter().any(|h| h == "webhook-formatter") {
            hooks.push("webhook-formatter".into());
        }
        hooks
    }

    fn path_of(&self, p: &PluginConfig) -> PathBuf {
        if p.file.is_absolute() {
            p.file.clone()
        } else {
            self.dir.join(&p.file)
        }
    }

    /// Applies the `[[plugins]]` list: loads new plugins, reloads changed
    /// ones (each from its current version: its stored upload if it has one,
    /// else its file), drops removed ones (their stored uploads stay, as
    /// their key-value stores do). With `strict`, the first failure is
    /// returned (at start-up a broken plugin stops the gateway); otherwise
    /// failures are logged and the old version keeps serving.
    pub async fn apply(
        &self,
        config: &Config,
        strict: bool,
    ) -> Result<Vec<LoadReport>, PluginError> {
        self.runtime.store(Arc::new(config.plugin_runtime.clone()));
        *self.formatters.write().unwrap_or_else(|p| p.into_inner()) = config
            .webhooks
            .iter()
            .filter_map(|w| w.formatter.clone())
            .collect();
        {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            slots.retain(|name, _| {
                let keep = config.plugins.iter().any(|p| &p.name == name);
                if !keep {
                    tracing::info!(plugin = %name, "plugin removed from config; unloaded");
                }
                keep
            });
        }
        let mut reports = Vec::new();
        for p in &config.plugins {
            let (slot, changed, previous) = {
                let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
                match slots.get(&p.name) {
                    Some(s) => {
                        let previous = s.settings.load_full();
                        let changed = *previous != *p;
                        s.settings.store(Arc::new(p.clone()));
                        (s.clone(), changed, Some(previous))
                    }
                    None => {
                        let s = Arc::new(Slot {
                            settings: ArcSwap::from_pointee(p.clone()),
                            current: ArcSwapOption::empty(),
                            origin: Mutex::new(None),
                            log: Arc::new(
                                PluginLog::new(&p.name)
                                    .with_counters(self.log_drop_counters(&p.name)),
                            ),
                            breaker: Mutex::new(Breaker::default()),
                            swaps: AtomicU64::new(0),
                            last_load_error: Mutex::new(None),
                            loading: tokio::sync::Mutex::new(()),
                        });
                        slots.insert(p.name.clone(), s.clone());
                        (s, true, None)
                    }
                }
            };
            if !changed && slot.current.load().is_some() {
                continue;
            }
            match self.load(&slot, Want::Current, true).await {
                Ok(r) => reports.push(r),
                Err(e) if strict => {
                    return Err(PluginError::Named {
                        name: p.name.clone(),
                        error: Box::new(e),
                    })
                }
                Err(e) => {
                    // The version that keeps serving keeps its own settings.
                    if let (Some(previous), true) = (previous, slot.current.load().is_some()) {
                        slot.settings.store(previous);
                    }
                    tracing::error!(plugin = %p.name, error = %e, "plugin not (re)loaded; the previous version keeps serving")
                }
            }
        }
        Ok(reports)
    }

    /// Loads what `want` names as the plugin's new version, under its load
    /// lock (so a storage read or a file read can never be overtaken by an
    /// upload and then swap stale bytes back in).
    async fn load(&self, slot: &Slot, want: Want, force: bool) -> Result<LoadReport, PluginError> {
        let _loading = slot.loading.lock().await;
        self.load_locked(slot, want, force).await
    }

    /// The folder watcher's load: the changed file, unless the serving
    /// version is an upload (`None`: nothing done).
    async fn load_changed_file(&self, slot: &Slot) -> Result<Option<LoadReport>, PluginError> {
        let _loading = slot.loading.lock().await;
        let origin = *slot.origin.lock().unwrap_or_else(|p| p.into_inner());
        if origin.is_some_and(|o| o.source == Source::Upload) {
            return Ok(None);
        }
        self.load_locked(slot, Want::File, false).await.map(Some)
    }

    /// [`Self::load`], with the plugin's load lock held.
    async fn load_locked(
        &self,
        slot: &Slot,
        want: Want,
        force: bool,
    ) -> Result<LoadReport, PluginError> {
        let settings = slot.settings.load_full();
        let name = settings.name.as_str();
        let reading = |error| PluginError::Storage {
            action: "read the uploaded version",
            error,
        };
        let candidate = match want {
            Want::Current => match self.store.plugin_get(name).await.map_err(reading)? {
                Some(stored) => Candidate::stored(stored),
                None => self.file_candidate(&settings).await?,
            },
            Want::File => self.file_candidate(&settings).await?,
            Want::Upload(bytes) => {
                if let Err(error) = check_size(bytes.len()) {
                    return Err(PluginError::Storage {
                        action: "store the uploaded version",
                        error,
                    });
                }
                Candidate {
                    bytes,
                    origin: Origin::upload(crate::now_ms()),
                    recorded_sha256: None,
                    store: true,
                }
            }
            Want::Stored => {
                // The hash first, without the bytes: a signal for the version
                // that already serves costs no transfer of the component.
                let info = self
                    .store
                    .plugin_list()
                    .await
                    .map_err(reading)?
                    .into_iter()
                    .find(|i| i.name == name)
                    .ok_or_else(|| PluginError::NoUpload(name.to_string()))?;
                let current = slot.current.load_full();
                if let Some(c) = current.filter(|c| !force && c.sha256 == info.sha256) {
                    let origin = Origin::upload(info.uploaded_at_ms);
                    *slot.origin.lock().unwrap_or_else(|p| p.into_inner()) = Some(origin);
                    return Ok(LoadReport {
                        name: name.to_string(),
                        sha256: info.sha256,
                        exports: c.exports.clone(),
                        cached: false,
                        compile_ms: 0.0,
                        swapped: false,
                        source: Source::Upload,
                        uploaded_at: origin.uploaded_at(),
                    });
                }
                match self.store.plugin_get(name).await.map_err(reading)? {
                    Some(stored) => Candidate::stored(stored),
                    None => return Err(PluginError::NoUpload(name.to_string())),
                }
            }
        };
        let recorded = candidate.recorded_sha256.clone();
        let origin = candidate.origin;
        self.swap(slot, &settings, candidate, force)
            .await
            .map_err(|e| {
                let e = match recorded {
                    // Name the uploaded version that was refused: the file
                    // is not what was tried.
                    Some(sha256) => PluginError::Stored {
                        version: sha256.chars().take(12).collect(),
                        uploaded_at: origin.uploaded_at().unwrap_or_default(),
                        error: Box::new(e),
                    },
                    None => e,
                };
                self.refused(slot, e)
            })
    }

    /// The plugin's file, read now.
    async fn file_candidate(&self, settings: &PluginConfig) -> Result<Candidate, PluginError> {
        let path = self.path_of(settings);
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| PluginError::Read {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(Candidate {
            bytes,
            origin: Origin::FILE,
            recorded_sha256: None,
            store: false,
        })
    }

    /// Compiles, validates and swaps in `candidate` as the plugin's new
    /// version (the load lock is held). An upload is stored after it passed
    /// validation and before the swap: if storage refuses it, it is refused.
    /// A refusal is returned for the caller to record ([`Self::refused`]).
    async fn swap(
        &self,
        slot: &Slot,
        settings: &PluginConfig,
        candidate: Candidate,
        force: bool,
    ) -> Result<LoadReport, PluginError> {
        let Candidate {
            bytes,
            origin,
            recorded_sha256,
            store,
        } = candidate;
        let name = settings.name.clone();
        let engine = self.engine.clone();
        let (compiled, bytes) = tokio::task::spawn_blocking(move || {
            let compiled = engine.compile(&bytes);
            (compiled, bytes)
        })
        .await
        .map_err(|e| PluginError::Engine(e.to_string()))?;
        let result = match compiled {
            Err(e) => Err(e),
            Ok(compiled) => {
                if let Some(recorded) = recorded_sha256.filter(|r| *r != compiled.sha256) {
                    if !self.serves(&compiled.sha256) {
                        self.engine.discard(&compiled.sha256);
                    }
                    return Err(PluginError::Read {
                        path: format!("the uploaded version of `{name}`"),
                        message: format!(
                            "its SHA-256 is {}, not the {recorded} recorded with it",
                            compiled.sha256
                        ),
                    });
                }
                let current = slot.current.load_full();
                if !force
                    && current
                        .as_ref()
                        .is_some_and(|c| c.sha256 == compiled.sha256)
                {
                    // The same bytes serve already: nothing to swap. An upload
                    // of them still becomes the stored, current version.
                    if store {
                        self.store_upload(&name, &compiled.sha256, bytes, origin)
                            .await?;
                    }
                    *slot.origin.lock().unwrap_or_else(|p| p.into_inner()) = Some(origin);
                    return Ok(LoadReport {
                        name,
                        sha256: compiled.sha256,
                        exports: current.map(|c| c.exports.clone()).unwrap_or_default(),
                        cached: compiled.cached,
                        compile_ms: compiled.took.as_secs_f64() * 1000.0,
                        swapped: false,
                        source: origin.source,
                        uploaded_at: origin.uploaded_at(),
                    });
                }
                let ctx = Arc::new(PluginContext {
                    name: name.clone(),
                    config: settings
                        .config
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    log: slot.log.clone(),
                    kv: self.kv.clone(),
                });
                let loaded = LoadedPlugin::load(
                    self.engine.clone(),
                    &compiled.component,
                    compiled.sha256.clone(),
                    ctx,
                    limits(settings, &self.runtime.load()),
                    &self.required_hooks(settings),
                )
                .await;
                let stored = match loaded {
                    Ok(loaded) if store => self
                        .store_upload(&name, &compiled.sha256, bytes, origin)
                        .await
                        .map(|()| loaded),
                    other => other,
                };
                match stored {
                    Ok(loaded) => Ok((loaded, compiled)),
                    Err(e) => {
                        if !self.serves(&compiled.sha256) {
                            self.engine.discard(&compiled.sha256);
                        }
                        Err(e)
                    }
                }
            }
        };
        let outcome = PluginOutcomeLabel {
            plugin: name.clone(),
            outcome: if result.is_ok() { "ok" } else { "refused" }.into(),
        };
        self.metrics.plugin_loads.get_or_create(&outcome).inc();
        let (loaded, compiled) = result?;
        let report = LoadReport {
            name: name.clone(),
            sha256: loaded.sha256.clone(),
            exports: loaded.exports.clone(),
            cached: compiled.cached,
            compile_ms: compiled.took.as_secs_f64() * 1000.0,
            swapped: true,
            source: origin.source,
            uploaded_at: origin.uploaded_at(),
        };
        {
            let mut serving = slot.origin.lock().unwrap_or_else(|p| p.into_inner());
            *serving = Some(origin);
            slot.current.store(Some(loaded));
        }
        slot.swaps.fetch_add(1, Ordering::Relaxed);
        *slot.breaker.lock().unwrap_or_else(|p| p.into_inner()) = Breaker::default();
        self.metrics
            .plugin_breaker_open
            .get_or_create(&PluginLabel {
                plugin: name.clone(),
            })
            .set(0);
        *slot
            .last_load_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        let from = match origin.source {
            Source::File => "file",
            Source::Upload => "upload",
        };
        slot.log.gateway(
            LogLevel::Info,
            format!(
                "version {} loaded (exports {}) from the {from}",
                &report.sha256[..12],
                report.exports.join(", ")
            ),
        );
        tracing::info!(plugin = %name, sha256 = %report.sha256, source = from, cached = report.cached, compile_ms = report.compile_ms, "plugin version loaded");
        Ok(report)
    }

    /// Stores an upload that passed validation (durable on return).
    async fn store_upload(
        &self,
        name: &str,
        sha256: &str,
        bytes: Vec<u8>,
        origin: Origin,
    ) -> Result<(), PluginError> {
        self.store
            .plugin_put(
                name,
                sha256,
                bytes,
                origin.uploaded_at_ms.unwrap_or_default(),
            )
            .await
            .map_err(|error| PluginError::Storage {
                action: "store the uploaded version",
                error,
            })
    }

    /// Records a refused version (log line, `last_load_error`).
    fn refused(&self, slot: &Slot, e: PluginError) -> PluginError {
        let name = &slot.settings.load().name;
        let text = e.to_string();
        slot.log
            .gateway(LogLevel::Error, format!("new version refused: {text}"));
        tracing::error!(plugin = %name, error = %text, "plugin version refused");
        *slot
            .last_load_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(text);
        e
    }

    /// Whether some plugin serves the component with `sha256` now.
    fn serves(&self, sha256: &str) -> bool {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|s| {
                s.current
                    .load()
                    .as_ref()
                    .is_some_and(|c| c.sha256 == sha256)
            })
    }

    /// Validates `bytes` as a new version of plugin `name`, stores it as the
    /// plugin's uploaded version (durable, so a restart and every node
    /// sharing the storage load it) and swaps it in. The old version serves
    /// until then and keeps serving if the new one is refused, storage
    /// refusing it included. The plugin's file is not touched.
    pub async fn install(&self, name: &str, bytes: Vec<u8>) -> Result<LoadReport, PluginError> {
        let slot = self
            .slot(name)
            .ok_or_else(|| PluginError::Unknown(name.to_string()))?;
        self.load(&slot, Want::Upload(bytes), false).await
    }

    /// Reloads plugin `name` from its current version: its uploaded version
    /// if storage holds one, else its file.
    pub async fn reload(&self, name: &str) -> Result<LoadReport, PluginError> {
        let slot = self
            .slot(name)
            .ok_or_else(|| PluginError::Unknown(name.to_string()))?;
        self.load(&slot, Want::Current, false).await
    }

    /// Loads plugin `name`'s stored upload, as when another node signals
    /// that it uploaded a version: nothing is read beyond its hash, nor
    /// swapped (`swapped: false`, `compile_ms: 0`), when the serving version
    /// already has that SHA-256. [`PluginError::NoUpload`] when storage
    /// holds none (it was unloaded since); the serving version stays.
    pub async fn load_stored(&self, name: &str) -> Result<LoadReport, PluginError> {
        let slot = self
            .slot(name)
            .ok_or_else(|| PluginError::Unknown(name.to_string()))?;
        self.load(&slot, Want::Stored, false).await
    }

    /// Unloads plugin `name` and removes its uploaded version from storage
    /// (answers whether there was one): calls fail as unavailable (and get
    /// its on-error policy) until it is loaded again by a reload, an upload
    /// or a config reload, from its file unless a new version is uploaded.
    /// If storage refuses the removal, nothing is unloaded.
    pub async fn unload(&self, name: &str) -> Result<bool, PluginError> {
        let slot = self
            .slot(name)
            .ok_or_else(|| PluginError::Unknown(name.to_string()))?;
        let _loading = slot.loading.lock().await;
        let removed =
            self.store
                .plugin_delete(name)
                .await
                .map_err(|error| PluginError::Storage {
                    action: "remove the uploaded version",
                    error,
                })?;
        {
            let mut origin = slot.origin.lock().unwrap_or_else(|p| p.into_inner());
            *origin = None;
            slot.current.store(None);
        }
        let also = if removed {
            "; its uploaded version is removed"
        } else {
            ""
        };
        slot.log.gateway(
            LogLevel::Warn,
            format!("unloaded through the admin API{also}"),
        );
        tracing::warn!(plugin = %name, upload_removed = removed, "plugin unloaded through the admin API");
        Ok(removed)
    }

    /// The on-error policy of plugin `name` for `hook`: its `on_error`, else
    /// the hook's default.
    pub fn on_error(&self, name: &str, hook: &str) -> OnError {
        self.slot(name)
            .and_then(|s| s.settings.load().on_error)
            .unwrap_or_else(|| crate::config::default_on_error(hook))
    }

    /// Calls `name`'s formatter with the breaker, metrics and output checks
    /// for a request to `endpoint_url`: a request that breaks them is
    /// `malformed`, and never sent.
    pub async fn format(
        &self,
        name: &str,
        event: &wf::Event,
        endpoint_url: &str,
    ) -> Result<Option<FormattedRequest>, CallFailure> {
        self.call(name, "webhook-formatter", |p| {
            let event = event.clone();
            async move {
                match p.format(&event).await? {
                    None => Ok(None),
                    Some(req) => check_request(req, endpoint_url)
                        .map(Some)
                        .map_err(CallFailure::Malformed),
                }
            }
        })
        .await
    }

    /// Calls `name`'s conversation filter with the breaker and metrics; the
    /// answer must hold one verdict per conversation, and a rewrite must keep
    /// the channel id and type.
    pub async fn filter(
        &self,
        name: &str,
        viewer: &cf::Viewer,
        conversations: &[cf::Conversation],
    ) -> Result<Vec<cf::Verdict>, CallFailure> {
        self.call(name, "conversation-filter", |p| async move {
            let verdicts = p.filter(viewer, conversations).await?;
            check_verdicts(conversations, &verdicts).map_err(CallFailure::Malformed)?;
            Ok(verdicts)
        })
        .await
    }

    /// Calls `name`'s control handler with the breaker and metrics; a plan
    /// must hold JSON payloads and valid user ids.
    pub async fn control(
        &self,
        name: &str,
        request: &ch::ControlRequest,
    ) -> Result<ch::Decision, CallFailure> {
        self.call(name, "control-handler", |p| async move {
            let decision = p.control(request).await?;
            check_decision(&decision).map_err(CallFailure::Malformed)?;
            Ok(decision)
        })
        .await
    }

    /// One call with the breaker and metrics around it.
    async fn call<T, F, Fut>(&self, name: &str, hook: &'static str, f: F) -> Result<T, CallFailure>
    where
        F: FnOnce(Arc<LoadedPlugin>) -> Fut,
        Fut: std::future::Future<Output = Result<T, CallFailure>>,
    {
        let Some(slot) = self.slot(name) else {
            return Err(CallFailure::Unavailable(format!(
                "no plugin named `{name}`"
            )));
        };
        {
            let mut b = slot.breaker.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(until) = b.open_until {
                if Instant::now() < until || b.trial {
                    drop(b);
                    self.count(name, hook, "breaker_open");
                    return Err(CallFailure::BreakerOpen);
                }
                // Half-open: this call is the one trial.
                b.trial = true;
            }
        }
        let Some(version) = slot.current.load_full() else {
            let failure = CallFailure::Unavailable(format!("plugin `{name}` is not loaded"));
            self.count(name, hook, failure.label());
            return Err(failure);
        };
        let started = Instant::now();
        let result = f(version).await;
        match &result {
            Ok(_) => {
                self.count(name, hook, "ok");
                let mut b = slot.breaker.lock().unwrap_or_else(|p| p.into_inner());
                b.consecutive_failures = 0;
                if b.open_until.take().is_some() {
                    b.trial = false;
                    self.metrics
                        .plugin_breaker_open
                        .get_or_create(&PluginLabel {
                            plugin: name.to_string(),
                        })
                        .set(0);
                    slot.log.gateway(
                        LogLevel::Info,
                        "circuit breaker closed: the trial call succeeded".into(),
                    );
                    tracing::info!(plugin = %name, "plugin circuit breaker closed");
                }
                self.metrics
                    .plugin_call_seconds
                    .get_or_create(&PluginHookLabel {
                        plugin: name.to_string(),
                        hook: hook.to_string(),
                    })
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(failure) => self.record(name, hook, failure, started.elapsed()),
        }
        result
    }

    fn count(&self, name: &str, hook: &str, outcome: &str) {
        self.metrics
            .plugin_calls
            .get_or_create(&crate::metrics::PluginCallLabel {
                plugin: name.to_string(),
                hook: hook.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a failure and trips the breaker after too many in a row.
    fn record(&self, name: &str, hook: &str, failure: &CallFailure, took: Duration) {
        self.count(name, hook, failure.label());
        if !took.is_zero() {
            self.metrics
                .plugin_call_seconds
                .get_or_create(&PluginHookLabel {
                    plugin: name.to_string(),
                    hook: hook.to_string(),
                })
                .observe(took.as_secs_f64());
        }
        let Some(slot) = self.slot(name) else { return };
        if matches!(
            failure,
            CallFailure::BreakerOpen | CallFailure::Unavailable(_)
        ) {
            return;
        }
        slot.log
            .gateway(LogLevel::Warn, format!("{hook} call failed: {failure}"));
        let rt = self.runtime.load();
        let mut b = slot.breaker.lock().unwrap_or_else(|p| p.into_inner());
        b.consecutive_failures += 1;
        // A failed trial reopens at once; otherwise after enough failures in a row.
        if b.trial || b.consecutive_failures >= rt.breaker_failures {
            b.trial = false;
            b.open_until = Some(Instant::now() + rt.breaker_cooldown);
            b.trips += 1;
            b.consecutive_failures = 0;
            self.metrics
                .plugin_breaker_open
                .get_or_create(&PluginLabel {
                    plugin: name.to_string(),
                })
                .set(1);
            self.metrics
                .plugin_breaker_trips
                .get_or_create(&PluginLabel {
                    plugin: name.to_string(),
                })
                .inc();
            slot.log.gateway(
                LogLevel::Error,
                format!(
                    "circuit breaker opened after {} failures in a row; skipped for {:?}",
                    rt.breaker_failures, rt.breaker_cooldown
                ),
            );
            tracing::error!(plugin = %name, failures = rt.breaker_failures, cooldown = ?rt.breaker_cooldown, last = %failure, "plugin circuit breaker opened");
        }
    }

    /// The chain of a hook: loaded plugins exporting it (and listing it in
    /// `hooks`, when they list any), in `order`, then name. This is the
    /// order in which the hook's callers run them.
    pub fn chain(&self, hook: &str) -> Vec<String> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let mut chain: Vec<(i32, String)> = slots
            .iter()
            .filter(|(_, s)| {
                let settings = s.settings.load();
                let exported = s
                    .current
                    .load()
                    .as_ref()
                    .is_some_and(|c| c.exports.contains(&hook));
                exported && (settings.hooks.is_empty() || settings.hooks.iter().any(|h| h == hook))
            })
            .map(|(name, s)| (s.settings.load().order, name.clone()))
            .collect();
        chain.sort();
        chain.into_iter().map(|(_, name)| name).collect()
    }

    /// Every plugin's state, for the admin API, with at most `log_lines` of
    /// its recent lines (and at most [`VIEW_LOG_BYTES`] of them).
    pub fn views(&self, log_lines: usize) -> Vec<PluginView> {
        let slots: Vec<(String, Arc<Slot>)> = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        slots
            .into_iter()
            .map(|(name, slot)| {
                let s = slot.settings.load();
                // Under the origin's lock: the version and its source together.
                let (current, origin) = {
                    let origin = slot.origin.lock().unwrap_or_else(|p| p.into_inner());
                    (slot.current.load_full(), *origin)
                };
                let origin = origin.filter(|_| current.is_some());
                let b = slot.breaker.lock().unwrap_or_else(|p| p.into_inner());
                let open = b.open_until.is_some_and(|u| Instant::now() < u);
                if !open {
                    self.metrics
                        .plugin_breaker_open
                        .get_or_create(&PluginLabel {
                            plugin: name.clone(),
                        })
                        .set(0);
                }
                PluginView {
                    name,
                    file: self.path_of(&s).display().to_string(),
                    loaded: current.is_some(),
                    sha256: current.as_ref().map(|c| c.sha256.clone()),
                    source: origin.map(|o| o.source),
                    uploaded_at: origin.and_then(|o| o.uploaded_at()),
                    wit_version: super::instance::WIT_VERSION,
                    exports: current
                        .as_ref()
                        .map(|c| c.exports.clone())
                        .unwrap_or_default(),
                    hooks: s.hooks.clone(),
                    order: s.order,
                    on_error: s.on_error,
                    deadline_ms: s.deadline.as_millis() as u64,
                    memory_limit: s.memory_limit,
                    swaps: slot.swaps.load(Ordering::Relaxed),
                    breaker: BreakerView {
                        open,
                        consecutive_failures: b.consecutive_failures,
                        trips: b.trips,
                        open_until: b.open_until.filter(|_| open).map(|u| {
                            let left = u.saturating_duration_since(Instant::now());
                            crate::rfc3339_ms(crate::now_ms() + left.as_millis() as i64)
                        }),
                    },
                    pooled_instances: current.as_ref().map(|c| c.pooled()).unwrap_or(0),
                    last_load_error: slot
                        .last_load_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                    recent_logs: slot.log.recent(log_lines, VIEW_LOG_BYTES),
                    log_dropped: slot.log.dropped(),
                }
            })
            .collect()
    }

    /// Watches the plugins folder and reloads a plugin whose file changes.
    pub fn start_watcher(self: &Arc<Self>) -> Option<notify::RecommendedWatcher> {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                use notify::EventKind;
                if matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_)) {
                    for p in event.paths {
                        let _ = tx.send(p);
                    }
                }
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the plugins folder; use the admin API to reload");
                return None;
            }
        };
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot create the plugins folder");
        }
        if let Err(e) = watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the plugins folder");
            return None;
        }
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Let a burst of writes to the same file settle.
                let mut changed = vec![first];
                let settle = tokio::time::sleep(Duration::from_millis(150));
                tokio::pin!(settle);
                loop {
                    tokio::select! {
                        _ = &mut settle => break,
                        more = rx.recv() => match more {
                            Some(p) => changed.push(p),
                            None => return,
                        },
                    }
                }
                let Some(this) = this.upgrade() else { return };
                if !this.runtime.load().watch {
                    continue;
                }
                let slots: Vec<Arc<Slot>> = this
                    .slots
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect();
                for slot in slots {
                    let path = this.path_of(&slot.settings.load());
                    if changed.iter().any(|c| same_file(c, &path)) {
                        match this.load_changed_file(&slot).await {
                            Ok(Some(r)) if r.swapped => {
                                tracing::info!(plugin = %r.name, "plugin file changed; new version swapped in")
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => {
                                slot.log.gateway(
                                    LogLevel::Warn,
                                    "file changed; not loaded: an uploaded version is current until it is unloaded or replaced".into(),
                                );
                                tracing::warn!(plugin = %slot.settings.load().name, "plugin file changed; not loaded: an uploaded version is current until it is unloaded or replaced")
                            }
                            Err(e) => {
                                tracing::error!(plugin = %slot.settings.load().name, error = %e, "changed plugin file refused; the previous version keeps serving")
                            }
                        }
                    }
                }
            }
        });
        Some(watcher)
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => {
                a.file_name() == b.file_name()
                    && a.parent().map(|p| p.canonicalize().ok())
                        == b.parent().map(|p| p.canonicalize().ok())
            }
        }
}

/// Checks a control handler's decision against the contract: every payload
/// is JSON text nested at most `json::MAX_DEPTH` levels, as the API's must
/// be (the size limit is the control module's, which knows the config).
pub fn check_decision(decision: &ch::Decision) -> Result<(), String> {
    let ch::Decision::Deliver(plan) = decision else {
        return Ok(());
    };
    let json_text = |p: &str| {
        crate::json::check_depth(p, crate::json::MAX_DEPTH).map_err(|e| e.to_string())?;
        serde_json::from_str::<serde::de::IgnoredAny>(p)
            .map(|_| ())
            .map_err(|_| "not JSON text".to_string())
    };
    json_text(&plan.payload).map_err(|e| format!("the plan's payload is {e}"))?;
    for t in &plan.targets {
        if !crate::auth::valid_id(&t.user_id) {
            return Err(format!("target user id {:?} is not a valid id", t.user_id));
        }
        if let Some(p) = &t.payload {
            json_text(p).map_err(|e| format!("the payload for `{}` is {e}", t.user_id))?;
        }
    }
    Ok(())
}

/// Checks a filter's answer against its input.
pub fn check_verdicts(input: &[cf::Conversation], verdicts: &[cf::Verdict]) -> Result<(), String> {
    if verdicts.len() != input.len() {
        return Err(format!(
            "{} verdicts for {} conversations (one per conversation, in order)",
            verdicts.len(),
            input.len()
        ));
    }
    for (i, (c, v)) in input.iter().zip(verdicts).enumerate() {
        if let cf::Verdict::Rewrite(r) = v {
            if r.channel_id != c.channel_id || r.channel_type != c.channel_type {
                return Err(format!(
                    "verdict {i} rewrites conversation `{}` into another channel (`{}`)",
                    c.channel_id, r.channel_id
                ));
            }
        }
    }
    Ok(())
}

/// Checks a formatter's request against the contract, for an endpoint
/// whose URL is `endpoint_url`, and builds the URL it goes to.
pub fn check_request(
    req: wf::OutgoingRequest,
    endpoint_url: &str,
) -> Result<FormattedRequest, String> {
    if req.body.len() > MAX_FORMATTED_BODY {
        return Err(format!(
            "body of {} bytes is larger than {MAX_FORMATTED_BODY}",
            req.body.len()
        ));
    }
    let content_type = http::HeaderValue::from_str(&req.content_type)
        .ok()
        .filter(|_| !req.content_type.is_empty())
        .ok_or_else(|| {
            format!(
                "content-type {:?} is not a valid header value",
                req.content_type
            )
        })?;
    let mut headers = Vec::new();
    for pair in req.headers {
        let name = http::HeaderName::from_bytes(pair.key.as_bytes())
            .map_err(|_| format!("header name {:?} is not valid", pair.key))?;
        if RESERVED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("webhook-") {
            return Err(format!("header `{name}` cannot be set by a plugin"));
        }
        let value = http::HeaderValue::from_str(&pair.value)
            .map_err(|_| format!("value of header `{name}` is not a valid header value"))?;
        headers.push((name, value));
    }
    if let Some(suffix) = &req.path_suffix {
        check_path_suffix(suffix)?;
    }
    if let Some(q) = &req.query {
        if q.contains(['#', ' ']) || q.chars().any(|c| c.is_control()) {
            return Err(format!(
                "query {q:?} holds `#`, spaces or control characters"
            ));
        }
    }
    let url = request_url(
        endpoint_url,
        req.path_suffix.as_deref(),
        req.query.as_deref(),
    )?;
    Ok(FormattedRequest {
        url,
        body: req.body,
        content_type,
        headers,
    })
}

/// A path suffix must stay under the endpoint's path, for the gateway's
/// URL parser and for whatever decodes the path after it (a proxy, the
/// receiver's framework). So: visible ASCII starting with `/`; no `?`, `#`
/// or `\`; no `.` or `..` segment (also not with `;` parameters, as in
/// `..;`); and no escape of `.`, `/`, `\` or `%` (`%2e`, `%2f`, `%5c`,
/// `%25`, in either case), which a decoder would turn back into one
/// (`%252e` is `%2e` once decoded).
fn check_path_suffix(suffix: &str) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("path-suffix {suffix:?} {why}"));
    if !suffix.starts_with('/') {
        return refuse("must start with `/`");
    }
    if let Some(c) = suffix.chars().find(|c| !c.is_ascii_graphic()) {
        return refuse(&format!(
            "holds {c:?}: only visible ASCII is allowed (percent-encode the rest)"
        ));
    }
    if let Some(c) = suffix.chars().find(|c| matches!(c, '?' | '#' | '\\')) {
        return refuse(&format!("holds `{c}`"));
    }
    let bytes = suffix.as_bytes();
    for (i, _) in suffix.match_indices('%') {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match escaped {
            None => return refuse("holds a `%` that is not followed by two hex digits"),
            Some(b'.' | b'/' | b'\\' | b'%') => {
                return refuse("holds an escaped `.`, `/`, `\\` or `%`")
            }
            Some(_) => {}
        }
    }
    for segment in suffix[1..].split('/') {
        let name = segment.split(';').next().unwrap_or_default();
        if !name.is_empty() && name.chars().all(|c| c == '.') {
            return refuse("holds a dot segment (`.` or `..`)");
        }
    }
    Ok(())
}

/// The endpoint URL with a formatter's path suffix and query. The suffix is
/// appended to the endpoint's path (without its trailing `/`); the query is
/// added after the endpoint's own, and may not repeat one of its keys
/// (compared decoded and in any letter case, as receivers differ), which
/// would let a plugin override what the endpoint's URL says (a `token`).
/// The result is checked to be under the endpoint's path, whatever the URL
/// parser made of the suffix.
fn request_url(base: &str, suffix: Option<&str>, query: Option<&str>) -> Result<String, String> {
    let mut url =
        reqwest::Url::parse(base).map_err(|e| format!("the endpoint URL does not parse: {e}"))?;
    let base_path = url.path().trim_end_matches('/').to_string();
    if let Some(s) = suffix {
        url.set_path(&format!("{base_path}{s}"));
        if !url.path().starts_with(&format!("{base_path}/")) {
            return Err(format!("path-suffix {s:?} leaves the endpoint's path"));
        }
    }
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        let own: std::collections::BTreeSet<String> =
            url.query_pairs().map(|(k, _)| k.to_lowercase()).collect();
        let mut theirs = url.clone();
        theirs.set_query(Some(q));
        if let Some((key, _)) = theirs
            .query_pairs()
            .find(|(k, _)| own.contains(&k.to_lowercase()))
        {
            return Err(format!(
                "query key {key:?} is already in the endpoint's URL"
            ));
        }
        let joined = match url.query() {
            Some(existing) if !existing.is_empty() => format!("{existing}&{q}"),
            _ => q.to_string(),
        };
        url.set_query(Some(&joined));
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::bindings::plugboard::plugin::types::Pair;

    const ENDPOINT: &str = "https://bot.example.com/hook/?token=abc";

    fn request(
        suffix: Option<&str>,
        query: Option<&str>,
        headers: &[(&str, &str)],
    ) -> wf::OutgoingRequest {
        wf::OutgoingRequest {
            body: b"{}".to_vec(),
            content_type: "application/json".into(),
            headers: headers
                .iter()
                .map(|(k, v)| Pair {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            path_suffix: suffix.map(str::to_string),
            query: query.map(str::to_string),
        }
    }

    #[test]
    fn a_suffix_and_a_query_are_added_under_the_endpoint() {
        let r = check_request(
            request(Some("/onebot/event"), Some("event=x"), &[]),
            ENDPOINT,
        )
        .unwrap();
        assert_eq!(
            r.url,
            "https://bot.example.com/hook/onebot/event?token=abc&event=x"
        );
        let r = check_request(request(None, None, &[]), ENDPOINT).unwrap();
        assert_eq!(r.url, ENDPOINT);
        // Ordinary escapes and dots inside a name are fine.
        let r = check_request(
            request(Some("/a%20b/v1.2/.well-known"), None, &[]),
            ENDPOINT,
        )
        .unwrap();
        assert_eq!(
            r.url,
            "https://bot.example.com/hook/a%20b/v1.2/.well-known?token=abc"
        );
    }

    #[test]
    fn a_suffix_that_could_leave_the_endpoint_path_is_refused() {
        for suffix in [
            "/..",
            "/../../admin/secret",
            "/.",
            "/./x",
            "/a/../../b",
            "/%2e%2e/admin",
            "/%2E%2E/admin",
            "/%2e./admin",
            "/.%2E/admin",
            "/%252e%252e/admin",
            "/%25%32%65",
            "/a%2fb",
            "/a%2F..",
            "/..\\..\\admin",
            "/a\\b",
            "/%5c..%5cadmin",
            "/%5C",
            "/..;/admin",
            "/.;x",
            "/...",
            "/x/..",
            "relative",
            "",
            "/x?y",
            "/x#y",
            "/x y",
            "/x\ny",
            "/caf\u{e9}",
            "/bad%zz",
            "/bad%2",
            "/bad%",
            "/%+1",
        ] {
            let err = check_request(request(Some(suffix), None, &[]), ENDPOINT).expect_err(suffix);
            assert!(err.starts_with("path-suffix "), "{suffix}: {err}");
        }
    }

    #[test]
    fn gateway_credential_and_hop_by_hop_headers_are_refused() {
        for name in [
            "authorization",
            "Authorization",
            "proxy-authorization",
            "user-agent",
            "expect",
            "te",
            "upgrade",
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "trailer",
            "host",
            "content-length",
            "content-type",
            "webhook-signature",
            "webhook-anything",
        ] {
            let err = check_request(request(None, None, &[(name, "x")]), ENDPOINT).expect_err(name);
            assert!(err.contains("cannot be set by a plugin"), "{name}: {err}");
        }
        assert!(check_request(request(None, None, &[("x-self-id", "1")]), ENDPOINT).is_ok());
    }

    #[test]
    fn a_query_may_not_repeat_a_key_of_the_endpoint_url() {
        for query in [
            "token=evil",
            "TOKEN=evil",
            "tok%65n=evil",
            "a=1&token=evil",
            "token",
        ] {
            let err = check_request(request(None, Some(query), &[]), ENDPOINT).expect_err(query);
            assert!(
                err.contains("already in the endpoint's URL"),
                "{query}: {err}"
            );
        }
        let r = check_request(request(None, Some("tokens=1"), &[]), ENDPOINT).unwrap();
        assert_eq!(r.url, "https://bot.example.com/hook/?token=abc&tokens=1");
    }
}
