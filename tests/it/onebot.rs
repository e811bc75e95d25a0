//! The OneBot example formatter speaks OneBot v11 to a real OneBot app:
//! aiocqhttp (tests/onebot/receiver.py, installed by
//! scripts/install-plugin-toolchains) with a `secret`, so every post must
//! carry OneBot's `X-Signature` or be refused. The gateway's service
//! lifecycle becomes `lifecycle` `enable` / `disable`; users' presence
//! becomes `client_status` notices.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use plugboard_tests::{plugins, Gateway, GatewayOptions, WsClient, WAIT};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SECRET: &str = "onebot-app-secret";
const SELF_ID: i64 = 10001;

/// The OneBot app, and every line it printed.
struct OneBotApp {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
}

/// tests/onebot/.venv's Python when the install script made it, else python3.
fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("onebot/.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

impl OneBotApp {
    async fn start() -> OneBotApp {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("onebot/receiver.py");
        let mut child = Command::new(python())
            .arg("-u")
            .arg(&script)
            .args(["--secret", SECRET])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run python for tests/onebot/receiver.py");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(WAIT, stdout.next_line()).await;
        let port = match first {
            Ok(Ok(Some(line))) => serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v["listening"].as_u64())
                .unwrap_or_else(|| panic!("unexpected first line: {line}"))
                as u16,
            other => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = tokio::time::timeout(WAIT, e.read_to_string(&mut err)).await;
                }
                panic!(
                    "the OneBot app did not start ({other:?}); is aiocqhttp installed \
                     (./scripts/install-plugin-toolchains)? stderr:\n{err}"
                );
            }
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "unparsed": line }));
                sink.lock().unwrap().push(v);
            }
        });
        OneBotApp { child, port, lines }
    }

    /// The events aiocqhttp accepted, in order; panics on any refused post.
    fn accepted(&self) -> Vec<Value> {
        let lines = self.lines.lock().unwrap();
        let refused: Vec<&Value> = lines
            .iter()
            .filter(|l| l.get("accepted").is_none())
            .collect();
        assert!(
            refused.is_empty(),
            "posts the OneBot app refused: {refused:?}"
        );
        lines.iter().map(|l| l["accepted"].clone()).collect()
    }

    async fn wait_for(&self, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        plugboard_tests::wait_until(what, WAIT, || {
            let events = self.accepted();
            check(&events).then_some(events)
        })
        .await
    }
}

fn lifecycles(events: &[Value], sub_type: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            e["post_type"] == "meta_event"
                && e["meta_event_type"] == "lifecycle"
                && e["sub_type"] == sub_type
        })
        .count()
}

fn notices(events: &[Value]) -> Vec<(Value, bool)> {
    events
        .iter()
        .filter(|e| e["post_type"] == "notice" && e["notice_type"] == "client_status")
        .map(|e| (e["user_id"].clone(), e["online"].as_bool().unwrap()))
        .collect()
}

#[tokio::test]
async fn a_signed_onebot_app_hears_one_enable_one_disable_and_each_users_presence() {
    let app = OneBotApp::start().await;
    let opts = GatewayOptions::default().extra(&format!(
        "[[plugins]]\nname = \"onebot\"\nfile = {:?}\n[plugins.config]\nself_id = \"{SELF_ID}\"\nsecret = \"{SECRET}\"\n\
         [[webhooks]]\nname = \"onebot-app\"\nurl = \"http://127.0.0.1:{}/\"\nsecret = \"{}\"\nformatter = \"onebot\"\n",
        plugins::ONEBOT_FORMATTER,
        app.port,
        plugboard_tests::receiver::SECRET,
    ));
    let gw = Gateway::start(opts.clone()).await;
    app.wait_for("lifecycle enable", |e| lifecycles(e, "enable") == 1)
        .await;

    // A numeric id and one that is not: both users' notices, and nothing per connection.
    for user in ["42", "alice"] {
        let mut c = WsClient::connect(&gw, user).await;
        c.close(1000, "");
        c.closed().await;
    }
    let events = app
        .wait_for("four client_status notices", |e| notices(e).len() == 4)
        .await;
    // Each user's in order; the int64 id as a number, the other as a string.
    for user in [Value::from(42), Value::from("alice")] {
        let theirs: Vec<bool> = notices(&events)
            .into_iter()
            .filter(|(u, _)| *u == user)
            .map(|(_, online)| online)
            .collect();
        assert_eq!(theirs, [true, false], "{user}: {events:#?}");
    }

    // Switched off by reload: one disable.
    let (status, report) = gw
        .reload_with(&opts.clone().extra("[gateway]\nenabled = false"))
        .await;
    assert_eq!(status, 200, "{report}");
    app.wait_for("lifecycle disable", |e| lifecycles(e, "disable") == 1)
        .await;
    // A shutdown of a service already disabled sends no second disable.
    assert_eq!(gw.terminate().await, Some(0));
    let events = app.accepted();
    assert_eq!(lifecycles(&events, "enable"), 1, "{events:#?}");
    assert_eq!(lifecycles(&events, "disable"), 1, "{events:#?}");
    assert_eq!(lifecycles(&events, "connect"), 0, "{events:#?}");
    assert_eq!(events.len(), 6, "nothing else was posted: {events:#?}");
    for e in &events {
        assert_eq!(e["self_id"], SELF_ID, "{e}");
        assert!(e["time"].is_u64(), "{e}");
    }
    let disable = events.iter().find(|e| e["sub_type"] == "disable").unwrap();
    assert_eq!(disable["reason"], "reload", "{disable}");
    drop(app.child);
}
