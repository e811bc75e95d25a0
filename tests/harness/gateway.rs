//! A real gateway process (the `plugboard` command line) on port 0, with its
//! own data folder, that tests can reload, signal, kill and restart.
//!
//! It stores on SQLite in its data folder, or, when the test run asks for it
//! (`TEST_STORAGE=postgres`) or a test forces it
//! ([`GatewayOptions::engine`]), on a database of its own on the test
//! process's shared PostgreSQL server ([`crate::postgres::shared`]).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::receiver::SECRET;

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef-0123456789";
pub const API_KEY: &str = "test-api-key-0123456789";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Path of the gateway binary built beside the tests (`PLUGBOARD_BIN` overrides).
/// Cargo puts `gateway-under-test` in the profile folder, and test binaries in
/// its `deps/` folder, so it is found next to, or one folder above, this executable.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("PLUGBOARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join("gateway-under-test");
        if candidate.exists() {
            return candidate;
        }
        dir = d.parent();
    }
    panic!("gateway-under-test binary not found near {}; build it with `cargo build -p plugboard-tests`", exe.display())
}

/// One compile cache for every test gateway, beside the test binaries, so a
/// large JavaScript or Python component is compiled once per build, not per test.
pub fn plugin_cache_dir() -> PathBuf {
    binary()
        .parent()
        .map(|d| d.join("plugin-cache"))
        .unwrap_or_else(|| std::env::temp_dir().join("plugboard-test-plugin-cache"))
}

/// Addresses of the test gateways running in this process, so that a
/// receiver can ask each whether it still owes it deliveries.
static RUNNING: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The addresses of the test gateways of this process that are running now.
pub fn running_addrs() -> Vec<String> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The environment variable that picks the storage engine of a test run.
/// Not `PLUGBOARD_…`: the gateways the tests start inherit the environment,
/// and read every `PLUGBOARD_*` variable as a config key.
pub const STORAGE_ENV: &str = "TEST_STORAGE";

/// The storage engine a test gateway runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// SQLite, `<data_dir>/plugboard.db` (the gateway's default).
    Sqlite,
    /// A brand-new database on the test process's shared PostgreSQL server.
    Postgres,
}

impl Engine {
    /// The engine of this test run, from `TEST_STORAGE`: `sqlite`
    /// (also when unset or empty) or `postgres`; any other value panics.
    pub fn from_env() -> Engine {
        match std::env::var(STORAGE_ENV) {
            Err(std::env::VarError::NotPresent) => Engine::Sqlite,
            Ok(v) if v.is_empty() || v == "sqlite" => Engine::Sqlite,
            Ok(v) if v == "postgres" => Engine::Postgres,
            Ok(v) => panic!("{STORAGE_ENV}={v:?}: expected `sqlite` (the default) or `postgres`"),
            Err(e) => panic!("{STORAGE_ENV}: {e}; expected `sqlite` (the default) or `postgres`"),
        }
    }

    /// The engine's `storage.backend` name.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }

    pub fn is_postgres(self) -> bool {
        self == Engine::Postgres
    }
}

impl Default for Engine {
    /// [`Engine::from_env`].
    fn default() -> Self {
        Engine::from_env()
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a test changes in the gateway's config.
#[derive(Clone, Debug, Default)]
pub struct GatewayOptions {
    /// Webhook receiver URL; a `[[webhooks]]` entry named `rx` is added for it.
    pub webhook_url: Option<String>,
    /// Extra TOML merged over the test defaults (tables merge key by key).
    pub extra: String,
    /// The storage engine, [`Engine::from_env`] unless forced with
    /// [`GatewayOptions::engine`]. It is chosen at [`Gateway::start`] and
    /// kept across restarts and config rewrites.
    pub engine: Engine,
    /// On [`Engine::Postgres`], this database instead of a new one on the
    /// shared server (a benchmark's, on a durable [`crate::PgServer`]);
    /// the test owns it, the gateway never drops it.
    pub database_url: Option<String>,
    /// A command the gateway binary runs under, with its arguments (a
    /// benchmark's `valgrind --tool=callgrind …`); empty: run it directly.
    /// Kept across restarts.
    pub launcher: Vec<String>,
}

impl GatewayOptions {
    pub fn with_receiver(url: &str) -> Self {
        GatewayOptions {
            webhook_url: Some(url.to_string()),
            ..GatewayOptions::default()
        }
    }

    /// Runs the gateway on `engine` whatever the test run's default.
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// Runs the gateway on PostgreSQL, on database `url` (see
    /// [`GatewayOptions::database_url`]).
    pub fn postgres_database(mut self, url: &str) -> Self {
        self.engine = Engine::Postgres;
        self.database_url = Some(url.to_string());
        self
    }

    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Runs the gateway binary under `command` (see [`GatewayOptions::launcher`]).
    pub fn launcher(mut self, command: &[&str]) -> Self {
        self.launcher = command.iter().map(|a| a.to_string()).collect();
        self
    }
}

/// Merges `from` over `into`: tables merge key by key, anything else in
/// `from` replaces what `into` has.
pub fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Builds the config text for a test gateway. With a `database_url` the
/// gateway stores on that PostgreSQL database (`[storage]`, under
/// `opts.extra`); without one nothing is written about storage (SQLite in
/// the data folder). `opts.engine` is not read here: the database is
/// chosen once, at [`Gateway::start`].
pub fn config_text(
    data_dir: &std::path::Path,
    opts: &GatewayOptions,
    database_url: Option<&str>,
) -> String {
    let base = format!(
        r#"
data_dir = {data_dir:?}
[server]
listen = "127.0.0.1:0"
[auth]
jwt_secret = "{JWT_SECRET}"
api_keys = ["{API_KEY}"]
admin_token = "{ADMIN_TOKEN}"
token_leeway = "0s"
[gateway]
ping_interval = "1s"
pong_timeout = "1s"
close_timeout = "2s"
auth_timeout = "1s"
[shutdown]
drain_timeout = "5s"
outbox_flush_timeout = "10s"
[outbox]
retry_schedule = ["100ms", "200ms", "300ms", "400ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms", "500ms"]
jitter = 0.1
[log]
level = "info,plugboard=debug"
[plugin_runtime]
cache_dir = {cache_dir:?}
"#,
        data_dir = data_dir.display().to_string(),
        cache_dir = plugin_cache_dir().display().to_string(),
    );
    let mut table: toml::Table = base.parse().expect("base test config parses");
    if let Some(url) = database_url {
        let mut storage = toml::Table::new();
        storage.insert("backend".into(), Engine::Postgres.name().into());
        storage.insert("url".into(), url.into());
        table.insert("storage".into(), toml::Value::Table(storage));
    }
    let extra: toml::Table = opts.extra.parse().expect("test config overrides parse");
    merge(&mut table, extra);
    if let Some(url) = &opts.webhook_url {
        let hooks = table
            .entry("webhooks")
            .or_insert_with(|| toml::Value::Array(vec![]));
        if let toml::Value::Array(list) = hooks {
            if list.is_empty() {
                let mut rx = toml::Table::new();
                rx.insert("name".into(), "rx".into());
                rx.insert("url".into(), url.as_str().into());
                rx.insert("secret".into(), SECRET.into());
                // Every event of clients and the API, not the gateway's own
                // `service.*` (one at each start and shutdown), so tests can
                // count what their clients caused. Service events are tested
                // with endpoints of their own.
                let events = ["connection.*", "user.*", "message.*", "control.*"];
                rx.insert("events".into(), events.to_vec().into());
                list.push(toml::Value::Table(rx));
            }
        }
    }
    toml::to_string(&table).expect("config serialises")
}

/// Where a gateway's data lives besides its data folder; one for its whole
/// life, restarts included.
#[derive(Clone)]
struct Storage {
    engine: Engine,
    /// The PostgreSQL database (for [`Engine::Postgres`]).
    database: Option<Arc<Database>>,
}

impl Storage {
    async fn new(opts: &GatewayOptions) -> Storage {
        let engine = opts.engine;
        let database = match (engine, &opts.database_url) {
            (Engine::Sqlite, _) => None,
            (Engine::Postgres, Some(url)) => Some(Arc::new(Database {
                url: url.clone(),
                owned: false,
            })),
            (Engine::Postgres, None) => {
                let created =
                    tokio::task::spawn_blocking(|| crate::postgres::shared().create_database())
                        .await;
                let url = created.unwrap_or_else(|e| match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    Err(e) => panic!("creating the gateway's database: {e}"),
                });
                Some(Arc::new(Database { url, owned: true }))
            }
        };
        Storage { engine, database }
    }

    fn url(&self) -> Option<&str> {
        self.database.as_ref().map(|d| d.url.as_str())
    }
}

/// A database of the shared PostgreSQL server, dropped once no gateway or
/// restart handle uses it (so a long test run does not fill the disk).
struct Database {
    url: String,
    /// Created on the shared server for this gateway (else the test's own).
    owned: bool,
}

impl Drop for Database {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let url = std::mem::take(&mut self.url);
        // In the background: a drop must not hold up the test (or its
        // runtime); a failure only leaves the database to the server's
        // removal at exit.
        std::thread::spawn(move || {
            let _ = crate::postgres::shared().try_drop_database(&url);
        });
    }
}

/// The data folder and config of a gateway, to start it again.
pub struct RestartHandle {
    dir: Arc<tempfile::TempDir>,
    config_path: PathBuf,
    storage: Storage,
    launcher: Arc<Vec<String>>,
}

impl RestartHandle {
    pub async fn restart(&self) -> Gateway {
        Gateway::spawn(
            self.dir.clone(),
            self.config_path.clone(),
            self.storage.clone(),
            self.launcher.clone(),
        )
        .await
    }

    /// The storage engine of the gateway this handle restarts.
    pub fn engine(&self) -> Engine {
        self.storage.engine
    }

    /// The config file the gateway starts with.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Rewrites the config file with `opts` before a restart, on the
    /// gateway's own storage, as [`Gateway::write_config`] does.
    pub fn write_config(&self, opts: &GatewayOptions) {
        std::fs::write(
            &self.config_path,
            config_text(&self.dir.path().join("data"), opts, self.storage.url()),
        )
        .unwrap();
    }
}

/// A running gateway child process.
pub struct Gateway {
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
    pub addr: String,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    http: reqwest::Client,
    storage: Storage,
    launcher: Arc<Vec<String>>,
}

impl Gateway {
    /// Starts a gateway with its own new data folder and, on
    /// [`Engine::Postgres`], its own new database.
    pub async fn start(opts: GatewayOptions) -> Gateway {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let config_path = dir.path().join("plugboard.toml");
        let storage = Storage::new(&opts).await;
        std::fs::write(
            &config_path,
            config_text(&dir.path().join("data"), &opts, storage.url()),
        )
        .unwrap();
        Self::spawn(dir, config_path, storage, Arc::new(opts.launcher)).await
    }

    /// The storage engine this gateway runs on.
    pub fn engine(&self) -> Engine {
        self.storage.engine
    }

    /// The URL of its PostgreSQL database (`None` on SQLite).
    pub fn database_url(&self) -> Option<&str> {
        self.storage.url()
    }

    /// Starts another gateway process on the same data folder, database and
    /// config (after a crash or a shutdown).
    pub async fn restart(&self) -> Gateway {
        self.restart_handle().restart().await
    }

    /// What is needed to start this gateway again after it is gone.
    pub fn restart_handle(&self) -> RestartHandle {
        RestartHandle {
            dir: self.dir.clone(),
            config_path: self.config_path.clone(),
            storage: self.storage.clone(),
            launcher: self.launcher.clone(),
        }
    }

    async fn spawn(
        dir: Arc<tempfile::TempDir>,
        config_path: PathBuf,
        storage: Storage,
        launcher: Arc<Vec<String>>,
    ) -> Gateway {
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        // SIGXFSZ ignored, so that a test that caps the gateway's file size
        // (`limit_file_size`) sees failed writes rather than a killed
        // process. Without a cap the signal never comes.
        #[allow(unsafe_code)]
        // SAFETY: `signal` is async-signal-safe, the only kind of call
        // allowed between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the gateway binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log3 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("plugboard: listening on http://") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.to_string());
                    }
                }
                log3.lock().unwrap().push(line);
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(120)))
            .await
            .unwrap();
        let addr = match addr {
            Ok(a) => a,
            Err(_) => {
                let status = child.try_wait();
                panic!(
                    "gateway did not start ({status:?}); its output:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(addr.clone());
        Gateway {
            dir,
            config_path,
            addr,
            child: Some(child),
            log,
            http: reqwest::Client::new(),
            storage,
            launcher,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The gateway's log so far (stdout and stderr lines).
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// A client token for `user`, optionally for a device and with a lifetime.
    pub fn token(&self, user: &str, device: Option<&str>, ttl: Option<Duration>) -> String {
        plugboard::auth::mint_token(user, device, ttl, JWT_SECRET.as_bytes())
    }

    /// A client token with exactly these claims (an expired one, an `exp`
    /// at the edge of the range), signed with the gateway's secret.
    pub fn token_with_claims(&self, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        )
        .expect("claims encode")
    }

    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request(method, path, API_KEY, body).await
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request(method, path, ADMIN_TOKEN, body).await
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("gateway answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("gateway answers");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    }

    /// Rewrites the config file with `opts` and reloads through the admin API.
    pub async fn reload_with(&self, opts: &GatewayOptions) -> (u16, Value) {
        self.write_config(opts);
        self.admin(reqwest::Method::POST, "/admin/reload", None)
            .await
    }

    /// Rewrites the config file with `opts`, on this gateway's own storage
    /// (`opts.engine` is not read: the engine and database stay the ones
    /// chosen at start).
    pub fn write_config(&self, opts: &GatewayOptions) {
        self.restart_handle().write_config(opts);
    }

    pub fn signal(&self, sig: libc::c_int) {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, sig);
        }
    }

    /// Caps the size of the files the gateway process may write (its
    /// RLIMIT_FSIZE; `None` lifts the cap): with `Some(0)` every write to
    /// storage fails, as on a full disk. Linux only. It caps the gateway
    /// process only: on [`Engine::Postgres`] the database server writes
    /// its files itself.
    pub fn limit_file_size(&self, bytes: Option<u64>) {
        let limit = libc::rlimit {
            rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
            rlim_max: libc::RLIM_INFINITY,
        };
        #[allow(unsafe_code)]
        // SAFETY: prlimit(2) on our own child's pid, with a valid struct
        // and no old-limit pointer.
        let rc = unsafe {
            libc::prlimit(
                self.pid() as libc::pid_t,
                libc::RLIMIT_FSIZE,
                &limit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(
            rc,
            0,
            "prlimit(RLIMIT_FSIZE): {}",
            std::io::Error::last_os_error()
        );
    }

    /// SIGKILL: the gateway dies without any cleanup.
    pub async fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
    }

    /// SIGTERM, then waits for the process to exit; returns its exit code.
    pub async fn terminate(mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        status.code()
    }

    /// A metric's value from `/metrics` (sum over series whose labels contain `labels`).
    ///
    /// A series that does not exist counts as `0.0` here, so this must not
    /// be used to show that something did not happen (a misspelt name or
    /// label would pass): use [`Gateway::metric_strict`] or
    /// [`Gateway::metrics`] for that.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, text) = self.get_text("/metrics").await;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Like [`Gateway::metric`], but a missing series fails the test: at
    /// least one series of `name` must have labels containing `labels`.
    pub async fn metric_strict(&self, name: &str, labels: &str) -> f64 {
        self.metrics().await.value(name, labels)
    }

    /// One read of `/metrics`, parsed.
    pub async fn metrics(&self) -> Metrics {
        let (status, text) = self.get_text("/metrics").await;
        assert_eq!(status, 200, "GET /metrics: {text}");
        Metrics::parse(&text)
    }
}

/// One sample line of `/metrics`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    /// The label text between the braces, as served (`a="x",b="y"`).
    pub label_text: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed `/metrics` body; every look-up is strict: asking for a series
/// that is not there fails the test.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_sample)
            .collect();
        Metrics {
            samples,
            text: text.to_string(),
        }
    }

    /// Every series of `name`; panics if there is none.
    #[track_caller]
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        let found: Vec<&Sample> = self.samples.iter().filter(|s| s.name == name).collect();
        assert!(
            !found.is_empty(),
            "no series of `{name}` in /metrics:\n{}",
            self.text
        );
        found
    }

    /// The sum over the series of `name` whose label text contains
    /// `labels`; panics if no series matches.
    #[track_caller]
    pub fn value(&self, name: &str, labels: &str) -> f64 {
        let matching: Vec<&Sample> = self
            .series(name)
            .into_iter()
            .filter(|s| s.label_text.contains(labels))
            .collect();
        assert!(
            !matching.is_empty(),
            "no series of `{name}` with {labels} in /metrics: {:#?}",
            self.series(name)
        );
        matching.iter().map(|s| s.value).sum()
    }
}

/// `name{a="x",b="y"} 1` or `name 1` (an optional timestamp or exemplar
/// after the value is ignored).
fn parse_sample(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let (label_text, after) = if let Some(rest) = rest.strip_prefix('{') {
        let end = label_end(rest)?;
        (rest[..end].to_string(), &rest[end + 1..])
    } else {
        (String::new(), rest)
    };
    let value = after.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels: parse_labels(&label_text),
        label_text,
        value,
    })
}

/// Where the closing `}` of a label set is, skipping quoted values.
fn label_end(text: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = eq + 2 + i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key, value));
        rest = &rest[end.min(rest.len())..];
    }
    labels
}

impl Gateway {
    fn unregister(&self) {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = running.iter().position(|a| *a == self.addr) {
            running.swap_remove(i);
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.unregister();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failing test shows what its gateway logged, warnings and errors
        // first: the cause is usually there.
        if std::thread::panicking() {
            let log = self.log();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- gateway {} (storage: {:?}): {} warning/error lines ---\n{}\n--- last lines ---\n{}",
                self.addr,
                self.engine(),
                notable.len(),
                notable.iter().take(60).copied().collect::<Vec<_>>().join("\n"),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}
