//! A plugin's recent log lines (from `host.log`, stdout and stderr), kept
//! for the admin API and the CLI, and forwarded to the gateway's log.
//!
//! Everything a plugin logs is bounded, because a plugin is untrusted: a
//! line's message, the number of its fields and each field's key and value
//! are cut to fixed sizes, a call may write only so many lines, and the
//! recent-lines buffer is bounded in lines and in bytes. What is cut or
//! dropped is counted (per plugin, and in a metric), never silently lost.
//! Control characters are left as they are here: the gateway's text log
//! escapes them when it writes a line, and the admin API's JSON escapes them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::bindings::plugboard::plugin::types::LogLevel;

/// Largest message of one line, in bytes (cut at a character boundary).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Most fields of one line; later ones are dropped.
pub const MAX_FIELDS: usize = 16;
/// Largest field name, in bytes.
pub const MAX_FIELD_KEY_BYTES: usize = 64;
/// Largest field value, in bytes.
pub const MAX_FIELD_VALUE_BYTES: usize = 1024;
/// Most lines one call (or one `init`) may write; later ones are dropped.
pub const MAX_LINES_PER_CALL: u32 = 50;
/// Lines kept per plugin.
pub const KEEP_LINES: usize = 200;
/// Bytes kept per plugin (messages, field names and values together).
pub const KEEP_BYTES: usize = 256 * 1024;

/// One log line of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    pub at: String,
    pub level: &'static str,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

impl LogLine {
    /// The bytes this line holds (what the buffer's byte bound counts).
    fn bytes(&self) -> usize {
        self.message.len()
            + self
                .fields
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// What a plugin's log dropped to stay within its limits, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LogDropped {
    /// Whole lines not written: past the per-call line limit.
    pub lines: u64,
    /// Fields dropped from lines: past the per-line field limit.
    pub fields: u64,
    /// Lines written with their message, a field name or a value cut short.
    pub truncated: u64,
}

/// The metric counters of one plugin's dropped log parts.
#[derive(Debug, Clone, Default)]
pub struct DropCounters {
    pub lines: Counter,
    pub fields: Counter,
    pub truncated: Counter,
}

/// How many lines the current call of one instance may still write. The
/// instance's `host.log` and its stdout and stderr share one budget, reset
/// at the start of every call.
#[derive(Debug)]
pub struct LineBudget {
    left: AtomicU32,
    dropped: AtomicU32,
}

impl Default for LineBudget {
    fn default() -> Self {
        LineBudget {
            left: AtomicU32::new(MAX_LINES_PER_CALL),
            dropped: AtomicU32::new(0),
        }
    }
}

impl LineBudget {
    /// Starts a new call's budget; returns how many lines the previous
    /// call dropped.
    pub fn reset(&self) -> u32 {
        self.left.store(MAX_LINES_PER_CALL, Ordering::Relaxed);
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Takes one line from the budget; false when it is spent.
    fn take(&self) -> bool {
        let taken = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !taken {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Lines dropped so far in this call.
    pub fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The recent lines of one plugin.
#[derive(Debug)]
pub struct PluginLog {
    plugin: String,
    recent: Mutex<Recent>,
    dropped_lines: AtomicU64,
    dropped_fields: AtomicU64,
    truncated: AtomicU64,
    counters: Option<DropCounters>,
}

#[derive(Debug, Default)]
struct Recent {
    lines: VecDeque<LogLine>,
    bytes: usize,
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

/// Cuts `s` to at most `max` bytes at a character boundary; true if it cut.
fn cut(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    true
}

impl PluginLog {
    pub fn new(plugin: &str) -> Self {
        PluginLog {
            plugin: plugin.to_string(),
            recent: Mutex::new(Recent::default()),
            dropped_lines: AtomicU64::new(0),
            dropped_fields: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            counters: None,
        }
    }

    /// Also counts what is dropped in these metric counters.
    pub fn with_counters(mut self, counters: DropCounters) -> Self {
        self.counters = Some(counters);
        self
    }

    /// A line from the plugin itself (`host.log`, stdout or stderr): it
    /// spends one line of the call's `budget`, and is dropped when the
    /// budget is spent.
    pub fn plugin_line(
        &self,
        budget: &LineBudget,
        level: LogLevel,
        message: String,
        fields: Vec<(String, String)>,
    ) {
        if !budget.take() {
            self.dropped_lines.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = &self.counters {
                c.lines.inc();
            }
            return;
        }
        self.push(level, message, fields);
    }

    /// Records a line, within the line limits, and writes it to the
    /// gateway's log, tagged with the plugin.
    pub fn push(&self, level: LogLevel, mut message: String, fields: Vec<(String, String)>) {
        let mut truncated = cut(&mut message, MAX_MESSAGE_BYTES);
        let extra_fields = fields.len().saturating_sub(MAX_FIELDS) as u64;
        let fields: Vec<(String, String)> = fields
            .into_iter()
            .take(MAX_FIELDS)
            .map(|(mut k, mut v)| {
                truncated |= cut(&mut k, MAX_FIELD_KEY_BYTES);
                truncated |= cut(&mut v, MAX_FIELD_VALUE_BYTES);
                (k, v)
            })
            .collect();
        if extra_fields > 0 {
            self.dropped_fields
                .fetch_add(extra_fields, Ordering::Relaxed);
            if let Some(c) = &self.counters {
                c.fields.inc_by(extra_fields);
            }
        }
        if truncated {
            self.truncated.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = &self.counters {
                c.truncated.inc();
            }
        }
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
        let line = LogLine {
            at: crate::rfc3339_ms(crate::now_ms()),
            level: level_str(level),
            message,
            fields,
        };
        let size = line.bytes();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while !recent.lines.is_empty()
            && (recent.lines.len() >= KEEP_LINES || recent.bytes + size > KEEP_BYTES)
        {
            if let Some(old) = recent.lines.pop_front() {
                recent.bytes -= old.bytes();
            }
        }
        recent.bytes += size;
        recent.lines.push_back(line);
    }

    /// A line written by the gateway about the plugin (traps, timeouts, swaps).
    pub fn gateway(&self, level: LogLevel, message: String) {
        self.push(level, message, vec![("source".into(), "gateway".into())]);
    }

    /// The last `n` lines, oldest first, holding at most `max_bytes`
    /// together (the newest line is always included).
    pub fn recent(&self, n: usize, max_bytes: usize) -> Vec<LogLine> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = 0;
        let mut out: Vec<LogLine> = recent
            .lines
            .iter()
            .rev()
            .take(n)
            .take_while(|l| {
                total += l.bytes();
                total <= max_bytes || total == l.bytes()
            })
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// What was dropped since start.
    pub fn dropped(&self) -> LogDropped {
        LogDropped {
            lines: self.dropped_lines.load(Ordering::Relaxed),
            fields: self.dropped_fields.load(Ordering::Relaxed),
            truncated: self.truncated.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn huge_fields(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("k{i}").repeat(100), "v".repeat(100_000)))
            .collect()
    }

    #[test]
    fn a_line_is_cut_to_its_limits_and_the_cut_is_counted() {
        let log = PluginLog::new("p");
        log.push(LogLevel::Info, "é".repeat(10_000), huge_fields(40));
        let line = &log.recent(1, usize::MAX)[0];
        assert!(line.message.len() <= MAX_MESSAGE_BYTES);
        assert!(line.message.chars().all(|c| c == 'é'));
        assert_eq!(line.fields.len(), MAX_FIELDS);
        assert!(line
            .fields
            .iter()
            .all(|(k, v)| k.len() <= MAX_FIELD_KEY_BYTES && v.len() <= MAX_FIELD_VALUE_BYTES));
        assert_eq!(
            log.dropped(),
            LogDropped {
                lines: 0,
                fields: 40 - MAX_FIELDS as u64,
                truncated: 1
            }
        );
    }

    #[test]
    fn a_call_writes_at_most_its_line_budget() {
        let log = PluginLog::new("p");
        let budget = LineBudget::default();
        for i in 0..MAX_LINES_PER_CALL + 7 {
            log.plugin_line(&budget, LogLevel::Info, format!("line {i}"), vec![]);
        }
        assert_eq!(log.dropped().lines, 7);
        assert_eq!(
            budget.reset(),
            7,
            "the reset reports the previous call's drops"
        );
        log.plugin_line(&budget, LogLevel::Info, "next call".into(), vec![]);
        assert_eq!(log.dropped().lines, 7);
        assert_eq!(log.recent(1, usize::MAX)[0].message, "next call");
        // Gateway lines about the plugin do not spend the plugin's budget.
        log.gateway(LogLevel::Warn, "about the plugin".into());
        assert_eq!(log.dropped().lines, 7);
    }

    #[test]
    fn the_recent_lines_are_bounded_in_bytes() {
        let log = PluginLog::new("p");
        for _ in 0..KEEP_LINES {
            log.push(
                LogLevel::Info,
                "m".repeat(MAX_MESSAGE_BYTES),
                huge_fields(16),
            );
        }
        let recent = log.recent.lock().unwrap();
        let held: usize = recent.lines.iter().map(LogLine::bytes).sum();
        assert_eq!(held, recent.bytes);
        assert!(held <= KEEP_BYTES, "{held}");
        assert!(recent.lines.len() < KEEP_LINES);
        drop(recent);
        let shown = log.recent(20, 64 * 1024);
        assert!(!shown.is_empty());
        assert!(shown.iter().map(LogLine::bytes).sum::<usize>() <= 64 * 1024);
    }
}
