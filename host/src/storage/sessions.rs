//! Sessions: one durable row per open connection, and the lifecycle events
//! written with each change.
//!
//! Properties every engine keeps:
//! - **Exactly-once close.** A close that finds no session row writes
//!   nothing and returns `None`; of two concurrent closes of one session
//!   (the session task and a sweep, or two processes) exactly one writes
//!   `connection.closed`.
//! - **Presence is counted inside the transaction** that inserts or deletes
//!   the row, from the session rows themselves (every node's), so
//!   `user.online` / `user.offline` follow the lifecycle events exactly even
//!   when one user's connections open and close concurrently on several
//!   processes.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use super::{NewEvent, Result};

/// The durable record of one open connection.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionRecord {
    pub connection_id: String,
    pub user_id: String,
    pub device_id: String,
    pub node_id: String,
    /// Unix milliseconds.
    pub opened_at: i64,
    pub remote_addr: String,
}

/// A user's presence after a change, counted inside the transaction that made it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
pub struct Presence {
    /// Open connections of the user, on all nodes.
    pub connections: u32,
    /// Distinct devices among them.
    pub devices: u32,
}

/// Builds the events of a session change once the new presence is known.
pub type SessionEvents = Arc<dyn Fn(&SessionRecord, Presence) -> Vec<NewEvent> + Send + Sync>;

/// The session contract.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Records an open session and its events (built from the presence after the insert).
    async fn open_session(&self, record: SessionRecord, events: SessionEvents) -> Result<Presence>;

    /// Removes a session and records its events. Returns `None`, and writes
    /// nothing, when the session is not recorded (already closed): this is
    /// what makes `connection.closed` exactly-once.
    async fn close_session(
        &self,
        connection_id: &str,
        events: SessionEvents,
    ) -> Result<Option<Presence>>;

    /// Closes every session recorded for `node_id` (left behind by a crash),
    /// each with its own events. Returns how many were closed.
    async fn close_node_sessions(&self, node_id: &str, events: SessionEvents) -> Result<usize>;

    /// A user's presence and open sessions.
    async fn presence(&self, user_id: &str) -> Result<(Presence, Vec<SessionRecord>)>;
}
