//! When storage is unavailable (`StorageError::Unavailable`: the database
//! cannot be reached or is restarting) or behind (`StorageError::Busy`: the
//! writer's queue stayed full, see [`crate::storage::queue`]): what a
//! refused request is told, and how work that waits for storage to come
//! back paces itself.
//!
//! A request from a client or the business server is answered at once —
//! `503 storage_unavailable` (or `storage_busy`) with `Retry-After` at the
//! HTTP edge, an `error` frame of the same code on a socket, which stays
//! open — and its sender retries it. Background work (the close retry queue, the webhook
//! workers, persisted controls at connect) waits with a [`Backoff`] and
//! tries again by itself; none of it gives up while the gateway runs.

use std::time::Duration;

use crate::storage::StorageError;

/// The code of every refusal caused by unavailable storage.
pub const CODE: &str = "storage_unavailable";

/// The message of every refusal caused by unavailable storage.
pub const MESSAGE: &str = "storage is unavailable right now; nothing was done, try again shortly";

/// The code of a refusal because the writer's queue stayed full.
pub const BUSY_CODE: &str = "storage_busy";

/// The message of a refusal because the writer's queue stayed full.
pub const BUSY_MESSAGE: &str = "storage is behind on writes; nothing was done, try again shortly";

/// The code and message that refuse a request failed with `e`, when `e`
/// means "nothing was done, try again" ([`StorageError::is_unavailable`]).
pub fn refusal(e: &StorageError) -> Option<(&'static str, &'static str)> {
    match e {
        StorageError::Busy { .. } => Some((BUSY_CODE, BUSY_MESSAGE)),
        e if e.is_unavailable() => Some((CODE, MESSAGE)),
        _ => None,
    }
}

/// The `Retry-After` of an HTTP refusal, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Doubling waits from `first` up to `max`, restarted by [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
    /// Failures since the last reset.
    failures: u32,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
            failures: 0,
        }
    }

    /// The wait before the next attempt after one more failure.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        self.failures += 1;
        wait
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_restart_after_a_success() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let waits: Vec<_> = (0..5).map(|_| b.failed()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(b.failures(), 5);
        b.reset();
        assert_eq!((b.failed(), b.failures()), (ms(100), 1));
    }
}
