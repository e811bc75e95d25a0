//! Bindings generated from `wit/` (world `full`), and the host side of the
//! `host` interface: logging, config, key-value store, time.
//!
//! The store data is [`PluginState`]: WASI with nothing granted (no
//! preopened directories, environment, arguments, network or real clocks;
//! stdout and stderr go to the plugin's log), a memory cap over all of an
//! instance's memories, and the per-call budget of epoch ticks read by the
//! epoch callback.

#![allow(missing_docs, clippy::all)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::logs::{LineBudget, PluginLog};
use super::PluginContext;

wasmtime::component::bindgen!({
    world: "full",
    path: "../wit",
    imports: { default: async },
    exports: { default: async },
    // `plugboard plugin run` reads hook inputs from JSON and prints results.
    additional_derives: [serde::Serialize, serde::Deserialize],
});

use plugboard::plugin::types::{KvError, LogLevel, Pair};

/// Largest key and value of the key-value store.
pub const KV_MAX_KEY: usize = 512;
pub const KV_MAX_VALUE: usize = 1024 * 1024;

/// Caps the total size of every linear memory of one instance.
pub struct MemoryCap {
    pub limit: usize,
    total: usize,
    /// Set when a growth was refused, so a resulting trap can say why.
    pub hit: bool,
}

impl MemoryCap {
    pub fn new(limit: usize) -> Self {
        MemoryCap {
            limit,
            total: 0,
            hit: false,
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let next = self.total - current.min(self.total) + desired;
        if next > self.limit {
            self.hit = true;
            return Ok(false);
        }
        self.total = next;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// The data of one plugin instance's store.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub memory: MemoryCap,
    /// Epoch ticks the current call may still run guest code for.
    pub ticks_left: u64,
    /// Lines the current call may still log (`host.log`, stdout, stderr).
    pub log_budget: Arc<LineBudget>,
    pub ctx: Arc<PluginContext>,
}

impl PluginState {
    pub fn new(ctx: Arc<PluginContext>, memory_limit: usize) -> Self {
        let log_budget = Arc::new(LineBudget::default());
        let wasi = WasiCtx::builder()
            .stdout(LogStream {
                log: ctx.log.clone(),
                budget: log_budget.clone(),
                stderr: false,
            })
            .stderr(LogStream {
                log: ctx.log.clone(),
                budget: log_budget.clone(),
                stderr: true,
            })
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        PluginState {
            wasi,
            table: ResourceTable::new(),
            memory: MemoryCap::new(memory_limit),
            ticks_left: u64::MAX,
            log_budget,
            ctx,
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// WASI clocks that stand still: the only clock a plugin gets is `host.now-ms`.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Plugin stdout/stderr, written line by line into the plugin's log.
struct LogStream {
    log: Arc<PluginLog>,
    budget: Arc<LineBudget>,
    stderr: bool,
}

impl wasmtime_wasi::cli::IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            log: self.log.clone(),
            budget: self.budget.clone(),
            stderr: self.stderr,
            buf: Vec::new(),
        })
    }
}

struct LineWriter {
    log: Arc<PluginLog>,
    budget: Arc<LineBudget>,
    stderr: bool,
    buf: Vec<u8>,
}

impl LineWriter {
    fn emit(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line).trim_end().to_string();
        if !text.is_empty() {
            let level = if self.stderr {
                LogLevel::Warn
            } else {
                LogLevel::Info
            };
            let stream = if self.stderr { "stderr" } else { "stdout" };
            self.log.plugin_line(
                &self.budget,
                level,
                text,
                vec![("stream".into(), stream.into())],
            );
        }
    }
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.buf.extend_from_slice(data);
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            self.emit(&line);
        }
        if self.buf.len() > 4096 {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl plugboard::plugin::types::Host for PluginState {}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() || key.len() > KV_MAX_KEY {
        return Err(KvError::BadKey(format!("keys are 1 to {KV_MAX_KEY} bytes")));
    }
    Ok(())
}

impl plugboard::plugin::host::Host for PluginState {
    async fn log(&mut self, level: LogLevel, message: String, fields: Vec<Pair>) {
        self.ctx.log.plugin_line(
            &self.log_budget,
            level,
            message,
            fields.into_iter().map(|p| (p.key, p.value)).collect(),
        );
    }

    async fn config(&mut self) -> Vec<Pair> {
        self.ctx
            .config
            .iter()
            .map(|(k, v)| Pair {
                key: k.clone(),
                value: v.clone(),
            })
            .collect()
    }

    async fn kv_get(&mut self, key: String) -> Result<Option<Vec<u8>>, KvError> {
        check_key(&key)?;
        self.ctx.kv.get(&self.ctx.name, &key).await
    }

    async fn kv_set(&mut self, key: String, value: Vec<u8>) -> Result<(), KvError> {
        check_key(&key)?;
        if value.len() > KV_MAX_VALUE {
            return Err(KvError::TooLarge(value.len() as u64));
        }
        self.ctx.kv.set(&self.ctx.name, &key, value).await
    }

    async fn kv_delete(&mut self, key: String) -> Result<(), KvError> {
        check_key(&key)?;
        self.ctx.kv.delete(&self.ctx.name, &key).await
    }

    async fn now_ms(&mut self) -> i64 {
        crate::now_ms()
    }
}
