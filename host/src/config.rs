//! Configuration: compiled-in defaults, then the TOML file, then `PLUGBOARD_*`
//! environment overrides; validated once at load.
//!
//! Every key is documented in `docs/configuration.md`. An unknown key is an
//! error that names the key, so a typo never silently falls back to a default.
//! This module only parses and validates; it does not apply anything. What can
//! change on a live reload is decided by [`Config::restart_required_changes`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Deserializer, Serialize};

/// The prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "PLUGBOARD_";

/// Environment variables with the prefix that are not config keys.
const ENV_RESERVED: &[&str] = &["PLUGBOARD_CONFIG"];

/// A configuration error. The message always names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

fn key_err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

/// The config in force, shared by the services that read it and replaced
/// whole by a reload (only the server stores into it). Cheap to clone.
#[derive(Clone)]
pub struct Handle(Arc<ArcSwap<Config>>);

impl Handle {
    pub fn new(config: Config) -> Handle {
        Handle(Arc::new(ArcSwap::from_pointee(config)))
    }

    /// The config in force now; a reload does not change what this returned.
    pub fn load(&self) -> Arc<Config> {
        self.0.load_full()
    }

    /// Puts `config` in force.
    pub fn store(&self, config: Config) {
        self.0.store(Arc::new(config));
    }
}

/// The whole configuration of one gateway process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Folder holding the SQLite database and generated development secrets.
    pub data_dir: PathBuf,
    /// Name of this node; session rows are tagged with it so that crash
    /// recovery closes only this node's sessions.
    pub node_id: String,
    pub storage: StorageConfig,
    /// Cluster mode (several nodes on one PostgreSQL, routed through NATS);
    /// absent: a single node.
    pub cluster: Option<ClusterConfig>,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub gateway: GatewayConfig,
    pub outbox: OutboxConfig,
    pub messaging: MessagingConfig,
    pub conversations: ConversationsConfig,
    pub control: ControlConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    /// Webhook endpoints; events go to each endpoint whose filter matches.
    pub webhooks: Vec<WebhookConfig>,
    /// Settings of the plugin runtime.
    pub plugin_runtime: PluginRuntimeConfig,
    /// Plugins to load (WebAssembly components).
    pub plugins: Vec<PluginConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("plugboard-data"),
            node_id: "node-1".to_string(),
            storage: StorageConfig::default(),
            cluster: None,
            server: ServerConfig::default(),
            auth: AuthConfig::default(),
            gateway: GatewayConfig::default(),
            outbox: OutboxConfig::default(),
            messaging: MessagingConfig::default(),
            conversations: ConversationsConfig::default(),
            control: ControlConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
            webhooks: Vec::new(),
            plugin_runtime: PluginRuntimeConfig::default(),
            plugins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the one HTTP listener (client WebSocket, server API, admin API, metrics).
    pub listen: SocketAddr,
    /// Deadline for a client to send complete HTTP request headers (covers the upgrade request).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Deadline for a client to send a whole request body, counted from the
    /// end of its headers; a body still arriving then is answered `408`.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Largest accepted HTTP request body on the server and admin API.
    #[serde(deserialize_with = "de_size", serialize_with = "ser_size")]
    pub max_body_size: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7600".parse().expect("valid literal"),
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_body_size: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret shared with the business server for client tokens.
    /// Empty: a development secret is generated in `data_dir` and printed once.
    pub jwt_secret: String,
    /// Allowed clock skew when checking `exp` / `nbf` at the handshake.
    #[serde(with = "humantime_serde")]
    pub token_leeway: Duration,
    /// API keys accepted on the server API (`Authorization: Bearer <key>`).
    /// Empty: a development key is generated.
    pub api_keys: Vec<String>,
    /// Token for the admin API. Empty: a development token is generated.
    pub admin_token: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: String::new(),
            token_leeway: Duration::from_secs(5),
            api_keys: Vec::new(),
            admin_token: String::new(),
        }
    }
}

/// What happens when a user opens a connection on a device that already has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SameDevicePolicy {
    /// The older connection is closed with reason `replaced`.
    Replace,
    /// The new connection is refused (HTTP 409 before the upgrade).
    Reject,
    /// Both stay open.
    Allow,
}

/// What happens when a new device would exceed `max_devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceLimitPolicy {
    /// The device whose newest connection is oldest is closed with reason `replaced`.
    ReplaceOldest,
    /// The new connection is refused (HTTP 409 before the upgrade).
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// Most distinct devices one user may have connected at once.
    pub max_devices: usize,
    pub same_device: SameDevicePolicy,
    pub when_full: DeviceLimitPolicy,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            max_devices: 5,
            same_device: SameDevicePolicy::Replace,
            when_full: DeviceLimitPolicy::ReplaceOldest,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Whether the client WebSocket service accepts connections. Setting it to
    /// false on a reload drains every live connection (close code 1012).
    pub enabled: bool,
    /// Deadline for an `auth` frame when the upgrade request carried no token.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Largest WebSocket message (after reassembly of fragments).
    #[serde(deserialize_with = "de_size", serialize_with = "ser_size")]
    pub max_message_size: usize,
    /// Largest single WebSocket frame.
    #[serde(deserialize_with = "de_size", serialize_with = "ser_size")]
    pub max_frame_size: usize,
    /// Frames waiting to be written to one connection; when full the
    /// connection is closed as a slow consumer (code 4004).
    pub outbound_queue: usize,
    /// Longest a single write to a client may take before the connection is
    /// closed as a slow consumer.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Interval between server WebSocket pings.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long after a ping the peer has to show any sign of life.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// How long the server waits for the close handshake to complete.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    pub devices: DevicesConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            enabled: true,
            auth_timeout: Duration::from_secs(10),
            max_message_size: 64 * 1024,
            max_frame_size: 64 * 1024,
            outbound_queue: 1024,
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            devices: DevicesConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Delay before each retry: the first attempt is immediate, retry `n`
    /// waits entry `n`. After the last retry fails the delivery is kept as
    /// failed, so there are `len + 1` attempts in all.
    #[serde(with = "humantime_list")]
    pub retry_schedule: Vec<Duration>,
    /// Each delay is multiplied by a random factor in `[1 - jitter, 1 + jitter]`.
    pub jitter: f64,
    /// An endpoint that has failed continuously this long is disabled.
    #[serde(with = "humantime_serde")]
    pub disable_after: Duration,
    /// Timeout of one webhook HTTP request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests in flight per endpoint (each for a different user).
    pub max_in_flight: usize,
    /// Longest honoured `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Length of an endpoint's delivery lease: the one process holding it
    /// delivers the endpoint, renewing it every third of this.
    #[serde(with = "humantime_serde")]
    pub endpoint_lease: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        let s = Duration::from_secs;
        OutboxConfig {
            retry_schedule: vec![
                s(5),
                s(30),
                s(2 * 60),
                s(10 * 60),
                s(30 * 60),
                s(60 * 60),
                s(2 * 3600),
                s(4 * 3600),
                s(8 * 3600),
                s(8 * 3600),
            ],
            jitter: 0.2,
            disable_after: s(24 * 3600),
            request_timeout: s(10),
            max_in_flight: 32,
            max_retry_after: s(3600),
            endpoint_lease: s(10),
        }
    }
}

/// Messages, channels and groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagingConfig {
    /// Largest message payload (its JSON text).
    #[serde(deserialize_with = "de_size", serialize_with = "ser_size")]
    pub max_payload_size: usize,
    /// Most members a group may have.
    pub max_group_members: usize,
    /// Messages in a `sync` page when the request names no `limit`.
    pub sync_default_limit: usize,
    /// Most messages in one `sync` page.
    pub sync_max_limit: usize,
    /// Characters of a message's preview kept for conversation lists.
    pub preview_chars: usize,
    /// The sender of messages the business server sends as the system. No
    /// client token may name this user.
    pub system_user: String,
}

impl Default for MessagingConfig {
    fn default() -> Self {
        MessagingConfig {
            max_payload_size: 16 * 1024,
            max_group_members: 100_000,
            sync_default_limit: 100,
            sync_max_limit: 500,
            preview_chars: 100,
            system_user: "system".into(),
        }
    }
}

/// Recent-conversation lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConversationsConfig {
    /// Conversations in a page when the request names no `limit`.
    pub default_limit: usize,
    /// Most conversations in one page.
    pub max_limit: usize,
    /// Last messages included per conversation when the request names no `last_messages`.
    pub default_last_messages: usize,
    /// Most last messages per conversation a request may ask for.
    pub max_last_messages: usize,
    /// How long a deleted conversation is kept as a tombstone for incremental
    /// syncs. A client whose version is older than a pruned tombstone is told
    /// to reset (full sync).
    #[serde(with = "humantime_serde")]
    pub tombstone_retention: Duration,
    /// How often tombstones older than the retention are pruned.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
}

impl Default for ConversationsConfig {
    fn default() -> Self {
        ConversationsConfig {
            default_limit: 100,
            max_limit: 500,
            default_last_messages: 0,
            max_last_messages: 20,
            tombstone_retention: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
        }
    }
}

/// Business control messages (`POST /v1/control`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Most target users in one request (after group expansion).
    pub max_targets: usize,
    /// Largest control payload (its JSON text).
    #[serde(deserialize_with = "de_size", serialize_with = "ser_size")]
    pub max_payload_size: usize,
    /// Time-to-live of a persisted control that names none.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Longest time-to-live a request may ask for.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Requests per second allowed per API key (token bucket refill rate).
    pub rate_limit: f64,
    /// Requests an API key may make in a burst.
    pub rate_burst: u32,
    /// Require an HMAC-SHA256 signature over the timestamp and body.
    pub require_signature: bool,
    /// Secret of those signatures.
    pub signing_secret: String,
    /// How far a signed request's timestamp may be from the gateway's clock;
    /// a signature is remembered this long to refuse replays.
    #[serde(with = "humantime_serde")]
    pub signature_tolerance: Duration,
    /// How often persisted controls past their time-to-live are expired.
    #[serde(with = "humantime_serde")]
    pub expiry_interval: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            max_targets: 10_000,
            max_payload_size: 16 * 1024,
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            rate_limit: 50.0,
            rate_burst: 100,
            require_signature: false,
            signing_secret: String::new(),
            signature_tolerance: Duration::from_secs(300),
            expiry_interval: Duration::from_secs(1),
        }
    }
}

/// The storage engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Embedded: `<data_dir>/plugboard.db`, nothing else to run.
    Sqlite,
    /// A PostgreSQL server at `storage.url`; several gateways may share it.
    Postgres,
}

/// Cluster mode: every node shares one PostgreSQL database (everything
/// durable) and one NATS system (routing between nodes). See docs/cluster.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS servers to connect to (`nats://host:port`; credentials in the
    /// URL are allowed and shown redacted). Any one reachable is enough.
    pub nats_urls: Vec<String>,
    /// This node's id. Empty: the id kept in `<data_dir>/node-id`, generated
    /// there at the first start, so a node keeps its id across restarts.
    pub node_id: String,
    /// How long a node's lease in the database lasts. When it lapses (the
    /// node died, froze or was cut off), a surviving node closes its
    /// connections; a node that cannot renew closes its own clients before then.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often a node renews its lease (and looks for lapsed ones).
    #[serde(with = "humantime_serde")]
    pub lease_renew: Duration,
    /// Longest wait for the other nodes' answers to a cluster-wide request
    /// (who is online, a push that must be counted, a kick, a reload).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a node holds a message whose channel has a gap in `seq`
    /// (an earlier one still in transit) before it reads the missing ones
    /// from the database.
    #[serde(with = "humantime_serde")]
    pub gap_wait: Duration,
    /// First token of every NATS subject the cluster uses, so several
    /// clusters can share one NATS system.
    pub subject_prefix: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_urls: vec!["nats://127.0.0.1:4222".to_string()],
            node_id: String::new(),
            lease_ttl: Duration::from_secs(10),
            lease_renew: Duration::from_secs(2),
            request_timeout: Duration::from_millis(500),
            gap_wait: Duration::from_millis(100),
            subject_prefix: "plugboard".to_string(),
        }
    }
}

impl ClusterConfig {
    fn validate(&self, storage: &StorageConfig) -> Result<(), ConfigError> {
        if storage.backend != StorageBackend::Postgres {
            return Err(key_err(
                "cluster",
                "cluster mode needs storage.backend = \"postgres\" (every node shares one database)",
            ));
        }
        if self.nats_urls.is_empty() {
            return Err(key_err(
                "cluster.nats_urls",
                "must name at least one NATS server",
            ));
        }
        for url in &self.nats_urls {
            let ok = reqwest::Url::parse(url).is_ok_and(|u| {
                matches!(u.scheme(), "nats" | "tls" | "ws" | "wss") && u.host_str().is_some()
            });
            if !ok {
                return Err(key_err(
                    "cluster.nats_urls",
                    format!("{} is not a NATS URL (nats://host:port)", redact_url(url)),
                ));
            }
        }
        if !self.node_id.is_empty() && !valid_node_id(&self.node_id) {
            return Err(key_err(
                "cluster.node_id",
                "must be 1 to 64 letters, digits, `-` or `_`",
            ));
        }
        if !valid_node_id(&self.subject_prefix) {
            return Err(key_err(
                "cluster.subject_prefix",
                "must be 1 to 64 letters, digits, `-` or `_` (one NATS subject token)",
            ));
        }
        for (key, value) in [
            ("cluster.lease_ttl", self.lease_ttl),
            ("cluster.lease_renew", self.lease_renew),
            ("cluster.request_timeout", self.request_timeout),
            ("cluster.gap_wait", self.gap_wait),
        ] {
            if value.is_zero() {
                return Err(key_err(key, "must be greater than zero"));
            }
        }
        if self.lease_renew * 3 > self.lease_ttl {
            return Err(key_err(
                "cluster.lease_renew",
                format!(
                    "must be at most a third of cluster.lease_ttl ({}), so that a lease survives two missed renewals",
                    humantime::format_duration(self.lease_ttl)
                ),
            ));
        }
        Ok(())
    }
}

/// A node id: it names NATS subjects and the `node-id` file, so it is kept
/// to one subject token of plain characters.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Where everything durable is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// PostgreSQL connection URL (`postgres://user:password@host:port/db`);
    /// only for `backend = "postgres"`. Shown redacted everywhere.
    pub url: String,
    /// Most connections the gateway holds open to PostgreSQL.
    pub pool_size: usize,
    /// Longest a single statement may run on PostgreSQL before it is cancelled.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Longest wait for a PostgreSQL connection (to open one, or for a free
    /// one from the pool) before the operation fails as unavailable.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most writes (messages and other non-bookkeeping writes) waiting for
    /// or in the writer at a time; see [`crate::storage::queue`].
    pub max_queued_writes: usize,
    /// Longest a write waits for a place in a full queue before it fails
    /// as `storage_busy`.
    #[serde(with = "humantime_serde")]
    pub queue_wait: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Sqlite,
            url: String::new(),
            pool_size: 16,
            statement_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_queued_writes: 4096,
            queue_wait: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Longest wait for live connections to finish their close handshake.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Longest wait for the outbox to be delivered before exiting.
    #[serde(with = "humantime_serde")]
    pub outbox_flush_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(10),
            outbox_flush_timeout: Duration::from_secs(5),
        }
    }
}

/// Settings shared by every plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginRuntimeConfig {
    /// Folder plugin files are read from (relative `file` names resolve here).
    /// Empty: `<data_dir>/plugins`.
    pub dir: PathBuf,
    /// Folder for compiled plugins. Empty: `<data_dir>/plugin-cache`.
    pub cache_dir: PathBuf,
    /// Reload a plugin when its file in `dir` changes.
    pub watch: bool,
    /// Consecutive failures after which a plugin's circuit breaker opens.
    pub breaker_failures: u32,
    /// How long an open breaker skips the plugin before trying it again.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Idle instances kept per plugin for reuse.
    pub pool_size: usize,
}

impl Default for PluginRuntimeConfig {
    fn default() -> Self {
        PluginRuntimeConfig {
            dir: PathBuf::new(),
            cache_dir: PathBuf::new(),
            watch: true,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            pool_size: 8,
        }
    }
}

/// What happens to the work at hand when a plugin call fails (trap,
/// timeout, error result or malformed output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Go on as if the plugin were not there.
    FailOpen,
    /// Stop: the work is refused (or, for webhooks, retried later).
    FailClosed,
}

/// One plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Unique name; webhook endpoints and the admin API refer to it.
    pub name: String,
    /// The component file, absolute or relative to `plugin_runtime.dir`.
    pub file: PathBuf,
    /// Hooks the plugin must export and serves: `webhook-formatter`,
    /// `conversation-filter`, `control-handler`. Empty: every hook it exports.
    #[serde(default)]
    pub hooks: Vec<String>,
    /// Position in each hook's chain (lower runs first; ties by name).
    #[serde(default)]
    pub order: i32,
    /// Cap on the plugin's linear memory (all memories of an instance together).
    #[serde(
        default = "default_plugin_memory",
        deserialize_with = "de_size",
        serialize_with = "ser_size"
    )]
    pub memory_limit: usize,
    /// CPU deadline of one hook call.
    #[serde(default = "default_plugin_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Deadline of `init` (language runtimes start slower than a hook call).
    #[serde(default = "default_init_deadline", with = "humantime_serde")]
    pub init_deadline: Duration,
    /// Policy when a call fails. Unset: the hook's default (fail-closed for
    /// `control-handler`, fail-open for the others).
    #[serde(default)]
    pub on_error: Option<OnError>,
    /// Calls after which an instance is replaced by a fresh one.
    #[serde(default = "default_max_calls")]
    pub max_calls_per_instance: u64,
    /// Handed to the plugin (`host.config` and `init`).
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
}

fn default_plugin_memory() -> usize {
    128 * 1024 * 1024
}
fn default_plugin_deadline() -> Duration {
    Duration::from_millis(100)
}
fn default_init_deadline() -> Duration {
    Duration::from_secs(5)
}
/// The policy of a hook when its plugin sets no `on_error`.
pub fn default_on_error(hook: &str) -> OnError {
    if hook == "control-handler" {
        OnError::FailClosed
    } else {
        OnError::FailOpen
    }
}
fn default_max_calls() -> u64 {
    100_000
}

/// The hook names a plugin can serve.
pub const HOOKS: &[&str] = &[
    "webhook-formatter",
    "conversation-filter",
    "control-handler",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `plugboard=debug,info`. `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Stable name; delivery state is kept under it across restarts.
    pub name: String,
    /// `http://` or `https://` URL that receives `POST` requests.
    pub url: String,
    /// Standard Webhooks secret: `whsec_` followed by base64 of at least 16 bytes.
    pub secret: String,
    /// Event types to send: exact names, `prefix.*`, or `*`.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// Whether the endpoint receives anything. A disabled endpoint keeps its backlog.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Send up to this many events (of different users) in one request.
    /// 1 sends each event on its own.
    #[serde(default = "one")]
    pub batch_max: usize,
    /// With batching, how long to wait for a batch to fill.
    #[serde(default, with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Name of a plugin (exporting `webhook-formatter`) that turns each event
    /// into the request sent to this endpoint. The default JSON body otherwise.
    #[serde(default)]
    pub formatter: Option<String>,
}

fn all_events() -> Vec<String> {
    vec!["*".to_string()]
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}

impl WebhookConfig {
    /// Whether events of this type go to this endpoint.
    pub fn accepts(&self, event_type: &str) -> bool {
        self.events.iter().any(|p| pattern_matches(p, event_type))
    }

    /// The HMAC key decoded from the `whsec_` secret.
    pub fn key(&self) -> Vec<u8> {
        decode_secret(&self.secret).unwrap_or_default()
    }
}

/// `*` matches all, `a.*` matches `a.b`, anything else matches exactly.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix(".*") {
        Some(prefix) => event_type
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.')),
        None => pattern == event_type,
    }
}

fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let body = secret
        .strip_prefix("whsec_")
        .ok_or_else(|| "must start with `whsec_`".to_string())?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("is not valid base64 after `whsec_`: {e}"))?;
    if key.len() < 16 {
        return Err("must decode to at least 16 bytes".to_string());
    }
    Ok(key)
}

impl Config {
    /// Loads the config: defaults, then `path` (if any), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: path.to_path_buf(),
                        message: syntax_message(&text, &e),
                    })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        let config = Self::from_table(table)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a config from TOML text (no environment), validating it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Syntax {
                path: PathBuf::from("<inline>"),
                message: syntax_message(text, &e),
            })?;
        let config = Self::from_table(table)?;
        config.validate()?;
        Ok(config)
    }

    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        let value = toml::Value::Table(table);
        serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            // The first line is the message; later lines only name the enclosing table.
            let inner = e.into_inner().to_string();
            let inner = inner.lines().next().unwrap_or_default().trim().to_string();
            // serde quotes the value it could not take ("invalid type:
            // string \"…\""): not when that value is a secret.
            let inner = if is_secret_key(&key) {
                redact_quoted(&inner)
            } else {
                inner
            };
            key_err(if key == "." { "<root>".into() } else { key }, inner)
        })
    }

    /// Checks what types alone cannot express. Errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id.trim().is_empty() {
            return Err(key_err("node_id", "must not be empty"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(key_err("data_dir", "must not be empty"));
        }
        self.storage.validate()?;
        if let Some(cluster) = &self.cluster {
            cluster.validate(&self.storage)?;
            if self.node_id != Config::default().node_id
                && !cluster.node_id.is_empty()
                && cluster.node_id != self.node_id
            {
                return Err(key_err(
                    "node_id",
                    "in cluster mode the node id is cluster.node_id; set one of the two",
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(key_err("log.level", format!("is not a valid filter: {e}")));
        }
        let g = &self.gateway;
        let positive = [
            ("gateway.auth_timeout", g.auth_timeout),
            ("gateway.write_timeout", g.write_timeout),
            ("gateway.ping_interval", g.ping_interval),
            ("gateway.pong_timeout", g.pong_timeout),
            ("gateway.close_timeout", g.close_timeout),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_timeout", self.server.body_timeout),
            ("outbox.request_timeout", self.outbox.request_timeout),
            ("outbox.disable_after", self.outbox.disable_after),
            ("outbox.endpoint_lease", self.outbox.endpoint_lease),
            (
                "conversations.prune_interval",
                self.conversations.prune_interval,
            ),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(key_err(key, "must be greater than zero"));
            }
        }
        let m = &self.messaging;
        let counts = [
            ("messaging.max_group_members", m.max_group_members),
            ("messaging.sync_default_limit", m.sync_default_limit),
            ("messaging.sync_max_limit", m.sync_max_limit),
            ("messaging.max_payload_size", m.max_payload_size),
            (
                "conversations.default_limit",
                self.conversations.default_limit,
            ),
            ("conversations.max_limit", self.conversations.max_limit),
        ];
        for (key, value) in counts {
            if value == 0 {
                return Err(key_err(key, "must be greater than zero"));
            }
        }
        if m.sync_default_limit > m.sync_max_limit {
            return Err(key_err(
                "messaging.sync_default_limit",
                "must not exceed messaging.sync_max_limit",
            ));
        }
        let c = &self.conversations;
        if c.default_limit > c.max_limit {
            return Err(key_err(
                "conversations.default_limit",
                "must not exceed conversations.max_limit",
            ));
        }
        if c.default_last_messages > c.max_last_messages {
            return Err(key_err(
                "conversations.default_last_messages",
                "must not exceed conversations.max_last_messages",
            ));
        }
        if !crate::auth::valid_id(&m.system_user) {
            return Err(key_err(
                "messaging.system_user",
                "must be 1 to 128 bytes without control characters",
            ));
        }
        let ctl = &self.control;
        if ctl.max_targets == 0 || ctl.max_targets > 1_000_000 {
            return Err(key_err("control.max_targets", "must be 1 to 1000000"));
        }
        if ctl.max_payload_size == 0 {
            return Err(key_err(
                "control.max_payload_size",
                "must be greater than zero",
            ));
        }
        if ctl.default_ttl.is_zero() || ctl.default_ttl > ctl.max_ttl {
            return Err(key_err(
                "control.default_ttl",
                "must be greater than zero and at most control.max_ttl",
            ));
        }
        if !(ctl.rate_limit > 0.0 && ctl.rate_limit.is_finite()) || ctl.rate_burst == 0 {
            return Err(key_err(
                "control.rate_limit",
                "rate_limit and rate_burst must be greater than zero",
            ));
        }
        if ctl.require_signature && ctl.signing_secret.len() < 16 {
            return Err(key_err(
                "control.signing_secret",
                "must be at least 16 characters when control.require_signature is true",
            ));
        }
        if ctl.expiry_interval.is_zero() || ctl.signature_tolerance.is_zero() {
            return Err(key_err(
                "control.expiry_interval",
                "expiry_interval and signature_tolerance must be greater than zero",
            ));
        }
        if g.max_frame_size < 128 {
            return Err(key_err(
                "gateway.max_frame_size",
                "must be at least 128 bytes",
            ));
        }
        if g.max_message_size < g.max_frame_size {
            return Err(key_err(
                "gateway.max_message_size",
                "must be at least gateway.max_frame_size",
            ));
        }
        if g.outbound_queue == 0 {
            return Err(key_err("gateway.outbound_queue", "must be at least 1"));
        }
        if g.devices.max_devices == 0 {
            return Err(key_err("gateway.devices.max_devices", "must be at least 1"));
        }
        if self.server.max_body_size == 0 {
            return Err(key_err("server.max_body_size", "must be at least 1 byte"));
        }
        let o = &self.outbox;
        if o.retry_schedule.is_empty() {
            return Err(key_err(
                "outbox.retry_schedule",
                "must have at least one entry",
            ));
        }
        if !(0.0..=1.0).contains(&o.jitter) {
            return Err(key_err("outbox.jitter", "must be between 0 and 1"));
        }
        if o.max_in_flight == 0 {
            return Err(key_err("outbox.max_in_flight", "must be at least 1"));
        }
        if o.endpoint_lease < o.request_timeout {
            return Err(key_err(
                "outbox.endpoint_lease",
                "must be at least outbox.request_timeout",
            ));
        }
        for (i, key) in self.auth.api_keys.iter().enumerate() {
            if key.len() < 16 {
                return Err(key_err(
                    format!("auth.api_keys[{i}]"),
                    "must be at least 16 characters",
                ));
            }
        }
        if !self.auth.admin_token.is_empty() && self.auth.admin_token.len() < 16 {
            return Err(key_err(
                "auth.admin_token",
                "must be at least 16 characters",
            ));
        }
        if !self.auth.jwt_secret.is_empty() && self.auth.jwt_secret.len() < 32 {
            return Err(key_err("auth.jwt_secret", "must be at least 32 bytes"));
        }
        let mut names = BTreeSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            let at = |field: &str| format!("webhooks[{i}].{field}");
            check_name(&at("name"), &w.name, &mut names)?;
            match reqwest::Url::parse(&w.url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(_) => return Err(key_err(at("url"), "must be an http:// or https:// URL")),
                Err(e) => return Err(key_err(at("url"), format!("is not a URL: {e}"))),
            }
            decode_secret(&w.secret).map_err(|m| key_err(at("secret"), m))?;
            if w.events.is_empty() {
                return Err(key_err(at("events"), "must name at least one event type"));
            }
            for p in &w.events {
                // The catalogue of event types is `events`: a typo in a
                // filter is caught at load.
                if !crate::events::type_names().any(|t| pattern_matches(p, t)) {
                    let known: Vec<&str> = crate::events::type_names().collect();
                    return Err(key_err(
                        at("events"),
                        format!("`{p}` matches no event type (known: {})", known.join(", ")),
                    ));
                }
            }
            if w.batch_max == 0 || w.batch_max > 1000 {
                return Err(key_err(at("batch_max"), "must be between 1 and 1000"));
            }
            if w.formatter.is_some() && w.batch_max > 1 {
                return Err(key_err(
                    at("formatter"),
                    "cannot be combined with batch_max > 1 (a formatter shapes one event per request)",
                ));
            }
            if let Some(f) = &w.formatter {
                match self.plugins.iter().find(|p| &p.name == f) {
                    None => {
                        return Err(key_err(
                            at("formatter"),
                            format!("names no plugin (no [[plugins]] entry named `{f}`)"),
                        ))
                    }
                    Some(p)
                        if !p.hooks.is_empty()
                            && !p.hooks.iter().any(|h| h == "webhook-formatter") =>
                    {
                        return Err(key_err(
                            at("formatter"),
                            format!("plugin `{f}` does not list the `webhook-formatter` hook"),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        let r = &self.plugin_runtime;
        if r.breaker_failures == 0 {
            return Err(key_err(
                "plugin_runtime.breaker_failures",
                "must be at least 1",
            ));
        }
        if r.breaker_cooldown.is_zero() {
            return Err(key_err(
                "plugin_runtime.breaker_cooldown",
                "must be greater than zero",
            ));
        }
        let mut plugin_names = BTreeSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            let at = |field: &str| format!("plugins[{i}].{field}");
            check_name(&at("name"), &p.name, &mut plugin_names)?;
            if p.file.as_os_str().is_empty() {
                return Err(key_err(at("file"), "must name a .wasm component"));
            }
            for h in &p.hooks {
                if !HOOKS.contains(&h.as_str()) {
                    return Err(key_err(
                        at("hooks"),
                        format!("`{h}` is not a hook (known: {})", HOOKS.join(", ")),
                    ));
                }
            }
            if p.memory_limit < 1024 * 1024 || p.memory_limit > 512 * 1024 * 1024 {
                return Err(key_err(
                    at("memory_limit"),
                    "must be between 1MiB and 512MiB",
                ));
            }
            if p.deadline.is_zero() {
                return Err(key_err(at("deadline"), "must be greater than zero"));
            }
            if p.init_deadline.is_zero() {
                return Err(key_err(at("init_deadline"), "must be greater than zero"));
            }
            if p.max_calls_per_instance == 0 {
                return Err(key_err(at("max_calls_per_instance"), "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The folder plugin files are read from.
    pub fn plugins_dir(&self) -> PathBuf {
        if self.plugin_runtime.dir.as_os_str().is_empty() {
            self.data_dir.join("plugins")
        } else {
            self.plugin_runtime.dir.clone()
        }
    }

    /// The folder for compiled plugins.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        if self.plugin_runtime.cache_dir.as_os_str().is_empty() {
            self.data_dir.join("plugin-cache")
        } else {
            self.plugin_runtime.cache_dir.clone()
        }
    }

    /// A copy with every secret replaced, for printing.
    pub fn redacted(&self) -> Config {
        let hide = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                "<redacted>".to_string()
            }
        };
        let mut c = self.clone();
        c.auth.jwt_secret = hide(&c.auth.jwt_secret);
        c.auth.admin_token = hide(&c.auth.admin_token);
        c.auth.api_keys = c.auth.api_keys.iter().map(|k| hide(k)).collect();
        for w in &mut c.webhooks {
            w.secret = hide(&w.secret);
            w.url = redact_url(&w.url);
        }
        c.control.signing_secret = hide(&c.control.signing_secret);
        if !c.storage.url.is_empty() {
            c.storage.url = redact_url(&c.storage.url);
        }
        if let Some(cluster) = &mut c.cluster {
            for url in &mut cluster.nats_urls {
                *url = redact_url(url);
            }
        }
        c
    }

    /// Keys whose change a live reload cannot apply; they keep their old
    /// values until a restart.
    pub fn restart_required_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.data_dir != new.data_dir {
            keys.push("data_dir");
        }
        if self.node_id != new.node_id {
            keys.push("node_id");
        }
        if self.storage != new.storage {
            keys.push("storage");
        }
        if self.cluster != new.cluster {
            keys.push("cluster");
        }
        if self.server != new.server {
            keys.push("server");
        }
        if self.log != new.log {
            keys.push("log");
        }
        if self.plugin_runtime.dir != new.plugin_runtime.dir
            || self.plugin_runtime.cache_dir != new.plugin_runtime.cache_dir
        {
            keys.push("plugin_runtime.dir/cache_dir");
        }
        keys
    }
}

/// A TOML syntax error without the source line that toml quotes, since that
/// line may hold a secret (`jwt_secret = "…` with its quote left open):
/// where it is, and what is wrong.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let what = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before
                .rsplit('\n')
                .next()
                .unwrap_or_default()
                .chars()
                .count()
                + 1;
            format!("line {line}, column {column}: {what}")
        }
        None => what,
    }
}

/// Whether the config key at `path` (as serde_path_to_error names it) holds
/// a secret, or a URL that may carry one.
fn is_secret_key(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    let last = last.split('[').next().unwrap_or(last);
    matches!(
        last,
        "jwt_secret" | "admin_token" | "api_keys" | "secret" | "signing_secret" | "url"
    )
}

/// `message` with every quoted part (`"…"` or `` `…` ``) replaced.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => {
                out.push_str("<redacted>");
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '"' || c == '`' {
                    open = Some(c);
                }
            }
        }
    }
    if open.is_some() {
        out.push_str("<redacted>");
    }
    out
}

impl StorageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match self.backend {
            StorageBackend::Sqlite => {
                if !self.url.is_empty() {
                    return Err(key_err(
                        "storage.url",
                        "is only used with storage.backend = \"postgres\"",
                    ));
                }
            }
            StorageBackend::Postgres => {
                if self.url.is_empty() {
                    return Err(key_err(
                        "storage.url",
                        "is required with storage.backend = \"postgres\"",
                    ));
                }
                let scheme_ok = reqwest::Url::parse(&self.url)
                    .map(|u| matches!(u.scheme(), "postgres" | "postgresql") && u.has_host())
                    .unwrap_or(false);
                if !scheme_ok {
                    return Err(key_err(
                        "storage.url",
                        "must be a URL like postgres://user:password@host:5432/database",
                    ));
                }
            }
        }
        if self.pool_size == 0 || self.pool_size > 1024 {
            return Err(key_err("storage.pool_size", "must be between 1 and 1024"));
        }
        if self.max_queued_writes == 0 || self.max_queued_writes > 1_000_000 {
            return Err(key_err(
                "storage.max_queued_writes",
                "must be between 1 and 1000000",
            ));
        }
        for (key, value) in [
            ("storage.statement_timeout", self.statement_timeout),
            ("storage.connect_timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(key_err(key, "must be greater than zero"));
            }
        }
        Ok(())
    }
}

/// A URL as it may be shown (logs, admin views, `config check`): the
/// user name and password, and every query value, are replaced by `***`;
/// the scheme, host, port, path and query keys stay, so the endpoint can
/// still be recognised. Text that does not parse as a URL is not shown.
/// This is the one place the gateway redacts a URL.
pub fn redact_url(url: &str) -> String {
    use std::fmt::Write as _;
    let Ok(u) = reqwest::Url::parse(url) else {
        return "<not a URL>".to_string();
    };
    let mut out = format!("{}://", u.scheme());
    if !u.username().is_empty() || u.password().is_some() {
        out.push_str("***@");
    }
    out.push_str(u.host_str().unwrap_or_default());
    if let Some(port) = u.port() {
        let _ = write!(out, ":{port}");
    }
    out.push_str(u.path());
    if let Some(query) = u.query() {
        let pairs: Vec<String> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) => format!("{key}=***"),
                None => "***".to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// A name that config entries and URLs refer to: unique, and letters,
/// digits, `-` or `_` only.
fn check_name<'a>(
    key: &str,
    name: &'a str,
    seen: &mut BTreeSet<&'a str>,
) -> Result<(), ConfigError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(key_err(
            key,
            "must be non-empty letters, digits, `-` or `_`",
        ));
    }
    if !seen.insert(name) {
        return Err(key_err(key, format!("`{name}` is used twice")));
    }
    Ok(())
}

/// Applies `PLUGBOARD_SECTION__KEY=value` overrides. The value is read as a
/// TOML value when it parses as one (numbers, booleans, arrays, inline
/// tables) and as a string otherwise.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !ENV_RESERVED.contains(&k.as_str()))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Env {
                var,
                message: "has an empty key segment".into(),
            });
        }
        let value = match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw)),
            Err(_) => toml::Value::String(raw),
        };
        let mut at = &mut *table;
        for segment in &path[..path.len() - 1] {
            let entry = at
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            at = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Env {
                        var,
                        message: format!("`{segment}` is not a section"),
                    })
                }
            };
        }
        at.insert(path[path.len() - 1].clone(), value);
    }
    Ok(())
}

/// Parses a byte size: an integer, or a string like `64KiB`, `1MiB`, `512B`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 64KiB"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1024,
        "MiB" | "M" | "MB" => 1024 * 1024,
        "GiB" | "G" | "GB" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{text}` is too large"))
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => usize::try_from(n).map_err(serde::de::Error::custom),
        Raw::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn ser_size<S: serde::Serializer>(v: &usize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(*v as u64)
}

mod humantime_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        raw.iter()
            .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
            .collect()
    }

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_err(toml: &str, expect_key: &str) {
        let err = Config::from_toml(toml).unwrap_err().to_string();
        assert!(
            err.contains(expect_key),
            "error `{err}` does not name `{expect_key}`"
        );
    }

    #[test]
    fn cluster_mode_needs_postgres_and_sane_leases() {
        const PG: &str = "[storage]\nbackend = \"postgres\"\nurl = \"postgres://db/x\"\n";
        let c = Config::from_toml(&format!("{PG}[cluster]\n")).unwrap();
        assert_eq!(c.cluster, Some(ClusterConfig::default()));
        assert!(
            Config::from_toml("").unwrap().cluster.is_none(),
            "no section: a single node"
        );
        check_err("[cluster]\n", "cluster");
        check_err(
            &format!("{PG}[cluster]\nnats_urls = []\n"),
            "cluster.nats_urls",
        );
        check_err(
            &format!("{PG}[cluster]\nnode_id = \"a.b\"\n"),
            "cluster.node_id",
        );
        check_err(
            &format!("{PG}[cluster]\nsubject_prefix = \"x y\"\n"),
            "cluster.subject_prefix",
        );
        check_err(
            &format!("{PG}[cluster]\nlease_ttl = \"3s\"\nlease_renew = \"2s\"\n"),
            "cluster.lease_renew",
        );
        check_err(
            &format!("{PG}node_id = \"one\"\n[cluster]\nnode_id = \"two\"\n"),
            "node_id",
        );
        let shown = Config::from_toml(&format!(
            "{PG}[cluster]\nnats_urls = [\"nats://user:pw@nats:4222\"]\n"
        ))
        .unwrap()
        .redacted();
        assert_eq!(
            shown.cluster.unwrap().nats_urls,
            vec!["nats://***@nats:4222".to_string()]
        );
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        check_err("[gateway]\npign_interval = \"5s\"", "gateway.pign_interval");
        check_err(
            "[gateway]\nping_interval = \"soon\"",
            "gateway.ping_interval",
        );
        check_err("bogus = 1", "bogus");
        check_err(
            "[gateway]\nmax_frame_size = \"10XB\"",
            "gateway.max_frame_size",
        );
        check_err(
            "[gateway.devices]\nsame_device = \"maybe\"",
            "gateway.devices.same_device",
        );
        check_err(
            "[[webhooks]]\nname = \"a\"\nurl = \"ftp://x\"\nsecret = \"whsec_MDEyMzQ1Njc4OWFiY2RlZg==\"",
            "webhooks[0].url",
        );
        check_err(
            "[[webhooks]]\nname = \"a\"\nurl = \"http://x\"\nsecret = \"nope\"",
            "webhooks[0].secret",
        );
        check_err(
            "[[webhooks]]\nname = \"a\"\nurl = \"http://x\"\nsecret = \"whsec_MDEyMzQ1Njc4OWFiY2RlZg==\"\nevents = [\"conection.*\"]",
            "webhooks[0].events",
        );
        check_err("[outbox]\nretry_schedule = []", "outbox.retry_schedule");
    }

    #[test]
    fn an_endpoint_lease_is_positive_and_at_least_one_request_long() {
        let outbox = |toml: &str| Config::from_toml(&format!("[outbox]\n{toml}"));
        let c = outbox("request_timeout = \"2s\"\nendpoint_lease = \"2s\"").unwrap();
        assert_eq!(c.outbox.endpoint_lease, Duration::from_secs(2));
        let err = |toml: &str| outbox(toml).unwrap_err().to_string();
        assert_eq!(
            err("endpoint_lease = \"0s\""),
            "config key `outbox.endpoint_lease`: must be greater than zero"
        );
        assert_eq!(
            err("request_timeout = \"20s\"\nendpoint_lease = \"15s\""),
            "config key `outbox.endpoint_lease`: must be at least outbox.request_timeout"
        );
    }

    #[test]
    fn env_overrides_file() {
        let env = vec![
            (
                "PLUGBOARD_GATEWAY__PING_INTERVAL".to_string(),
                "3s".to_string(),
            ),
            (
                "PLUGBOARD_GATEWAY__OUTBOUND_QUEUE".to_string(),
                "7".to_string(),
            ),
            ("PLUGBOARD_NODE_ID".to_string(), "edge-2".to_string()),
            ("PLUGBOARD_CONFIG".to_string(), "ignored.toml".to_string()),
        ];
        let c = Config::load_with_env(None, env).unwrap();
        assert_eq!(c.gateway.ping_interval, Duration::from_secs(3));
        assert_eq!(c.gateway.outbound_queue, 7);
        assert_eq!(c.node_id, "edge-2");
        let bad = vec![("PLUGBOARD_GATEWAY__NOPE".to_string(), "1".to_string())];
        let err = Config::load_with_env(None, bad).unwrap_err().to_string();
        assert!(err.contains("gateway.nope"), "{err}");
    }

    #[test]
    fn sizes_and_patterns() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("12").unwrap(), 12);
        assert!(parse_size("1 parsec").is_err());
        assert!(pattern_matches("connection.*", "connection.opened"));
        assert!(!pattern_matches("connection.*", "connections.opened"));
        assert!(pattern_matches("*", "user.online"));
        assert!(!pattern_matches("user.online", "user.offline"));
    }
    #[test]
    fn a_syntax_error_on_a_secret_line_does_not_quote_the_line() {
        let secret = "hunter2-0123456789-abcdefghijklmnop";
        for toml in [
            format!("[auth]\njwt_secret = \"{secret}\n"),
            format!("[auth]\nadmin_token = {secret}\n"),
            format!("[auth]\njwt_secret = \"{secret}\" trailing\n"),
        ] {
            let err = Config::from_toml(&toml).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("line 2"), "the error still says where: {err}");
        }
    }

    #[test]
    fn a_mistyped_secret_is_not_quoted_in_the_error() {
        let err = Config::from_toml("[auth]\napi_keys = \"hunter2-key\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.api_keys"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // Other keys keep serde's full message.
        let err = Config::from_toml("[gateway]\nping_interval = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query_values() {
        assert_eq!(
            redact_url("https://bot:s3cret@example.com:8443/hook/x?token=abc&flag&b=2#frag"),
            "https://***@example.com:8443/hook/x?token=***&***&b=***"
        );
        assert_eq!(
            redact_url("http://example.com/hook"),
            "http://example.com/hook"
        );
        assert_eq!(redact_url("not a url with s3cret"), "<not a URL>");
        let mut c = Config::from_toml(
            "[[webhooks]]\nname = \"a\"\nurl = \"http://u:p4ss@x/h?token=t0k\"\nsecret = \"whsec_MDEyMzQ1Njc4OWFiY2RlZg==\"",
        )
        .unwrap();
        c = c.redacted();
        assert_eq!(c.webhooks[0].url, "http://***@x/h?token=***");
    }
}
