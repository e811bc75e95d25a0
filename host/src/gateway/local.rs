//! The single-node [`Delivery`]: this node's registry of live sessions and
//! its ordered fan-out shards.
//!
//! A push is rendered here, once per user it goes to (person channels name
//! the other user), by [`super::protocol::push_frame`], and queued on each
//! connection's bounded queue of the push's lane; the session task writes
//! it. A full queue closes that connection as a slow consumer (4004) and the
//! push does not count as taken. Committed messages go through the fan-out
//! shards ([`super::fanout`]), which keep each channel in commit order.

use std::collections::HashSet;
use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use super::fanout::{Fanout, Job};
use super::protocol;
use super::registry::{LiveSession, Registry};
use crate::delivery::{CloseReason, Connection, Delivery, Lane, Push};
use crate::metrics::Metrics;
use crate::storage::messages::Appended;

/// Fan-out tasks; channels are spread over them by hash.
const FANOUT_SHARDS: usize = 4;

/// This node's sessions, as the rest of the gateway reaches them.
pub struct LocalDelivery {
    registry: Arc<Registry>,
    fanout: Fanout,
}

impl LocalDelivery {
    /// Starts the fan-out shards on the current runtime.
    pub fn start(registry: Arc<Registry>, metrics: Arc<Metrics>) -> LocalDelivery {
        let fanout = Fanout::start(registry.clone(), metrics, FANOUT_SHARDS);
        LocalDelivery { registry, fanout }
    }
}

impl LocalDelivery {
    /// The registry of this node's sessions.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// [`Delivery::to_user`] on this node only.
    pub fn to_user_here(&self, user: &str, push: &Push, lane: Lane, except: Option<&str>) -> usize {
        let sessions: Vec<_> = self
            .registry
            .user_sessions(user)
            .into_iter()
            .filter(|s| Some(s.connection_id.as_str()) != except)
            .collect();
        if sessions.is_empty() {
            return 0;
        }
        let frame = Message::text(protocol::push_frame(push, user));
        sessions
            .iter()
            .filter(|s| queue(s, frame.clone(), lane))
            .count()
    }

    /// [`Delivery::to_connection`] on this node only.
    pub fn to_connection_here(
        &self,
        user: &str,
        connection_id: &str,
        push: &Push,
        lane: Lane,
    ) -> bool {
        let Some(session) = self
            .registry
            .user_sessions(user)
            .into_iter()
            .find(|s| s.connection_id == connection_id)
        else {
            return false;
        };
        queue(
            &session,
            Message::text(protocol::push_frame(push, user)),
            lane,
        )
    }

    /// [`Delivery::kick_user`] on this node only.
    pub fn kick_user_here(
        &self,
        user: &str,
        device: Option<&str>,
        reason: CloseReason,
        message: &str,
    ) -> Vec<String> {
        self.registry
            .user_sessions(user)
            .into_iter()
            .filter(|s| device.is_none_or(|d| d == s.device_id))
            .filter(|s| s.request_close(reason, message))
            .map(|s| s.connection_id.clone())
            .collect()
    }

    /// [`Delivery::kick_connection`] on this node only.
    pub fn kick_connection_here(
        &self,
        user: &str,
        connection_id: &str,
        reason: CloseReason,
        message: &str,
    ) -> bool {
        self.registry
            .user_sessions(user)
            .iter()
            .find(|s| s.connection_id == connection_id)
            .is_some_and(|s| s.request_close(reason, message))
    }

    /// [`Delivery::online`] on this node only.
    pub fn online_here(&self, user: Option<&str>) -> Vec<Connection> {
        let sessions = match user {
            Some(u) => self.registry.user_sessions(u),
            None => self.registry.all(),
        };
        sessions.iter().map(|s| self.registry.view(s)).collect()
    }

    /// [`Delivery::online_among`] on this node only.
    pub fn online_among_here(&self, users: &[String]) -> HashSet<String> {
        users
            .iter()
            .filter(|u| !self.registry.user_sessions(u).is_empty())
            .cloned()
            .collect()
    }

    /// [`Delivery::online_users`] on this node only.
    pub fn online_users_here(&self) -> HashSet<String> {
        self.registry
            .all()
            .iter()
            .map(|s| s.user_id.clone())
            .collect()
    }

    /// [`Delivery::close_all`] (always this node only).
    pub fn close_all_here(&self, reason: CloseReason, message: &str) -> usize {
        let sessions = self
            .registry
            .all()
            .iter()
            .filter(|s| s.request_close(reason, message))
            .count();
        sessions + self.registry.close_pending(reason, message)
    }
}

/// Queues `frame` on `session`'s queue of `lane`; true when it was taken.
fn queue(session: &LiveSession, frame: Message, lane: Lane) -> bool {
    match lane {
        Lane::Normal => session.push(frame).is_ok(),
        Lane::Urgent => session.push_urgent(frame).is_ok(),
    }
}

#[async_trait::async_trait]
impl Delivery for LocalDelivery {
    fn fan_out(&self, appended: Appended, origin: Option<String>) {
        self.fanout.queue(Job { appended, origin });
    }

    async fn to_user(&self, user: &str, push: &Push, lane: Lane, except: Option<&str>) -> usize {
        self.to_user_here(user, push, lane, except)
    }

    async fn to_connection(
        &self,
        user: &str,
        connection_id: &str,
        push: &Push,
        lane: Lane,
    ) -> bool {
        self.to_connection_here(user, connection_id, push, lane)
    }

    async fn kick_user(
        &self,
        user: &str,
        device: Option<&str>,
        reason: CloseReason,
        message: &str,
    ) -> Vec<String> {
        self.kick_user_here(user, device, reason, message)
    }

    async fn kick_connection(
        &self,
        user: &str,
        connection_id: &str,
        reason: CloseReason,
        message: &str,
    ) -> bool {
        self.kick_connection_here(user, connection_id, reason, message)
    }

    fn close_all(&self, reason: CloseReason, message: &str) -> usize {
        self.close_all_here(reason, message)
    }

    async fn online(&self, user: Option<&str>) -> Vec<Connection> {
        self.online_here(user)
    }

    async fn online_among(&self, users: &[String]) -> HashSet<String> {
        self.online_among_here(users)
    }

    async fn online_users(&self) -> HashSet<String> {
        self.online_users_here()
    }
}
