//! Choosing and opening a storage engine: start-up errors name the database
//! and never its password; the schema version is checked.

use std::process::Command;

use plugboard_tests::gateway::binary;
use plugboard_tests::postgres;

/// Runs `serve` with `toml` and returns its `plugboard: error:` line.
fn start_error(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugboard.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&path)
        .env("PLUGBOARD_DATA_DIR", dir.path().join("data"))
        .env("PLUGBOARD_SERVER__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "started anyway: {toml}");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("plugboard: error: "))
        .unwrap_or_else(|| panic!("no `plugboard: error:` line: {stderr}"))
        .to_string()
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn an_unreachable_database_stops_the_start_naming_the_host_not_the_password() {
    let port = closed_port();
    let toml = format!(
        "[storage]\nbackend = \"postgres\"\nurl = \"postgres://plugboard:hunter2-secret@127.0.0.1:{port}/chat\"\nconnect_timeout = \"2s\"\n"
    );
    let message = start_error(&toml);
    assert!(
        message.contains(&format!("127.0.0.1:{port}/chat")),
        "the error does not name the database: {message}"
    );
    assert!(
        !message.contains("hunter2"),
        "the password leaked: {message}"
    );
    assert!(
        !message.contains("plugboard:"),
        "the user leaked: {message}"
    );
}

#[test]
fn a_schema_newer_than_the_binary_is_refused() {
    let server = postgres::shared();
    let url = server.create_database();
    // A database a later gateway migrated.
    server.psql(
        &url,
        "CREATE TABLE plugboard_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL);
         INSERT INTO plugboard_schema VALUES (999, 'from the future', 0);",
    );
    let message = start_error(&format!(
        "[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n"
    ));
    assert!(
        message.contains("schema is at version 999, newer than this gateway knows"),
        "{message}"
    );
    // Nothing was created beside the version table.
    let tables = server.psql(
        &url,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    );
    assert_eq!(tables.trim(), "1");
    server.drop_database(&url);
}

#[test]
fn migrations_are_recorded_and_applied_once() {
    let server = postgres::shared();
    let url = server.create_database();
    let dir = tempfile::tempdir().unwrap();
    // `config check` does not open storage; a short start does: run the
    // gateway twice and stop it as soon as it listens.
    for _ in 0..2 {
        let path = dir.path().join("plugboard.toml");
        std::fs::write(
            &path,
            format!("[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n"),
        )
        .unwrap();
        let mut child = Command::new(binary())
            .args(["serve", "--config"])
            .arg(&path)
            .env("PLUGBOARD_DATA_DIR", dir.path().join("data"))
            .env("PLUGBOARD_SERVER__LISTEN", "127.0.0.1:0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let listening = std::io::BufRead::lines(std::io::BufReader::new(stdout))
            .map_while(Result::ok)
            .any(|l| l.contains("listening"));
        let _ = child.kill();
        let status = child.wait().unwrap();
        assert!(
            listening,
            "the gateway did not start on PostgreSQL ({status})"
        );
    }
    let versions = server.psql(
        &url,
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM plugboard_schema",
    );
    assert_eq!(versions.trim(), "1,2,3");
    server.drop_database(&url);
}
