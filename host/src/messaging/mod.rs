//! Messaging: sending, fan-out, message sync and conversation lists, for
//! both the client WebSocket and the server API.
//!
//! A send goes one way: validate → one storage transaction (sequence,
//! version, message, members' conversation rows, `message.created` event) →
//! on the writer, in commit order, the message is handed to the delivery
//! seam's ordered fan-out → answer (`sendack`). Fan-out never touches
//! storage again, and nothing is answered before the commit.
//!
//! Conversation lists go: storage page by version and cursor → the
//! `conversation-filter` chain with the viewer → a page value (see
//! [`conversations`]); a change is pushed to the user's other connections
//! through [`Delivery`].
//!
//! Everything goes through the [`Messaging`] service, which holds only what
//! these flows use. This module is not the frame parser or renderer
//! ([`crate::gateway::protocol`]) nor the HTTP routes ([`crate::http`]);
//! both call into it, and it calls neither: its answers are values (pages,
//! acks) and its refusals [`MessagingError`]s, which the edges render.

pub mod conversations;
pub mod render;

use std::sync::{Arc, Weak};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::config;
use crate::delivery::Delivery;
use crate::json::{self, TooDeep, MAX_DEPTH};
use crate::metrics::Metrics;
use crate::outbox::Wakeup;
use crate::plugins::PluginRegistry;
use crate::storage::messages::{
    Channel, ChannelType, MessagePage, MessageRange, NewMessage, SendRejected, StoredMessage,
    SyncRefused,
};
use crate::storage::{MessageStore, StorageError};

/// What the messaging flows use: the config in force, the message store,
/// the delivery seam, the conversation-filter chain, metrics, and the
/// webhook workers' wake-up. Shared as `Arc<Messaging>`.
pub struct Messaging {
    config: config::Handle,
    messages: Arc<dyn MessageStore>,
    delivery: Arc<dyn Delivery>,
    plugins: Arc<PluginRegistry>,
    metrics: Arc<Metrics>,
    wakeup: Wakeup,
}

/// Why a messaging request was refused. Each has a stable code, used both
/// in `error` frames and in API errors.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error("{0}")]
    BadRequest(String),
    #[error("the payload is {size} bytes; messaging.max_payload_size is {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("the payload is {0}")]
    TooDeep(#[from] TooDeep),
    /// A stored message cannot be shown as a JSON value (the server API
    /// re-reads payloads; frames embed them as stored and never hit this).
    #[error("{what} cannot be read back as a JSON value: {reason}")]
    Unreadable { what: String, reason: String },
    #[error("no group `{0}`")]
    UnknownGroup(String),
    #[error("`{user}` is not a member of group `{group}`")]
    NotMember { user: String, group: String },
    #[error("`{user}` has no conversation {kind}:{id}")]
    UnknownConversation {
        user: String,
        kind: &'static str,
        id: String,
    },
    #[error("version {since} cannot be synced incrementally (current version {current}); sync from version 0")]
    ResetRequired { since: u64, current: u64 },
    #[error("the conversation filter `{plugin}` failed and its policy is fail-closed: {reason}")]
    FilterFailed { plugin: String, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl MessagingError {
    /// The stable code of `error` frames and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            MessagingError::Storage(e) if e.is_unavailable() => {
                crate::unavailable::refusal(e).unwrap_or_default().0
            }
            MessagingError::BadRequest(_) => "bad_request",
            MessagingError::PayloadTooLarge { .. } => "payload_too_large",
            MessagingError::TooDeep(_) => "too_deep",
            MessagingError::UnknownGroup(_) => "unknown_channel",
            MessagingError::NotMember { .. } => "not_member",
            MessagingError::UnknownConversation { .. } => "unknown_conversation",
            MessagingError::ResetRequired { .. } => "reset_required",
            MessagingError::FilterFailed { .. } => "filter_failed",
            MessagingError::Unreadable { .. } | MessagingError::Storage(_) => "internal",
        }
    }

    /// The text shown to a client: internals stay in the log.
    pub fn public_message(&self) -> String {
        match self {
            MessagingError::Storage(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "storage is unavailable; a messaging request was refused");
                crate::unavailable::refusal(e).unwrap_or_default().1.into()
            }
            MessagingError::Storage(e) => {
                tracing::error!(error = %e, "storage failed while handling a messaging request");
                "internal error; see the gateway log".into()
            }
            MessagingError::Unreadable { .. } => {
                tracing::error!(error = %self, "a stored message cannot be answered as JSON");
                "internal error; see the gateway log".into()
            }
            other => other.to_string(),
        }
    }
}

fn refused(e: SyncRefused, user: &str, channel: Option<&Channel>, since: u64) -> MessagingError {
    let group = channel
        .and_then(|c| c.group_id())
        .unwrap_or_default()
        .to_string();
    match e {
        SyncRefused::ResetRequired { current } => MessagingError::ResetRequired { since, current },
        SyncRefused::UnknownGroup => MessagingError::UnknownGroup(group),
        SyncRefused::NotMember => MessagingError::NotMember {
            user: user.to_string(),
            group,
        },
    }
}

/// Parses a channel type name.
pub fn channel_type(text: &str) -> Result<ChannelType, MessagingError> {
    ChannelType::parse(text).ok_or_else(|| {
        MessagingError::BadRequest(format!(
            "`channel_type` must be \"person\" or \"group\", not {text:?}"
        ))
    })
}

/// Checks an id named in a request.
pub fn check_id(field: &str, id: &str) -> Result<(), MessagingError> {
    crate::auth::check_id(field, id).map_err(MessagingError::BadRequest)
}

/// A send, from a client frame or the API.
pub struct SendRequest<'a> {
    pub sender: String,
    /// Sent by the business server as the system.
    pub system: bool,
    pub channel_type: &'a str,
    pub channel_id: &'a str,
    pub payload: &'a RawValue,
    pub client_msg_id: Option<&'a str>,
    /// The connection it came from, which gets no copy of the message.
    pub origin: Option<String>,
}

/// What the sender is told once the message is committed.
#[derive(Debug, Clone)]
pub struct SendAck {
    pub message: StoredMessage,
    /// The channel id as the sender named it.
    pub channel_id: String,
    pub duplicate: bool,
}

impl SendAck {
    /// The ack as JSON (the `sendack` frame without `type` and `id`, and the API answer).
    pub fn json(&self) -> Value {
        json!({
            "message_id": self.message.id,
            "client_msg_id": self.message.client_msg_id,
            "channel_type": self.message.channel.kind,
            "channel_id": self.channel_id,
            "seq": self.message.seq,
            "version": self.message.version,
            "created_at": crate::rfc3339_ms(self.message.created_at),
            "duplicate": self.duplicate,
        })
    }
}

#[derive(Deserialize)]
struct PreviewFields {
    preview: Option<String>,
    text: Option<String>,
}

/// A message's preview: its payload's `preview` string, else its `text`
/// string, else the payload itself when it is a string; cut to `chars`.
pub fn preview_of(payload: &str, chars: usize) -> String {
    let text = match serde_json::from_str::<PreviewFields>(payload) {
        Ok(PreviewFields {
            preview: Some(p), ..
        }) => p,
        Ok(PreviewFields { text: Some(t), .. }) => t,
        Ok(_) => String::new(),
        Err(_) => serde_json::from_str::<String>(payload).unwrap_or_default(),
    };
    match text.char_indices().nth(chars) {
        Some((at, _)) => text[..at].to_string(),
        None => text,
    }
}

impl Messaging {
    pub fn new(
        config: config::Handle,
        messages: Arc<dyn MessageStore>,
        delivery: Arc<dyn Delivery>,
        plugins: Arc<PluginRegistry>,
        metrics: Arc<Metrics>,
        wakeup: Wakeup,
    ) -> Messaging {
        Messaging {
            config,
            messages,
            delivery,
            plugins,
            metrics,
            wakeup,
        }
    }

    /// Validates, commits and fans out one message.
    pub async fn send(&self, req: SendRequest<'_>) -> Result<SendAck, MessagingError> {
        let cfg = self.config.load();
        let m = &cfg.messaging;
        let kind = channel_type(req.channel_type)?;
        check_id("channel_id", req.channel_id)?;
        if let Some(cid) = req.client_msg_id {
            if cid.is_empty() || cid.len() > 128 {
                return Err(MessagingError::BadRequest(
                    "`client_msg_id` must be 1 to 128 bytes".into(),
                ));
            }
        }
        let payload = req.payload.get();
        if payload.len() > m.max_payload_size {
            return Err(MessagingError::PayloadTooLarge {
                size: payload.len(),
                limit: m.max_payload_size,
            });
        }
        // The one nesting check of every path that sends (frames, the API):
        // whatever is accepted must read back inside every envelope.
        json::check_depth(payload, MAX_DEPTH)?;
        // Everything that takes the payload (webhook receivers, plugins, the
        // API's answers) reads it as a value: one that would not read back is
        // refused here, before anything is written.
        json::check_reads_back(payload).map_err(|e| {
            MessagingError::BadRequest(format!("`payload` does not read back: {e}"))
        })?;
        if kind == ChannelType::Person && req.channel_id == m.system_user && !req.system {
            return Err(MessagingError::BadRequest(format!(
                "`{}` is the system user (messaging.system_user); it cannot be messaged",
                m.system_user
            )));
        }
        let channel = Channel::addressed(&req.sender, kind, req.channel_id);
        let new = NewMessage {
            id: crate::new_id("msg"),
            channel,
            sender: req.sender.clone(),
            system: req.system,
            client_msg_id: req.client_msg_id.map(str::to_string),
            payload: req.payload.to_owned(),
            preview: preview_of(payload, m.preview_chars),
            created_at: crate::now_ms(),
            max_members: m.max_group_members,
        };
        let recipient = req.channel_id.to_string();
        let event =
            Box::new(move |msg: &StoredMessage| crate::events::message_created(msg, &recipient));
        // Runs on the writer right after the commit, in commit order: the
        // seam keeps that order per channel.
        let delivery = self.delivery.clone();
        let origin = req.origin.clone();
        let on_append = Box::new(move |a: &crate::storage::messages::Appended| {
            delivery.fan_out(a.clone(), origin);
        });
        let started = Instant::now();
        let result = self.messages.append_message(new, event, on_append).await?;
        self.metrics
            .message_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(a) => {
                if !a.duplicate {
                    self.wakeup.wake();
                }
                Ok(SendAck {
                    channel_id: a.message.channel.id_for(&req.sender),
                    duplicate: a.duplicate,
                    message: a.message,
                })
            }
            Err(SendRejected::UnknownGroup) => {
                Err(MessagingError::UnknownGroup(req.channel_id.to_string()))
            }
            Err(SendRejected::NotMember) => Err(MessagingError::NotMember {
                user: req.sender,
                group: req.channel_id.to_string(),
            }),
        }
    }
}

/// A message sync request: exactly one of the three positions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncQuery {
    pub channel_type: Option<String>,
    pub channel_id: Option<String>,
    /// Messages of the channel after this sequence number (0: from the start).
    pub after_seq: Option<u64>,
    /// Messages of the channel before this sequence number (history, newest page first).
    pub before_seq: Option<u64>,
    /// Messages of every conversation after this version (the per-user cursor).
    pub after_version: Option<u64>,
    pub limit: Option<usize>,
}

/// One page of a message sync, cut to a byte budget. It is written as the
/// `messages` frame (by `gateway::protocol`) or as the server API's answer
/// ([`SyncPage::json`]).
#[derive(Debug, Serialize)]
pub struct SyncPage {
    #[serde(skip_serializing_if = "Option::is_none")]
    channel_type: Option<ChannelType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel_id: Option<String>,
    /// The messages, each a raw view with its payload as stored.
    messages: Vec<Box<RawValue>>,
    more: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after_version: Option<u64>,
}

impl SyncPage {
    /// The answer of `GET /v1/users/{uid}/messages`. The API answers a JSON
    /// value, so each payload is read again here; one that does not read
    /// (stored before the nesting limit existed) is an error, never `null`.
    pub fn json(&self) -> Result<Value, MessagingError> {
        serde_json::to_value(self).map_err(|e| MessagingError::Unreadable {
            what: format!("stored message `{}`", unreadable_id(&self.messages)),
            reason: e.to_string(),
        })
    }
}

/// The id of the first message of `items` whose view does not read as a value.
fn unreadable_id(items: &[Box<RawValue>]) -> String {
    #[derive(Deserialize)]
    struct Id {
        message_id: String,
    }
    items
        .iter()
        .find(|m| serde_json::from_str::<Value>(m.get()).is_err())
        .and_then(|m| serde_json::from_str::<Id>(m.get()).ok())
        .map(|m| m.message_id)
        .unwrap_or_default()
}

impl Messaging {
    /// Answers a message sync for `user`: at most `limit` messages and, beside
    /// that, at most `budget` bytes of message views (at least one message, so a
    /// page always moves on). A page cut short says `more` with the cursor to
    /// go on from.
    pub async fn sync_page(
        &self,
        user: &str,
        q: &SyncQuery,
        budget: usize,
    ) -> Result<SyncPage, MessagingError> {
        let cfg = self.config.load();
        let limit = q
            .limit
            .unwrap_or(cfg.messaging.sync_default_limit)
            .clamp(1, cfg.messaging.sync_max_limit);
        let positions = [
            q.after_seq.is_some(),
            q.before_seq.is_some(),
            q.after_version.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if positions != 1 {
            return Err(MessagingError::BadRequest(
                "name exactly one of `after_seq`, `before_seq` (with a channel) or `after_version`"
                    .into(),
            ));
        }
        let channel = match (&q.channel_type, &q.channel_id) {
            (Some(t), Some(id)) => {
                check_id("channel_id", id)?;
                Some(Channel::addressed(user, channel_type(t)?, id))
            }
            (None, None) => None,
            _ => {
                return Err(MessagingError::BadRequest(
                    "`channel_type` and `channel_id` go together".into(),
                ))
            }
        };
        let range = match (&channel, q.after_seq, q.before_seq, q.after_version) {
            (Some(c), Some(seq), _, _) => MessageRange::After {
                channel: c.clone(),
                seq,
            },
            (Some(c), _, Some(seq), _) => MessageRange::Before {
                channel: c.clone(),
                seq,
            },
            (None, _, _, Some(version)) => MessageRange::UserAfter { version },
            (None, _, _, _) => {
                return Err(MessagingError::BadRequest(
                    "`after_seq` and `before_seq` need `channel_type` and `channel_id`".into(),
                ))
            }
            (Some(_), _, _, _) => {
                return Err(MessagingError::BadRequest(
                    "`after_version` syncs every conversation: leave out the channel".into(),
                ))
            }
        };
        let page: MessagePage = self
            .messages
            .messages(user, range.clone(), limit)
            .await?
            .map_err(|e| refused(e, user, channel.as_ref(), q.after_version.unwrap_or(0)))?;
        let mut stored = page.messages;
        let mut items: Vec<Box<RawValue>> = stored
            .iter()
            .map(|m| render::message_raw(m, user))
            .collect();
        // History pages keep the messages nearest the cursor: the newest, at the end.
        let backwards = matches!(range, MessageRange::Before { .. });
        let sizes = items.iter().map(|m| m.get().len());
        let keep = if backwards {
            render::fitting(sizes.rev(), budget)
        } else {
            render::fitting(sizes, budget)
        };
        let cut = keep < items.len();
        if backwards {
            let from = items.len() - keep;
            items.drain(..from);
            stored.drain(..from);
        } else {
            items.truncate(keep);
            stored.truncate(keep);
        }
        let mut out = SyncPage {
            channel_type: channel.as_ref().map(|c| c.kind),
            channel_id: channel.as_ref().map(|c| c.id_for(user)),
            messages: items,
            more: page.more || cut,
            next_after_seq: None,
            next_before_seq: None,
            next_after_version: None,
        };
        // Where the next page starts, in the same direction.
        match range {
            MessageRange::After { seq, .. } => {
                out.next_after_seq = Some(stored.last().map(|m| m.seq).unwrap_or(seq));
            }
            MessageRange::Before { seq, .. } => {
                out.next_before_seq = Some(stored.first().map(|m| m.seq).unwrap_or(seq));
            }
            MessageRange::UserAfter { version } => {
                out.next_after_version = Some(stored.last().map(|m| m.version).unwrap_or(version));
            }
        }
        Ok(out)
    }

    /// Starts the task that prunes old conversation tombstones, every
    /// `conversations.prune_interval` while the service exists. A failed pass
    /// (storage unavailable, say) is logged and tried again at the next one.
    pub fn start_maintenance(self: &Arc<Self>) {
        let weak: Weak<Messaging> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(this) = weak.upgrade() else { return };
                let c = this.config.load().conversations.clone();
                let horizon = crate::now_ms() - c.tombstone_retention.as_millis() as i64;
                match this.messages.prune_conversations(horizon).await {
                    Ok(0) => {}
                    Ok(n) => {
                        this.metrics.conversations_pruned.inc_by(n as u64);
                        tracing::debug!(count = n, "pruned deleted-conversation tombstones");
                    }
                    Err(StorageError::Closed) => return,
                    Err(e) => tracing::warn!(error = %e, "pruning conversation tombstones failed"),
                }
                drop(this);
                tokio::time::sleep(c.prune_interval).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews() {
        assert_eq!(preview_of(r#"{"text":"hello"}"#, 100), "hello");
        assert_eq!(
            preview_of(r#"{"text":"hello","preview":"[image]"}"#, 100),
            "[image]"
        );
        assert_eq!(preview_of(r#""just text""#, 4), "just");
        assert_eq!(preview_of(r#"{"n":1}"#, 100), "");
        assert_eq!(preview_of(r#"[1,2]"#, 100), "");
        assert_eq!(preview_of(r#"{"text":"héllo wörld"}"#, 5), "héllo");
    }
}
