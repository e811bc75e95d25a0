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
//! A channel is followed from the first message that has a member with a
//! session on this node. Messages committed by different nodes may cross
//! in transit, so the first one seen need not be the first one owed: unless
//! it is the channel's first (`seq` 1), it is held for `cluster.gap_wait`,
//! and the channel starts at the lowest `seq` that arrived by then (its
//! earlier messages reached no session of this node live; clients read
//! them with `sync`). Messages of channels nobody here follows are dropped
//! at once, so what a node tracks grows with its own users. A channel idle for a while is forgotten, and so
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

/// Where missed messages are read back from (the database; a fake in the
/// unit tests).
#[async_trait::async_trait]
trait Source: Send + Sync + 'static {
    /// Messages of `channel` after `after`, at most `limit`, with members.
    async fn fill(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Appended>, StorageError>;
    /// The newest `seq` of each channel.
    async fn heads(&self, channels: Vec<String>) -> Result<Vec<(String, u64)>, StorageError>;
}

/// Where committed messages go once in order: this node's fan-out.
pub type Sink = Arc<dyn Fn(Appended, Option<String>) + Send + Sync>;

/// Whether any member of a message has a session on this node: a channel
/// nobody here follows is not tracked (so memory follows this node's
/// users, not the whole cluster's traffic).
pub type Wanted = Arc<dyn Fn(&Appended) -> bool + Send + Sync>;

/// Reads what a gap misses: messages and the members to fan them out to.
struct Filler {
    store: Arc<dyn ClusterStore>,
    groups: Arc<dyn GroupStore>,
}

#[async_trait::async_trait]
impl Source for Filler {
    async fn fill(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Appended>, StorageError> {
        Filler::fill(self, channel, after, limit).await
    }

    async fn heads(&self, channels: Vec<String>) -> Result<Vec<(String, u64)>, StorageError> {
        self.store.channel_heads(channels).await
    }
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
        let registry = local.registry().clone();
        let wanted: Wanted = Arc::new(move |a: &Appended| {
            a.members
                .iter()
                .any(|m| !registry.user_sessions(m).is_empty())
        });
        let sink: Sink = Arc::new(move |a, origin| local.fan_out(a, origin));
        Sequencer::with(
            sink,
            wanted,
            Arc::new(Filler { store, groups }),
            gap_wait,
            metrics,
        )
    }

    fn with(
        sink: Sink,
        wanted: Wanted,
        filler: Arc<dyn Source>,
        gap_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> Sequencer {
        let shards = (0..SHARDS)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let shard = Shard {
                    channels: HashMap::new(),
                    sink: sink.clone(),
                    wanted: wanted.clone(),
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
    /// The `seq` owed next; while `starting`, the lowest that has arrived.
    next: u64,
    /// Followed since less than `gap_wait`: where the channel starts is
    /// not known yet, and everything is held.
    starting: bool,
    held: BTreeMap<u64, (Appended, Option<String>)>,
    timer: bool,
    filling: bool,
    tries: u32,
    touched: Instant,
}

struct Shard {
    channels: HashMap<String, Chan>,
    sink: Sink,
    wanted: Wanted,
    filler: Arc<dyn Source>,
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
        (self.sink)(appended, origin);
    }

    fn message(&mut self, appended: Appended, origin: Option<String>) {
        let key = appended.message.channel.key.clone();
        let seq = appended.message.seq;
        if !self.channels.contains_key(&key) && !(self.wanted)(&appended) {
            // Nobody here to deliver to, and nothing followed yet.
            return;
        }
        // A channel followed from a message other than its first waits
        // `gap_wait` before choosing where to start: a message committed
        // before this one may still be on its way from another node.
        let fresh = !self.channels.contains_key(&key);
        let c = self.channels.entry(key.clone()).or_insert_with(|| Chan {
            next: seq,
            starting: seq > 1,
            held: BTreeMap::new(),
            timer: seq > 1,
            filling: false,
            tries: 0,
            touched: Instant::now(),
        });
        c.touched = Instant::now();
        if c.starting {
            if c.held.contains_key(&seq) {
                self.metrics.cluster_duplicates.inc();
            } else {
                c.next = c.next.min(seq);
                c.held.insert(seq, (appended, origin));
            }
            if fresh {
                self.later(self.gap_wait, Input::GapTimer { channel: key });
            }
            return;
        }
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
            if *entry.key() < c.next {
                // Delivered meanwhile by another way (read back): a duplicate.
                entry.remove();
                self.metrics.cluster_duplicates.inc();
                continue;
            }
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
        if c.starting {
            // The channel starts at the lowest that came; what is held above
            // it with gaps between is handled as any gap.
            c.starting = false;
            self.drain(&key);
            self.after_fill(&key);
            return;
        }
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
            // A message read back that is also held (a resync reads up to
            // the head) goes out as held: with its origin, so the sending
            // connection gets only its `sendack`.
            match c.held.remove(&a.message.seq) {
                Some((held, origin)) => self.deliver(held, origin),
                None => {
                    got += 1;
                    self.deliver(a, None);
                }
            }
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
            .filter(|(_, c)| !c.filling && !c.starting)
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
                let heads: HashMap<String, u64> = match filler.heads(keys).await {
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::value::RawValue;

    use super::*;
    use crate::storage::messages::Channel;

    /// The database as the fake has it: every message of one channel.
    struct Db(Mutex<Vec<u64>>);

    fn message(seq: u64) -> Appended {
        Appended {
            message: StoredMessage {
                id: format!("msg_{seq}"),
                channel: Channel::person("a", "b"),
                sender: "a".into(),
                system: false,
                seq,
                version: seq,
                client_msg_id: None,
                payload: RawValue::from_string("{}".into()).unwrap(),
                created_at: 0,
            },
            duplicate: false,
            members: Arc::new(vec!["a".into(), "b".into()]),
        }
    }

    #[async_trait::async_trait]
    impl Source for Db {
        async fn fill(
            &self,
            _channel: &str,
            after: u64,
            limit: usize,
        ) -> Result<Vec<Appended>, StorageError> {
            let all = self.0.lock().unwrap().clone();
            Ok(all
                .into_iter()
                .filter(|s| *s > after)
                .take(limit)
                .map(message)
                .collect())
        }

        async fn heads(&self, channels: Vec<String>) -> Result<Vec<(String, u64)>, StorageError> {
            let head = self.0.lock().unwrap().iter().copied().max().unwrap_or(0);
            Ok(channels.into_iter().map(|c| (c, head)).collect())
        }
    }

    type Out = Arc<Mutex<Vec<(u64, Option<String>)>>>;

    fn sequencer(committed: &[u64]) -> (Sequencer, Out) {
        let out: Out = Arc::default();
        let seen = out.clone();
        let sink: Sink =
            Arc::new(move |a, origin| seen.lock().unwrap().push((a.message.seq, origin)));
        let db = Arc::new(Db(Mutex::new(committed.to_vec())));
        let s = Sequencer::with(
            sink,
            Arc::new(|_: &Appended| true),
            db,
            Duration::from_millis(20),
            Arc::new(Metrics::new()),
        );
        (s, out)
    }

    async fn until(out: &Out, n: usize) -> Vec<(u64, Option<String>)> {
        for _ in 0..500 {
            if out.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        out.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn reordered_and_repeated_messages_come_out_once_in_order() {
        let (s, out) = sequencer(&[1, 2, 3, 4, 5]);
        for seq in [1, 3, 2, 2, 5, 4, 1] {
            s.submit(message(seq), None);
        }
        let got: Vec<u64> = until(&out, 5).await.into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn the_first_messages_of_a_channel_may_arrive_crossed() {
        // 1 and 2 were committed by two other nodes; 2's frame came first.
        let (s, out) = sequencer(&[1, 2, 3]);
        s.submit(message(2), None);
        s.submit(message(1), None);
        s.submit(message(3), None);
        let got: Vec<u64> = until(&out, 3).await.into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_channel_first_seen_mid_way_starts_there_and_reads_nothing_older() {
        // 1 to 4 went out before anybody here was a member.
        let (s, out) = sequencer(&[1, 2, 3, 4, 5, 6]);
        s.submit(message(6), None);
        s.submit(message(5), Some("c".into()));
        let got = until(&out, 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            out.lock().unwrap().clone(),
            vec![(5, Some("c".to_string())), (6, None)],
            "{got:?}"
        );
        // Followed now: the next one goes out at once.
        s.submit(message(7), None);
        let got: Vec<u64> = until(&out, 3).await.into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, vec![5, 6, 7]);
    }

    #[tokio::test]
    async fn a_gap_is_filled_from_the_database_and_the_held_keep_their_origin() {
        let (s, out) = sequencer(&[1, 2, 3, 4]);
        s.submit(message(1), None);
        // 2 and 3 never arrive; 4 is this node's own, from connection c.
        s.submit(message(4), Some("c".into()));
        let got = until(&out, 4).await;
        assert_eq!(
            got,
            vec![(1, None), (2, None), (3, None), (4, Some("c".to_string()))]
        );
    }

    #[tokio::test]
    async fn a_resync_finds_a_lost_last_message_and_repeats_nothing_held() {
        let (s, out) = sequencer(&[1, 2, 3]);
        s.submit(message(1), None);
        until(&out, 1).await;
        // 3 is held (own), 2 lost; a resync reads 2 and 3 back before the
        // gap timer: 3 must still go out once, with its origin.
        s.submit(message(3), Some("c".into()));
        s.resync();
        let got = until(&out, 3).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            out.lock().unwrap().clone(),
            vec![(1, None), (2, None), (3, Some("c".to_string()))],
            "{got:?}"
        );
    }
}
