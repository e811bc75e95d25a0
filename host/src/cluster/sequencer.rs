//! Per-channel order in front of this node's fan-out, and gap filling.
//!
//! Every committed message reaches this node's sessions through here: the
//! ones this node committed (handed over by its storage writer, in commit
//! order) and the ones other nodes committed (from NATS, in whatever order
//! and completeness NATS managed). For each channel the sequencer knows the
//! next `seq` it owes its sessions:
//! - the expected one is fanned out at once, with any held ones after it;
//! - an older one is a duplicate (it came both ways, or twice) and is dropped;
//! - a newer one is held. If the missing ones have not come within
//!   `cluster.gap_wait`, they are read from the database (every lower `seq`
//!   of a channel committed before a higher one, so they are there) and
//!   fanned out first, in order.
//!
//! A **resync** (this node's NATS connection came back, or a publisher's
//! frame numbers jumped: frames were lost) compares every channel it knows
//! with the database's heads and fills what is behind, which covers a lost
//! last message that no later one would reveal.
//!
//! A channel seen for the first time starts at the `seq` it arrives with
//! (its earlier messages reached no session of this node live; clients
//! read them with `sync`). A channel idle for a while is forgotten, and so
//! is a gap the database cannot fill after repeated tries: its held
//! messages are fanned out and the gap is counted
//! (`plugboard_cluster_gaps_total{outcome="skipped"}`); clients' catch-up
//! (`seq` jumps past their mark → `sync`) covers what was skipped.
//!
//! Channels are spread over shards by hash; a shard is one task, so the
//! order of one channel is the order of its shard's queue.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::delivery::Delivery;
use crate::gateway::local::LocalDelivery;
use crate::metrics::{GapLabel, Metrics};
use crate::storage::cluster::ClusterStore;
use crate::storage::groups::{GroupResult, GroupStore};
use crate::storage::messages::{Appended, ChannelType, StoredMessage};
use crate::storage::StorageError;

const SHARDS: usize = 4;
/// Most messages held behind one gap before it is given up.
const MAX_HELD: usize = 4096;
/// Most messages read to fill one gap at a time.
const FILL_LIMIT: usize = 1000;
/// Tries to fill one gap before it is skipped.
const FILL_TRIES: u32 = 5;
/// A channel with nothing held and no message for this long is forgotten.
const IDLE: Duration = Duration::from_secs(300);

enum Input {
    Message {
        appended: Appended,
        origin: Option<String>,
    },
    GapTimer {
        channel: String,
    },
    Filled {
        channel: String,
        messages: Vec<Appended>,
    },
    FillFailed {
        channel: String,
    },
    Resync,
}

/// Reads what a gap misses: messages and the members to fan them out to.
struct Filler {
    store: Arc<dyn ClusterStore>,
    groups: Arc<dyn GroupStore>,
}

impl Filler {
    async fn members(&self, m: &StoredMessage) -> Result<Arc<Vec<String>>, StorageError> {
        Ok(Arc::new(match m.channel.kind {
            ChannelType::Person => match m.channel.persons() {
                Some((a, b)) if a == b => vec![a.to_string()],
                Some((a, b)) => vec![a.to_string(), b.to_string()],
                None => Vec::new(),
            },
            ChannelType::Group => {
                match self
                    .groups
                    .group_member_ids(m.channel.group_id().unwrap_or_default())
                    .await?
                {
                    GroupResult::Ok(ids) => ids,
                    _ => Vec::new(),
                }
            }
        }))
    }

    async fn fill(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Appended>, StorageError> {
        let messages = self.store.channel_messages(channel, after, limit).await?;
        let Some(first) = messages.first() else {
            return Ok(Vec::new());
        };
        let members = self.members(first).await?;
        Ok(messages
            .into_iter()
            .map(|message| Appended {
                message,
                duplicate: false,
                members: members.clone(),
            })
            .collect())
    }
}

/// The members of a group message whose list did not travel (too large
/// for one NATS message).
pub async fn group_members(
    groups: &dyn GroupStore,
    m: &StoredMessage,
) -> Result<Arc<Vec<String>>, StorageError> {
    Ok(Arc::new(
        match groups
            .group_member_ids(m.channel.group_id().unwrap_or_default())
            .await?
        {
            GroupResult::Ok(ids) => ids,
            _ => Vec::new(),
        },
    ))
}

/// The shards' queues.
pub struct Sequencer {
    shards: Vec<mpsc::UnboundedSender<Input>>,
}

impl Sequencer {
    /// Starts the shards; what they release goes to `local`'s fan-out.
    pub fn start(
        local: Arc<LocalDelivery>,
        store: Arc<dyn ClusterStore>,
        groups: Arc<dyn GroupStore>,
        gap_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> Sequencer {
        let filler = Arc::new(Filler { store, groups });
        let shards = (0..SHARDS)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let shard = Shard {
                    channels: HashMap::new(),
                    local: local.clone(),
                    filler: filler.clone(),
                    me: tx.downgrade(),
                    gap_wait,
                    metrics: metrics.clone(),
                };
                tokio::spawn(shard.run(rx));
                tx
            })
            .collect();
        Sequencer { shards }
    }

    fn shard(&self, channel: &str) -> &mpsc::UnboundedSender<Input> {
        let mut h = DefaultHasher::new();
        channel.hash(&mut h);
        &self.shards[(h.finish() as usize) % self.shards.len()]
    }

    /// A committed message for this node's sessions (`origin`: the sending
    /// connection, which gets a `sendack` instead). Never blocks.
    pub fn submit(&self, appended: Appended, origin: Option<String>) {
        let shard = self.shard(&appended.message.channel.key);
        // Fails only when the runtime is going away.
        let _ = shard.send(Input::Message { appended, origin });
    }

    /// Compares every known channel with the database and fills what is behind.
    pub fn resync(&self) {
        for shard in &self.shards {
            let _ = shard.send(Input::Resync);
        }
    }
}

struct Chan {
    /// The `seq` owed next.
    next: u64,
    held: BTreeMap<u64, (Appended, Option<String>)>,
    timer: bool,
    filling: bool,
    tries: u32,
    touched: Instant,
}

struct Shard {
    channels: HashMap<String, Chan>,
    local: Arc<LocalDelivery>,
    filler: Arc<Filler>,
    me: mpsc::WeakUnboundedSender<Input>,
    gap_wait: Duration,
    metrics: Arc<Metrics>,
}

impl Shard {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let mut sweep = tokio::time::interval(IDLE / 4);
        loop {
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.handle(input),
                    None => return,
                },
                _ = sweep.tick() => {
                    let now = Instant::now();
                    self.channels.retain(|_, c| {
                        !c.held.is_empty() || c.filling || now.duration_since(c.touched) < IDLE
                    });
                }
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Message { appended, origin } => self.message(appended, origin),
            Input::GapTimer { channel } => self.gap_timer(channel),
            Input::Filled { channel, messages } => self.filled(channel, messages),
            Input::FillFailed { channel } => {
                if let Some(c) = self.channels.get_mut(&channel) {
                    c.filling = false;
                    c.tries += 1;
                }
                self.after_fill(&channel);
            }
            Input::Resync => self.resync(),
        }
    }

    fn deliver(&self, appended: Appended, origin: Option<String>) {
        self.local.fan_out(appended, origin);
    }

    fn message(&mut self, appended: Appended, origin: Option<String>) {
        let key = appended.message.channel.key.clone();
        let seq = appended.message.seq;
        let c = self.channels.entry(key.clone()).or_insert_with(|| Chan {
            next: seq,
            held: BTreeMap::new(),
            timer: false,
            filling: false,
            tries: 0,
            touched: Instant::now(),
        });
        c.touched = Instant::now();
        if seq < c.next || c.held.contains_key(&seq) {
            self.metrics.cluster_duplicates.inc();
            return;
        }
        if seq == c.next {
            c.next += 1;
            self.deliver(appended, origin);
            self.drain(&key);
            return;
        }
        c.held.insert(seq, (appended, origin));
        if c.held.len() > MAX_HELD {
            self.skip(&key);
            return;
        }
        if !c.timer && !c.filling {
            c.timer = true;
            self.later(self.gap_wait, Input::GapTimer { channel: key });
        }
    }

    /// Fans out held messages that are due now.
    fn drain(&mut self, key: &str) {
        loop {
            let Some(c) = self.channels.get_mut(key) else {
                return;
            };
            let Some(entry) = c.held.first_entry() else {
                c.tries = 0;
                return;
            };
            if *entry.key() != c.next {
                return;
            }
            let (appended, origin) = entry.remove();
            c.next += 1;
            self.deliver(appended, origin);
        }
    }

    /// Gives up on the gap in front of the held messages.
    fn skip(&mut self, key: &str) {
        let Some(c) = self.channels.get_mut(key) else {
            return;
        };
        let Some((&first, _)) = c.held.first_key_value() else {
            return;
        };
        tracing::warn!(
            channel = %key, from = c.next, to = first - 1,
            "messages routed between nodes were missed and could not be read back; the clients' catch-up will find them"
        );
        self.metrics
            .cluster_gaps
            .get_or_create(&GapLabel {
                outcome: "skipped".into(),
            })
            .inc();
        c.next = first;
        c.tries = 0;
        self.drain(key);
    }

    fn gap_timer(&mut self, key: String) {
        let Some(c) = self.channels.get_mut(&key) else {
            return;
        };
        c.timer = false;
        let Some((&first, _)) = c.held.first_key_value() else {
            return;
        };
        if c.filling || first <= c.next {
            return;
        }
        c.filling = true;
        let after = c.next - 1;
        let limit = ((first - c.next) as usize).min(FILL_LIMIT);
        self.fill(key, after, limit);
    }

    fn fill(&self, key: String, after: u64, limit: usize) {
        let filler = self.filler.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            let input = match filler.fill(&key, after, limit).await {
                Ok(messages) => Input::Filled {
                    channel: key,
                    messages,
                },
                Err(e) => {
                    tracing::warn!(channel = %key, error = %e, "cannot read missed messages yet");
                    Input::FillFailed { channel: key }
                }
            };
            if let Some(me) = me.upgrade() {
                let _ = me.send(input);
            }
        });
    }

    fn filled(&mut self, key: String, messages: Vec<Appended>) {
        let Some(c) = self.channels.get_mut(&key) else {
            return;
        };
        c.filling = false;
        let mut got = 0u64;
        for a in messages {
            let Some(c) = self.channels.get_mut(&key) else {
                return;
            };
            if a.message.seq != c.next {
                continue;
            }
            c.next += 1;
            got += 1;
            self.deliver(a, None);
            self.drain(&key);
        }
        if got > 0 {
            self.metrics
                .cluster_gaps
                .get_or_create(&GapLabel {
                    outcome: "filled".into(),
                })
                .inc();
            self.metrics.cluster_filled_messages.inc_by(got);
        }
        if let Some(c) = self.channels.get_mut(&key) {
            if got == 0 {
                c.tries += 1;
            }
        }
        self.after_fill(&key);
    }

    /// After a fill: a gap still open is tried again later, or skipped
    /// after too many tries.
    fn after_fill(&mut self, key: &str) {
        let Some(c) = self.channels.get_mut(key) else {
            return;
        };
        let gap = c.held.first_key_value().is_some_and(|(&f, _)| f > c.next);
        if !gap {
            return;
        }
        if c.tries >= FILL_TRIES {
            self.skip(key);
            return;
        }
        if !c.timer {
            c.timer = true;
            let wait = self.gap_wait * (1 << c.tries.min(6));
            self.later(
                wait,
                Input::GapTimer {
                    channel: key.to_string(),
                },
            );
        }
    }

    fn resync(&self) {
        let known: Vec<(String, u64)> = self
            .channels
            .iter()
            .filter(|(_, c)| !c.filling)
            .map(|(k, c)| (k.clone(), c.next))
            .collect();
        if known.is_empty() {
            return;
        }
        let filler = self.filler.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            for chunk in known.chunks(500) {
                let keys = chunk.iter().map(|(k, _)| k.clone()).collect();
                let heads: HashMap<String, u64> = match filler.store.channel_heads(keys).await {
                    Ok(h) => h.into_iter().collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot compare channels with the database after a gap in routing");
                        return;
                    }
                };
                for (key, next) in chunk {
                    let Some(&head) = heads.get(key) else {
                        continue;
                    };
                    if head < *next {
                        continue;
                    }
                    let limit = ((head - next + 1) as usize).min(FILL_LIMIT);
                    let input = match filler.fill(key, next - 1, limit).await {
                        Ok(messages) => Input::Filled {
                            channel: key.clone(),
                            messages,
                        },
                        Err(e) => {
                            tracing::warn!(channel = %key, error = %e, "cannot read missed messages yet");
                            Input::FillFailed {
                                channel: key.clone(),
                            }
                        }
                    };
                    let Some(me) = me.upgrade() else { return };
                    let _ = me.send(input);
                }
            }
        });
    }

    fn later(&self, after: Duration, input: Input) {
        let me = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(me) = me.upgrade() {
                let _ = me.send(input);
            }
        });
    }
}
