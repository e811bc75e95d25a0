//! P5: plugins built from source in Rust, JavaScript and Python format
//! webhooks in a real gateway; misbehaving plugins fail only their call,
//! under the configured policy; the breaker trips; hot swap drops nothing.

use std::time::Duration;

use plugboard_tests::plugins;
use plugboard_tests::receiver::SECRET;
use plugboard_tests::{Delivered, Gateway, GatewayOptions, Receiver, WsClient, WAIT};
use reqwest::Method;
use serde_json::Value;

/// A `[[plugins]]` entry.
fn plugin(name: &str, file: &str, extra: &str) -> String {
    format!("[[plugins]]\nname = \"{name}\"\nfile = {file:?}\n{extra}\n")
}

/// A `[[webhooks]]` entry formatted by `formatter`.
fn endpoint(name: &str, rx: &Receiver, formatter: Option<&str>) -> String {
    let f = formatter
        .map(|f| format!("formatter = \"{f}\"\n"))
        .unwrap_or_default();
    format!(
        "[[webhooks]]\nname = \"{name}\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n{f}\n",
        rx.url
    )
}

async fn gateway(toml: &str) -> Gateway {
    Gateway::start(GatewayOptions::default().extra(toml)).await
}

/// Request bodies a receiver got, as JSON.
fn bodies(rx: &Receiver) -> Vec<Value> {
    rx.attempts()
        .into_iter()
        .filter(|a| a.answered == 200)
        .map(|a| a.body)
        .collect()
}

async fn wait_bodies(rx: &Receiver, n: usize) -> Vec<Value> {
    plugboard_tests::wait_until(&format!("{n} requests"), WAIT, || {
        let b = bodies(rx);
        (b.len() >= n).then_some(b)
    })
    .await
}

async fn plugin_view(gw: &Gateway, name: &str) -> Value {
    let (status, body) = gw.admin(Method::GET, "/admin/plugins", None).await;
    assert_eq!(status, 200, "{body}");
    body["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no plugin {name} in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_formatters_in_rust_javascript_and_python_shape_the_webhooks() {
    let (onebot, wukong, card, cloud) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    let toml = [
        plugin(
            "onebot",
            plugins::ONEBOT_FORMATTER,
            "[plugins.config]\nself_id = \"10001\"",
        ),
        plugin("wukong", plugins::WUKONGIM_FORMATTER, ""),
        plugin(
            "card",
            plugins::CHATBOT_CARD,
            "init_deadline = \"30s\"\n[plugins.config]\nstyle = \"slack\"",
        ),
        plugin(
            "cloud",
            plugins::CLOUDEVENTS,
            "init_deadline = \"30s\"\n[plugins.config]\nsource = \"it-test\"",
        ),
        endpoint("onebot", &onebot, Some("onebot")),
        endpoint("wukong", &wukong, Some("wukong")),
        endpoint("card", &card, Some("card")),
        endpoint("cloud", &cloud, Some("cloud")),
    ]
    .concat();
    let gw = gateway(&toml).await;
    let c = WsClient::connect_device(&gw, "alice", "phone").await;
    c.close(1000, "");

    // OneBot v11: the service's lifecycle `enable`, and client-status notices
    // (connections are declined; tests/it/onebot.rs has the full exchange).
    let b = wait_bodies(&onebot, 3).await;
    let meta: Vec<&Value> = b
        .iter()
        .filter(|v| v["post_type"] == "meta_event")
        .collect();
    assert_eq!(meta.len(), 1, "{b:#?}");
    assert!(meta.iter().all(|v| v["meta_event_type"] == "lifecycle"
        && v["sub_type"] == "enable"
        && v["self_id"] == 10001));
    assert!(b
        .iter()
        .any(|v| v["post_type"] == "notice" && v["online"] == true));
    assert!(b.iter().all(|v| v["time"].is_u64()));

    // WuKongIM: online-status strings, with the event in the query: one
    // request for each of connection.opened, user.online, connection.closed
    // and user.offline (the two of the open may arrive before either of the
    // close).
    let b = wait_bodies(&wukong, 4).await;
    let statuses: Vec<String> = b
        .iter()
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    let with_status = |status: &str| {
        statuses
            .iter()
            .filter(|s| s.starts_with("alice-") && s.split('-').nth(2) == Some(status))
            .count()
    };
    assert_eq!(statuses.len(), 4, "{statuses:?}");
    assert_eq!(with_status("1"), 2, "online twice: {statuses:?}");
    assert_eq!(with_status("0"), 2, "offline twice: {statuses:?}");

    // JavaScript: Slack-style bot message.
    let b = wait_bodies(&card, 4).await;
    assert!(
        b.iter()
            .all(|v| v["text"].is_string() && v["blocks"].is_array()),
        "{b:#?}"
    );
    assert!(b
        .iter()
        .any(|v| v["text"].as_str().unwrap().contains("alice")));

    // Python: CloudEvents 1.0.
    let b = wait_bodies(&cloud, 4).await;
    assert!(
        b.iter()
            .all(|v| v["specversion"] == "1.0" && v["source"] == "it-test"),
        "{b:#?}"
    );
    assert!(b
        .iter()
        .any(|v| v["type"] == "com.plugboard.connection.closed" && v["subject"] == "alice"));

    for rx in [&onebot, &wukong, &card, &cloud] {
        assert_eq!(
            rx.bad_signatures(),
            0,
            "formatted requests are still signed by the gateway"
        );
    }
    let view = plugin_view(&gw, "cloud").await;
    assert_eq!(view["exports"], serde_json::json!(["webhook-formatter"]));
    assert_eq!(view["loaded"], true);
}

/// A gateway whose endpoint `rx` is formatted by `name` loaded from `file`.
async fn misbehaving(name: &str, file: &str, extra: &str) -> (Gateway, Receiver) {
    let rx = Receiver::start().await;
    let toml = [
        "[plugin_runtime]\nbreaker_failures = 3\nbreaker_cooldown = \"60s\"\n".to_string(),
        plugin(name, file, extra),
        endpoint("rx", &rx, Some(name)),
    ]
    .concat();
    (gateway(&toml).await, rx)
}

/// Opens and closes one connection; returns its id.
async fn one_session(gw: &Gateway, user: &str) -> String {
    let mut c = WsClient::connect(gw, user).await;
    c.close(1000, "");
    c.closed().await;
    c.connection_id.clone()
}

fn default_body(d: &Delivered) -> bool {
    !d.id.is_empty() && !d.event_type.is_empty()
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_at_its_deadline_and_fail_open_sends_the_default_body() {
    let (gw, rx) = misbehaving(
        "spin",
        plugins::SPIN_LOOP,
        "deadline = \"50ms\"\non_error = \"fail-open\"",
    )
    .await;
    let id = one_session(&gw, "loopy").await;
    let ev = rx.assert_exactly_once(&id).await;
    assert!(default_body(&ev));
    assert!(
        gw.metric("plugboard_plugin_calls_total", "outcome=\"timeout\"")
            .await
            >= 1.0
    );
    let view = plugin_view(&gw, "spin").await;
    let logs = view["recent_logs"].to_string();
    assert!(logs.contains("deadline"), "{logs}");
    // The gateway kept serving throughout.
    one_session(&gw, "after-loop").await;
}

#[tokio::test]
async fn a_memory_bomb_traps_at_its_cap_and_fail_closed_holds_the_event_then_the_breaker_trips() {
    let (gw, rx) = misbehaving(
        "bomb",
        plugins::MEMORY_BOMB,
        "memory_limit = \"16MiB\"\non_error = \"fail-closed\"",
    )
    .await;
    let _id = one_session(&gw, "greedy").await;
    // Fail-closed: nothing is sent while the plugin fails; the breaker opens after 3 failures.
    let view = plugboard_tests::wait_until_async(WAIT, || async {
        let v = plugin_view(&gw, "bomb").await;
        (v["breaker"]["open"] == true).then_some(v)
    })
    .await;
    assert!(view["breaker"]["trips"].as_u64().unwrap() >= 1);
    assert!(
        gw.metric("plugboard_plugin_calls_total", "outcome=\"memory_limit\"")
            .await
            >= 3.0
    );
    assert_eq!(
        gw.metric("plugboard_plugin_breaker_open", "plugin=\"bomb\"")
            .await,
        1.0
    );
    // The plugin's recent lines say so, in the documented words.
    let logs = view["recent_logs"].to_string();
    assert!(
        logs.contains("circuit breaker opened after 3 failures in a row; skipped for 60s"),
        "{logs}"
    );
    assert!(
        gw.metric_strict("plugboard_plugin_breaker_trips_total", "plugin=\"bomb\"")
            .await
            >= 1.0
    );
    assert!(rx.attempts().is_empty(), "fail-closed sent nothing");
    let (_, hooks) = gw.admin(Method::GET, "/admin/webhooks", None).await;
    assert!(
        hooks["endpoints"][0]["pending"].as_i64().unwrap() >= 1,
        "events are kept: {hooks}"
    );
    one_session(&gw, "still-serving").await;
}

#[tokio::test]
async fn a_panic_surfaces_as_a_trap_with_its_message_in_the_plugin_log() {
    let (gw, rx) = misbehaving("panicky", plugins::PANICKER, "on_error = \"fail-open\"").await;
    let id = one_session(&gw, "panic-user").await;
    rx.assert_exactly_once(&id).await;
    let view = plugin_view(&gw, "panicky").await;
    let logs = view["recent_logs"].to_string();
    assert!(logs.contains("plugin panicked on purpose"), "{logs}");
    assert!(
        gw.metric("plugboard_plugin_calls_total", "outcome=\"trap\"")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn the_sandbox_grants_no_files_environment_arguments_or_sockets() {
    // Something listens where the probe connects, so a refused connection
    // means the sandbox denied the socket, not that nobody was there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let (gw, rx) = misbehaving(
        "probe",
        plugins::SANDBOX_PROBE,
        &format!("[plugins.config]\nsocket_addr = \"{target}\""),
    )
    .await;
    one_session(&gw, "prober").await;
    let b = wait_bodies(&rx, 1).await;
    let probe = &b[0];
    assert_eq!(probe["socket_addr"], target.as_str(), "{probe}");
    assert_eq!(probe["file"], false, "{probe}");
    assert_eq!(probe["env"], false, "{probe}");
    assert_eq!(probe["args"], 0, "{probe}");
    assert_eq!(probe["socket"], false, "{probe}");
    // Nothing reached the listener either.
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the probe reached the test's socket: {other:?}"),
    }
}

#[tokio::test]
async fn a_malformed_result_is_rejected_and_the_policy_applies() {
    let (gw, rx) = misbehaving("bad", plugins::BAD_OUTPUT, "on_error = \"fail-open\"").await;
    let id = one_session(&gw, "malformed").await;
    let ev = rx.assert_exactly_once(&id).await;
    assert!(default_body(&ev), "fail-open sends the default body");
    assert!(
        gw.metric("plugboard_plugin_calls_total", "outcome=\"malformed\"")
            .await
            >= 1.0
    );
    let logs = plugin_view(&gw, "bad").await["recent_logs"].to_string();
    assert!(logs.contains("webhook-signature"), "{logs}");
}

#[tokio::test]
async fn a_plugin_whose_init_refuses_its_config_stops_the_start_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\n{}",
            dir.path().join("data").display().to_string(),
            plugin("stubborn", plugins::BAD_INIT, "")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(plugboard_tests::gateway::binary())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plugboard: error: plugin `stubborn`: ") && err.contains("refused on purpose"),
        "{err}"
    );
}

#[tokio::test]
async fn the_cli_checks_and_runs_a_plugin_without_a_gateway() {
    let bin = plugboard_tests::gateway::binary();
    let out = std::process::Command::new(&bin)
        .args([
            "plugin",
            "check",
            plugins::ONEBOT_FORMATTER,
            "--config",
            "self_id=42",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["exports"], serde_json::json!(["webhook-formatter"]));
    assert_eq!(report["wit"], "plugboard:plugin@0.1.0");
    assert_eq!(report["init"], "ok");

    let refused = std::process::Command::new(&bin)
        .args(["plugin", "check", plugins::BAD_INIT])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("plugboard: error: ")
            && err.contains("refused: its init refused the config: ")
            && err.contains("refused on purpose"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("event.json");
    std::fs::write(
        &input,
        r#"{"id":"evt_1","type":"connection.opened","timestamp":"2026-01-01T00:00:00.000Z","data":{"connection_id":"conn_1","user_id":"u1","device_id":"d"}}"#,
    )
    .unwrap();
    let out = std::process::Command::new(&bin)
        .args([
            "plugin",
            "run",
            plugins::ECHO_FORMATTER,
            "--hook",
            "webhook-formatter",
            "--input",
        ])
        .arg(&input)
        .args(["--config", "version=7"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["body"]["version"], "7", "{result}");
    assert_eq!(result["body"]["event"], "connection.opened");
    // The plugin's log line, as `[<time> <level>] <message> <name>=<value>…`.
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.ends_with("] echo formatted an event event=connection.opened id=evt_1 calls=1"))
        .unwrap_or_else(|| panic!("the plugin's log lines are printed: {err}"));
    assert!(line.starts_with('[') && line.contains(" info"), "{line}");
}

#[tokio::test]
async fn an_invalid_upload_is_refused_while_the_old_version_keeps_serving() {
    let rx = Receiver::start().await;
    let gw = gateway(
        &[
            plugin(
                "echo",
                plugins::ECHO_FORMATTER,
                "[plugins.config]\nversion = \"1\"",
            ),
            endpoint("rx", &rx, Some("echo")),
        ]
        .concat(),
    )
    .await;
    let http = reqwest::Client::new();
    for (bytes, why) in [
        (
            b"not wasm at all".to_vec(),
            "not a valid WebAssembly component",
        ),
        (
            std::fs::read(plugins::BAD_INIT).unwrap(),
            "refused on purpose",
        ),
        (
            std::fs::read(plugins::FILTER_ECHO).unwrap(),
            "webhook-formatter",
        ),
    ] {
        let resp = http
            .put(gw.url("/admin/plugins/echo"))
            .bearer_auth(plugboard_tests::gateway::ADMIN_TOKEN)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 422);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "plugin_refused", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{body}");
        assert!(
            message.ends_with("; the previous version keeps serving"),
            "{body}"
        );
    }
    one_session(&gw, "still-echo").await;
    let b = wait_bodies(&rx, 1).await;
    assert_eq!(b[0]["plugin"], "echo", "{b:?}");
    assert_eq!(b[0]["version"], "1");
    assert!(plugin_view(&gw, "echo").await["last_load_error"].is_string());
}

/// Hot swap under load: events flow from many connections while the
/// formatter is replaced 50 times (first through the folder watcher, then
/// through the admin API: once an upload is current, file changes no longer
/// replace it). No call fails, no connection drops, every event after a
/// swap uses the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_fails_no_call_and_drops_no_connection() {
    plugboard_tests::raise_fd_limit();
    let rx = Receiver::start().await;
    let probe = tempfile::tempdir().unwrap();
    let plugins_dir = probe.path().join("plugins");
    std::fs::create_dir_all(&plugins_dir).unwrap();
    let v1 = std::fs::read(plugins::ECHO_FORMATTER).unwrap();
    let v2 = std::fs::read(plugins::ECHO_FORMATTER_V2).unwrap();
    std::fs::write(plugins_dir.join("echo.wasm"), &v1).unwrap();
    let gw = gateway(
        &[
            format!(
                "[plugin_runtime]\ndir = {:?}\n",
                plugins_dir.display().to_string()
            ),
            plugin(
                "echo",
                "echo.wasm",
                "on_error = \"fail-closed\"\n[plugins.config]\nversion = \"x\"",
            ),
            endpoint("rx", &rx, Some("echo")),
        ]
        .concat(),
    )
    .await;
    // Long-lived connections that must survive every swap.
    let mut holders = Vec::new();
    for i in 0..50 {
        holders.push(WsClient::connect(&gw, &format!("holder{i}")).await);
    }
    // Load: connections opening and closing continuously.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let gw_url = gw.ws_url();
        let stop = stop.clone();
        let tokens: Vec<String> = (0..1000)
            .map(|i| gw.token(&format!("load{w}-{i}"), None, None))
            .collect();
        load.push(tokio::spawn(async move {
            // (sessions that opened, attempts that did not)
            let (mut opened, mut refused) = (0usize, 0usize);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = format!("{gw_url}?token={}", tokens[n % tokens.len()]);
                match tokio_tungstenite::connect_async(&url).await {
                    Ok((mut ws, _)) => {
                        use futures_util::StreamExt;
                        // Open means the `meta` `connect` frame came first.
                        let first = ws.next().await;
                        let connected = matches!(&first, Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))
                            if t.contains(r#""event":"connect""#));
                        if connected {
                            opened += 1;
                        } else {
                            refused += 1;
                        }
                        let _ = ws.close(None).await;
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                    Err(_) => refused += 1,
                }
                n += 1;
                // Steady, not flooding: the point is swaps amid traffic, and a
                // backlog of undelivered events (on a loaded machine) would only
                // delay the probes below, not test anything more.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (opened, refused)
        }));
    }
    let http = reqwest::Client::new();
    let mut last = "";
    for i in 0..50 {
        let (bytes, label) = if i % 2 == 0 {
            (&v2, "echo-v2")
        } else {
            (&v1, "echo")
        };
        if i < 10 {
            // Through the watcher: replace the file, then wait for the swap.
            let tmp = plugins_dir.join("echo.wasm.tmp");
            std::fs::write(&tmp, bytes).unwrap();
            std::fs::rename(&tmp, plugins_dir.join("echo.wasm")).unwrap();
            let want = sha256_hex(bytes);
            plugboard_tests::wait_until_async(WAIT, || async {
                let v = plugin_view(&gw, "echo").await;
                (v["sha256"].as_str() == Some(want.as_str())).then_some(())
            })
            .await;
        } else {
            let resp = http
                .put(gw.url("/admin/plugins/echo"))
                .bearer_auth(plugboard_tests::gateway::ADMIN_TOKEN)
                .body(bytes.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        }
        last = label;
        // An event created after the swap is formatted by the new version.
        let user = format!("probe{i}");
        let c = WsClient::connect(&gw, &user).await;
        let deadline = std::time::Instant::now() + 3 * WAIT;
        let b = loop {
            if let Some(b) = bodies(&rx).into_iter().find(|b| {
                b["data"]["user_id"] == user.as_str() && b["event"] == "connection.opened"
            }) {
                break b;
            }
            if std::time::Instant::now() > deadline {
                let log = gw.log();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                panic!(
                    "swap {i}: no opened event of {user}; gateway log (newest first):\n{}",
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(b["plugin"], label, "swap {i}: {b}");
        c.close(1000, "");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sessions, mut refused) = (0, 0);
    for l in load {
        let (o, r) = l.await.unwrap();
        sessions += o;
        refused += r;
    }
    assert_eq!(refused, 0, "no connection attempt failed during the swaps");
    assert!(sessions > 20, "the load ran: {sessions} sessions");
    // No connection dropped.
    let (_, conns) = gw.admin(Method::GET, "/admin/connections", None).await;
    assert_eq!(
        conns["count"], 50,
        "every long-lived connection is still open"
    );
    for h in holders.iter_mut() {
        h.send_json(serde_json::json!({ "type": "ping" }));
        assert_eq!(h.next_json().await["event"], "heartbeat");
    }
    // The last version serves the events that come after it.
    let c = WsClient::connect(&gw, "after-swaps").await;
    c.close(1000, "");
    let b = plugboard_tests::wait_until("an event of after-swaps", WAIT, || {
        bodies(&rx)
            .into_iter()
            .find(|b| b["data"]["user_id"] == "after-swaps")
    })
    .await;
    assert_eq!(
        b["plugin"], last,
        "formatted by the version swapped in last"
    );
    // No failed call: every call of the formatter is counted `ok`, one per
    // request the receiver got. Failure series appear on a first failure,
    // so every series of the family other than `ok` must be absent or 0,
    // whatever its outcome is called; the `ok` series must exist.
    rx.wait_settled().await;
    let metrics = gw.metrics().await;
    let calls = metrics.series("plugboard_plugin_calls_total");
    let failed: Vec<_> = calls
        .iter()
        .filter(|s| s.label("outcome") != Some("ok") && s.value != 0.0)
        .collect();
    assert!(
        failed.is_empty(),
        "failed calls during hot swap: {failed:#?}"
    );
    for outcome in [
        "trap",
        "timeout",
        "error",
        "malformed",
        "unavailable",
        "breaker_open",
        "memory_limit",
    ] {
        let series: Vec<_> = calls
            .iter()
            .filter(|s| s.label("outcome") == Some(outcome))
            .collect();
        assert!(
            series.iter().all(|s| s.value == 0.0),
            "no {outcome} during hot swap: {series:#?}"
        );
    }
    let ok = metrics.value(
        "plugboard_plugin_calls_total",
        r#"plugin="echo",hook="webhook-formatter",outcome="ok""#,
    );
    assert_eq!(
        ok,
        rx.attempts().len() as f64,
        "one ok call per request sent"
    );
    assert!(ok > 50.0, "{ok} calls");
    let view = plugin_view(&gw, "echo").await;
    // The first load and the 50 swaps.
    assert_eq!(view["swaps"], 51, "{view}");
}

/// The content hash the compile cache names its artifacts by.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    plugboard::hex(&sha2::Sha256::digest(bytes))
}

#[tokio::test]
async fn chains_follow_the_configured_order_and_a_restart_loads_from_the_compile_cache() {
    let cache = tempfile::tempdir().unwrap();
    let toml = [
        format!(
            "[plugin_runtime]\ncache_dir = {:?}\n",
            cache.path().display().to_string()
        ),
        plugin("zeta", plugins::FULL_DEFAULTS, "order = 1"),
        plugin("alpha", plugins::FILTER_ECHO, "order = 5"),
        plugin(
            "mid",
            plugins::ECHO_FORMATTER,
            "order = 1\n[plugins.config]\nversion = \"1\"",
        ),
    ]
    .concat();
    let gw = gateway(&toml).await;
    let (_, body) = gw.admin(Method::GET, "/admin/plugins", None).await;
    assert_eq!(
        body["chains"]["conversation-filter"],
        serde_json::json!(["zeta", "alpha"]),
        "{body}"
    );
    assert_eq!(
        body["chains"]["webhook-formatter"],
        serde_json::json!(["mid", "zeta"]),
        "{body}"
    );
    assert_eq!(
        body["chains"]["control-handler"],
        serde_json::json!(["zeta"]),
        "{body}"
    );
    // The first start compiled each component into the cache, named
    // `<sha256 of the .wasm>-<engine fingerprint>.cwasm`.
    let artifacts = || {
        let mut found: Vec<(String, u64)> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                use std::os::unix::fs::MetadataExt;
                let name = e.file_name().to_string_lossy().into_owned();
                (name, e.metadata().unwrap().ino())
            })
            .collect();
        found.sort();
        found
    };
    let first = artifacts();
    assert_eq!(first.len(), 3, "{first:?}");
    for file in [
        plugins::FULL_DEFAULTS,
        plugins::FILTER_ECHO,
        plugins::ECHO_FORMATTER,
    ] {
        let sha = sha256_hex(&std::fs::read(file).unwrap());
        assert!(
            first
                .iter()
                .any(|(name, _)| name.starts_with(&format!("{sha}-")) && name.ends_with(".cwasm")),
            "no artifact for {file}: {first:?}"
        );
    }
    let handle = gw.restart_handle();
    assert_eq!(gw.terminate().await, Some(0));
    let gw = handle.restart().await;
    // A restart loads those artifacts: compiling writes a new file (a
    // temporary one renamed over the old), so the very same files, and no
    // new one, mean nothing was compiled again.
    assert_eq!(artifacts(), first, "a restart loads compiled artifacts");
    let (_, body) = gw.admin(Method::GET, "/admin/plugins", None).await;
    let views = body["plugins"].as_array().unwrap();
    assert_eq!(views.len(), 3, "{body}");
    assert!(views.iter().all(|p| p["loaded"] == true), "{body}");
}

// Durable uploads: an uploaded version is stored, loaded again at start,
// kept over file changes, and removed by an unload.

/// A gateway serving plugin `echo` from `folder/echo.wasm` (a copy of
/// `file`) as the formatter of endpoint `rx`.
async fn echo_gateway(folder: &std::path::Path, file: &str, rx: &Receiver) -> Gateway {
    std::fs::copy(file, folder.join("echo.wasm")).unwrap();
    gateway(
        &[
            format!(
                "[plugin_runtime]\ndir = {:?}\n",
                folder.display().to_string()
            ),
            plugin(
                "echo",
                "echo.wasm",
                "on_error = \"fail-closed\"\n[plugins.config]\nversion = \"d\"",
            ),
            endpoint("rx", rx, Some("echo")),
        ]
        .concat(),
    )
    .await
}

/// `PUT /admin/plugins/echo` with `bytes`.
async fn upload_echo(gw: &Gateway, bytes: &[u8]) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .put(gw.url("/admin/plugins/echo"))
        .bearer_auth(plugboard_tests::gateway::ADMIN_TOKEN)
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Which version formatted the `connection.opened` event of a new
/// connection of `user` (the formatter's `plugin` field).
async fn formatted_by(gw: &Gateway, rx: &Receiver, user: &str) -> String {
    let c = WsClient::connect(gw, user).await;
    let b = plugboard_tests::wait_until(&format!("the opened event of {user}"), WAIT, || {
        bodies(rx)
            .into_iter()
            .find(|b| b["data"]["user_id"] == user && b["event"] == "connection.opened")
    })
    .await;
    c.close(1000, "");
    b["plugin"].as_str().unwrap_or_default().to_string()
}

/// The serving version of `echo` as `GET /admin/plugins` shows it:
/// (sha256, source, uploaded_at).
async fn serving(gw: &Gateway) -> (Value, Value, Value) {
    let v = plugin_view(gw, "echo").await;
    (
        v["sha256"].clone(),
        v["source"].clone(),
        v["uploaded_at"].clone(),
    )
}

#[tokio::test]
async fn an_uploaded_version_is_loaded_again_after_a_restart_until_it_is_unloaded() {
    let rx = Receiver::start().await;
    let folder = tempfile::tempdir().unwrap();
    let v1 = std::fs::read(plugins::ECHO_FORMATTER).unwrap();
    let v2 = std::fs::read(plugins::ECHO_FORMATTER_V2).unwrap();
    let (sha1, sha2) = (sha256_hex(&v1), sha256_hex(&v2));
    let gw = echo_gateway(folder.path(), plugins::ECHO_FORMATTER, &rx).await;
    assert_eq!(
        serving(&gw).await,
        (sha1.clone().into(), "file".into(), Value::Null)
    );
    assert_eq!(formatted_by(&gw, &rx, "before").await, "echo");

    let (status, report) = upload_echo(&gw, &v2).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (&report["sha256"], &report["swapped"], &report["source"]),
        (&sha2.clone().into(), &true.into(), &"upload".into()),
        "{report}"
    );
    let uploaded_at = report["uploaded_at"].clone();
    assert!(uploaded_at.is_string(), "{report}");
    assert_eq!(formatted_by(&gw, &rx, "uploaded").await, "echo-v2");
    assert_eq!(
        serving(&gw).await,
        (sha2.clone().into(), "upload".into(), uploaded_at.clone())
    );
    // The plugins folder is not where an upload goes.
    assert_eq!(std::fs::read(folder.path().join("echo.wasm")).unwrap(), v1);

    // A restart loads the uploaded version, not the file.
    let handle = gw.restart_handle();
    assert_eq!(gw.terminate().await, Some(0));
    let gw = handle.restart().await;
    assert_eq!(
        serving(&gw).await,
        (sha2.clone().into(), "upload".into(), uploaded_at.clone())
    );
    assert_eq!(formatted_by(&gw, &rx, "after-restart").await, "echo-v2");

    // An unload removes it: the next start loads the file again.
    let (status, body) = gw.admin(Method::DELETE, "/admin/plugins/echo", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"name": "echo", "loaded": false, "upload_removed": true})
    );
    assert_eq!(serving(&gw).await, (Value::Null, Value::Null, Value::Null));
    assert_eq!(gw.terminate().await, Some(0));
    let gw = handle.restart().await;
    assert_eq!(
        serving(&gw).await,
        (sha1.clone().into(), "file".into(), Value::Null)
    );
    assert_eq!(formatted_by(&gw, &rx, "file-again").await, "echo");
    // Nothing was left to remove.
    let (_, body) = gw.admin(Method::DELETE, "/admin/plugins/echo", None).await;
    assert_eq!(body["upload_removed"], false, "{body}");
}

#[tokio::test]
async fn a_file_change_does_not_replace_an_uploaded_version_until_it_is_unloaded() {
    let rx = Receiver::start().await;
    let folder = tempfile::tempdir().unwrap();
    let file = folder.path().join("echo.wasm");
    let v1 = std::fs::read(plugins::ECHO_FORMATTER).unwrap();
    let v2 = std::fs::read(plugins::ECHO_FORMATTER_V2).unwrap();
    let (sha1, sha2) = (sha256_hex(&v1), sha256_hex(&v2));
    let gw = echo_gateway(folder.path(), plugins::ECHO_FORMATTER, &rx).await;
    let replace_file = |bytes: &[u8]| {
        let tmp = folder.path().join("echo.wasm.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    let (status, report) = upload_echo(&gw, &v2).await;
    assert_eq!(status, 200, "{report}");

    // The watcher sees the file change and leaves the upload serving.
    replace_file(&v1);
    plugboard_tests::wait_until_async(WAIT, || async {
        let logs = plugin_view(&gw, "echo").await["recent_logs"].to_string();
        logs.contains("file changed; not loaded: an uploaded version is current")
            .then_some(())
    })
    .await;
    assert_eq!(serving(&gw).await.0, sha2.as_str());
    assert_eq!(formatted_by(&gw, &rx, "after-file-change").await, "echo-v2");

    // A reload reloads the current version: the upload.
    let (status, report) = gw
        .admin(Method::POST, "/admin/plugins/echo/reload", None)
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (&report["sha256"], &report["swapped"], &report["source"]),
        (&sha2.clone().into(), &false.into(), &"upload".into()),
        "{report}"
    );

    // Once it is unloaded, the file is the current version again, and the
    // watcher follows the file.
    let (status, body) = gw.admin(Method::DELETE, "/admin/plugins/echo", None).await;
    assert_eq!(
        (status, &body["upload_removed"]),
        (200, &true.into()),
        "{body}"
    );
    let (status, report) = gw
        .admin(Method::POST, "/admin/plugins/echo/reload", None)
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (&report["sha256"], &report["swapped"], &report["source"]),
        (&sha1.clone().into(), &true.into(), &"file".into()),
        "{report}"
    );
    assert_eq!(formatted_by(&gw, &rx, "file-current").await, "echo");
    replace_file(&v2);
    let want = (Value::from(sha2.as_str()), Value::from("file"));
    plugboard_tests::wait_until_async(WAIT, || async {
        let (sha, source, _) = serving(&gw).await;
        ((sha, source) == want).then_some(())
    })
    .await;
    assert_eq!(formatted_by(&gw, &rx, "watched").await, "echo-v2");
}

/// Makes storage refuse every write of an uploaded version, as a full or
/// broken database would: a trigger on SQLite, a constraint on PostgreSQL.
fn refuse_uploads(gw: &Gateway, refuse: bool) {
    match gw.database_url() {
        Some(url) => {
            let sql = if refuse {
                "ALTER TABLE plugin_versions ADD CONSTRAINT refused_by_the_test CHECK (false) NOT VALID"
            } else {
                "ALTER TABLE plugin_versions DROP CONSTRAINT refused_by_the_test"
            };
            plugboard_tests::postgres::shared().psql(url, sql);
        }
        None => {
            let sql = if refuse {
                "CREATE TRIGGER refuse_insert BEFORE INSERT ON plugin_versions BEGIN SELECT RAISE(ABORT, 'refused by the test'); END; \
                 CREATE TRIGGER refuse_update BEFORE UPDATE ON plugin_versions BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
            } else {
                "DROP TRIGGER refuse_insert; DROP TRIGGER refuse_update;"
            };
            let db = gw.dir.path().join("data").join("plugboard.db");
            let status = std::process::Command::new("python3")
                .arg("-c")
                .arg(format!(
                    "import sqlite3; c = sqlite3.connect({:?}, timeout=30); c.executescript({sql:?}); c.commit()",
                    db.display().to_string()
                ))
                .status()
                .unwrap();
            assert!(status.success());
        }
    }
}

#[tokio::test]
async fn an_upload_that_storage_refuses_fails_and_swaps_nothing() {
    let rx = Receiver::start().await;
    let folder = tempfile::tempdir().unwrap();
    let v1 = std::fs::read(plugins::ECHO_FORMATTER).unwrap();
    let v2 = std::fs::read(plugins::ECHO_FORMATTER_V2).unwrap();
    let sha1 = sha256_hex(&v1);
    let gw = echo_gateway(folder.path(), plugins::ECHO_FORMATTER, &rx).await;
    refuse_uploads(&gw, true);
    let (status, body) = upload_echo(&gw, &v2).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "internal", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("cannot store the uploaded version: database error: ")
            && message.ends_with("; the previous version keeps serving"),
        "{body}"
    );
    let view = plugin_view(&gw, "echo").await;
    assert_eq!(
        (&view["sha256"], &view["source"], &view["swaps"]),
        (&sha1.clone().into(), &"file".into(), &1.into()),
        "{view}"
    );
    assert!(
        view["last_load_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("cannot store the uploaded version")),
        "{view}"
    );
    assert_eq!(formatted_by(&gw, &rx, "refused").await, "echo");
    // Nothing was stored: a restart still loads the file.
    let handle = gw.restart_handle();
    assert_eq!(gw.terminate().await, Some(0));
    let gw = handle.restart().await;
    assert_eq!(serving(&gw).await.0, sha1.as_str());
    // Once storage takes it, the same upload goes through.
    refuse_uploads(&gw, false);
    let (status, body) = upload_echo(&gw, &v2).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(formatted_by(&gw, &rx, "accepted").await, "echo-v2");
}

/// Two gateways' plugin registries on one storage (one database shared by
/// two backends on PostgreSQL; the one backend on SQLite), in this process.
struct TwoNodes {
    a: std::sync::Arc<plugboard::plugins::PluginRegistry>,
    b: std::sync::Arc<plugboard::plugins::PluginRegistry>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl TwoNodes {
    async fn start(config_toml: &str) -> TwoNodes {
        use plugboard::config::{Config, StorageBackend, StorageConfig};
        use plugboard::plugins::{engine::PluginEngine, Kv, PluginRegistry};
        use std::sync::Arc;

        let data = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let storage = match plugboard_tests::Engine::from_env() {
            plugboard_tests::Engine::Sqlite => StorageConfig::default(),
            plugboard_tests::Engine::Postgres => StorageConfig {
                backend: StorageBackend::Postgres,
                url: tokio::task::spawn_blocking(|| {
                    plugboard_tests::postgres::shared().create_database()
                })
                .await
                .unwrap(),
                ..StorageConfig::default()
            },
        };
        let first = plugboard::storage::open(&storage, data.path(), None)
            .await
            .unwrap();
        let second = if storage.backend == StorageBackend::Postgres {
            plugboard::storage::open(&storage, data.path(), None)
                .await
                .unwrap()
        } else {
            first.clone()
        };
        let config = Config::from_toml(config_toml).unwrap();
        let node = |backend: &plugboard::storage::Backend| {
            Arc::new(PluginRegistry::new(
                PluginEngine::new(Some(cache.path().to_path_buf())).unwrap(),
                Arc::new(Kv::Storage(backend.kv.clone())),
                backend.plugin_store.clone(),
                Arc::new(plugboard::metrics::Metrics::new()),
                &config,
            ))
        };
        let (a, b) = (node(&first), node(&second));
        a.apply(&config, true).await.unwrap();
        b.apply(&config, true).await.unwrap();
        TwoNodes {
            a,
            b,
            _dirs: (data, cache),
        }
    }
}

/// The `plugin` field of what `echo` formats on `node` (a failed call fails
/// the test).
async fn echo_label(node: &plugboard::plugins::PluginRegistry) -> String {
    use plugboard::plugins::bindings::exports::plugboard::plugin::webhook_formatter as wf;
    let event = wf::Event {
        id: "evt_1".into(),
        event_type: "connection.opened".into(),
        timestamp_ms: 1,
        data: r#"{"user_id":"u1"}"#.into(),
        endpoint: "rx".into(),
    };
    let request = node
        .format("echo", &event, "http://127.0.0.1:9/hook")
        .await
        .unwrap_or_else(|e| panic!("a formatter call failed: {e}"))
        .expect("a request");
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    body["plugin"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_nodes_upload_is_loaded_by_load_stored_without_a_failed_call() {
    use plugboard::plugins::{PluginError, Source};

    let nodes = TwoNodes::start(&plugin(
        "echo",
        plugins::ECHO_FORMATTER,
        "[plugins.config]\nversion = \"n\"",
    ))
    .await;
    let v2 = std::fs::read(plugins::ECHO_FORMATTER_V2).unwrap();
    let sha2 = sha256_hex(&v2);
    // Nothing is stored yet: nothing to load, and the file keeps serving.
    assert!(matches!(
        nodes.b.load_stored("echo").await,
        Err(PluginError::NoUpload(_))
    ));
    assert!(matches!(
        nodes.b.load_stored("nobody").await,
        Err(PluginError::Unknown(_))
    ));
    assert_eq!(echo_label(&nodes.b).await, "echo");

    let uploaded = nodes.a.install("echo", v2).await.unwrap();
    assert_eq!((uploaded.swapped, uploaded.source), (true, Source::Upload));
    // Node b serves the file's version until it is told; calls run
    // throughout its swap, and none fails.
    assert_eq!(echo_label(&nodes.b).await, "echo");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = {
        let (b, stop) = (nodes.b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut labels = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                labels.push(echo_label(&b).await);
            }
            labels
        })
    };
    let report = nodes.b.load_stored("echo").await.unwrap();
    assert_eq!(
        (
            report.sha256.as_str(),
            report.swapped,
            report.source,
            &report.uploaded_at
        ),
        (sha2.as_str(), true, Source::Upload, &uploaded.uploaded_at)
    );
    // A call that starts after the swap uses the new version.
    assert_eq!(echo_label(&nodes.b).await, "echo-v2");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let labels = calls.await.unwrap();
    let first_new = labels
        .iter()
        .position(|l| l == "echo-v2")
        .unwrap_or(labels.len());
    assert!(
        labels[first_new..].iter().all(|l| l == "echo-v2"),
        "a call after the swap used the old version: {labels:?}"
    );
    // Told again (a repeated signal): nothing to do.
    let again = nodes.b.load_stored("echo").await.unwrap();
    assert_eq!((again.swapped, again.compile_ms), (false, 0.0));
    let view = nodes.b.views(0);
    assert_eq!(
        (
            view[0].sha256.as_deref(),
            view[0].source,
            view[0].swaps,
            &view[0].uploaded_at
        ),
        (
            Some(sha2.as_str()),
            Some(Source::Upload),
            2,
            &uploaded.uploaded_at
        )
    );

    // Unloaded on node a: the upload is gone from storage; node b keeps
    // serving what it has and is told there is nothing stored.
    assert!(nodes.a.unload("echo").await.unwrap());
    assert!(matches!(
        nodes.b.load_stored("echo").await,
        Err(PluginError::NoUpload(_))
    ));
    assert_eq!(echo_label(&nodes.b).await, "echo-v2");
    // Its reload now goes back to the file.
    let back = nodes.b.reload("echo").await.unwrap();
    assert_eq!((back.swapped, back.source), (true, Source::File));
    assert_eq!(echo_label(&nodes.b).await, "echo");
}

#[tokio::test]
async fn a_config_reload_reloads_the_uploaded_version_and_a_start_that_refuses_it_names_it() {
    let rx = Receiver::start().await;
    let folder = tempfile::tempdir().unwrap();
    let v2 = std::fs::read(plugins::ECHO_FORMATTER_V2).unwrap();
    let sha2 = sha256_hex(&v2);
    let gw = echo_gateway(folder.path(), plugins::ECHO_FORMATTER, &rx).await;
    let (status, body) = upload_echo(&gw, &v2).await;
    assert_eq!(status, 200, "{body}");
    let entry = |extra: &str| {
        GatewayOptions::default().extra(
            &[
                format!(
                    "[plugin_runtime]\ndir = {:?}\n",
                    folder.path().display().to_string()
                ),
                plugin("echo", "echo.wasm", extra),
                endpoint("rx", &rx, Some("echo")),
            ]
            .concat(),
        )
    };

    // A changed entry is reloaded from the upload, not from the file.
    let (status, report) = gw
        .reload_with(&entry("[plugins.config]\nversion = \"reloaded\""))
        .await;
    assert_eq!(status, 200, "{report}");
    let loaded = &report["plugins_loaded"][0];
    assert_eq!(
        (&loaded["sha256"], &loaded["source"], &loaded["swapped"]),
        (&sha2.clone().into(), &"upload".into(), &true.into()),
        "{report}"
    );
    let c = WsClient::connect(&gw, "after-reload").await;
    let b = plugboard_tests::wait_until("the opened event of after-reload", WAIT, || {
        bodies(&rx)
            .into_iter()
            .find(|b| b["data"]["user_id"] == "after-reload" && b["event"] == "connection.opened")
    })
    .await;
    c.close(1000, "");
    assert_eq!(
        (&b["plugin"], &b["version"]),
        (&"echo-v2".into(), &"reloaded".into())
    );

    // An entry the upload does not fit stops the next start, naming the
    // uploaded version (the file is not tried in its place).
    gw.write_config(&GatewayOptions::default().extra(&format!(
        "[plugin_runtime]\ndir = {:?}\n{}",
        folder.path().display().to_string(),
        plugin("echo", "echo.wasm", "hooks = [\"conversation-filter\"]")
    )));
    let config = gw.config_path.clone();
    // Keeps the data folder (and database) after the gateway is gone.
    let _handle = gw.restart_handle();
    assert_eq!(gw.terminate().await, Some(0));
    let out = std::process::Command::new(plugboard_tests::gateway::binary())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "plugboard: error: plugin `echo`: its uploaded version {} (uploaded ",
            &sha2[..12]
        )) && err.contains(") was refused: does not fit the plugboard:plugin contract"),
        "{err}"
    );
}
