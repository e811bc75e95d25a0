//! Config errors are caught at load and name the key.

use std::process::Command;

use plugboard_tests::gateway::binary;
use plugboard_tests::GatewayOptions;
use reqwest::Method;

use crate::setup;

#[track_caller]
fn check_refused(toml: &str, key: &str) {
    // The documented form: one message, `plugboard: error: config key `<path>`: …`.
    let message = load_error(toml);
    assert!(
        message.starts_with(&format!("config key `{key}`: ")),
        "error does not name `{key}` as documented: {message}"
    );
}

#[test]
fn bad_config_keys_fail_at_load_naming_the_key() {
    check_refused("[gateway]\nping_intervl = \"5s\"\n", "gateway.ping_intervl");
    check_refused(
        "[gateway]\nping_interval = \"often\"\n",
        "gateway.ping_interval",
    );
    check_refused(
        "[gateway]\nmax_message_size = \"1KiB\"\nmax_frame_size = \"4KiB\"\n",
        "gateway.max_message_size",
    );
    check_refused(
        "[[webhooks]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/\"\nsecret = \"plain\"\n",
        "webhooks[0].secret",
    );
    check_refused("[server]\nlisten = \"nowhere\"\n", "server.listen");
    check_refused("listen = \"127.0.0.1:1\"\n", "listen");
}

#[test]
fn environment_overrides_are_validated_too() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["config", "check"])
        .env("PLUGBOARD_DATA_DIR", dir.path().join("data"))
        .env("PLUGBOARD_GATEWAY__OUTBOUND_QUEUE", "zero")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plugboard: error: config key `gateway.outbound_queue`: "),
        "{stderr}"
    );
    let out = Command::new(binary())
        .args(["config", "check"])
        .env("PLUGBOARD_DATA_DIR", dir.path().join("data"))
        .env("PLUGBOARD_GATEWAY__OUTBOUND_QUEUE", "77")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("outbound_queue = 77"));
}

#[tokio::test]
async fn a_bad_config_on_reload_is_refused_and_the_old_one_stays() {
    let (gw, rx) = setup("").await;
    std::fs::write(&gw.config_path, "[gateway]\nenabled = maybe\n").unwrap();
    let (status, body) = gw.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config");
    std::fs::write(&gw.config_path, "[gateway]\nenabeld = false\n").unwrap();
    let (status, body) = gw.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_config")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("config key `gateway.enabeld`: unknown field `enabeld`"),
        "{body}"
    );
    // Still serving with the old config.
    let c = plugboard_tests::WsClient::connect(&gw, "quinn").await;
    c.close(1000, "");
    rx.assert_exactly_once(&c.connection_id).await;
    // A restart-only key is reported, not applied.
    let opts = GatewayOptions::with_receiver(&rx.url).extra("[server]\nmax_body_size = \"2MiB\"");
    let (status, body) = gw.reload_with(&opts).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_required"], serde_json::json!(["server"]));
}

/// The error `serve` prints for `toml`, less the `plugboard: error: ` prefix.
fn load_error(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&path)
        .env("PLUGBOARD_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "started with a bad config: {toml}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("plugboard: error: "))
        .unwrap_or_else(|| panic!("no `plugboard: error:` line: {stderr}"));
    line.to_string()
}

#[test]
fn the_documented_validation_errors_are_the_ones_printed() {
    // docs/configuration.md "Validation errors" shows real messages; the
    // lists of known keys and events in them drift as the config grows.
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .unwrap();
    let section = doc
        .split("## Validation errors")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Validation errors section");
    for toml in [
        "[gateway]\npign_interval = \"5s\"\n",
        "bogus = 1\n",
        "[[webhooks]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"conection.*\"]\n",
        "[plugin_runtime]\nnope = 1\n",
        "[[plugins]]\nname = \"x\"\nfile = \"x.wasm\"\nbogus = 1\n",
        "[[plugins]]\nname = \"x\"\nfile = \"x.wasm\"\nhooks = [\"formatter\"]\n",
        "[gateway.devices]\nsame_device = \"maybe\"\n",
        "[storage]\nbackend = \"mysql\"\n",
        "[storage]\nbackend = \"postgres\"\n",
        "[storage]\nbackend = \"postgres\"\nurl = \"mysql://root@db/x\"\n",
        "[storage]\npool_size = 0\n",
        "[cluster]\n",
        "[storage]\nbackend = \"postgres\"\nurl = \"postgres://db/x\"\n[cluster]\nnats_urls = []\n",
        "[storage]\nbackend = \"postgres\"\nurl = \"postgres://db/x\"\n[cluster]\nnats_urls = [\"http://127.0.0.1:4222\"]\n",
        "[storage]\nbackend = \"postgres\"\nurl = \"postgres://db/x\"\n[cluster]\nlease_renew = \"5s\"\n",
    ] {
        let message = load_error(toml);
        assert!(
            section.lines().any(|l| l == message),
            "docs/configuration.md does not show the message printed for {toml:?}:\n{message}"
        );
    }
}
