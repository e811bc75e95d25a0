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
    assert_eq!(versions.trim(), "1,2,3,4,5,6");
    server.drop_database(&url);
}

/// What one sender saw while PostgreSQL went away and came back.
#[derive(Default)]
struct SenderLog {
    /// (client_msg_id, message_id, seq) of every `sendack`.
    acked: Vec<(String, String, u64)>,
    /// `error` frames by code.
    errors: std::collections::BTreeMap<String, usize>,
    closed: bool,
}

#[tokio::test]
async fn a_postgres_restart_under_load_loses_nothing_acknowledged_and_heals_without_a_gateway_restart(
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use plugboard_tests::{Engine, Gateway, GatewayOptions, PgOptions, PgServer, WsClient};
    use serde_json::json;

    // A private, durable server: this test stops it under the gateway.
    let server = PgServer::start(PgOptions::durable());
    let url = server.create_database();
    let gw = Gateway::start(
        GatewayOptions::default()
            .engine(Engine::Postgres)
            .postgres_database(&url)
            .extra("[storage]\nconnect_timeout = \"1s\"\nstatement_timeout = \"3s\"\n"),
    )
    .await;
    let pairs = 3usize;
    let acked = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut receivers = Vec::new();
    let mut tasks = Vec::new();
    for p in 0..pairs {
        receivers.push(WsClient::connect(&gw, &format!("reader{p}")).await);
        let mut c = WsClient::connect(&gw, &format!("writer{p}")).await;
        let (acked, refused, stop) = (acked.clone(), refused.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            // One send in flight at a time; a refused send is retried with
            // the same client_msg_id, as a client would.
            let mut log = SenderLog::default();
            let mut n = 0u64;
            while !*stop.borrow() {
                let cmid = format!("w{p}-{n}");
                c.send_json(json!({"type": "send", "id": cmid, "channel_type": "person",
                    "channel_id": format!("reader{p}"), "client_msg_id": cmid,
                    "payload": {"n": n}}));
                let answer = loop {
                    match tokio::time::timeout(plugboard_tests::WAIT, c.next_json_or_closed()).await
                    {
                        Ok(Some(f)) if f["id"] == cmid.as_str() => break Some(f),
                        Ok(Some(_)) => continue,
                        Ok(None) => break None,
                        Err(_) => panic!(
                            "no answer to send {cmid} within {:?}",
                            plugboard_tests::WAIT
                        ),
                    }
                };
                let Some(f) = answer else {
                    log.closed = true;
                    return log;
                };
                match f["type"].as_str() {
                    Some("sendack") => {
                        log.acked.push((
                            cmid,
                            f["message_id"].as_str().unwrap().to_string(),
                            f["seq"].as_u64().unwrap(),
                        ));
                        acked.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    Some("error") => {
                        let code = f["code"].as_str().unwrap_or("?").to_string();
                        if code == "storage_unavailable" {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        *log.errors.entry(code).or_default() += 1;
                        // Retry the same message after a short pause.
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected answer {other:?}: {f}"),
                }
            }
            log
        }));
    }
    let wait = plugboard_tests::WAIT * 3;
    plugboard_tests::wait_until("100 acknowledged messages", wait, || {
        (acked.load(Ordering::Relaxed) >= 100).then_some(())
    })
    .await;

    server.stop();
    plugboard_tests::wait_until("sends refused as storage_unavailable", wait, || {
        (refused.load(Ordering::Relaxed) >= pairs).then_some(())
    })
    .await;
    let (status, body) = gw.get_text("/readyz").await;
    assert_eq!(status, 503, "/readyz while the database is down: {body}");
    assert!(body.contains("\"storage\":\"unavailable\""), "{body}");
    // The API refuses with the stable code too.
    let (status, body) = gw
        .api(
            reqwest::Method::POST,
            "/v1/messages",
            Some(
                json!({"from": "writer0", "channel_type": "person", "channel_id": "reader0",
                "payload": {"via": "api"}}),
            ),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable", "{body}");
    // A new connection is told why and asked to come back later (1013).
    let token = gw.token("latecomer", None, None);
    let (mut raw, status) =
        plugboard_tests::RawClient::upgrade(&gw.addr, &format!("/v1/ws?token={token}")).await;
    assert!(status.contains("101"), "{status}");
    let frame = raw
        .read_frame(plugboard_tests::WAIT)
        .await
        .expect("an error frame");
    assert_eq!(frame.opcode, 1, "{frame:?}");
    let error: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
    assert_eq!(error["code"], "storage_unavailable", "{error}");
    let frame = raw
        .read_frame(plugboard_tests::WAIT)
        .await
        .expect("a close frame");
    assert_eq!(
        (frame.opcode, frame.close_code()),
        (8, Some(1013)),
        "{frame:?}"
    );

    server.start_again();
    let before = acked.load(Ordering::Relaxed);
    plugboard_tests::wait_until("sends acknowledged again", wait, || {
        (acked.load(Ordering::Relaxed) >= before + 100).then_some(())
    })
    .await;
    let deadline = tokio::time::Instant::now() + wait;
    while gw.get_text("/readyz").await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz not ready again within {wait:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);

    for (p, task) in tasks.into_iter().enumerate() {
        let log = task.await.unwrap();
        assert!(
            !log.closed,
            "writer{p}'s connection was closed during the outage"
        );
        let other: Vec<_> = log
            .errors
            .iter()
            .filter(|(code, _)| code.as_str() != "storage_unavailable")
            .collect();
        assert!(other.is_empty(), "writer{p} got other errors: {other:?}");
        // Every acknowledged message is stored, once, in 1..n.
        let mut r = WsClient::connect(&gw, &format!("reader{p}")).await;
        let stored = crate::messaging::sync_all(
            &mut r,
            json!({"channel_type": "person", "channel_id": format!("writer{p}"), "after_seq": 0, "limit": 500}),
            "next_after_seq",
            "after_seq",
        )
        .await;
        let seqs: Vec<u64> = stored.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=stored.len() as u64).collect::<Vec<_>>(),
            "writer{p}"
        );
        let by_id: std::collections::HashMap<&str, u64> = stored
            .iter()
            .map(|m| {
                (
                    m["message_id"].as_str().unwrap(),
                    m["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        for (cmid, id, seq) in &log.acked {
            assert_eq!(
                by_id.get(id.as_str()),
                Some(seq),
                "acknowledged {cmid} is stored"
            );
        }
        let cmids: std::collections::HashSet<&str> = stored
            .iter()
            .map(|m| m["client_msg_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            cmids.len(),
            stored.len(),
            "writer{p}: a retried message was stored twice"
        );
        // The reader, online throughout, got every acknowledged message live.
        let live = &mut receivers[p];
        let mut seen = std::collections::HashSet::new();
        while seen.len() < log.acked.len() {
            let f = live.next_json().await;
            if f["type"] == "message" {
                seen.insert(f["message_id"].as_str().unwrap().to_string());
            }
        }
        for (cmid, id, _) in &log.acked {
            assert!(seen.contains(id), "reader{p} did not get {cmid} live");
        }
    }
}

#[test]
fn a_sqlite_database_from_a_newer_gateway_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    {
        // What a later gateway leaves behind: its schema version recorded.
        let db = data.join("plugboard.db");
        let status = Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import sqlite3; c = sqlite3.connect({:?}); c.execute('PRAGMA user_version = 99'); c.commit()",
                db.display().to_string()
            ))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let path = dir.path().join("plugboard.toml");
    std::fs::write(&path, "").unwrap();
    let out = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&path)
        .env("PLUGBOARD_DATA_DIR", &data)
        .env("PLUGBOARD_SERVER__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("schema is at version 99, newer than this gateway knows (2)"),
        "{stderr}"
    );
}

/// Runs `script` (Python, with `db` bound to a connection to the SQLite
/// database at `path`) and returns what it prints.
fn python_sqlite(path: &std::path::Path, script: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3\ndb = sqlite3.connect({:?}, timeout=30)\n{script}\ndb.commit()",
            path.display().to_string()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn a_version_1_sqlite_database_is_upgraded_in_place_and_keeps_its_data() {
    use plugboard_tests::{plugins, Engine, Gateway, GatewayOptions};
    use reqwest::Method;

    let gw = Gateway::start(
        GatewayOptions::default()
            .engine(Engine::Sqlite)
            .extra(&format!(
                "[[plugins]]\nname = \"echo\"\nfile = {:?}\n[plugins.config]\nversion = \"1\"\n",
                plugins::ECHO_FORMATTER
            )),
    )
    .await;
    let (status, body) = gw
        .admin(
            Method::PUT,
            "/admin/plugins/echo/kv/kept",
            Some(serde_json::json!("from version 1")),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let db = gw.dir.path().join("data").join("plugboard.db");
    let handle = gw.restart_handle();
    assert_eq!(gw.terminate().await, Some(0));
    // What a version-1 gateway left: its schema is this one without
    // `plugin_versions`, and it recorded version 1.
    python_sqlite(
        &db,
        "db.execute('DROP TABLE plugin_versions')\ndb.execute('PRAGMA user_version = 1')",
    );
    let tables = "print(db.execute(\"SELECT count(*) FROM sqlite_master WHERE name = 'plugin_versions'\").fetchone()[0], db.execute('PRAGMA user_version').fetchone()[0])";
    assert_eq!(python_sqlite(&db, tables), "0 1");

    // The new gateway opens it, adds the table and records version 2.
    let gw = handle.restart().await;
    assert_eq!(python_sqlite(&db, tables), "1 2");
    let (status, body) = gw
        .admin(Method::GET, "/admin/plugins/echo/kv/kept", None)
        .await;
    assert_eq!((status, body.as_str()), (200, Some("from version 1")));
    // Uploads are durable on the upgraded database.
    let v2 = std::fs::read(plugins::ECHO_FORMATTER_V2).unwrap();
    let resp = reqwest::Client::new()
        .put(gw.url("/admin/plugins/echo"))
        .bearer_auth(plugboard_tests::gateway::ADMIN_TOKEN)
        .body(v2.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(gw.terminate().await, Some(0));
    let gw = handle.restart().await;
    let (_, view) = gw.admin(Method::GET, "/admin/plugins", None).await;
    let echo = &view["plugins"][0];
    assert_eq!(
        (&echo["sha256"], &echo["source"]),
        (
            &serde_json::Value::from(crate::plugins::sha256_hex(&v2)),
            &serde_json::Value::from("upload")
        ),
        "{view}"
    );
}

/// Holds SQLite's write lock on `path` from another process until dropped,
/// so the gateway's writer waits (its busy timeout is 30 s).
struct WriteLock(std::process::Child);

impl WriteLock {
    fn take(path: &std::path::Path) -> WriteLock {
        use std::io::BufRead;
        let script = format!(
            "import sqlite3, sys\ndb = sqlite3.connect({:?}, timeout=30, isolation_level=None)\n\
             db.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\nsys.stdin.readline()\n\
             db.execute('COMMIT')\n",
            path.display().to_string()
        );
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        WriteLock(child)
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_full_write_queue_refuses_sends_as_storage_busy_and_loses_nothing() {
    use plugboard_tests::{Engine, Gateway, GatewayOptions, WsClient};
    use serde_json::json;

    let gw = Gateway::start(
        GatewayOptions::default()
            .engine(Engine::Sqlite)
            .extra("[storage]\nmax_queued_writes = 2\nqueue_wait = \"300ms\"\n"),
    )
    .await;
    let mut reader = WsClient::connect(&gw, "reader").await;
    let mut writer = WsClient::connect(&gw, "writer").await;
    let body = |n: &str| {
        json!({"from": "writer", "channel_type": "person", "channel_id": "reader",
            "client_msg_id": n, "payload": {"n": n}})
    };

    // Stall the writer: two sends take both places and wait for the lock.
    let lock = WriteLock::take(&gw.dir.path().join("data").join("plugboard.db"));
    let mut waiting = Vec::new();
    for n in ["a", "b"] {
        let (http, url, b) = (reqwest::Client::new(), gw.url("/v1/messages"), body(n));
        waiting.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(plugboard_tests::gateway::API_KEY)
                .json(&b)
                .send()
                .await
                .unwrap();
            resp.status().as_u16()
        }));
    }
    // Both places of the queue taken.
    plugboard_tests::wait_until_async(plugboard_tests::WAIT, || async {
        let queued = gw
            .metric_strict("plugboard_storage_queued_writes", "")
            .await;
        (queued == 2.0).then_some(())
    })
    .await;

    // The API is refused with the stable code and a retry hint.
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .bearer_auth(plugboard_tests::gateway::API_KEY)
        .json(&body("c"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(retry_after.as_deref(), Some("1"));
    let refused: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "storage_busy", "{refused}");
    // A socket's send gets an error frame of the same code; it stays open.
    let frame = json!({"type": "send", "channel_type": "person", "channel_id": "reader",
        "client_msg_id": "d", "payload": {"n": "d"}});
    let answer = writer.request(frame.clone()).await;
    assert_eq!(
        (&answer["type"], &answer["code"]),
        (&json!("error"), &json!("storage_busy")),
        "{answer}"
    );

    // Once storage catches up, the waiting sends complete and the refused
    // ones go through when repeated: every message arrives once.
    drop(lock);
    for w in waiting {
        assert_eq!(w.await.unwrap(), 201);
    }
    let (status, sent) = gw
        .api(reqwest::Method::POST, "/v1/messages", Some(body("c")))
        .await;
    assert_eq!(status, 201, "{sent}");
    let answer = writer.request(frame).await;
    assert_eq!(answer["type"], "sendack", "{answer}");
    let mut got: Vec<_> = crate::messaging::messages(&mut reader, 4)
        .await
        .iter()
        .map(|m| m["payload"]["n"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, ["a", "b", "c", "d"]);
    assert_eq!(
        gw.metric_strict("plugboard_storage_busy_total", "").await,
        2.0
    );
    assert_eq!(
        gw.metric_strict("plugboard_storage_queued_writes", "")
            .await,
        0.0
    );
}
