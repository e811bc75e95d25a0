//! A cluster of gateway processes for a test: N gateways (`node-a`,
//! `node-b`, …) on one PostgreSQL database of their own (on the test
//! process's shared server, [`crate::postgres::shared`]; on a private
//! server with [`ClusterOptions::private_postgres`]; or the caller's, as a
//! benchmark's, with [`ClusterOptions::database`]), routed through one
//! private NATS server ([`NatsServer`]).
//!
//! Each node has its own data folder, config file and port. A test can
//! kill a node (SIGKILL: its data folder stays), terminate it (SIGTERM: a
//! graceful drain) and start it again on the same config, data folder and
//! port; it can stop, kill and restart NATS through [`Cluster::nats`].
//!
//! Every node's config is the test gateway's ([`crate::gateway::config_text`])
//! on the cluster's database, with a `[cluster]` section:
//!
//! ```toml
//! [cluster]
//! nats_urls = ["nats://127.0.0.1:PORT"]
//! node_id = "node-a"
//! lease_ttl = "3s"        # ClusterOptions::lease_ttl
//! lease_renew = "500ms"   # ClusterOptions::lease_renew
//! ```
//!
//! and [`ClusterOptions::extra`] merged over it (tables key by key, so it
//! can set any `[cluster]` key too).

use std::time::Duration;

use crate::gateway::{merge, Gateway, GatewayOptions, RestartHandle};
use crate::nats::NatsServer;
use crate::WAIT;

/// What a test changes in a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// How many gateway processes (3 by default; at most 26).
    pub nodes: usize,
    /// `cluster.lease_ttl` of every node (3 s by default).
    pub lease_ttl: Duration,
    /// `cluster.lease_renew` of every node (500 ms by default; at most a
    /// third of `lease_ttl`).
    pub lease_renew: Duration,
    /// Webhook receiver URL; every node gets a `[[webhooks]]` entry `rx`
    /// for it (see [`GatewayOptions::webhook_url`]).
    pub webhook_url: Option<String>,
    /// Extra TOML merged over every node's config, `[cluster]` included.
    pub extra: String,
    /// A private, durable PostgreSQL server instead of a database on the
    /// shared one, for a test that stops or kills it
    /// ([`Cluster::postgres`]).
    pub private_postgres: bool,
    /// A database the caller made and keeps (on a server of its own, as a
    /// benchmark's): the cluster runs on it and neither creates nor drops
    /// it. Takes precedence over `private_postgres`.
    pub database: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            lease_ttl: Duration::from_secs(3),
            lease_renew: Duration::from_millis(500),
            webhook_url: None,
            extra: String::new(),
            private_postgres: false,
            database: None,
        }
    }
}

impl ClusterOptions {
    /// `n` nodes, the rest by default.
    pub fn nodes(n: usize) -> Self {
        ClusterOptions {
            nodes: n,
            ..ClusterOptions::default()
        }
    }

    /// Every node delivers webhooks to the receiver at `url`.
    pub fn with_receiver(mut self, url: &str) -> Self {
        self.webhook_url = Some(url.to_string());
        self
    }

    /// The lease timing of every node.
    pub fn lease(mut self, ttl: Duration, renew: Duration) -> Self {
        self.lease_ttl = ttl;
        self.lease_renew = renew;
        self
    }

    /// The cluster runs on a private, durable PostgreSQL server.
    pub fn private_postgres(mut self) -> Self {
        self.private_postgres = true;
        self
    }

    /// The cluster runs on the database at `url`, which the caller created
    /// and drops (see [`ClusterOptions::database`]).
    pub fn database(mut self, url: &str) -> Self {
        self.database = Some(url.to_string());
        self
    }

    /// Adds TOML merged over every node's config.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }
}

/// The id of the `i`-th node: `node-a`, `node-b`, …
pub fn node_id(i: usize) -> String {
    assert!(
        i < 26,
        "a test cluster has at most 26 nodes (node-a to node-z)"
    );
    format!("node-{}", char::from(b'a' + i as u8))
}

/// A duration as the config reads it (`3s`, `500ms`).
fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// One node: its config, what is needed to start it again, and the process
/// while it runs.
struct Node {
    id: String,
    /// The config over the test gateway's defaults: `[cluster]`, the test's
    /// extra TOML and, once the node has restarted, its pinned listen address.
    overrides: toml::Table,
    webhook_url: Option<String>,
    database_url: String,
    handle: RestartHandle,
    /// The port it listens on, the same across restarts.
    port: u16,
    gateway: Option<Gateway>,
}

impl Node {
    fn options(&self) -> GatewayOptions {
        node_options(
            &self.overrides,
            self.webhook_url.as_deref(),
            &self.database_url,
        )
    }
}

fn node_options(overrides: &toml::Table, webhook: Option<&str>, database: &str) -> GatewayOptions {
    let extra = toml::to_string(overrides).expect("node config serialises");
    let mut opts = GatewayOptions::default()
        .postgres_database(database)
        .extra(&extra);
    opts.webhook_url = webhook.map(str::to_string);
    opts
}

/// The cluster's database: on the shared PostgreSQL server, dropped with
/// it; on a private server, removed with it; or the caller's, left alone.
struct ClusterDatabase {
    url: String,
    owner: DatabaseOwner,
}

enum DatabaseOwner {
    Shared,
    Private(crate::postgres::PgServer),
    Caller,
}

impl Drop for ClusterDatabase {
    fn drop(&mut self) {
        if !matches!(self.owner, DatabaseOwner::Shared) {
            return;
        }
        let url = std::mem::take(&mut self.url);
        // In the background, as the gateway harness's databases: a failure
        // only leaves the database to the server's removal at exit.
        std::thread::spawn(move || {
            let _ = crate::postgres::shared().try_drop_database(&url);
        });
    }
}

/// N gateway processes on one PostgreSQL database and one NATS server.
///
/// Fields drop in order: the gateways first (killed), then NATS, then the
/// database.
pub struct Cluster {
    nodes: Vec<Node>,
    nats: NatsServer,
    database: ClusterDatabase,
}

impl Cluster {
    /// Starts NATS, creates the cluster's database, then starts every node
    /// at once and waits until each answers `/readyz` with 200. Panics
    /// naming the node that did not start or become ready.
    pub async fn start(opts: ClusterOptions) -> Cluster {
        assert!(opts.nodes >= 1, "a cluster needs at least one node");
        assert!(
            opts.lease_renew * 3 <= opts.lease_ttl,
            "lease_renew ({:?}) must be at most a third of lease_ttl ({:?})",
            opts.lease_renew,
            opts.lease_ttl
        );
        let private = opts.private_postgres;
        let given = opts.database.clone();
        let (nats, database) = tokio::task::spawn_blocking(move || {
            let nats = NatsServer::start();
            let database = if let Some(url) = given {
                ClusterDatabase {
                    url,
                    owner: DatabaseOwner::Caller,
                }
            } else if private {
                let server =
                    crate::postgres::PgServer::start(crate::postgres::PgOptions::durable());
                ClusterDatabase {
                    url: server.create_database(),
                    owner: DatabaseOwner::Private(server),
                }
            } else {
                ClusterDatabase {
                    url: crate::postgres::shared().create_database(),
                    owner: DatabaseOwner::Shared,
                }
            };
            (nats, database)
        })
        .await
        .unwrap_or_else(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("starting NATS and creating the cluster's database: {e}"),
        });
        let extra: toml::Table = opts
            .extra
            .parse()
            .unwrap_or_else(|e| panic!("ClusterOptions::extra is not TOML: {e}"));
        let configs: Vec<(String, toml::Table)> = (0..opts.nodes)
            .map(|i| {
                let id = node_id(i);
                let mut cluster = toml::Table::new();
                cluster.insert("nats_urls".into(), vec![nats.url()].into());
                cluster.insert("node_id".into(), id.clone().into());
                cluster.insert("lease_ttl".into(), duration_text(opts.lease_ttl).into());
                cluster.insert("lease_renew".into(), duration_text(opts.lease_renew).into());
                let mut overrides = toml::Table::new();
                overrides.insert("cluster".into(), toml::Value::Table(cluster));
                merge(&mut overrides, extra.clone());
                (id, overrides)
            })
            .collect();
        let started = futures_util::future::join_all(configs.iter().map(|(_, overrides)| {
            Gateway::start(node_options(
                overrides,
                opts.webhook_url.as_deref(),
                &database.url,
            ))
        }))
        .await;
        let nodes = configs
            .into_iter()
            .zip(started)
            .map(|((id, overrides), gateway)| Node {
                id,
                overrides,
                webhook_url: opts.webhook_url.clone(),
                database_url: database.url.clone(),
                handle: gateway.restart_handle(),
                port: port_of(&gateway.addr),
                gateway: Some(gateway),
            })
            .collect();
        let cluster = Cluster {
            nodes,
            nats,
            database,
        };
        futures_util::future::join_all((0..cluster.len()).map(|i| cluster.wait_ready(i))).await;
        cluster
    }

    /// How many nodes the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The running gateway of node `i`; panics if it is down.
    #[track_caller]
    pub fn node(&self, i: usize) -> &Gateway {
        let node = self.entry(i);
        node.gateway
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", node.id))
    }

    /// [`Cluster::node`], mutably.
    #[track_caller]
    pub fn node_mut(&mut self, i: usize) -> &mut Gateway {
        let node = self.entry_mut(i);
        let id = node.id.clone();
        node.gateway
            .as_mut()
            .unwrap_or_else(|| panic!("{id} is not running"))
    }

    /// The running gateways, with their index.
    pub fn running(&self) -> impl Iterator<Item = (usize, &Gateway)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.gateway.as_ref().map(|g| (i, g)))
    }

    /// Whether node `i` is running (as far as the cluster knows: a node
    /// that exited by itself still counts until it is killed or
    /// terminated).
    pub fn is_up(&self, i: usize) -> bool {
        self.entry(i).gateway.is_some()
    }

    /// Node `i`'s id (`cluster.node_id`): `node-a`, `node-b`, …
    pub fn node_id(&self, i: usize) -> &str {
        &self.entry(i).id
    }

    /// Node `i`'s port on 127.0.0.1, the same across restarts.
    pub fn port(&self, i: usize) -> u16 {
        self.entry(i).port
    }

    /// Node `i`'s options as it runs now, to change and hand to
    /// [`Gateway::reload_with`] or [`Gateway::write_config`] (a config
    /// written so is the one [`Cluster::restart`] starts it with only
    /// until the cluster writes its own again).
    pub fn node_options(&self, i: usize) -> GatewayOptions {
        self.entry(i).options()
    }

    /// SIGKILL node `i` and wait for it to be gone; its data folder, config
    /// and port are kept for [`Cluster::restart`]. Panics if it is down.
    pub async fn kill(&mut self, i: usize) {
        let node = self.entry_mut(i);
        let gateway = node
            .gateway
            .take()
            .unwrap_or_else(|| panic!("kill: {} is not running", node.id));
        gateway.kill().await;
    }

    /// SIGTERM node `i` (a graceful drain and shutdown) and wait for it to
    /// exit; returns its exit code. Its data folder, config and port are
    /// kept. Panics if it is down.
    pub async fn terminate(&mut self, i: usize) -> Option<i32> {
        let node = self.entry_mut(i);
        let gateway = node
            .gateway
            .take()
            .unwrap_or_else(|| panic!("terminate: {} is not running", node.id));
        gateway.terminate().await
    }

    /// Starts node `i` again with the same config, data folder and port
    /// (after [`Cluster::kill`] or [`Cluster::terminate`]; a running node
    /// is terminated first), and waits until it is ready. Panics if it does
    /// not start (for instance if its port was taken meanwhile).
    pub async fn restart(&mut self, i: usize) {
        if self.is_up(i) {
            self.terminate(i).await;
        }
        let node = self.entry_mut(i);
        // The first start listened on port 0: pin the port it got.
        let mut server = toml::Table::new();
        server.insert("listen".into(), format!("127.0.0.1:{}", node.port).into());
        let mut listen = toml::Table::new();
        listen.insert("server".into(), toml::Value::Table(server));
        merge(&mut node.overrides, listen);
        node.handle.write_config(&node.options());
        let gateway = node.handle.restart().await;
        assert_eq!(
            port_of(&gateway.addr),
            node.port,
            "{} restarted on another port",
            node.id
        );
        node.gateway = Some(gateway);
        self.wait_ready(i).await;
    }

    /// Waits until node `i` answers `GET /readyz` with 200; panics after
    /// [`WAIT`] with its last answer.
    pub async fn wait_ready(&self, i: usize) {
        let gateway = self.node(i);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = gateway.get_text("/readyz").await;
            if status == 200 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} ({}) not ready after {WAIT:?}: {status} {body}",
                    self.node_id(i),
                    gateway.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The cluster's NATS server (stop, kill and start it again on the same
    /// port to see the nodes lose and regain it).
    pub fn nats(&self) -> &NatsServer {
        &self.nats
    }

    /// The URL of the cluster's PostgreSQL database.
    pub fn database_url(&self) -> &str {
        &self.database.url
    }

    /// Runs `sql` on the cluster's database with `psql`; its unaligned,
    /// tuples-only output (see [`crate::PgServer::psql`]). Panics on any
    /// error (and on a database given by [`ClusterOptions::database`]: its
    /// server is the caller's). Blocking (a short command).
    #[track_caller]
    pub fn psql(&self, sql: &str) -> String {
        match &self.database.owner {
            DatabaseOwner::Private(server) => server.psql(&self.database.url, sql),
            DatabaseOwner::Shared => crate::postgres::shared().psql(&self.database.url, sql),
            DatabaseOwner::Caller => {
                panic!("Cluster::psql: the cluster runs on the caller's database; use its server")
            }
        }
    }

    /// The cluster's private PostgreSQL server, to stop, kill or restart
    /// it; panics unless it was started with
    /// [`ClusterOptions::private_postgres`] (the shared server serves
    /// every test of the process).
    #[track_caller]
    pub fn postgres(&self) -> &crate::postgres::PgServer {
        match &self.database.owner {
            DatabaseOwner::Private(server) => server,
            _ => panic!("ClusterOptions::private_postgres() gives a cluster a server of its own"),
        }
    }

    #[track_caller]
    fn entry(&self, i: usize) -> &Node {
        let len = self.nodes.len();
        self.nodes
            .get(i)
            .unwrap_or_else(|| panic!("node {i} of a cluster of {len}"))
    }

    #[track_caller]
    fn entry_mut(&mut self, i: usize) -> &mut Node {
        let len = self.nodes.len();
        self.nodes
            .get_mut(i)
            .unwrap_or_else(|| panic!("node {i} of a cluster of {len}"))
    }
}

/// The port of a gateway's `host:port` address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("gateway address {addr:?} has no port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_named_by_letter() {
        assert_eq!(node_id(0), "node-a");
        assert_eq!(node_id(2), "node-c");
        assert_eq!(node_id(25), "node-z");
    }

    #[test]
    fn durations_are_written_as_the_config_reads_them() {
        assert_eq!(duration_text(Duration::from_secs(3)), "3s");
        assert_eq!(duration_text(Duration::from_millis(500)), "500ms");
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn a_node_config_has_the_cluster_section_and_the_extra_over_it() {
        let mut overrides: toml::Table = r#"
            [cluster]
            nats_urls = ["nats://127.0.0.1:4"]
            node_id = "node-b"
            lease_ttl = "3s"
        "#
        .parse()
        .unwrap();
        merge(
            &mut overrides,
            "[cluster]\nlease_ttl = \"6s\"\n[gateway]\nping_interval = \"2s\"\n"
                .parse()
                .unwrap(),
        );
        let url = "postgres://postgres@127.0.0.1:5/pb_1_1";
        let opts = node_options(&overrides, Some("http://127.0.0.1:9/hook"), url);
        let dir = tempfile::tempdir().unwrap();
        let text = crate::gateway::config_text(dir.path(), &opts, opts.database_url.as_deref());
        let config: toml::Table = text.parse().unwrap();
        let cluster = config["cluster"].as_table().unwrap();
        assert_eq!(cluster["node_id"].as_str(), Some("node-b"));
        assert_eq!(cluster["lease_ttl"].as_str(), Some("6s"));
        assert_eq!(
            cluster["nats_urls"].as_array().unwrap()[0].as_str(),
            Some("nats://127.0.0.1:4")
        );
        assert_eq!(config["storage"]["backend"].as_str(), Some("postgres"));
        assert_eq!(config["storage"]["url"].as_str(), Some(url));
        assert_eq!(config["gateway"]["ping_interval"].as_str(), Some("2s"));
        assert_eq!(config["gateway"]["pong_timeout"].as_str(), Some("1s"));
        assert_eq!(config["webhooks"][0]["name"].as_str(), Some("rx"));
    }
}
