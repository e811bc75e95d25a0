//! Fan-out: queues a committed message to every live connection of its
//! channel's members on this node. It never touches storage.
//!
//! Order: the storage writer hands each committed message to the shard of
//! its channel right after the commit, on the writer thread, in commit
//! order; each shard is one task working through its queue in order. So
//! every recipient sees a channel's messages in sequence order, whoever
//! sent them. A frame that cannot be queued (a slow or closing connection)
//! is dropped and counted: the message is stored, and the client catches up
//! with `sync` when it reconnects.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::render;
use crate::gateway::Registry;
use crate::metrics::Metrics;
use crate::storage::messages::{Appended, ChannelType};

/// One committed message to deliver.
pub struct Delivery {
    pub appended: Appended,
    /// The connection that sent it (it gets a `sendack`, not the message).
    pub origin: Option<String>,
}

/// The shards; cheap to clone a sender from.
pub struct Fanout {
    shards: Vec<mpsc::UnboundedSender<Delivery>>,
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

    /// The queue of a channel's shard (handed to the storage writer).
    pub fn queue_for(&self, channel_key: &str) -> mpsc::UnboundedSender<Delivery> {
        let mut h = DefaultHasher::new();
        channel_key.hash(&mut h);
        self.shards[(h.finish() as usize) % self.shards.len()].clone()
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Delivery>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
) {
    let mut delivered = 0u64;
    while let Some(d) = rx.recv().await {
        let m = &d.appended.message;
        // A group frame reads the same for every member; a person frame
        // names the other user, so it differs per side.
        let shared = match m.channel.kind {
            ChannelType::Group => Some(Message::text(render::message_frame(m, ""))),
            ChannelType::Person => None,
        };
        for user in d.appended.members.iter() {
            let sessions = registry.user_sessions(user);
            if sessions.is_empty() {
                continue;
            }
            let frame = match &shared {
                Some(f) => f.clone(),
                None => Message::text(render::message_frame(m, user)),
            };
            for s in sessions {
                if d.origin.as_deref() == Some(s.connection_id.as_str()) {
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
