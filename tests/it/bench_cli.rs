//! The benchmark programs' command lines: `--help` lists every option and
//! exits 0; an unknown option or a malformed value is refused with exit
//! code 2 and clap's message, never a panic; `--storage` has the same shape
//! wherever it exists (`sqlite`, `postgres` or `both`, anything else refused
//! with exit code 2); the hidden `--baseline-server` first argument still
//! turns a program into its baseline server, and `--hold-connections` turns
//! bench-cluster into a holder of idle connections.

use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

/// Each program's executable, the options its `--help` must list, and one
/// of its numeric options.
const BENCHES: [(&str, &[&str], &str); 5] = [
    (
        env!("CARGO_BIN_EXE_bench-connections"),
        &[
            "--connections",
            "--concurrency",
            "--settle",
            "--attempt-timeout",
            "--ramp-timeout",
            "--hold",
            "--sources",
            "--baseline-read-buffers",
            "--no-baseline",
            "--no-gateway",
        ],
        "--connections",
    ),
    (
        env!("CARGO_BIN_EXE_bench-control"),
        &[
            "--quick",
            "--storage",
            "--users",
            "--repeats",
            "--webhook-wait",
            "--in-flight",
            "--warmup",
            "--duration",
            "--targets",
            "--offline-users",
            "--webhook-batch",
            "--no-webhooks",
            "--concurrency",
            "--sources",
            "--no-fanout",
            "--no-rate",
            "--no-baseline",
        ],
        "--users",
    ),
    (
        env!("CARGO_BIN_EXE_bench-messaging"),
        &[
            "--quick",
            "--storage",
            "--pairs",
            "--window",
            "--warmup",
            "--duration",
            "--paced-duration",
            "--paced-rate",
            "--webhook-drain",
            "--webhook-batch",
            "--no-webhooks",
            "--group-members",
            "--group-repeats",
            "--conversations",
            "--sync-runs",
            "--concurrency",
            "--sources",
            "--no-one-to-one",
            "--no-baseline",
            "--no-group",
            "--no-sync",
            "--instructions",
        ],
        "--pairs",
    ),
    (env!("CARGO_BIN_EXE_bench-plugins"), &["--calls"], "--calls"),
    (
        env!("CARGO_BIN_EXE_bench-cluster"),
        &[
            "--quick",
            "--nodes",
            "--pairs",
            "--window",
            "--duration",
            "--paced-rate",
            "--group",
            "--fanout-runs",
            "--idle",
            "--holders",
            "--concurrency",
        ],
        "--pairs",
    ),
];

/// A program that ignored its arguments would start a benchmark of minutes.
const LIMIT: Duration = Duration::from_secs(60);

async fn run(exe: &str, args: &[&str]) -> Output {
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    timeout(LIMIT, child)
        .await
        .unwrap_or_else(|_| panic!("{exe} {args:?} still running after {LIMIT:?}"))
        .unwrap_or_else(|e| panic!("{exe}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn help_lists_every_option_and_exits_0() {
    for (exe, options, _) in BENCHES {
        for args in [&["--help"][..], &["-h"], &["--quick", "--help"]] {
            if args.contains(&"--quick") && !options.contains(&"--quick") {
                continue;
            }
            let out = run(exe, args).await;
            let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
            assert_eq!(out.status.code(), Some(0), "{exe} {args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{exe} {args:?}: {stderr}");
            assert!(stdout.contains("Usage:"), "{exe} {args:?}:\n{stdout}");
            for option in options {
                assert!(
                    stdout.contains(option),
                    "{exe} {args:?} does not list {option}:\n{stdout}"
                );
            }
            for hidden in ["--baseline-server", "--hold-connections"] {
                assert!(
                    !stdout.contains(hidden),
                    "{exe} {args:?} lists the hidden argument {hidden}:\n{stdout}"
                );
            }
        }
    }
}

#[tokio::test]
async fn unknown_options_and_malformed_values_exit_2_without_a_panic() {
    for (exe, _, numeric) in BENCHES {
        for args in [
            &["--bogus"][..],
            &["extra"],
            &[numeric, "many"],
            &[numeric],
            &[numeric, "-1"],
        ] {
            let out = run(exe, args).await;
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{exe} {args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{exe} {args:?}: {stderr}");
            assert!(stderr.starts_with("error: "), "{exe} {args:?}: {stderr}");
            assert!(out.stdout.is_empty(), "{exe} {args:?} printed figures");
        }
    }
}

/// The benchmark starts itself with `--baseline-server` first for the bare
/// tokio-tungstenite baseline; clap must not see (and refuse) it.
#[tokio::test]
async fn baseline_server_argument_still_starts_the_baseline() {
    for exe in [
        env!("CARGO_BIN_EXE_bench-connections"),
        env!("CARGO_BIN_EXE_bench-messaging"),
    ] {
        let mut child = Command::new(exe)
            .arg("--baseline-server")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = timeout(LIMIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{exe} --baseline-server: no ready line"))
            .unwrap()
            .unwrap_or_else(|| panic!("{exe} --baseline-server ended without a ready line"));
        let addr = line
            .strip_prefix("baseline: listening on ")
            .unwrap_or_else(|| panic!("{exe} --baseline-server: {line}"));
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        timeout(LIMIT, tokio::net::TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        child.kill().await.unwrap();
    }
}

/// bench-cluster starts itself with `--hold-connections ADDRS FIRST COUNT`
/// to hold idle connections: it reports what it opened and what failed on
/// one line, holds until its standard input closes, and refuses malformed
/// arguments with its usage and exit code 2.
#[tokio::test]
async fn hold_connections_argument_reports_and_holds_until_stdin_closes() {
    let exe = env!("CARGO_BIN_EXE_bench-cluster");
    // A port nothing listens on: every connection fails, and says why.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let mut child = Command::new(exe)
        .args(["--hold-connections", &addr, "0", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Held here: tokio's `Child::wait` closes a stdin the child still owns.
    let stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = timeout(LIMIT, lines.next_line())
        .await
        .expect("the holder reports")
        .unwrap()
        .expect("a report line");
    assert!(line.starts_with("held 0 3 "), "{line}");
    assert!(line.contains("TCP connect"), "{line}");
    // Still holding: it waits for its standard input to close.
    assert!(
        timeout(Duration::from_millis(300), child.wait())
            .await
            .is_err(),
        "the holder exited before its standard input closed"
    );
    drop(stdin);
    let status = timeout(LIMIT, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));

    for args in [
        &["--hold-connections"][..],
        &["--hold-connections", "nowhere", "0", "1"],
        &["--hold-connections", &addr, "first", "1"],
        &["--hold-connections", &addr, "0", "1", "extra"],
    ] {
        let out = run(exe, args).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("usage: bench-cluster --hold-connections"),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// The programs that store through a gateway, and so take `--storage`.
const WITH_STORAGE: [&str; 2] = [
    env!("CARGO_BIN_EXE_bench-control"),
    env!("CARGO_BIN_EXE_bench-messaging"),
];

#[tokio::test]
async fn storage_option_lists_its_engines_and_its_default() {
    for exe in WITH_STORAGE {
        let out = run(exe, &["--help"]).await;
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{exe}: {}", text(&out.stderr));
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with("--storage"))
            .unwrap_or_else(|| panic!("{exe} --help has no --storage line:\n{stdout}"));
        assert!(line.contains("<ENGINE>"), "{exe}: {line}");
        for engine in ["sqlite", "postgres", "both"] {
            assert!(
                stdout.contains(&format!("{engine}:")),
                "{exe} --help does not describe `{engine}`:\n{stdout}"
            );
        }
        assert!(
            stdout.contains("[default: sqlite]"),
            "{exe} --help does not name the default engine:\n{stdout}"
        );
        // Every value is accepted (with --help, nothing runs).
        for engine in ["sqlite", "postgres", "both"] {
            for args in [
                &["--storage", engine, "--help"][..],
                &[&format!("--storage={engine}"), "--help"],
            ] {
                let out = run(exe, args).await;
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "{exe} {args:?}: {}",
                    text(&out.stderr)
                );
            }
        }
    }
}

#[tokio::test]
async fn a_bad_storage_engine_exits_2_without_a_panic() {
    for exe in WITH_STORAGE {
        for args in [
            &["--storage", "mysql"][..],
            &["--storage", "SQLite"],
            &["--storage", ""],
            &["--storage=pg"],
            &["--storage"],
            &["--quick", "--storage", "postgresql"],
        ] {
            let out = run(exe, args).await;
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{exe} {args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{exe} {args:?}: {stderr}");
            assert!(stderr.starts_with("error: "), "{exe} {args:?}: {stderr}");
            assert!(out.stdout.is_empty(), "{exe} {args:?} printed figures");
            if args.len() > 1 || args[0].contains('=') {
                assert!(
                    stderr.contains("possible values: sqlite, postgres, both"),
                    "{exe} {args:?}: {stderr}"
                );
            }
        }
    }
}
