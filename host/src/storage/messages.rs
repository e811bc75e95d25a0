//! Messages and every user's conversation list.
//!
//! Versions: one counter, advanced once per state-changing operation, stamps
//! every message and every conversation row the operation touches. A user's
//! rows therefore change with strictly increasing versions, a message's
//! version orders it across all channels (the per-user cursor), and "what
//! changed since version V" is a range query.
//!
//! Properties every engine keeps, also when several gateway processes write
//! to one database:
//! - **A channel's sequence numbers follow commit order**: they are 1, 2, 3…
//!   with no gap and no repeat, and a message with a higher `seq` commits
//!   after every lower one of its channel. `on_append` hooks of one channel
//!   run in `seq` order (fan-out relies on it).
//! - **A user's versions increase in commit order**: a version stamped on a
//!   user's row or message is greater than every version stamped on that
//!   user's rows by transactions that committed before, so a sync that read
//!   up to version V never misses a change that commits later with a version
//!   at or below V.
//! - **Client message ids are unique per sender**: a second append with the
//!   same (sender, `client_msg_id`) returns the first message with
//!   `duplicate: true` and writes nothing, also when both run concurrently.
//! - **A message is written with its members' conversation rows and its
//!   `message.created` event in one transaction**; a rejected or failed
//!   append writes nothing.
//!
//! This module holds no SQL; the engines implement the trait.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::Result;

/// Separates the two users of a person channel's key. User ids cannot hold
/// control characters (see `auth::valid_id`), so the key is unambiguous.
const PERSON_SEP: char = '\u{1f}';

/// The kind of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelType {
    /// Between two users; each sees the other's id as the channel id.
    Person,
    /// A group managed through `/v1/groups`; the channel id is the group id.
    Group,
}

impl ChannelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelType::Person => "person",
            ChannelType::Group => "group",
        }
    }

    pub fn parse(text: &str) -> Option<ChannelType> {
        match text {
            "person" => Some(ChannelType::Person),
            "group" => Some(ChannelType::Group),
            _ => None,
        }
    }

    pub(crate) fn code(self) -> i64 {
        match self {
            ChannelType::Person => 0,
            ChannelType::Group => 1,
        }
    }

    pub(crate) fn from_code(code: i64) -> ChannelType {
        if code == 1 {
            ChannelType::Group
        } else {
            ChannelType::Person
        }
    }
}

/// A channel as stored: its type and a key that is the same for every member.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Channel {
    pub kind: ChannelType,
    /// `g:<group id>` or `p:<user a>\x1f<user b>` with a < b.
    pub key: String,
}

impl Channel {
    /// The person channel between two users (in either order).
    pub fn person(a: &str, b: &str) -> Channel {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        Channel {
            kind: ChannelType::Person,
            key: format!("p:{lo}{PERSON_SEP}{hi}"),
        }
    }

    pub fn group(group_id: &str) -> Channel {
        Channel {
            kind: ChannelType::Group,
            key: format!("g:{group_id}"),
        }
    }

    /// The channel a viewer names as (`type`, `id`).
    pub fn addressed(viewer: &str, kind: ChannelType, id: &str) -> Channel {
        match kind {
            ChannelType::Person => Channel::person(viewer, id),
            ChannelType::Group => Channel::group(id),
        }
    }

    pub fn from_key(kind: ChannelType, key: String) -> Channel {
        Channel { kind, key }
    }

    /// The group id of a group channel.
    pub fn group_id(&self) -> Option<&str> {
        match self.kind {
            ChannelType::Group => self.key.strip_prefix("g:"),
            ChannelType::Person => None,
        }
    }

    /// The two users of a person channel (equal for a user's own channel).
    pub fn persons(&self) -> Option<(&str, &str)> {
        match self.kind {
            ChannelType::Person => self.key.strip_prefix("p:")?.split_once(PERSON_SEP),
            ChannelType::Group => None,
        }
    }

    /// The channel id as `viewer` sees it: the group id, or the other user.
    pub fn id_for(&self, viewer: &str) -> String {
        match self.kind {
            ChannelType::Group => self.group_id().unwrap_or_default().to_string(),
            ChannelType::Person => match self.persons() {
                Some((a, b)) if a == viewer => b.to_string(),
                Some((a, _)) => a.to_string(),
                None => String::new(),
            },
        }
    }
}

/// A message to commit.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// `msg_…`, assigned by the caller.
    pub id: String,
    pub channel: Channel,
    pub sender: String,
    /// Sent by the business server as the system (no membership check).
    pub system: bool,
    /// The sender's id for deduplicating retries.
    pub client_msg_id: Option<String>,
    /// The payload, JSON text kept byte for byte as it was sent.
    pub payload: Box<RawValue>,
    /// Shown in conversation lists.
    pub preview: String,
    /// Unix ms.
    pub created_at: i64,
    /// Refuse a group with more members than this (0: no limit).
    pub max_members: usize,
}

/// A committed message.
#[derive(Debug, Clone, Serialize)]
pub struct StoredMessage {
    pub id: String,
    #[serde(skip)]
    pub channel: Channel,
    pub sender: String,
    pub system: bool,
    pub seq: u64,
    pub version: u64,
    pub client_msg_id: Option<String>,
    /// The payload as stored, embedded in every view without being parsed
    /// again (so no nesting limit of a parser can turn it into anything else).
    pub payload: Box<RawValue>,
    /// Unix ms.
    pub created_at: i64,
}

/// The result of appending a message.
#[derive(Debug, Clone)]
pub struct Appended {
    pub message: StoredMessage,
    /// True when a message with the same sender and client message id already
    /// existed: this is that message, and nothing was written.
    pub duplicate: bool,
    /// The users whose conversation lists hold the channel (the sender
    /// included when a member).
    pub members: Arc<Vec<String>>,
}

/// Why a message was not appended. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendRejected {
    UnknownGroup,
    NotMember,
}

/// Runs on the writer right after the commit, in commit order (fan-out uses
/// it so that every recipient sees a channel in sequence order).
pub type OnAppend = Box<dyn FnOnce(&Appended) + Send>;

/// Builds the `message.created` event once the sequence and version are known.
pub type EventBuilder = Box<dyn FnOnce(&StoredMessage) -> super::NewEvent + Send>;

/// What a conversation row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RowState {
    Live,
    Hidden,
    Deleted,
}

impl RowState {
    pub(crate) fn code(self) -> i64 {
        match self {
            RowState::Live => 0,
            RowState::Hidden => 1,
            RowState::Deleted => 2,
        }
    }

    pub(crate) fn from_code(code: i64) -> RowState {
        match code {
            1 => RowState::Hidden,
            2 => RowState::Deleted,
            _ => RowState::Live,
        }
    }
}

/// The last message of a conversation, as a list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastMessage {
    pub id: String,
    pub seq: u64,
    pub sender: String,
    pub preview: String,
    /// Unix ms.
    pub created_at: i64,
}

/// One row of a user's conversation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRow {
    pub user_id: String,
    pub channel: Channel,
    /// The channel id as this user sees it.
    pub channel_id: String,
    pub state: RowState,
    pub unread: u64,
    pub read_seq: u64,
    pub version: u64,
    /// Unix ms of the row's last change.
    pub updated_at: i64,
    pub last_message: Option<LastMessage>,
}

/// A page of a conversation sync.
#[derive(Debug, Clone)]
pub struct ConversationPage {
    /// The version the client holds once it has every page of this sync.
    pub version: u64,
    /// Rows changed since the requested version (live, hidden and deleted ones),
    /// in key order.
    pub rows: Vec<ConversationRow>,
    /// The last messages of each live row, when asked for (oldest first).
    pub messages: Vec<Vec<StoredMessage>>,
    /// The key after which the next page starts, when there is one.
    pub next_key: Option<String>,
}

/// Which messages a sync asks for.
#[derive(Debug, Clone)]
pub enum MessageRange {
    /// One channel, sequence numbers after `seq`, oldest first.
    After { channel: Channel, seq: u64 },
    /// One channel, sequence numbers before `seq`, newest page, oldest first.
    Before { channel: Channel, seq: u64 },
    /// Every channel in the user's list, versions after `version`.
    UserAfter { version: u64 },
}

/// A page of messages.
#[derive(Debug, Clone)]
pub struct MessagePage {
    pub messages: Vec<StoredMessage>,
    /// There are more messages in the asked direction.
    pub more: bool,
}

/// Why a conversation sync cannot be served incrementally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncRefused {
    /// The version is older than the oldest the store can serve a delta
    /// from (deleted rows were pruned), or newer than any version it has.
    ResetRequired {
        current: u64,
    },
    UnknownGroup,
    NotMember,
}

/// A change to a user's own conversation row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowChange {
    /// Mark read up to a sequence number (the last message when `None`).
    Read(Option<u64>),
    Hide,
    Delete,
}

/// The durable messaging contract.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Assigns the next sequence number of the channel and the next version,
    /// writes the message, every member's conversation row and the
    /// `message.created` event in one transaction, then runs `on_append`
    /// (not for a duplicate) and resolves.
    async fn append_message(
        &self,
        message: NewMessage,
        event: EventBuilder,
        on_append: OnAppend,
    ) -> Result<std::result::Result<Appended, SendRejected>>;

    /// Messages of a range that `user` may read, at most `limit`.
    async fn messages(
        &self,
        user: &str,
        range: MessageRange,
        limit: usize,
    ) -> Result<std::result::Result<MessagePage, SyncRefused>>;

    /// A page of `user`'s conversations changed after `since` (0: all live
    /// ones), in key order after `after_key`. `high` pins the version a
    /// multi-page sync reports (taken from the first page). Each live row
    /// comes with up to `last_messages` of its newest messages.
    async fn conversations(
        &self,
        user: &str,
        since: u64,
        high: Option<u64>,
        after_key: Option<String>,
        limit: usize,
        last_messages: usize,
    ) -> Result<std::result::Result<ConversationPage, SyncRefused>>;

    /// Changes one of `user`'s conversation rows. `None` when the user has no
    /// such conversation. The row is returned as it is afterwards (its
    /// version unchanged when nothing changed).
    async fn change_conversation(
        &self,
        user: &str,
        channel: Channel,
        change: RowChange,
    ) -> Result<Option<ConversationRow>>;

    /// Deletes rows marked deleted longer than `older_than_ms` ago and
    /// remembers, per user, the newest version it pruned (a sync from an
    /// older version must reset). Returns how many rows it pruned.
    async fn prune_conversations(&self, older_than_ms: i64) -> Result<usize>;

    /// The newest version handed out.
    async fn current_version(&self) -> Result<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn person_channels_are_symmetric() {
        let a = Channel::person("alice", "bob");
        let b = Channel::person("bob", "alice");
        assert_eq!(a, b);
        assert_eq!(a.id_for("alice"), "bob");
        assert_eq!(a.id_for("bob"), "alice");
        let own = Channel::person("alice", "alice");
        assert_eq!(own.id_for("alice"), "alice");
        assert_eq!(
            Channel::addressed("x", ChannelType::Group, "g1").key,
            "g:g1"
        );
        assert_eq!(Channel::group("g1").id_for("anyone"), "g1");
        // A separator cannot be confused with part of an id.
        assert_ne!(
            Channel::person("a:b", "c").key,
            Channel::person("a", "b:c").key
        );
    }
}
