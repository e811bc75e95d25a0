//! The bound on the writer's queue, shared by both engines.
//!
//! Every write in the writer's normal lane (messages, conversation changes,
//! groups, controls, plugin uploads) takes a place before it is queued and
//! gives it back once it is answered, so at most `storage.max_queued_writes`
//! of them wait or run at a time, whatever the number of senders. A write
//! that finds no place waits for one, in arrival order, for up to
//! `storage.queue_wait`; then it fails with [`StorageError::Busy`] and
//! nothing is written. A socket's frames are handled one after another, so
//! a connection whose `send` waits here reads nothing more meanwhile: that
//! is the per-connection flow control, and TCP carries it back to the
//! client. The API answers `503 storage_busy` with `Retry-After`.
//!
//! The urgent lane (session records, webhook bookkeeping, plugin key-value
//! writes) takes no place: its writes are bounded by what issues them
//! (admitted connections, each endpoint's `max_in_flight`, plugin calls'
//! own limits), and refusing them would close connections
//! or stall webhooks because messages are arriving fast.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::{Result, StorageError};
use crate::metrics::Metrics;

/// Places in the writer's normal lane.
pub struct WriteQueue {
    room: Arc<Semaphore>,
    limit: usize,
    wait: Duration,
    queued: Gauge,
    refused: Counter,
}

/// A place in the queue, given back when dropped (after the write is answered).
pub struct Place {
    _permit: OwnedSemaphorePermit,
    queued: Gauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.queued.dec();
    }
}

impl WriteQueue {
    /// `limit` places (at least one); a write waits up to `wait` for one.
    /// With `metrics`, the places taken and the writes refused are counted
    /// there (`plugboard_storage_queued_writes`, `plugboard_storage_busy_total`).
    pub fn new(limit: usize, wait: Duration, metrics: Option<&Metrics>) -> WriteQueue {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        let (queued, refused) = match metrics {
            Some(m) => (m.storage_queued_writes.clone(), m.storage_busy.clone()),
            None => Default::default(),
        };
        WriteQueue {
            room: Arc::new(Semaphore::new(limit)),
            limit,
            wait,
            queued,
            refused,
        }
    }

    /// From the `[storage]` settings.
    pub fn from_config(config: &crate::config::StorageConfig, metrics: Option<&Metrics>) -> Self {
        WriteQueue::new(config.max_queued_writes, config.queue_wait, metrics)
    }

    /// The place a write of the given lane holds while it waits and runs:
    /// none for the urgent lane (see the module doc), else [`Self::admit`].
    pub async fn admit_lane(&self, urgent: bool) -> Result<Option<Place>> {
        match urgent {
            true => Ok(None),
            false => self.admit().await.map(Some),
        }
    }

    /// Takes a place: at once when there is one, else the first to free up
    /// within the wait (places go in arrival order), else `Busy`.
    pub async fn admit(&self) -> Result<Place> {
        let permit = match self.room.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(StorageError::Closed),
            Err(TryAcquireError::NoPermits) => {
                match tokio::time::timeout(self.wait, self.room.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(StorageError::Closed),
                    Err(_) => {
                        self.refused.inc();
                        return Err(StorageError::Busy {
                            queued: self.limit,
                            waited: self.wait,
                        });
                    }
                }
            }
        };
        self.queued.inc();
        Ok(Place {
            _permit: permit,
            queued: self.queued.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_makes_writes_wait_in_order_then_refuses_them() {
        let metrics = Metrics::new();
        let wait = Duration::from_millis(200);
        let q = Arc::new(WriteQueue::new(2, wait, Some(&metrics)));
        let a = q.admit().await.unwrap();
        let _b = q.admit().await.unwrap();
        assert!(
            q.admit_lane(true).await.unwrap().is_none(),
            "urgent writes take no place"
        );
        assert_eq!(metrics.storage_queued_writes.get(), 2);

        // Two waiters: the first one gets the place `a` frees.
        let first = tokio::spawn({
            let q = q.clone();
            async move { q.admit().await }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let q = q.clone();
            async move { q.admit().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        drop(a);
        let held = first
            .await
            .unwrap()
            .expect("the first waiter gets the freed place");
        // Nothing frees up for the second within the wait.
        match second.await.unwrap() {
            Err(StorageError::Busy { queued, waited }) => {
                assert_eq!((queued, waited), (2, wait));
            }
            other => panic!("expected Busy, got {:?}", other.map(|_| ())),
        }
        assert_eq!(metrics.storage_busy.get(), 1);
        // Places go back when dropped.
        drop(held);
        assert_eq!(metrics.storage_queued_writes.get(), 1);
        assert!(q.room.try_acquire().is_ok(), "a place is free again");
    }
}
