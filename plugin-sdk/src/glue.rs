//! The bridge between wit-bindgen's generated traits and types and the SDK's
//! plain ones. [`Glue<T>`] implements every generated `Guest` trait by
//! converting arguments, calling the plugin's own trait impl on `T` and
//! converting the answer back; [`export_plugin!`](crate::export_plugin)
//! exports `Glue<YourPlugin>` for the hooks of the chosen world.
//!
//! All of it is hidden from the docs: nothing here is part of the API.

use std::marker::PhantomData;

use crate::bindings::base::exports::plugboard::plugin::plugin as wit_plugin;
use crate::bindings::base::plugboard::plugin::types as wit;
use crate::bindings::control::exports::plugboard::plugin::control_handler as wit_control;
use crate::bindings::filter::exports::plugboard::plugin::conversation_filter as wit_filter;
use crate::bindings::formatter::exports::plugboard::plugin::webhook_formatter as wit_formatter;
use crate::{
    ChannelType, Config, ControlHandler, ControlRequest, Conversation, ConversationFilter,
    Decision, Delivery, Event, HookError, KvError, LogLevel, MessageSummary, Plan, Plugin,
    Priority, Verdict, Viewer, WebhookFormatter,
};

/// Exported in place of the plugin type `T`; never constructed.
pub struct Glue<T>(PhantomData<fn() -> T>);

impl<T: Plugin> wit_plugin::Guest for Glue<T> {
    fn init(config: Vec<wit::Pair>) -> Result<(), wit::HookError> {
        let config: Config = config.into_iter().map(|p| (p.key, p.value)).collect();
        T::init(&config).map_err(Into::into)
    }
}

impl<T: WebhookFormatter> wit_formatter::Guest for Glue<T> {
    fn format(
        event: wit_formatter::Event,
    ) -> Result<Option<wit_formatter::OutgoingRequest>, wit::HookError> {
        let event = Event {
            id: event.id,
            event_type: event.event_type,
            timestamp_ms: event.timestamp_ms,
            data: event.data,
            endpoint: event.endpoint,
        };
        match T::format(event) {
            Ok(request) => Ok(request.map(|r| wit_formatter::OutgoingRequest {
                body: r.body,
                content_type: r.content_type,
                headers: r
                    .headers
                    .into_iter()
                    .map(|(key, value)| wit::Pair { key, value })
                    .collect(),
                path_suffix: r.path_suffix,
                query: r.query,
            })),
            Err(e) => Err(e.into()),
        }
    }
}

impl<T: ConversationFilter> wit_filter::Guest for Glue<T> {
    fn filter(
        viewer: wit_filter::Viewer,
        conversations: Vec<wit_filter::Conversation>,
    ) -> Result<Vec<wit_filter::Verdict>, wit::HookError> {
        let viewer = Viewer {
            user_id: viewer.user_id,
            device_id: viewer.device_id,
        };
        let conversations = conversations.into_iter().map(conversation_in).collect();
        match T::filter(viewer, conversations) {
            Ok(verdicts) => Ok(verdicts
                .into_iter()
                .map(|v| match v {
                    Verdict::Keep => wit_filter::Verdict::Keep,
                    Verdict::Drop => wit_filter::Verdict::Drop,
                    Verdict::Rewrite(c) => wit_filter::Verdict::Rewrite(conversation_out(c)),
                })
                .collect()),
            Err(e) => Err(e.into()),
        }
    }
}

fn conversation_in(c: wit_filter::Conversation) -> Conversation {
    Conversation {
        channel_id: c.channel_id,
        channel_type: match c.channel_type {
            wit_filter::ChannelType::Person => ChannelType::Person,
            wit_filter::ChannelType::Group => ChannelType::Group,
        },
        unread: c.unread,
        version: c.version,
        updated_at_ms: c.updated_at_ms,
        last_message: c.last_message.map(|m| MessageSummary {
            message_id: m.message_id,
            seq: m.seq,
            sender: m.sender,
            preview: m.preview,
        }),
    }
}

fn conversation_out(c: Conversation) -> wit_filter::Conversation {
    wit_filter::Conversation {
        channel_id: c.channel_id,
        channel_type: match c.channel_type {
            ChannelType::Person => wit_filter::ChannelType::Person,
            ChannelType::Group => wit_filter::ChannelType::Group,
        },
        unread: c.unread,
        version: c.version,
        updated_at_ms: c.updated_at_ms,
        last_message: c.last_message.map(|m| wit_filter::MessageSummary {
            message_id: m.message_id,
            seq: m.seq,
            sender: m.sender,
            preview: m.preview,
        }),
    }
}

impl<T: ControlHandler> wit_control::Guest for Glue<T> {
    fn handle(
        request: wit_control::ControlRequest,
    ) -> Result<wit_control::Decision, wit::HookError> {
        let request = ControlRequest {
            id: request.id,
            kind: request.kind,
            payload: request.payload,
            priority: priority_in(request.priority),
            targets: request.targets,
            group_id: request.group_id,
            persist: request.persist,
            ttl_ms: request.ttl_ms,
            receipt: request.receipt,
        };
        match T::handle(request) {
            Ok(Decision::Deliver(plan)) => Ok(wit_control::Decision::Deliver(plan_out(plan))),
            Ok(Decision::Reject(why)) => Ok(wit_control::Decision::Reject(why)),
            Err(e) => Err(e.into()),
        }
    }
}

fn priority_in(p: wit_control::Priority) -> Priority {
    match p {
        wit_control::Priority::High => Priority::High,
        wit_control::Priority::Normal => Priority::Normal,
        wit_control::Priority::Low => Priority::Low,
    }
}

fn plan_out(plan: Plan) -> wit_control::Plan {
    wit_control::Plan {
        payload: plan.payload,
        priority: match plan.priority {
            Priority::High => wit_control::Priority::High,
            Priority::Normal => wit_control::Priority::Normal,
            Priority::Low => wit_control::Priority::Low,
        },
        targets: plan
            .targets
            .into_iter()
            .map(|Delivery { user_id, payload }| wit_control::Delivery { user_id, payload })
            .collect(),
    }
}

impl From<HookError> for wit::HookError {
    fn from(e: HookError) -> Self {
        match e {
            HookError::InvalidInput(m) => Self::InvalidInput(m),
            HookError::BadConfig(m) => Self::BadConfig(m),
            HookError::HostFailure(m) => Self::HostFailure(m),
            HookError::Other(m) => Self::Other(m),
        }
    }
}

impl From<wit::KvError> for KvError {
    fn from(e: wit::KvError) -> Self {
        match e {
            wit::KvError::BadKey(m) => Self::BadKey(m),
            wit::KvError::TooLarge(n) => Self::TooLarge(n),
            wit::KvError::QuotaExceeded(m) => Self::QuotaExceeded(m),
            wit::KvError::Storage(m) => Self::Storage(m),
            wit::KvError::Other(m) => Self::Other(m),
        }
    }
}

impl From<LogLevel> for wit::LogLevel {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Trace => Self::Trace,
            LogLevel::Debug => Self::Debug,
            LogLevel::Info => Self::Info,
            LogLevel::Warn => Self::Warn,
            LogLevel::Error => Self::Error,
        }
    }
}

/// Compile-time checks that give a readable error when the plugin type does
/// not implement what its world needs (instead of one about `Glue<T>`).
pub const fn assert_formatter<T: WebhookFormatter>() {}
/// See [`assert_formatter`].
pub const fn assert_filter<T: ConversationFilter>() {}
/// See [`assert_formatter`].
pub const fn assert_control<T: ControlHandler>() {}
