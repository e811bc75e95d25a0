//! The benchmark programs' command lines: `--help` lists every option and
//! exits 0; an unknown option or a malformed value is refused with exit
//! code 2 and clap's message, never a panic; the hidden `--baseline-server`
//! first argument still turns a program into its baseline server.

use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

/// Each program's executable, the options its `--help` must list, and one
/// of its numeric options.
const BENCHES: [(&str, &[&str], &str); 4] = [
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
        ],
        "--pairs",
    ),
    (env!("CARGO_BIN_EXE_bench-plugins"), &["--calls"], "--calls"),
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
            assert!(
                !stdout.contains("--baseline-server"),
                "{exe} {args:?} lists the hidden argument:\n{stdout}"
            );
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
