//! A plugin's recent log lines (from `host.log`, stdout and stderr), kept
//! for the admin API and the CLI, and forwarded to the gateway's log.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

use super::bindings::plugboard::plugin::types::LogLevel;

/// Lines kept per plugin.
const KEEP: usize = 200;

/// One log line of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    pub at: String,
    pub level: &'static str,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

/// The recent lines of one plugin.
#[derive(Debug)]
pub struct PluginLog {
    plugin: String,
    lines: Mutex<VecDeque<LogLine>>,
}

fn level_str(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

impl PluginLog {
    pub fn new(plugin: &str) -> Self {
        PluginLog {
            plugin: plugin.to_string(),
            lines: Mutex::new(VecDeque::new()),
        }
    }

    /// Records a line and writes it to the gateway's log, tagged with the plugin.
    pub fn push(&self, level: LogLevel, message: String, fields: Vec<(String, String)>) {
        let message: String = message.chars().take(4096).collect();
        let plugin = self.plugin.as_str();
        let f = fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        match level {
            LogLevel::Trace => tracing::trace!(plugin, fields = %f, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, fields = %f, "{message}"),
            LogLevel::Info => tracing::info!(plugin, fields = %f, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, fields = %f, "{message}"),
            LogLevel::Error => tracing::error!(plugin, fields = %f, "{message}"),
        }
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == KEEP {
            lines.pop_front();
        }
        lines.push_back(LogLine {
            at: crate::rfc3339_ms(crate::now_ms()),
            level: level_str(level),
            message,
            fields,
        });
    }

    /// A line written by the gateway about the plugin (traps, timeouts, swaps).
    pub fn gateway(&self, level: LogLevel, message: String) {
        self.push(level, message, vec![("source".into(), "gateway".into())]);
    }

    pub fn recent(&self, n: usize) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().rev().take(n).rev().cloned().collect()
    }
}
