//! Fan-out shards: queue committed messages to every live connection of
//! their channel's members on this node, one channel's messages in order.
//!
//! Order: the storage writer hands each committed message to the shard of
//! its channel right after the commit, on the writer thread, in commit
//! order (through [`crate::delivery::Delivery::fan_out`]); each shard is
//! one task working through its queue in order. So every recipient sees a
//! channel's messages in sequence order, whoever sent them. A frame that
//! cannot be queued (a slow or closing connection) is dropped and counted:
//! the message is stored, and the client catches up with `sync`.
//!
//! It never touches storage. The shard queues are unbounded because the
//! writer must not wait; what bounds them is the writer's own pace, and
//! each shard hands frames on to bounded per-connection queues at once.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::protocol;
use super::registry::Registry;
use crate::metrics::Metrics;
use crate::storage::messages::{Appended, ChannelType};

/// One committed message to deliver.
pub struct Job {
    pub appended: Appended,
    /// The connection that sent it (it gets a `sendack`, not the message).
    pub origin: Option<String>,
}

/// The shards.
pub struct Fanout {
    shards: Vec<mpsc::UnboundedSender<Job>>,
}

impl Fanout {
    /// Starts `shards` fan-out tasks on the current runtime.
    pub fn start(registry: Arc<Registry>, metrics: Arc<Metrics>, shards: usize) -> Fanout {
        let shards = (0..shards.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run(rx, registry.clone(), metrics.clone()));
                tx
            })
            .collect();
        Fanout { shards }
    }

    /// Queues a job on its channel's shard.
    pub fn queue(&self, job: Job) {
        let mut h = DefaultHasher::new();
        job.appended.message.channel.key.hash(&mut h);
        let shard = &self.shards[(h.finish() as usize) % self.shards.len()];
        // A send fails only once the shard task is gone (the runtime is
        // shutting down): nobody is left to deliver to.
        let _ = shard.send(job);
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Job>, registry: Arc<Registry>, metrics: Arc<Metrics>) {
    let mut delivered = 0u64;
    while let Some(job) = rx.recv().await {
        let m = &job.appended.message;
        // A group frame reads the same for every member; a person frame
        // names the other user, so it differs per side.
        let shared = match m.channel.kind {
            ChannelType::Group => Some(Message::text(protocol::message_frame(m, ""))),
            ChannelType::Person => None,
        };
        for user in job.appended.members.iter() {
            let sessions = registry.user_sessions(user);
            if sessions.is_empty() {
                continue;
            }
            let frame = match &shared {
                Some(f) => f.clone(),
                None => Message::text(protocol::message_frame(m, user)),
            };
            for s in sessions {
                if job.origin.as_deref() == Some(s.connection_id.as_str()) {
                    continue;
                }
                match s.push(frame.clone()) {
                    Ok(()) => metrics.fanout_frames.inc(),
                    Err(_) => metrics.fanout_dropped.inc(),
                };
            }
            delivered += 1;
            // A large group must not hold the runtime thread for long.
            if delivered % 1024 == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
}
