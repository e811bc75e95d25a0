//! The delivery lease of one endpoint: which gateway process delivers it.
//!
//! Several gateway processes may share one database (PostgreSQL), each with
//! a worker per endpoint. Only the worker whose process holds the
//! endpoint's lease in storage works: it fans out, claims and sends; the
//! others only keep asking for the lease. A task beside each worker takes
//! the lease when it is free and renews it every third of
//! `outbox.endpoint_lease`; the worker asks [`LeaseWatch::holds`] before
//! each claim round.
//!
//! - **Counted from the call.** A lease granted by a call sent at local time
//!   `t` is taken to end at `t + ttl`, which is never later than storage
//!   lets it end (its clock starts when the call arrives), so the worker
//!   stops claiming before another process could be granted the lease.
//!   A renewal that fails, is refused or is still unanswered when the lease
//!   would end loses the lease at once: the worker claims nothing more.
//! - **Cheap to wait for.** While it does not hold the lease the task asks
//!   again every tenth of the lease length (at most a second): one
//!   statement, which changes nothing while another holder's lease is live.
//! - **Handed over on stop.** When the worker stops (shutdown after the
//!   flush, or the endpoint left the config) the lease is released, so
//!   another process takes the endpoint at once instead of after the lease
//!   lapses. A node whose config has the endpoint `enabled = false` does not
//!   hold its lease either, leaving it to one that delivers.
//!
//! The lease decides who works, not what is sent: claims keep their own
//! per-delivery leases (`storage::outbox`), so if two workers ever overlapped
//! (a process paused past its lease) they would still never send one
//! delivery at the same time or a user's events out of order, and what a
//! holder that died had in flight is sent again by the next holder once
//! those claim leases end.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::config::WebhookConfig;
use crate::metrics::EndpointLabel;

/// Shortest and longest wait between two attempts to take a lease that
/// another holder has.
const POLL_MIN: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(1);

/// How long to wait before asking again for a lease of length `ttl` held
/// by someone else.
pub(crate) fn poll_interval(ttl: Duration) -> Duration {
    (ttl / 10).clamp(POLL_MIN, POLL_MAX)
}

/// When to renew a lease of length `ttl` that was granted at `granted`.
fn renew_at(granted: Instant, ttl: Duration) -> Instant {
    granted + ttl / 3
}

/// Whether the process holds an endpoint's lease now: the local end of the
/// lease while it holds it, else `None`.
#[derive(Clone)]
pub(crate) struct LeaseWatch(watch::Receiver<Option<Instant>>);

impl LeaseWatch {
    /// Holds the lease now (a renewal is due before the lease ends).
    pub(crate) fn holds(&self) -> bool {
        self.0.borrow().is_some_and(|until| Instant::now() < until)
    }

    /// Resolves when the lease was taken, renewed or lost; an error once
    /// the lease task is gone.
    pub(crate) async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.0.changed().await
    }
}

/// The lease task of one endpoint's worker.
pub(crate) struct Lease {
    watch: LeaseWatch,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
    name: String,
}

impl Lease {
    /// Starts asking for the lease of `config`'s endpoint.
    pub(crate) fn start(shared: Arc<Shared>, config: Arc<ArcSwap<WebhookConfig>>) -> Lease {
        let name = config.load().name.clone();
        let (tx, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep(shared.clone(), config, tx, stop.clone()));
        Lease {
            watch: LeaseWatch(rx),
            stop,
            task,
            shared,
            name,
        }
    }

    /// A view of whether the lease is held, for the worker and the outbox.
    pub(crate) fn watch(&self) -> LeaseWatch {
        self.watch.clone()
    }

    /// Stops renewing and releases the lease, so another process can take
    /// it at once.
    pub(crate) async fn end(self) {
        self.stop.cancel();
        let _ = self.task.await;
        let shared = &self.shared;
        match shared
            .storage
            .endpoint_release(&self.name, &shared.holder)
            .await
        {
            Ok(()) => tracing::debug!(endpoint = %self.name, "released the webhook delivery lease"),
            Err(e) => tracing::warn!(endpoint = %self.name, error = %e,
                "cannot release the webhook delivery lease; another process takes it once it lapses"),
        }
    }
}

/// Takes, renews and (when the config disables the endpoint) gives back the
/// lease until `stop`; publishes the local end of the lease on `tx`.
async fn keep(
    shared: Arc<Shared>,
    config: Arc<ArcSwap<WebhookConfig>>,
    tx: watch::Sender<Option<Instant>>,
    stop: CancellationToken,
) {
    let name = config.load().name.clone();
    let label = EndpointLabel {
        endpoint: name.clone(),
    };
    let leader = shared
        .metrics
        .webhook_endpoint_leader
        .get_or_create(&label)
        .clone();
    leader.set(0);
    let publish = |until: Option<Instant>| {
        tx.send_if_modified(|held| {
            let changed = *held != until;
            *held = until;
            changed
        });
    };
    let mut held_until: Option<Instant> = None;
    let mut failing = false;
    loop {
        let ttl = shared.settings.load().endpoint_lease;
        let sent = Instant::now();
        let granted = if config.load().enabled {
            // Unanswered by the time the lease would end: lost.
            let limit = held_until.map_or(ttl, |until| until.saturating_duration_since(sent));
            let asked = shared.storage.endpoint_lease(&name, &shared.holder, ttl);
            let answer = tokio::select! {
                // Stopping does not wait for storage: the release follows.
                _ = stop.cancelled() => break,
                answer = tokio::time::timeout(limit, asked) => answer,
            };
            match answer {
                Ok(Ok(granted)) => {
                    if failing {
                        failing = false;
                        tracing::info!(endpoint = %name, "the webhook delivery lease can be asked for again");
                    }
                    granted
                }
                Ok(Err(e)) => {
                    if !failing {
                        failing = true;
                        tracing::warn!(endpoint = %name, error = %e,
                            "cannot take or renew the webhook delivery lease; not delivering until it can");
                    }
                    false
                }
                Err(_) => {
                    tracing::warn!(endpoint = %name, "renewing the webhook delivery lease took too long; not delivering until it is renewed");
                    false
                }
            }
        } else {
            if held_until.is_some() {
                // Disabled in this node's config: leave it to a node that delivers.
                if let Err(e) = shared.storage.endpoint_release(&name, &shared.holder).await {
                    tracing::warn!(endpoint = %name, error = %e, "cannot release the webhook delivery lease");
                }
            }
            false
        };
        if granted {
            let until = sent + ttl;
            if held_until.is_none() {
                leader.set(1);
                shared
                    .metrics
                    .webhook_lease_takeovers
                    .get_or_create(&label)
                    .inc();
                tracing::info!(endpoint = %name, holder = %shared.holder,
                    "took the webhook delivery lease: this process delivers the endpoint");
            }
            held_until = Some(until);
            publish(held_until);
        } else {
            if held_until.take().is_some() {
                leader.set(0);
                tracing::warn!(endpoint = %name, "lost the webhook delivery lease: this process stops delivering the endpoint");
            }
            publish(None);
        }
        let next = match held_until {
            Some(_) => renew_at(sent, ttl),
            None => sent + poll_interval(ttl),
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
    publish(None);
    leader.set(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_renewed_at_a_third_and_asked_for_at_a_tenth() {
        let ms = Duration::from_millis;
        let t = Instant::now();
        assert_eq!(renew_at(t, ms(9_000)), t + ms(3_000));
        assert_eq!(poll_interval(ms(10_000)), ms(1_000));
        assert_eq!(poll_interval(ms(4_000)), ms(400));
        // At most a second however long the lease, at least 50 ms however short.
        assert_eq!(poll_interval(Duration::from_secs(3_600)), ms(1_000));
        assert_eq!(poll_interval(ms(100)), ms(50));
    }
}
