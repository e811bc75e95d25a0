//! The client WebSocket gateway: upgrade and authentication, the session
//! task that owns each socket, the frame protocol, the registry of live
//! sessions, and the lifecycle state machine that records every open
//! connection's `connection.opened` and `connection.closed` exactly once.
//!
//! It does not deliver webhooks (that is [`crate::outbox`]); it only writes
//! events through [`crate::storage`] in the same transaction as the session
//! change.

pub mod lifecycle;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod upgrade;
pub mod wire;

pub use lifecycle::CloseReason;
pub use registry::{LiveSession, Registry};
