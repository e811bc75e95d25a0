//! Value parsers the benchmark programs' command lines share (clap's derive
//! API): whole numbers clamped into a range, and whole seconds. A number
//! out of range is taken as the nearest bound, as the programs have always
//! done; text that is not a whole number is refused, and clap prints the
//! error and exits with code 2. Each program uses part of it.
#![allow(dead_code)]

use std::time::Duration;

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
