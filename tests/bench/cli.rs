//! What the benchmark programs' command lines share (clap's derive API):
//! value parsers for whole numbers clamped into a range and for whole
//! seconds, and the `--storage` option. A number out of range is taken as
//! the nearest bound, as the programs have always done; text that is not a
//! whole number, or an engine that is not one of `--storage`'s values, is
//! refused, and clap prints the error and exits with code 2. Each program
//! uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use plugboard_tests::Engine;

/// A whole number; blanks around it are allowed.
pub(crate) fn whole(s: &str) -> Result<usize, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))
}

/// A parser for a whole number, clamped into `lo..=hi`.
pub(crate) fn clamped(
    lo: usize,
    hi: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s| whole(s).map(|n| n.clamp(lo, hi))
}

/// A parser for a whole number of seconds, at least `min`.
pub(crate) fn seconds(
    min: u64,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| whole(s).map(|n| Duration::from_secs((n as u64).max(min)))
}

/// The help heading of `--storage`.
pub(crate) const STORAGE: &str = "Storage";

/// The storage engines the gateways of a run store on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StorageArg {
    /// SQLite in each gateway's temporary folder (the gateway's default)
    #[default]
    Sqlite,
    /// A fresh database per gateway on a private PostgreSQL server that
    /// the benchmark starts, with PostgreSQL's durable defaults
    Postgres,
    /// Every measurement on each engine, SQLite first, side by side
    Both,
}

impl StorageArg {
    /// The engines, in the order their runs are made and printed.
    pub(crate) fn engines(self) -> Vec<Engine> {
        match self {
            StorageArg::Sqlite => vec![Engine::Sqlite],
            StorageArg::Postgres => vec![Engine::Postgres],
            StorageArg::Both => vec![Engine::Sqlite, Engine::Postgres],
        }
    }
}

/// `--storage`, flattened into each program's options so that it has the
/// same shape in all of them.
#[derive(Clone, Copy, Debug, clap::Args)]
pub(crate) struct StorageFlag {
    /// Storage engine of the gateways: `both` runs every measurement on
    /// each engine and prints them side by side
    #[arg(
        long,
        value_enum,
        value_name = "ENGINE",
        default_value_t = StorageArg::Sqlite,
        help_heading = STORAGE
    )]
    pub(crate) storage: StorageArg,
}
