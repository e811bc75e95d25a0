//! Instructions per operation, counted by valgrind's callgrind: a figure
//! that the machine's load does not move, printed beside the timings.
//!
//! The gateway runs under `valgrind --tool=callgrind --separate-threads=yes`
//! (through the harness's `GatewayOptions::launcher`). The benchmark zeroes
//! the counters once the warm-up is done (`callgrind_control -z`), runs the
//! measured operations, and has callgrind write what it counted since
//! (`callgrind_control -d`): one file per thread. Each thread's total comes
//! from its file's `summary:` line; the thread is named by what it runs
//! (the SQLite writer, a tokio worker, the blocking pool, the checkpointer).
//! Inside the tokio workers, `callgrind_annotate --inclusive=yes` gives the
//! instructions under the client sessions, the fan-out tasks and the
//! webhook workers; async tasks are polled from many places, so those three
//! are lower bounds.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why callgrind cannot be used here, if it cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("valgrind").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => return Some(format!("`valgrind --version` exited with {}", o.status)),
        Err(e) => return Some(format!("`valgrind` cannot run ({e}); install valgrind")),
    }
    // Perl scripts of the valgrind package; their exit codes for
    // `--version` differ between releases, so only whether they run counts.
    for tool in ["callgrind_control", "callgrind_annotate"] {
        if let Err(e) = Command::new(tool).arg("--version").output() {
            return Some(format!("`{tool}` cannot run ({e}); install valgrind"));
        }
    }
    None
}

/// valgrind's version line, for the report.
pub fn version() -> String {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// One callgrind session: where its files go.
pub struct Callgrind {
    dir: tempfile::TempDir,
}

/// What a thread was doing, by the functions in its profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// `plugboard-sqlite-writer`: every write transaction.
    Writer,
    /// The tokio runtime's workers: sockets, sessions, fan-out, webhooks, the API.
    Workers,
    /// tokio's blocking pool: SQLite reads, file work.
    Blocking,
    /// `plugboard-sqlite-checkpoint`.
    Checkpoint,
    Other,
}

impl ThreadKind {
    pub fn label(self) -> &'static str {
        match self {
            ThreadKind::Writer => "storage writer thread",
            ThreadKind::Workers => "tokio workers",
            ThreadKind::Blocking => "blocking pool (storage reads)",
            ThreadKind::Checkpoint => "WAL checkpoint thread",
            ThreadKind::Other => "other threads",
        }
    }
}

/// Async tasks whose instructions the report gives (lower bounds).
pub const TASKS: [(&str, &str); 3] = [
    (
        "client sessions (frames in and out)",
        "plugboard::gateway::session::run::{{closure}}",
    ),
    (
        "fan-out tasks",
        "plugboard::gateway::fanout::run::{{closure}}",
    ),
    (
        "webhook deliveries (HTTP, signing)",
        "plugboard::outbox::worker::deliver::{{closure}}",
    ),
];

/// What callgrind counted between a zero and a dump.
#[derive(Debug, Default)]
pub struct Counts {
    pub total: u64,
    /// Per kind of thread, in [`ThreadKind`] order.
    pub threads: Vec<(ThreadKind, u64)>,
    /// Per entry of [`TASKS`]: its label and instructions.
    pub tasks: Vec<(&'static str, u64)>,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{:?} exited with {}: {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Callgrind {
    pub fn new() -> std::io::Result<Callgrind> {
        Ok(Callgrind {
            dir: tempfile::Builder::new()
                .prefix("plugboard-callgrind-")
                .tempdir()?,
        })
    }

    fn out_file(&self) -> PathBuf {
        self.dir.path().join("callgrind.out")
    }

    /// The command the gateway runs under.
    pub fn launcher(&self) -> Vec<String> {
        vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            "--separate-threads=yes".into(),
            "--dump-instr=no".into(),
            format!("--callgrind-out-file={}", self.out_file().display()),
        ]
    }

    /// Sets every counter of process `pid` to zero.
    pub fn zero(&self, pid: u32) -> Result<(), String> {
        run(Command::new("callgrind_control")
            .arg("-z")
            .arg(pid.to_string()))
        .map(drop)
    }

    /// Has process `pid` write what it counted since the last zero, and
    /// reads it back.
    pub fn dump(&self, pid: u32) -> Result<Counts, String> {
        let before = self.files();
        run(Command::new("callgrind_control")
            .arg("-d")
            .arg(pid.to_string()))?;
        let files: Vec<PathBuf> = self
            .files()
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if files.is_empty() {
            return Err(format!(
                "callgrind wrote no file in {}",
                self.dir.path().display()
            ));
        }
        let mut counts = Counts::default();
        let mut by_kind = std::collections::BTreeMap::new();
        let mut tasks = vec![0u64; TASKS.len()];
        for f in &files {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            let total =
                summary(&text).ok_or_else(|| format!("{} has no summary line", f.display()))?;
            let kind = kind_of(&text);
            counts.total += total;
            *by_kind.entry(kind).or_insert(0u64) += total;
            if kind == ThreadKind::Workers && total > 0 {
                let annotated = run(Command::new("callgrind_annotate")
                    .arg("--inclusive=yes")
                    .arg("--threshold=100")
                    .arg(f))?;
                for (i, (_, symbol)) in TASKS.iter().enumerate() {
                    tasks[i] += inclusive(&annotated, symbol);
                }
            }
        }
        counts.threads = by_kind.into_iter().collect();
        counts.tasks = TASKS.iter().map(|t| t.0).zip(tasks).collect();
        Ok(counts)
    }

    /// The per-thread files of every dump so far.
    fn files(&self) -> Vec<PathBuf> {
        let prefix = "callgrind.out.";
        std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(prefix))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The `summary:` (or `totals:`) line of a callgrind file.
fn summary(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// What a thread runs, by the functions its file names.
fn kind_of(text: &str) -> ThreadKind {
    if text.contains("plugboard::storage::sqlite::writer_loop") {
        ThreadKind::Writer
    } else if text.contains("plugboard::storage::sqlite::checkpoint_loop") {
        ThreadKind::Checkpoint
    } else if text.contains("multi_thread::worker::run") {
        ThreadKind::Workers
    } else if text.contains("blocking::pool::Inner::run") {
        ThreadKind::Blocking
    } else {
        ThreadKind::Other
    }
}

/// The largest inclusive count that `callgrind_annotate --inclusive=yes`
/// gives a function named `symbol`. It lists a function once per source
/// file its code was inlined from (`  1,234 (0.05%)  file:function [binary]`);
/// the largest entry is a lower bound of the whole.
fn inclusive(annotated: &str, symbol: &str) -> u64 {
    annotated
        .lines()
        .filter_map(|l| {
            let (count, rest) = l.trim_start().split_once(' ')?;
            let (_, place) = rest.split_once(")  ")?;
            let function = place.split_once(" [").map_or(place, |(f, _)| f);
            let (_, function) = function.split_once(':')?;
            (function.trim_end() == symbol).then(|| count.replace(',', "").parse().ok())?
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_is_read() {
        let text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 2539317187\n";
        assert_eq!(summary(text), Some(2_539_317_187));
        assert_eq!(summary("events: Ir\ntotals: 12\n"), Some(12));
        assert_eq!(summary("events: Ir\n"), None);
    }

    #[test]
    fn threads_are_named_by_what_they_run() {
        assert_eq!(
            kind_of("fn=(1) plugboard::storage::sqlite::writer_loop\n"),
            ThreadKind::Writer
        );
        assert_eq!(
            kind_of("fn=(9) tokio::runtime::scheduler::multi_thread::worker::run\n"),
            ThreadKind::Workers
        );
        assert_eq!(kind_of("fn=(2) main\n"), ThreadKind::Other);
    }

    #[test]
    fn the_largest_inclusive_entry_of_a_function_is_taken() {
        let annotated = "\
  128,983,191 ( 5.08%)  host/src/gateway/session.rs:plugboard::gateway::session::run::{{closure}} [gateway-under-test]
   14,137,612 ( 0.56%)  host/src/messaging/mod.rs:plugboard::gateway::session::run::{{closure}}
    9,000,000 ( 0.30%)  host/src/gateway/session.rs:plugboard::gateway::session::handle_frame::{{closure}} [gateway-under-test]
";
        assert_eq!(
            inclusive(annotated, "plugboard::gateway::session::run::{{closure}}"),
            128_983_191
        );
        assert_eq!(
            inclusive(annotated, "plugboard::outbox::worker::run::{{closure}}"),
            0
        );
    }
}
