//! The Rust SDK for plugboard plugins.
//!
//! A plugboard plugin is a WebAssembly component that the gateway calls at
//! fixed points (hooks). This crate hides the component plumbing
//! (wit-bindgen over `wit/plugboard.wit`, package `plugboard:plugin@0.1.0`)
//! behind plain Rust: a trait per hook with default methods, plain types for
//! what the hooks take and return, wrappers for what the gateway offers
//! ([`host`]), and one macro, [`export_plugin!`], that exports your type for
//! the hooks of one world.
//!
//! | world | hooks exported | your type implements |
//! | --- | --- | --- |
//! | `formatter` | `webhook-formatter` | [`Plugin`] + [`WebhookFormatter`] |
//! | `filter` | `conversation-filter` | [`Plugin`] + [`ConversationFilter`] |
//! | `control` | `control-handler` | [`Plugin`] + [`ControlHandler`] |
//! | `full` | all three | all four traits |
//!
//! Every world also exports `plugin` (its `init`). The gateway detects which
//! hooks a component serves from its exports, so export only what you
//! implement.
//!
//! # Example
//!
//! A formatter that posts `user.online` and `user.offline` as a small JSON
//! object and declines every other event:
//!
//! ```
//! use plugboard_plugin_sdk::{
//!     export_plugin, host, Config, Event, EventPayload, HookError, OutgoingRequest, Plugin,
//!     WebhookFormatter,
//! };
//!
//! struct Presence;
//!
//! impl Plugin for Presence {
//!     fn init(config: &Config) -> Result<(), HookError> {
//!         // Refuse the plugin at load if its config is unusable.
//!         config.require("app")?;
//!         Ok(())
//!     }
//! }
//!
//! impl WebhookFormatter for Presence {
//!     fn format(event: Event) -> Result<Option<OutgoingRequest>, HookError> {
//!         let app = host::config().require("app")?.to_owned();
//!         let body = match event.payload()? {
//!             EventPayload::UserOnline(p) => presence(&app, &p.user_id, true),
//!             EventPayload::UserOffline(p) => presence(&app, &p.user_id, false),
//!             _ => return Ok(None), // declined: skipped for this endpoint
//!         };
//!         host::info("formatted a presence change");
//!         Ok(Some(OutgoingRequest::json(&body)?.with_path_suffix("/presence")))
//!     }
//! }
//!
//! /// The pure part, testable natively with `cargo test`.
//! fn presence(app: &str, user: &str, online: bool) -> serde_json::Value {
//!     serde_json::json!({ "app": app, "user": user, "online": online })
//! }
//!
//! export_plugin!(Presence: formatter);
//! # fn main() {}
//! ```
//!
//! # Building and loading
//!
//! Make the plugin crate a `cdylib` and build it for WASI preview 2; the
//! result is a component, ready for the gateway:
//!
//! ```text
//! [lib]
//! crate-type = ["cdylib"]
//!
//! $ cargo build --target wasm32-wasip2 --release
//! $ ls target/wasm32-wasip2/release/*.wasm
//! ```
//!
//! Then name it in the gateway's config (`[[plugins]] name = "…" file = "….wasm"`,
//! with its `config` map) and point a hook at it, e.g. a webhook endpoint's
//! `formatter = "…"`.
//!
//! # Rules of the sandbox
//!
//! - A plugin reaches nothing but [`host`]: no files, network, environment or
//!   other clock. `std::fs`, `std::net` and `std::env` compile but fail.
//! - Hook functions take no `self`: an instance may be dropped and made
//!   anew at any time (after a trap, a timeout, a hot swap), so keep state
//!   that must last in the key-value store ([`host::kv_set`]).
//! - A panic traps the instance; the gateway counts it as a trap (its message
//!   reaches the plugin log through stderr), drops that instance and applies
//!   the plugin's on-error policy. Return a [`HookError`] instead.
//! - [`host`] functions panic outside the gateway, so keep logic in plain
//!   functions to unit-test it natively.

#![warn(missing_docs)]

#[doc(hidden)]
pub mod bindings;
mod control;
mod filter;
mod formatter;
mod glue;
pub mod host;
mod types;

pub use control::{ControlRequest, Decision, Delivery, Plan, Priority};
pub use filter::{ChannelType, Conversation, MessageSummary, Verdict, Viewer};
pub use formatter::{
    event_type, ConnectionClosed, ConnectionOpened, Event, EventPayload, OutgoingRequest,
    ServiceChange, UserOffline, UserOnline,
};
pub use types::{Config, HookError, KvError, LogLevel};

/// What every plugin implements: its initialisation.
///
/// Implement it (an empty `impl Plugin for MyPlugin {}` keeps the default)
/// alongside the hook traits of your world.
pub trait Plugin {
    /// Called once per instance before any hook, with the plugin's config
    /// map. An error refuses the plugin (at load or hot swap) with its
    /// message; use [`HookError::BadConfig`] for a config problem. The default
    /// accepts any config.
    fn init(config: &Config) -> Result<(), HookError> {
        let _ = config;
        Ok(())
    }
}

/// The `webhook-formatter` hook: turns a gateway event into the HTTP request
/// sent to a webhook endpoint. Signing, retries and ordering stay in the
/// gateway.
pub trait WebhookFormatter: Plugin {
    /// Formats one event. `Ok(None)` declines it: it is skipped for this
    /// endpoint and counted. The default declines every event.
    fn format(event: Event) -> Result<Option<OutgoingRequest>, HookError> {
        let _ = event;
        Ok(None)
    }
}

/// The `conversation-filter` hook: decides which conversations a viewer sees
/// in a conversation list, and how.
pub trait ConversationFilter: Plugin {
    /// Filters a page of a viewer's conversations. The answer has one verdict
    /// per input conversation, in the same order. The default keeps all.
    fn filter(viewer: Viewer, conversations: Vec<Conversation>) -> Result<Vec<Verdict>, HookError> {
        let _ = viewer;
        Ok(vec![Verdict::Keep; conversations.len()])
    }
}

/// The `control-handler` hook: checks, rewrites and targets business control
/// messages before delivery.
pub trait ControlHandler: Plugin {
    /// Decides what happens to one control request. The default delivers it
    /// unchanged ([`Decision::deliver_unchanged`]).
    fn handle(request: ControlRequest) -> Result<Decision, HookError> {
        Ok(Decision::deliver_unchanged(&request))
    }
}

/// Exports a plugin type for one world: `formatter`, `filter`, `control` or
/// `full`. Use it once, at the root of the plugin crate.
///
/// ```
/// use plugboard_plugin_sdk::{Plugin, WebhookFormatter};
///
/// struct MyPlugin;
/// impl Plugin for MyPlugin {}
/// impl WebhookFormatter for MyPlugin {} // declines everything
///
/// plugboard_plugin_sdk::export_plugin!(MyPlugin: formatter);
/// # fn main() {}
/// ```
///
/// The component then exports `plugin` plus exactly the hooks of that world
/// (see the table in the crate docs). The type must implement [`Plugin`] and
/// the world's hook traits; a missing one is a compile error naming the
/// trait. On targets other than `wasm32` only those checks remain, so the
/// crate still builds (and its tests run) natively.
///
/// The expansion contains the exported `extern "C"` functions, so it allows
/// `unsafe_code` for itself; a crate with `#![forbid(unsafe_code)]` cannot
/// use it (`deny` is fine).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty : formatter) => {
        $crate::__export_plugin!($plugin; formatter);
    };
    ($plugin:ty : filter) => {
        $crate::__export_plugin!($plugin; filter);
    };
    ($plugin:ty : control) => {
        $crate::__export_plugin!($plugin; control);
    };
    ($plugin:ty : full) => {
        $crate::__export_plugin!($plugin; formatter filter control);
    };
}

/// The body of [`export_plugin!`]; not part of the API.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin {
    ($plugin:ty; $($hook:ident)+) => {
        const _: () = {
            $( $crate::__export_plugin!(@assert $plugin; $hook); )+
        };
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        const _: () = {
            type __PlugboardGlue = $crate::__private::Glue<$plugin>;
            $crate::__private::bindings::base::export!(
                __PlugboardGlue with_types_in $crate::__private::bindings::base
            );
            $(
                $crate::__private::bindings::$hook::export!(
                    __PlugboardGlue with_types_in $crate::__private::bindings::$hook
                );
            )+
        };
    };
    (@assert $plugin:ty; formatter) => {
        $crate::__private::assert_formatter::<$plugin>()
    };
    (@assert $plugin:ty; filter) => {
        $crate::__private::assert_filter::<$plugin>()
    };
    (@assert $plugin:ty; control) => {
        $crate::__private::assert_control::<$plugin>()
    };
}

/// What [`export_plugin!`] expands to refers to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings;
    pub use crate::glue::{assert_control, assert_filter, assert_formatter, Glue};
}
