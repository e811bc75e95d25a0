//! A private PostgreSQL server for a test process: its own temporary
//! folder, a free loopback port, stopped when the process ends.
//!
//! [`shared()`] is the server of the functional tests: started once per
//! test binary (on first use, from any thread or runtime) with settings for
//! speed (`fsync`, `synchronous_commit` and `full_page_writes` off); each
//! test takes a brand-new database of its own with
//! [`PgServer::create_database`]. A test that stops or restarts PostgreSQL
//! on purpose starts a [`PgServer`] of its own with [`PgServer::start`]
//! ([`PgOptions::durable`] keeps PostgreSQL's durable defaults, for
//! benchmarks and durability tests).
//!
//! PostgreSQL refuses to run as root, and tests run as root: then the
//! server programs (`initdb`, `pg_ctl`, `postgres`) run as the `postgres`
//! user through `runuser`, in a folder owned by it. Clients (`createdb`,
//! `psql`) connect over TCP as the database superuser `postgres`, with
//! `trust` authentication on loopback.
//!
//! Nothing is left behind: the shared server is stopped by an `atexit`
//! handler, and every server has a watchdog process that stops it and
//! removes its folder once the test process is gone, however it ended
//! (the watchdog waits for the end of a pipe only the test process holds).
//!
//! Every failure is a panic naming the command that failed, with its output.

use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The PostgreSQL major version the tests are written for; a server of
/// another version is used only when this one is not installed.
pub const VERSION: u32 = 15;

/// The database superuser (and, as root, the system user the server runs as).
const SUPERUSER: &str = "postgres";

/// Client settings of the environment that would point the command-line
/// clients somewhere else; every command runs without them.
const CLIENT_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGCONNECT_TIMEOUT",
    "PGDATA",
    "PGTZ",
];

/// How a server is configured.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Keep PostgreSQL's durable defaults (`fsync`, `synchronous_commit`,
    /// `full_page_writes` on). Off by default: functional tests do not
    /// survive power losses, and fsyncs on a shared machine cost seconds.
    pub durable: bool,
    /// `max_connections` (400 by default: many gateways with their pools
    /// at once).
    pub max_connections: u32,
    /// Further `-c name=value` settings, applied last.
    pub settings: Vec<(String, String)>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            durable: false,
            max_connections: 400,
            settings: Vec::new(),
        }
    }
}

impl PgOptions {
    /// For functional tests: nothing waits for the disk. What is committed
    /// survives a crash of the gateway and a clean stop of PostgreSQL, not
    /// a crash of PostgreSQL ([`PgServer::kill`]) or of the machine.
    pub fn fast() -> Self {
        PgOptions::default()
    }

    /// PostgreSQL's durable defaults (for benchmarks and durability tests).
    pub fn durable() -> Self {
        PgOptions {
            durable: true,
            ..PgOptions::default()
        }
    }

    /// Adds a `-c name=value` setting.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    fn server_settings(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("max_connections".into(), self.max_connections.to_string()),
        ];
        if !self.durable {
            for name in ["fsync", "synchronous_commit", "full_page_writes"] {
                all.push((name.into(), "off".into()));
            }
        }
        all.extend(self.settings.iter().cloned());
        all
    }
}

/// A PostgreSQL server of this test process.
pub struct PgServer {
    /// The temporary folder: `data/`, the Unix socket and `server.log`.
    root: PathBuf,
    port: u16,
    bin: PathBuf,
    /// Run the server programs as the `postgres` user (this process is root).
    as_postgres: bool,
    options: PgOptions,
    /// The server of [`shared()`], which no test may stop.
    shared: bool,
    running: Mutex<bool>,
    /// The write end of the watchdog's standard input: when it closes (this
    /// server dropped, or the process gone), the watchdog cleans up.
    watchdog: Mutex<Option<ChildStdin>>,
}

static SHARED: OnceLock<Result<PgServer, String>> = OnceLock::new();

/// The PostgreSQL server shared by the tests of this process, started on
/// first use with [`PgOptions::fast`] and stopped when the process exits.
/// Give each test its own database with [`PgServer::create_database`].
pub fn shared() -> &'static PgServer {
    let server = SHARED.get_or_init(|| {
        let server = PgServer::try_start(PgOptions::fast(), true)?;
        register_exit_handler();
        Ok(server)
    });
    match server {
        Ok(server) => server,
        Err(e) => panic!("the shared PostgreSQL server of this test process did not start: {e}"),
    }
}

fn register_exit_handler() {
    extern "C" fn stop_shared() {
        // Never unwinds out of an `extern "C"` function.
        let _ = std::panic::catch_unwind(|| {
            if let Some(Ok(server)) = SHARED.get() {
                server.cleanup();
            }
        });
    }
    #[allow(unsafe_code)]
    // SAFETY: registers a plain function with no arguments; it touches only
    // a static that is initialised before registration.
    let rc = unsafe { libc::atexit(stop_shared) };
    if rc != 0 {
        // The watchdog still stops the server once the process is gone.
        eprintln!("postgres harness: atexit registration failed ({rc})");
    }
}

impl PgServer {
    /// Starts a private server: `initdb` in a new temporary folder, then
    /// `pg_ctl start` on a free loopback port. Panics with the failing
    /// command's output.
    pub fn start(options: PgOptions) -> PgServer {
        match PgServer::try_start(options, false) {
            Ok(server) => server,
            Err(e) => panic!("PostgreSQL did not start: {e}"),
        }
    }

    fn try_start(options: PgOptions, shared: bool) -> Result<PgServer, String> {
        let bin = find_bindir()?;
        let as_postgres = is_root();
        let root = tempfile::Builder::new()
            .prefix("plugboard-pg-")
            .tempdir()
            .map_err(|e| format!("creating a temporary folder: {e}"))?
            .keep();
        let mut server = PgServer {
            root,
            port: 0,
            bin,
            as_postgres,
            options,
            shared,
            running: Mutex::new(false),
            watchdog: Mutex::new(None),
        };
        // From here on, dropping `server` removes the folder.
        if as_postgres {
            run(
                Command::new("chown")
                    .arg(format!("{SUPERUSER}:"))
                    .arg(&server.root),
                "chown of the PostgreSQL folder to the `postgres` user (is PostgreSQL installed?)",
            )?;
        }
        server.spawn_watchdog()?;
        let mut initdb = server.server_command("initdb");
        initdb
            .arg("-D")
            .arg(server.data_dir())
            .args(["-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]);
        run(&mut initdb, "initdb")?;
        // A free port can be taken between finding it and binding it: try
        // a few.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port()?;
            match server.pg_ctl_start() {
                Ok(()) => {
                    *server.running.lock().unwrap() = true;
                    return Ok(server);
                }
                Err(e) if e.port_taken => last = e.message,
                Err(e) => return Err(e.message),
            }
        }
        Err(format!("no free port after 5 attempts; last: {last}"))
    }

    /// The TCP port (on 127.0.0.1). It stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data folder (`PGDATA`).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The URL of database `db`, as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a brand-new, empty database (a copy of `template1`) with a
    /// name unique in this machine's test runs, and returns its URL.
    pub fn create_database(&self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let name = format!(
            "pb_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut createdb = self.client_command("createdb");
        createdb.arg(&name);
        if let Err(e) = run(&mut createdb, "createdb") {
            panic!("creating database {name} on {}: {e}", self.url(""));
        }
        self.url(&name)
    }

    /// Drops a database (by name or URL) with its connections, if it exists.
    pub fn drop_database(&self, db: &str) {
        if let Err(e) = self.try_drop_database(db) {
            panic!("dropping database {}: {e}", database_name(db));
        }
    }

    /// [`PgServer::drop_database`], with the failure returned.
    pub fn try_drop_database(&self, db: &str) -> Result<(), String> {
        let mut dropdb = self.client_command("dropdb");
        dropdb
            .args(["--if-exists", "--force"])
            .arg(database_name(db));
        run(&mut dropdb, "dropdb").map(|_| ())
    }

    /// Runs `sql` with `psql` on database `db` (a name or a URL) and returns
    /// its unaligned, tuples-only output (`|` between columns). Panics on
    /// any error, with psql's message.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let url = if db.contains("://") {
            db.to_string()
        } else {
            self.url(db)
        };
        let mut psql = Command::new(self.bin.join("psql"));
        clear_client_env(&mut psql);
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(&url)
            .arg("-c")
            .arg(sql);
        match run(&mut psql, "psql") {
            Ok(out) => out,
            Err(e) => panic!("on {url}, {sql:?}: {e}"),
        }
    }

    /// Whether the server is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        *self.running.lock().unwrap()
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`: clients are
    /// disconnected, a checkpoint is written). Nothing happens if it is
    /// already stopped.
    pub fn stop(&self) {
        self.stop_mode("fast");
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`:
    /// no checkpoint, recovery at the next start). With
    /// [`PgOptions::fast`] (`synchronous_commit = off`) the last commits
    /// acknowledged before the kill can be lost: a test that kills
    /// PostgreSQL and counts what survived starts it with
    /// [`PgOptions::durable`].
    pub fn kill(&self) {
        self.stop_mode("immediate");
    }

    /// Starts the server again on the same data and port after
    /// [`PgServer::stop`] or [`PgServer::kill`]. Nothing happens if it is
    /// running. Panics if the port was taken meanwhile.
    pub fn start_again(&self) {
        self.refuse_on_shared("start_again");
        let mut running = self.running.lock().unwrap();
        if *running {
            return;
        }
        // The port was ours a moment ago; something else may hold it
        // briefly (a client's ephemeral port): give it a few tries.
        let mut last = String::new();
        for _ in 0..10 {
            match self.pg_ctl_start() {
                Ok(()) => {
                    *running = true;
                    return;
                }
                Err(e) if e.port_taken => {
                    last = e.message;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("PostgreSQL did not start again: {}", e.message),
            }
        }
        panic!(
            "PostgreSQL did not start again: port {} stays taken: {last}",
            self.port
        );
    }

    /// [`PgServer::stop`], then [`PgServer::start_again`].
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    fn stop_mode(&self, mode: &str) {
        self.refuse_on_shared("stop");
        let mut running = self.running.lock().unwrap();
        if !*running {
            return;
        }
        if let Err(e) = run(&mut self.pg_ctl_stop(mode), "pg_ctl stop") {
            panic!("stopping PostgreSQL: {e}");
        }
        *running = false;
    }

    fn refuse_on_shared(&self, what: &str) {
        assert!(
            !self.shared,
            "{what} on the shared PostgreSQL server would break every other test: \
             start a private one with PgServer::start"
        );
    }

    fn pg_ctl_start(&self) -> Result<(), StartError> {
        let log_path = self.log_path();
        let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let mut flags = format!(
            "-p {} -k {}",
            self.port,
            shell_quote(&self.root.display().to_string())
        );
        for (name, value) in self.options.server_settings() {
            flags.push_str(&format!(" -c {name}={}", shell_quote(&value)));
        }
        let mut pg_ctl = self.server_command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log_path)
            .arg("-o")
            .arg(flags)
            .args(["-w", "-t", "60", "start"]);
        run(&mut pg_ctl, "pg_ctl start").map(|_| ()).map_err(|e| {
            let log = read_from(&log_path, log_start);
            StartError {
                port_taken: log.contains("could not bind")
                    || log.contains("Address already in use")
                    || log.contains("could not create any TCP/IP sockets"),
                message: format!("{e}\nserver log:\n{log}"),
            }
        })
    }

    fn pg_ctl_stop(&self, mode: &str) -> Command {
        let mut pg_ctl = self.server_command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        pg_ctl
    }

    /// A server program (`initdb`, `pg_ctl`), as the `postgres` user when
    /// this process is root.
    fn server_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new(runuser());
            c.args(["-u", SUPERUSER, "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        clear_client_env(&mut command);
        // A folder the `postgres` user can enter.
        command.current_dir(&self.root);
        command
    }

    /// A client program (`createdb`, `dropdb`) connected to this server.
    fn client_command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        clear_client_env(&mut command);
        command.args(["-h", "127.0.0.1", "-U", SUPERUSER, "-p"]);
        command.arg(self.port.to_string());
        command
    }

    /// A process, in a process group of its own (a ^C to the tests does not
    /// reach it), that waits for the end of its standard input, then stops
    /// the server and removes the folder. Only this process holds the
    /// pipe's write end (close-on-exec), so the end comes when this handle
    /// is dropped or the process is gone, even by SIGKILL.
    fn spawn_watchdog(&mut self) -> Result<(), String> {
        // Retried: the process may have ended in the middle of `initdb` or
        // `pg_ctl start`, which go on writing for a moment.
        let script = r#"root=$1; data=$2; shift 2
read -r _
for _ in 1 2 3 4 5 6 7 8 9 10; do
  if [ -f "$data/postmaster.pid" ]; then "$@" -D "$data" -m immediate -w stop; fi
  rm -rf -- "$root"
  [ -e "$root" ] || exit 0
  sleep 1
done"#;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg("plugboard-pg-watchdog")
            .arg(&self.root)
            .arg(self.data_dir());
        if self.as_postgres {
            command.arg(runuser()).args(["-u", SUPERUSER, "--"]);
        }
        command.arg(self.bin.join("pg_ctl"));
        {
            use std::os::unix::process::CommandExt;
            command.process_group(0);
        }
        let mut child = command
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the watchdog (`sh`): {e}"))?;
        *self.watchdog.lock().unwrap() = child.stdin.take();
        // The watchdog outlives this handle on purpose; reap it in the
        // background so it never lingers as a zombie of this process.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }

    /// Stops the server at once and removes its folder; never panics.
    fn cleanup(&self) {
        let running = match self.running.try_lock() {
            Ok(guard) => *guard,
            Err(_) => true,
        };
        if running || self.data_dir().join("postmaster.pid").exists() {
            let _ = self
                .pg_ctl_stop("immediate")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.cleanup();
        // The watchdog finds nothing left to do.
        if let Ok(mut w) = self.watchdog.lock() {
            w.take();
        }
    }
}

struct StartError {
    port_taken: bool,
    message: String,
}

/// The name of a database given by name or by URL (`…/name?params`).
pub fn database_name(db: &str) -> &str {
    if !db.contains("://") {
        return db;
    }
    let path = db.rsplit('/').next().unwrap_or(db);
    path.split('?').next().unwrap_or(path)
}

/// The folder of `initdb`, `pg_ctl` and the clients: `PLUGBOARD_TEST_PG_BIN`
/// if set, else `/usr/lib/postgresql/15/bin`, else `pg_config --bindir`,
/// else the newest `/usr/lib/postgresql/*/bin` with an `initdb`.
pub fn find_bindir() -> Result<PathBuf, String> {
    let has_initdb = |d: &Path| d.join("initdb").is_file();
    if let Ok(dir) = std::env::var("PLUGBOARD_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has_initdb(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "PLUGBOARD_TEST_PG_BIN={} has no initdb",
                dir.display()
            ))
        };
    }
    let preferred = PathBuf::from(format!("/usr/lib/postgresql/{VERSION}/bin"));
    if has_initdb(&preferred) {
        return Ok(preferred);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_initdb(&dir) {
            return Ok(dir);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let dir = e.path().join("bin");
            has_initdb(&dir).then_some((version, dir))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, dir)| dir).ok_or_else(|| {
        format!(
            "no PostgreSQL server binaries (initdb) in /usr/lib/postgresql/{VERSION}/bin, \
             `pg_config --bindir` or /usr/lib/postgresql/*/bin: install PostgreSQL \
             (`apt-get install -y postgresql`; scripts/test does it)"
        )
    })
}

/// util-linux's `runuser`, also when `/usr/sbin` is not on `PATH`.
fn runuser() -> &'static str {
    const SBIN: &str = "/usr/sbin/runuser";
    if Path::new(SBIN).exists() {
        SBIN
    } else {
        "runuser"
    }
}

fn is_root() -> bool {
    #[allow(unsafe_code)]
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    euid == 0
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

fn clear_client_env(command: &mut Command) {
    for var in CLIENT_ENV {
        command.env_remove(var);
    }
}

/// Runs `command` to its end; its standard output, or an error naming
/// `what` with the exit status and everything it printed.
fn run(command: &mut Command, what: &str) -> Result<String, String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: could not run {:?}: {e}", command.get_program()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(format!(
        "{what} failed ({}): {command:?}\nstderr:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        if stdout.trim().is_empty() {
            String::new()
        } else {
            format!("stdout:\n{stdout}")
        }
    ))
}

/// `value` as one word for the shell that `pg_ctl` runs the server with.
fn shell_quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,".contains(c))
    {
        return value.to_string();
    }
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_string(&mut text);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_urls_or_names() {
        assert_eq!(database_name("pb_1_2"), "pb_1_2");
        assert_eq!(
            database_name("postgres://postgres@127.0.0.1:5/pb_1_2"),
            "pb_1_2"
        );
        assert_eq!(
            database_name("postgres://postgres@127.0.0.1:5/db?sslmode=disable"),
            "db"
        );
    }

    #[test]
    fn settings_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("/tmp/plugboard-pg-x1"), "/tmp/plugboard-pg-x1");
        assert_eq!(shell_quote("%m [%p] "), "'%m [%p] '");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn durable_keeps_the_defaults() {
        let fast = PgOptions::fast().server_settings();
        assert!(fast.contains(&("fsync".into(), "off".into())));
        let durable = PgOptions::durable().setting("work_mem", "8MB");
        let durable = durable.server_settings();
        assert!(!durable.iter().any(|(k, _)| k == "fsync"));
        assert_eq!(durable.last().unwrap(), &("work_mem".into(), "8MB".into()));
    }
}
