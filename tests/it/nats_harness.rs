//! The NATS harness itself: a server starts with JetStream on a free
//! loopback port and speaks the protocol; it keeps its port and store
//! across a kill, a stop and a start; two servers are apart; nothing is
//! left once the handle, or the whole test process, is gone. Only std TCP:
//! the tests crate has no NATS client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plugboard_tests::nats::{self, NatsServer};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A bare NATS protocol connection (text lines ending in CRLF).
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The server's `INFO` object.
    info: serde_json::Value,
}

impl Conn {
    fn open(server: &NatsServer) -> Conn {
        let stream = TcpStream::connect(server.addr()).expect("connect to nats-server");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let line = read_line(&mut reader);
        let json = line
            .strip_prefix("INFO ")
            .unwrap_or_else(|| panic!("first line is not INFO: {line:?}"));
        let info = serde_json::from_str(json).unwrap_or_else(|e| panic!("INFO {json}: {e}"));
        let mut conn = Conn {
            reader,
            writer,
            info,
        };
        conn.send(r#"CONNECT {"verbose":false,"pedantic":false,"name":"nats-harness-test"}"#);
        conn.ping();
        conn
    }

    fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
    }

    /// PING, then waits for the PONG (the server has read everything sent
    /// before it).
    fn ping(&mut self) {
        self.send("PING");
        let line = read_line(&mut self.reader);
        assert_eq!(line, "PONG", "answer to PING");
    }

    /// A request: publishes `payload` on `subject` with a reply inbox and
    /// returns the payload of the one answer.
    fn request(&mut self, subject: &str, payload: &str) -> serde_json::Value {
        self.send("SUB _INBOX.harness 1");
        self.send("UNSUB 1 1");
        self.send(&format!(
            "PUB {subject} _INBOX.harness {}\r\n{payload}",
            payload.len()
        ));
        loop {
            let line = read_line(&mut self.reader);
            if line == "PING" {
                self.send("PONG");
                continue;
            }
            // MSG <subject> <sid> <size>
            let size: usize = match line.strip_prefix("MSG _INBOX.harness 1 ") {
                Some(size) => size.parse().unwrap(),
                None => panic!("unexpected line waiting for the answer to {subject}: {line:?}"),
            };
            let mut body = vec![0; size + 2];
            self.reader.read_exact(&mut body).unwrap();
            body.truncate(size);
            return serde_json::from_slice(&body).unwrap();
        }
    }
}

fn read_line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    let n = reader.read_line(&mut line).expect("read from nats-server");
    assert!(n > 0, "nats-server closed the connection");
    line.trim_end_matches(['\r', '\n']).to_string()
}

/// Whether something accepts connections on 127.0.0.1:`port`.
fn accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Polls `check` until it holds; panics naming `what` after [`TIMEOUT`].
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn root_of(server: &NatsServer) -> PathBuf {
    server.log_path().parent().unwrap().to_path_buf()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_server_starts_with_jetstream_on_a_free_port_and_speaks_nats() {
    let server = NatsServer::start();
    assert!(server.is_running());
    let port = server.port();
    assert_ne!(port, 0);
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
    // The first line is the INFO object, JetStream on, on our port, on loopback.
    let line = nats::read_info(server.addr(), TIMEOUT).unwrap();
    assert!(line.starts_with("INFO {"), "{line:?}");
    let conn = Conn::open(&server);
    assert_eq!(conn.info["jetstream"], true, "{}", conn.info);
    assert_eq!(conn.info["port"], port, "{}", conn.info);
    assert_eq!(conn.info["host"], "127.0.0.1", "{}", conn.info);
    // JetStream answers its API, with the store in the server's folder.
    let mut conn = conn;
    let account = conn.request("$JS.API.INFO", "");
    assert!(account.get("error").is_none(), "{account}");
    assert_eq!(
        account["type"],
        "io.nats.jetstream.api.v1.account_info_response"
    );
    assert!(server.store_dir().join("jetstream").is_dir());
    assert!(server.log().contains("Server is ready"), "{}", server.log());
}

#[test]
fn a_killed_or_stopped_server_starts_again_on_its_port_with_its_store() {
    let server = NatsServer::start();
    let port = server.port();
    let mut conn = Conn::open(&server);
    let created = conn.request(
        "$JS.API.STREAM.CREATE.KEPT",
        r#"{"name":"KEPT","subjects":["kept.>"],"storage":"file"}"#,
    );
    assert!(created.get("error").is_none(), "{created}");
    drop(conn);

    // SIGKILL: the port closes at once; nothing is running.
    let pid = server.pid().unwrap();
    server.kill();
    assert!(!server.is_running());
    assert_eq!(server.pid(), None);
    assert!(
        !process_exists(pid),
        "the killed server's process is still there"
    );
    assert!(!accepts(port), "a killed server still accepts connections");
    server.kill(); // nothing happens

    server.start_again();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    let mut conn = Conn::open(&server);
    assert_eq!(conn.info["port"], port);
    let info = conn.request("$JS.API.STREAM.INFO.KEPT", "");
    assert_eq!(info["config"]["name"], "KEPT", "after kill: {info}");
    drop(conn);
    server.start_again(); // nothing happens: it runs
    assert_eq!(server.port(), port);

    // SIGTERM: a clean stop; restart is a stop and a start.
    server.stop();
    assert!(!server.is_running());
    assert!(!accepts(port));
    server.stop(); // nothing happens
    server.restart();
    assert!(server.is_running());
    server.restart();
    let mut conn = Conn::open(&server);
    let info = conn.request("$JS.API.STREAM.INFO.KEPT", "");
    assert_eq!(
        info["config"]["name"], "KEPT",
        "after stop and restarts: {info}"
    );
    // Every run appended to the one log.
    assert!(
        server.log().matches("Server is ready").count() >= 4,
        "{}",
        server.log()
    );
}

#[test]
fn two_servers_have_their_own_ports_and_folders_and_leave_nothing() {
    let a = NatsServer::start();
    let b = NatsServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.url(), b.url());
    assert_ne!(root_of(&a), root_of(&b));
    assert_eq!(Conn::open(&a).info["port"], a.port());
    assert_eq!(Conn::open(&b).info["port"], b.port());
    // Dropping one leaves the other running.
    let (a_port, a_root) = (a.port(), root_of(&a));
    drop(a);
    assert!(
        !accepts(a_port),
        "a dropped server still accepts connections"
    );
    assert!(!a_root.exists(), "{} is left behind", a_root.display());
    assert!(b.is_running());
    Conn::open(&b).ping();
}

/// The environment variable that makes
/// [`helper_a_process_that_dies_with_its_nats_server`] do its part.
const CHILD_ENV: &str = "PLUGBOARD_TEST_NATS_HARNESS_CHILD";

#[test]
fn a_server_dies_with_its_test_process_even_by_sigkill() {
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            "--exact",
            "nats_harness::helper_a_process_that_dies_with_its_nats_server",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut found = None;
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 {
        // libtest's `test … ...` may stand before it on the same line.
        if let Some((_, rest)) = line.trim_end().split_once("nats-harness-child: ") {
            let mut parts = rest.splitn(3, ' ');
            let pid: u32 = parts.next().unwrap().parse().unwrap();
            let port: u16 = parts.next().unwrap().parse().unwrap();
            let root = PathBuf::from(parts.next().unwrap());
            found = Some((pid, port, root));
            break;
        }
        line.clear();
    }
    let (pid, port, root) = found.expect("the child printed its server");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed: {status}");
    // The watchdog sees the pipe close and cleans up.
    wait_for("the orphaned nats-server to be killed", || {
        !process_exists(pid)
    });
    wait_for("its folder to be removed", || !root.exists());
    assert!(!accepts(port));
}

/// Not a test of its own: run by
/// [`a_server_dies_with_its_test_process_even_by_sigkill`] as a child
/// process, it starts a server, says where it is, and kills itself.
#[test]
fn helper_a_process_that_dies_with_its_nats_server() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let server = NatsServer::start();
    println!(
        "nats-harness-child: {} {} {}",
        server.pid().unwrap(),
        server.port(),
        root_of(&server).display()
    );
    std::io::stdout().flush().unwrap();
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on this very process; nothing runs after it.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL returned");
}
