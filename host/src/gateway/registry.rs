//! The registry of live sessions on this node, partitioned by user.
//!
//! It answers "which sockets does this user have here" for the delivery seam
//! (`local::LocalDelivery`: fan-out, pushes, kicks) and the multi-device
//! policy, and lets a drain reach every connection: the admitted sessions,
//! and the upgrades still waiting for their `auth` frame (which have no user
//! yet, so they are kept apart, by a number). It holds no durable state: the
//! session rows in storage are the record; this is the routing table.
//! Sessions are sharded by user id so no lock is global. Only the gateway
//! holds it; everyone else goes through [`crate::delivery::Delivery`].

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::config::{DeviceLimitPolicy, DevicesConfig, SameDevicePolicy};
use crate::delivery::{CloseReason, Connection};

const SHARDS: usize = 64;

/// A request, from outside the session task, to close its connection.
#[derive(Debug, Clone)]
pub struct CloseCommand {
    pub reason: CloseReason,
    pub message: String,
}

/// What the rest of the gateway holds of one session. The session task owns
/// the socket; everyone else talks to it through this handle.
#[derive(Debug)]
pub struct LiveSession {
    pub connection_id: String,
    pub user_id: String,
    pub device_id: String,
    pub remote_addr: String,
    /// Unix ms when admitted.
    pub admitted_at: i64,
    /// Frames waiting to be written; bounded by `gateway.outbound_queue`.
    outbound: mpsc::Sender<Message>,
    /// High-priority frames, written before anything waiting in `outbound`.
    urgent: mpsc::Sender<Message>,
    /// Taken by the first close request; later requests are no-ops.
    close: Mutex<Option<oneshot::Sender<CloseCommand>>>,
    /// Set once the open is recorded.
    opened: AtomicBool,
}

/// Why a frame could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// Queue full: the session is being closed as a slow consumer.
    SlowConsumer,
    /// The session is gone.
    Closed,
}

impl LiveSession {
    pub fn new(
        connection_id: String,
        user_id: String,
        device_id: String,
        remote_addr: String,
        queue: usize,
    ) -> (Arc<LiveSession>, Queues, oneshot::Receiver<CloseCommand>) {
        let (out_tx, out_rx) = mpsc::channel(queue);
        let (urgent_tx, urgent_rx) = mpsc::channel(queue);
        let (close_tx, close_rx) = oneshot::channel();
        let s = Arc::new(LiveSession {
            connection_id,
            user_id,
            device_id,
            remote_addr,
            admitted_at: crate::now_ms(),
            outbound: out_tx,
            urgent: urgent_tx,
            close: Mutex::new(Some(close_tx)),
            opened: AtomicBool::new(false),
        });
        (
            s,
            Queues {
                normal: out_rx,
                urgent: urgent_rx,
            },
            close_rx,
        )
    }

    /// Asks the session to close. Returns false if a close was already requested.
    pub fn request_close(&self, reason: CloseReason, message: impl Into<String>) -> bool {
        let sender = self.close.lock().unwrap_or_else(|p| p.into_inner()).take();
        match sender {
            Some(tx) => tx
                .send(CloseCommand {
                    reason,
                    message: message.into(),
                })
                .is_ok(),
            None => false,
        }
    }

    /// Queues a frame. A full queue closes the session as a slow consumer
    /// instead of growing without bound.
    pub fn push(&self, frame: Message) -> Result<(), PushError> {
        self.push_to(&self.outbound, frame)
    }

    /// Queues a frame ahead of everything waiting in the normal queue.
    pub fn push_urgent(&self, frame: Message) -> Result<(), PushError> {
        self.push_to(&self.urgent, frame)
    }

    fn push_to(&self, queue: &mpsc::Sender<Message>, frame: Message) -> Result<(), PushError> {
        match queue.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.request_close(
                    CloseReason::SlowConsumer,
                    "outbound queue full: the client is not reading fast enough",
                );
                Err(PushError::SlowConsumer)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PushError::Closed),
        }
    }

    pub fn queued(&self) -> usize {
        self.outbound.max_capacity() - self.outbound.capacity()
    }

    pub fn mark_opened(&self) {
        self.opened.store(true, Ordering::Release);
    }

    pub fn is_opened(&self) -> bool {
        self.opened.load(Ordering::Acquire)
    }

    /// The session as the delivery seam lists it.
    pub fn view(&self, node_id: &str) -> Connection {
        Connection {
            connection_id: self.connection_id.clone(),
            node_id: node_id.to_string(),
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
            remote_addr: self.remote_addr.clone(),
            opened_at: crate::rfc3339_ms(self.admitted_at),
            open: self.is_opened(),
            queued_frames: self.queued(),
        }
    }
}

/// A connection of the same user on another node, as the multi-device
/// policy counts it.
#[derive(Debug, Clone)]
pub struct Elsewhere {
    pub connection_id: String,
    pub device_id: String,
    /// Unix ms when it was admitted there.
    pub admitted_at: i64,
}

/// What admitting a session displaces.
#[derive(Debug, Default)]
pub struct Displaced {
    /// Sessions of this node.
    pub local: Vec<Arc<LiveSession>>,
    /// Connection ids on other nodes.
    pub elsewhere: Vec<String>,
}

/// The receiving ends of a session's queues, owned by its task.
#[derive(Debug)]
pub struct Queues {
    pub normal: mpsc::Receiver<Message>,
    /// Drained before `normal`.
    pub urgent: mpsc::Receiver<Message>,
}

/// Why a new session was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected(pub String);

/// A connection upgraded without a token and waiting for its `auth` frame,
/// as the registry knows it: a drain sends `close` a command. Dropping it
/// takes the connection off the list.
#[derive(Debug)]
pub struct PendingAuth {
    registry: Arc<Registry>,
    id: u64,
    /// Receives the drain's close request, if one comes while waiting.
    pub close: oneshot::Receiver<CloseCommand>,
}

impl Drop for PendingAuth {
    fn drop(&mut self) {
        self.registry.pending_list().remove(&self.id);
    }
}

#[derive(Default)]
pub struct Registry {
    /// The node these sessions are on (shown in connection views).
    node_id: String,
    shards: Vec<Mutex<HashMap<String, Vec<Arc<LiveSession>>>>>,
    count: AtomicUsize,
    /// Connections waiting for their `auth` frame, by a number of their own.
    pending: Mutex<HashMap<u64, oneshot::Sender<CloseCommand>>>,
    next_pending: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("count", &self.len())
            .finish()
    }
}

impl Registry {
    /// A registry of the sessions of node `node_id`.
    pub fn new(node_id: &str) -> Registry {
        Registry {
            node_id: node_id.to_string(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            count: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            next_pending: AtomicU64::new(0),
        }
    }

    fn pending_list(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<CloseCommand>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists a connection that waits for its `auth` frame, so a drain reaches
    /// it. It stays listed until the returned handle is dropped.
    pub fn add_pending(self: &Arc<Self>) -> PendingAuth {
        let id = self.next_pending.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending_list().insert(id, tx);
        PendingAuth {
            registry: self.clone(),
            id,
            close: rx,
        }
    }

    /// Connections waiting for their `auth` frame.
    pub fn pending_len(&self) -> usize {
        self.pending_list().len()
    }

    /// Asks every connection waiting for its `auth` frame to close, and takes
    /// them off the list (each is asked once). Returns how many were asked.
    pub fn close_pending(&self, reason: CloseReason, message: &str) -> usize {
        let waiting: Vec<_> = self.pending_list().drain().map(|(_, tx)| tx).collect();
        let command = || CloseCommand {
            reason,
            message: message.to_string(),
        };
        // A send fails only if the connection just stopped waiting.
        waiting
            .into_iter()
            .filter_map(|tx| tx.send(command()).ok())
            .count()
    }

    fn shard(&self, user_id: &str) -> &Mutex<HashMap<String, Vec<Arc<LiveSession>>>> {
        let mut h = DefaultHasher::new();
        user_id.hash(&mut h);
        &self.shards[(h.finish() as usize) % self.shards.len()]
    }

    /// The node these sessions are on.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// A view of a session of this registry.
    pub fn view(&self, session: &LiveSession) -> Connection {
        session.view(&self.node_id)
    }

    /// Applies the multi-device policy and, if the session may open, adds it.
    /// `elsewhere` are the user's connections on other nodes (cluster mode),
    /// counted by the policy like local ones. Returns what it displaces;
    /// the caller asks them to close.
    pub fn admit(
        &self,
        session: Arc<LiveSession>,
        policy: &DevicesConfig,
        elsewhere: &[Elsewhere],
    ) -> Result<Displaced, Rejected> {
        let mut shard = self
            .shard(&session.user_id)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let existing = shard.entry(session.user_id.clone()).or_default();
        let mut victims: Vec<Arc<LiveSession>> = Vec::new();
        let mut remote: Vec<String> = Vec::new();
        let same: Vec<Arc<LiveSession>> = existing
            .iter()
            .filter(|s| s.device_id == session.device_id)
            .cloned()
            .collect();
        let same_elsewhere: Vec<String> = elsewhere
            .iter()
            .filter(|e| e.device_id == session.device_id)
            .map(|e| e.connection_id.clone())
            .collect();
        if !same.is_empty() || !same_elsewhere.is_empty() {
            match policy.same_device {
                SameDevicePolicy::Replace => {
                    victims.extend(same);
                    remote.extend(same_elsewhere);
                }
                SameDevicePolicy::Reject => {
                    return Err(Rejected(format!(
                        "device `{}` already has a connection and gateway.devices.same_device = \"reject\"",
                        session.device_id
                    )))
                }
                SameDevicePolicy::Allow => {}
            }
        }
        // Devices that remain besides the new one, oldest newest-connection first.
        let mut devices: Vec<(&str, i64)> = Vec::new();
        let others = existing
            .iter()
            .map(|s| (s.device_id.as_str(), s.admitted_at))
            .chain(
                elsewhere
                    .iter()
                    .map(|e| (e.device_id.as_str(), e.admitted_at)),
            );
        for (device, at) in others {
            if device == session.device_id {
                continue;
            }
            match devices.iter_mut().find(|(d, _)| *d == device) {
                Some((_, t)) => *t = (*t).max(at),
                None => devices.push((device, at)),
            }
        }
        // The new session's device counts once, whether or not it shares it.
        let total = devices.len() + 1;
        if total > policy.max_devices {
            match policy.when_full {
                DeviceLimitPolicy::Reject => {
                    return Err(Rejected(format!(
                        "user already has {} devices connected (gateway.devices.max_devices = {})",
                        devices.len(),
                        policy.max_devices
                    )))
                }
                DeviceLimitPolicy::ReplaceOldest => {
                    devices.sort_by_key(|(_, t)| *t);
                    let excess = total - policy.max_devices;
                    let drop: Vec<String> = devices
                        .iter()
                        .take(excess)
                        .map(|(d, _)| d.to_string())
                        .collect();
                    victims.extend(
                        existing
                            .iter()
                            .filter(|s| drop.contains(&s.device_id))
                            .cloned(),
                    );
                    remote.extend(
                        elsewhere
                            .iter()
                            .filter(|e| drop.contains(&e.device_id))
                            .map(|e| e.connection_id.clone()),
                    );
                }
            }
        }
        existing.push(session);
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(Displaced {
            local: victims,
            elsewhere: remote,
        })
    }

    /// Removes a session (idempotent).
    pub fn remove(&self, session: &LiveSession) {
        let mut shard = self
            .shard(&session.user_id)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(list) = shard.get_mut(&session.user_id) {
            let before = list.len();
            list.retain(|s| s.connection_id != session.connection_id);
            if list.len() < before {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            if list.is_empty() {
                shard.remove(&session.user_id);
            }
        }
    }

    pub fn user_sessions(&self, user_id: &str) -> Vec<Arc<LiveSession>> {
        let shard = self
            .shard(user_id)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        shard.get(user_id).cloned().unwrap_or_default()
    }

    pub fn all(&self) -> Vec<Arc<LiveSession>> {
        let mut out = Vec::with_capacity(self.len());
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(shard.values().flatten().cloned());
        }
        out
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, device: &str) -> Arc<LiveSession> {
        LiveSession::new(
            crate::new_id("conn"),
            user.into(),
            device.into(),
            "test".into(),
            4,
        )
        .0
    }

    fn policy(max: usize, same: SameDevicePolicy, full: DeviceLimitPolicy) -> DevicesConfig {
        DevicesConfig {
            max_devices: max,
            same_device: same,
            when_full: full,
        }
    }

    #[test]
    fn same_device_policies() {
        let r = Registry::new("node-1");
        let p = policy(5, SameDevicePolicy::Replace, DeviceLimitPolicy::Reject);
        let a = session("u", "phone");
        assert!(r.admit(a.clone(), &p, &[]).unwrap().local.is_empty());
        let victims = r.admit(session("u", "phone"), &p, &[]).unwrap().local;
        assert_eq!(victims.len(), 1);
        assert!(Arc::ptr_eq(&victims[0], &a));

        let r = Registry::new("node-1");
        let p = policy(5, SameDevicePolicy::Reject, DeviceLimitPolicy::Reject);
        r.admit(session("u", "phone"), &p, &[]).unwrap();
        assert!(r.admit(session("u", "phone"), &p, &[]).is_err());
        assert_eq!(r.len(), 1);

        let r = Registry::new("node-1");
        let p = policy(1, SameDevicePolicy::Allow, DeviceLimitPolicy::Reject);
        r.admit(session("u", "phone"), &p, &[]).unwrap();
        assert!(r
            .admit(session("u", "phone"), &p, &[])
            .unwrap()
            .local
            .is_empty());
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn device_limit_policies() {
        let r = Registry::new("node-1");
        let p = policy(
            2,
            SameDevicePolicy::Replace,
            DeviceLimitPolicy::ReplaceOldest,
        );
        let a = session("u", "a");
        r.admit(a.clone(), &p, &[]).unwrap();
        r.admit(session("u", "b"), &p, &[]).unwrap();
        let victims = r.admit(session("u", "c"), &p, &[]).unwrap().local;
        assert_eq!(victims.len(), 1);
        assert_eq!(victims[0].device_id, "a");

        let r = Registry::new("node-1");
        let p = policy(2, SameDevicePolicy::Replace, DeviceLimitPolicy::Reject);
        r.admit(session("u", "a"), &p, &[]).unwrap();
        r.admit(session("u", "b"), &p, &[]).unwrap();
        assert!(r.admit(session("u", "c"), &p, &[]).is_err());
        // Another user is unaffected.
        assert!(r.admit(session("v", "c"), &p, &[]).is_ok());
    }

    #[test]
    fn a_drain_reaches_connections_waiting_for_auth_once() {
        let r = Arc::new(Registry::new("node-1"));
        let mut waiting = r.add_pending();
        let left = r.add_pending();
        assert_eq!(r.pending_len(), 2);
        drop(left);
        assert_eq!(r.pending_len(), 1);
        assert_eq!(r.close_pending(CloseReason::Shutdown, "bye"), 1);
        let cmd = waiting.close.try_recv().expect("told to close");
        assert_eq!(
            (cmd.reason, cmd.message.as_str()),
            (CloseReason::Shutdown, "bye")
        );
        // Told once: a second drain finds nobody, and the handle's drop is harmless.
        assert_eq!(r.close_pending(CloseReason::Shutdown, "again"), 0);
        drop(waiting);
        assert_eq!(r.pending_len(), 0);
    }
}
