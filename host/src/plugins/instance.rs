//! One loaded version of a plugin: its pre-linked component, the hooks it
//! exports, and a pool of ready instances.
//!
//! Instances are reused across calls (a fresh instance per call costs
//! 20–250× more) and replaced after a trap, a timeout, or
//! `max_calls_per_instance` calls. Each instance has one owner at a time: a
//! call takes it out of the pool and puts it back when done. Every call runs
//! with `call_async` under an epoch deadline whose callback yields to the
//! async runtime at each tick, so a spinning plugin never blocks a thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, InstancePre};
use wasmtime::{Store, UpdateDeadline};

use super::bindings::exports::plugboard::plugin::{
    control_handler as ch, conversation_filter as cf, plugin as pl, webhook_formatter as wf,
};
use super::bindings::plugboard::plugin::types::{HookError, LogLevel, Pair};
use super::bindings::PluginState;
use super::engine::PluginEngine;
use super::{PluginContext, PluginError};

/// The WIT package version this gateway speaks.
pub const WIT_VERSION: &str = "0.1.0";

/// How a plugin call failed. Every case fails only that call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// The plugin trapped (a panic, an uncaught exception, `unreachable`).
    Trap(String),
    /// The call ran past the plugin's deadline.
    Timeout(Duration),
    /// The plugin needed more memory than its cap.
    MemoryLimit(usize),
    /// The plugin returned a `hook-error`.
    Error(String),
    /// The result broke the contract (e.g. a forbidden header).
    Malformed(String),
    /// The circuit breaker is open: the plugin was not called.
    BreakerOpen,
    /// No version of the plugin is loaded, or it does not serve the hook.
    Unavailable(String),
}

impl CallFailure {
    /// The `outcome` label of the plugin metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CallFailure::Trap(_) => "trap",
            CallFailure::Timeout(_) => "timeout",
            CallFailure::MemoryLimit(_) => "memory_limit",
            CallFailure::Error(_) => "error",
            CallFailure::Malformed(_) => "malformed",
            CallFailure::BreakerOpen => "breaker_open",
            CallFailure::Unavailable(_) => "unavailable",
        }
    }
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallFailure::Trap(m) => write!(f, "plugin trapped: {m}"),
            CallFailure::Timeout(d) => write!(f, "plugin ran past its deadline of {d:?}"),
            CallFailure::MemoryLimit(n) => {
                write!(f, "plugin exceeded its memory limit of {n} bytes")
            }
            CallFailure::Error(m) => write!(f, "plugin returned an error: {m}"),
            CallFailure::Malformed(m) => write!(f, "plugin returned a malformed result: {m}"),
            CallFailure::BreakerOpen => write!(f, "plugin circuit breaker is open"),
            CallFailure::Unavailable(m) => write!(f, "plugin unavailable: {m}"),
        }
    }
}

/// The error the epoch callback raises when a call passes its deadline.
#[derive(Debug)]
struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// Limits of one plugin's calls.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory: usize,
    pub deadline: Duration,
    pub init_deadline: Duration,
    pub max_calls: u64,
    pub pool_size: usize,
}

/// A ready instance.
struct Pooled {
    store: Store<PluginState>,
    formatter: Option<wf::Guest>,
    filter: Option<cf::Guest>,
    control: Option<ch::Guest>,
    calls: u64,
}

/// One loaded version of a plugin.
pub struct LoadedPlugin {
    pub name: String,
    /// Hex SHA-256 of the component.
    pub sha256: String,
    /// Hooks the component exports, by WIT name.
    pub exports: Vec<&'static str>,
    pub limits: Limits,
    engine: Arc<PluginEngine>,
    pre: InstancePre<PluginState>,
    plugin_idx: pl::GuestIndices,
    formatter_idx: Option<wf::GuestIndices>,
    filter_idx: Option<cf::GuestIndices>,
    control_idx: Option<ch::GuestIndices>,
    ctx: Arc<PluginContext>,
    pool: Mutex<Vec<Pooled>>,
}

pub fn hook_error_text(e: &HookError) -> String {
    match e {
        HookError::InvalidInput(m) => format!("invalid-input: {m}"),
        HookError::BadConfig(m) => format!("bad-config: {m}"),
        HookError::HostFailure(m) => format!("host-failure: {m}"),
        HookError::Other(m) => format!("other: {m}"),
    }
}

impl LoadedPlugin {
    /// Links the component, checks its exports against `required` hooks,
    /// instantiates it once and runs its `init`: a version that passes is
    /// ready to serve.
    pub async fn load(
        engine: Arc<PluginEngine>,
        component: &Component,
        sha256: String,
        ctx: Arc<PluginContext>,
        limits: Limits,
        required: &[String],
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let pre = engine
            .linker
            .instantiate_pre(component)
            .map_err(|e| PluginError::Contract(format!("{e:#}")))?;
        let plugin_idx = pl::GuestIndices::new(&pre).map_err(|_| {
            PluginError::Contract(format!(
                "it does not export `plugboard:plugin/plugin@{WIT_VERSION}` (the `init` function)"
            ))
        })?;
        let formatter_idx = wf::GuestIndices::new(&pre).ok();
        let filter_idx = cf::GuestIndices::new(&pre).ok();
        let control_idx = ch::GuestIndices::new(&pre).ok();
        let mut exports = Vec::new();
        if formatter_idx.is_some() {
            exports.push("webhook-formatter");
        }
        if filter_idx.is_some() {
            exports.push("conversation-filter");
        }
        if control_idx.is_some() {
            exports.push("control-handler");
        }
        if exports.is_empty() {
            return Err(PluginError::Contract(format!(
                "it exports no hook of plugboard:plugin@{WIT_VERSION}"
            )));
        }
        for hook in required {
            if !exports.contains(&hook.as_str()) {
                return Err(PluginError::Contract(format!(
                    "the config lists hook `{hook}` but it does not export `plugboard:plugin/{hook}@{WIT_VERSION}` (it exports: {})",
                    exports.join(", ")
                )));
            }
        }
        let plugin = Arc::new(LoadedPlugin {
            name: ctx.name.clone(),
            sha256,
            exports,
            limits,
            engine,
            pre,
            plugin_idx,
            formatter_idx,
            filter_idx,
            control_idx,
            ctx,
            pool: Mutex::new(Vec::new()),
        });
        let first = plugin.instantiate().await.map_err(|e| match e {
            CallFailure::Error(m) => PluginError::Init(m),
            other => PluginError::Init(other.to_string()),
        })?;
        plugin.checkin(first);
        Ok(plugin)
    }

    /// The plugin's own log.
    pub fn log(&self) -> &super::logs::PluginLog {
        &self.ctx.log
    }

    fn new_store(&self) -> Store<PluginState> {
        let mut store = Store::new(
            &self.engine.engine,
            PluginState::new(self.ctx.clone(), self.limits.memory),
        );
        store.limiter(|s| &mut s.memory);
        // The callback runs once per epoch tick of *guest* execution: time
        // spent in host calls (the key-value store) or waiting to be polled
        // again after a yield does not count against the plugin's deadline.
        store.epoch_deadline_callback(|mut ctx| {
            let left = &mut ctx.data_mut().ticks_left;
            if *left == 0 {
                Err(wasmtime::Error::new(DeadlineExceeded))
            } else {
                *left -= 1;
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store
    }

    /// A fresh instance, initialised with the plugin's config.
    async fn instantiate(&self) -> Result<Pooled, CallFailure> {
        let mut store = self.new_store();
        arm(&mut store, self.limits.init_deadline);
        let result = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            let plugin = self.plugin_idx.load(&mut store, &instance)?;
            let formatter = self
                .formatter_idx
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?;
            let filter = self
                .filter_idx
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?;
            let control = self
                .control_idx
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?;
            let config: Vec<Pair> = self
                .ctx
                .config
                .iter()
                .map(|(k, v)| Pair {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect();
            let init = plugin.call_init(&mut store, &config).await?;
            Ok::<_, wasmtime::Error>((init, formatter, filter, control))
        }
        .await;
        self.report_dropped_lines(&store, "init");
        match result {
            Ok((Ok(()), formatter, filter, control)) => Ok(Pooled {
                store,
                formatter,
                filter,
                control,
                calls: 0,
            }),
            Ok((Err(e), ..)) => {
                let text = hook_error_text(&e);
                self.ctx
                    .log
                    .gateway(LogLevel::Error, format!("init refused the config: {text}"));
                Err(CallFailure::Error(text))
            }
            Err(trap) => Err(self.classify(&store, trap, self.limits.init_deadline, "init")),
        }
    }

    fn classify(
        &self,
        store: &Store<PluginState>,
        err: wasmtime::Error,
        deadline: Duration,
        what: &str,
    ) -> CallFailure {
        let failure =
            if err.is::<DeadlineExceeded>() || err.chain().any(|e| e.is::<DeadlineExceeded>()) {
                CallFailure::Timeout(deadline)
            } else if store.data().memory.hit {
                CallFailure::MemoryLimit(store.data().memory.limit)
            } else {
                // The root cause names the trap ("wasm `unreachable` instruction
                // executed"); the outer text is only "error while executing".
                let cause = err.root_cause().to_string();
                let first = cause.lines().next().unwrap_or_default().to_string();
                CallFailure::Trap(first)
            };
        self.ctx
            .log
            .gateway(LogLevel::Error, format!("{what} failed: {failure}"));
        failure
    }

    async fn checkout(&self) -> Result<Pooled, CallFailure> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(p) => Ok(p),
            None => self.instantiate().await,
        }
    }

    fn checkin(&self, p: Pooled) {
        if p.calls >= self.limits.max_calls {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.limits.pool_size {
            pool.push(p);
        }
    }

    /// Calls `webhook-formatter.format`.
    pub async fn format(
        &self,
        event: &wf::Event,
    ) -> Result<Option<wf::OutgoingRequest>, CallFailure> {
        let mut p = self.checkout().await?;
        let Some(guest) = p.formatter.take() else {
            self.checkin(p);
            return Err(CallFailure::Unavailable(
                "it does not export webhook-formatter".into(),
            ));
        };
        arm(&mut p.store, self.limits.deadline);
        p.calls += 1;
        let result = guest.call_format(&mut p.store, event).await;
        p.formatter = Some(guest);
        self.finish(p, result, "format")
    }

    /// Calls `conversation-filter.filter`.
    pub async fn filter(
        &self,
        viewer: &cf::Viewer,
        conversations: &[cf::Conversation],
    ) -> Result<Vec<cf::Verdict>, CallFailure> {
        let mut p = self.checkout().await?;
        let Some(guest) = p.filter.take() else {
            self.checkin(p);
            return Err(CallFailure::Unavailable(
                "it does not export conversation-filter".into(),
            ));
        };
        arm(&mut p.store, self.limits.deadline);
        p.calls += 1;
        let result = guest.call_filter(&mut p.store, viewer, conversations).await;
        p.filter = Some(guest);
        self.finish(p, result, "filter")
    }

    /// Calls `control-handler.handle`.
    pub async fn control(&self, request: &ch::ControlRequest) -> Result<ch::Decision, CallFailure> {
        let mut p = self.checkout().await?;
        let Some(guest) = p.control.take() else {
            self.checkin(p);
            return Err(CallFailure::Unavailable(
                "it does not export control-handler".into(),
            ));
        };
        arm(&mut p.store, self.limits.deadline);
        p.calls += 1;
        let result = guest.call_handle(&mut p.store, request).await;
        p.control = Some(guest);
        self.finish(p, result, "handle")
    }

    /// Puts the instance back (unless it trapped) and maps the outcome.
    fn finish<T>(
        &self,
        p: Pooled,
        result: wasmtime::Result<Result<T, HookError>>,
        what: &str,
    ) -> Result<T, CallFailure> {
        self.report_dropped_lines(&p.store, what);
        match result {
            Ok(Ok(v)) => {
                self.checkin(p);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.checkin(p);
                Err(CallFailure::Error(hook_error_text(&e)))
            }
            // After a trap or a timeout the instance is unusable: it is dropped.
            Err(trap) => Err(self.classify(&p.store, trap, self.limits.deadline, what)),
        }
    }

    /// Notes in the plugin's log how many lines the call just made dropped
    /// past its line budget, so the drop shows where the lines would have.
    fn report_dropped_lines(&self, store: &Store<PluginState>, what: &str) {
        let dropped = store.data().log_budget.dropped();
        if dropped > 0 {
            self.ctx.log.gateway(
                LogLevel::Warn,
                format!(
                    "{what} wrote too many log lines: {dropped} dropped (at most {} per call)",
                    super::logs::MAX_LINES_PER_CALL
                ),
            );
        }
    }

    /// Ready instances in the pool (for tests and the admin view).
    pub fn pooled(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Starts the deadline of one call (a budget of epoch ticks of guest
/// execution) and its budget of log lines.
fn arm(store: &mut Store<PluginState>, deadline: Duration) {
    let tick = super::engine::EPOCH_TICK.as_nanos().max(1);
    store.data_mut().ticks_left = (deadline.as_nanos().div_ceil(tick) as u64).max(1);
    store.data().log_budget.reset();
    store.set_epoch_deadline(1);
}
