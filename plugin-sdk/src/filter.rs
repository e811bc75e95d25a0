//! The `conversation-filter` hook's types: whose list it is ([`Viewer`]), the
//! rows of the list ([`Conversation`]) and what the viewer sees of each
//! ([`Verdict`]). Plain mirrors of the WIT interface.

/// Whose conversation list this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Viewer {
    /// The user the list belongs to.
    pub user_id: String,
    /// The device asking, when the request came from a client connection.
    pub device_id: Option<String>,
}

/// A person-to-person or group channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelType {
    /// A conversation between two users.
    Person,
    /// A group conversation.
    Group,
}

/// The last message of a conversation, as shown in a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSummary {
    /// The message id.
    pub message_id: String,
    /// The message's sequence number in its channel.
    pub seq: u64,
    /// The sender's user id.
    pub sender: String,
    /// A short preview of the content.
    pub preview: String,
}

/// One row of a user's conversation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The channel id (the other user for a person channel, the group id for a group).
    pub channel_id: String,
    /// The kind of channel.
    pub channel_type: ChannelType,
    /// Messages the viewer has not read.
    pub unread: u32,
    /// The row's version in the viewer's list.
    pub version: u64,
    /// When the row last changed, in milliseconds since the Unix epoch.
    pub updated_at_ms: i64,
    /// The last message, if any.
    pub last_message: Option<MessageSummary>,
}

/// What the viewer sees of one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Shown as it is.
    Keep,
    /// Not shown.
    Drop,
    /// Shown as rewritten; keep the channel id and type the same (the row
    /// must still describe the same conversation).
    Rewrite(Conversation),
}
