//! Cluster mode: several gateway nodes on one PostgreSQL database, routed
//! through NATS. See docs/cluster.md for the operator's view.
//!
//! Who holds what:
//! - **PostgreSQL** holds everything durable, as on a single node, plus a
//!   lease per node (`storage::cluster`). Sessions, presence, messages,
//!   the outbox and webhook state are shared by every node through it, so
//!   lifecycle and presence events stay exactly once across nodes by the
//!   same row guards and in-transaction counts as on one node.
//! - **NATS** carries what is live and may be lost: committed messages to
//!   the other nodes' sessions, pushes, kicks and questions ("who is
//!   online") between nodes. Nothing acknowledged to a client depends on
//!   it: a message lost in transit is noticed by its channel's `seq` (or
//!   by the publisher's frame numbers) and read from the database
//!   (`sequencer`).
//!
//! Modules: [`lease`] (join, renew, fence, reap lapsed nodes),
//! [`delivery`] (the cross-node `Delivery`, the requests nodes answer),
//! [`sequencer`] (per-channel order and gap filling in front of this
//! node's fan-out), [`wire`] (what crosses NATS).

pub mod delivery;
pub mod lease;
pub mod sequencer;
pub mod wire;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{redact_url, valid_node_id, ClusterConfig};

/// The file in the data folder that keeps a generated node id.
pub const NODE_ID_FILE: &str = "node-id";

/// How long the first connection to NATS may take before the start fails.
const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// This node's id in cluster mode: `cluster.node_id` when set; else the id
/// kept in `<data_dir>/node-id`; else a new one, written there first so it
/// stays the same across restarts.
pub fn resolve_node_id(config: &ClusterConfig, data_dir: &Path) -> anyhow::Result<String> {
    if !config.node_id.is_empty() {
        return Ok(config.node_id.clone());
    }
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim().to_string();
            if !valid_node_id(&id) {
                anyhow::bail!(
                    "{} does not hold a node id (1 to 64 letters, digits, `-` or `_`); fix or remove it",
                    path.display()
                );
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("node-{}", ulid::Ulid::new().to_string().to_lowercase());
            let tmp = data_dir.join(format!("{NODE_ID_FILE}.tmp"));
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|()| std::fs::rename(&tmp, &path))
                .with_context(|| format!("cannot write the node id to {}", path.display()))?;
            tracing::info!(node_id = %id, path = %path.display(), "generated this node's id");
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The NATS subjects of one cluster.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            prefix: prefix.to_string(),
        }
    }

    /// Every committed message, and publishers' beats.
    pub fn fanout(&self) -> String {
        format!("{}.fanout", self.prefix)
    }

    /// Requests to one node.
    pub fn node(&self, node_id: &str) -> String {
        format!("{}.node.{node_id}", self.prefix)
    }
}

/// Connects to NATS. Fails the start when no server answers within a few
/// seconds; once connected, the client reconnects on its own forever
/// (and `sequencer` reads what was missed meanwhile).
pub async fn connect_nats(
    config: &ClusterConfig,
    node_id: &str,
    on_event: impl Fn(async_nats::Event) + Send + Sync + 'static,
) -> anyhow::Result<async_nats::Client> {
    let addrs: Vec<async_nats::ServerAddr> = config
        .nats_urls
        .iter()
        .map(|u| {
            u.parse()
                .with_context(|| format!("cluster.nats_urls: {} is not a NATS URL", redact_url(u)))
        })
        .collect::<anyhow::Result<_>>()?;
    let shown: Vec<String> = config.nats_urls.iter().map(|u| redact_url(u)).collect();
    let on_event = Arc::new(on_event);
    let options = async_nats::ConnectOptions::new()
        .name(format!("plugboard {node_id}"))
        // Our own frames are handled locally, before they are published.
        .no_echo()
        .connection_timeout(NATS_CONNECT_TIMEOUT)
        .max_reconnects(None)
        .request_timeout(Some(config.request_timeout))
        .subscription_capacity(65_536)
        .event_callback(move |event| {
            let on_event = on_event.clone();
            async move { on_event(event) }
        });
    let client = tokio::time::timeout(NATS_CONNECT_TIMEOUT * 2, options.connect(addrs))
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot connect to NATS at {}", shown.join(", ")))?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_node_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = ClusterConfig::default();
        let first = resolve_node_id(&config, dir.path()).unwrap();
        assert!(valid_node_id(&first), "{first}");
        assert_eq!(resolve_node_id(&config, dir.path()).unwrap(), first);
        let named = ClusterConfig {
            node_id: "edge-7".into(),
            ..ClusterConfig::default()
        };
        assert_eq!(resolve_node_id(&named, dir.path()).unwrap(), "edge-7");
        std::fs::write(dir.path().join(NODE_ID_FILE), "../../etc\n").unwrap();
        let err = resolve_node_id(&config, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not hold a node id"), "{err}");
    }
}
