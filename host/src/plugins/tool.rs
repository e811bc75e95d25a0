//! `plugboard plugin check` and `plugboard plugin run`: load a component the
//! way the gateway does (same engine, sandbox and limits, an in-memory
//! key-value store) and call it once, so authors can test without a gateway.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::bindings::exports::plugboard::plugin::{
    control_handler as ch, conversation_filter as cf, webhook_formatter as wf,
};
use super::engine::PluginEngine;
use super::instance::{Limits, LoadedPlugin, WIT_VERSION};
use super::logs::PluginLog;
use super::{Kv, PluginContext};

/// A component loaded for the command line.
pub struct Loaded {
    pub plugin: Arc<LoadedPlugin>,
    pub log: Arc<PluginLog>,
    pub bytes: usize,
    pub compile_ms: f64,
    pub cached: bool,
}

/// Loads `file` with `config` on a new engine whose compile cache is
/// `cache_dir`; the error text says what refused it.
pub async fn load(
    file: &Path,
    config: Vec<(String, String)>,
    deadline: Duration,
    cache_dir: &Path,
) -> anyhow::Result<Loaded> {
    let bytes =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let size = bytes.len();
    let engine = PluginEngine::new(Some(cache_dir.to_path_buf()))?;
    let e2 = engine.clone();
    let compiled = tokio::task::spawn_blocking(move || e2.compile(&bytes)).await??;
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let log = Arc::new(PluginLog::new(&name));
    let ctx = Arc::new(PluginContext {
        name,
        config,
        log: log.clone(),
        kv: Arc::new(Kv::memory()),
    });
    let limits = Limits {
        memory: 256 * 1024 * 1024,
        deadline,
        init_deadline: Duration::from_secs(30),
        max_calls: u64::MAX,
        pool_size: 1,
    };
    let plugin = LoadedPlugin::load(
        engine,
        &compiled.component,
        compiled.sha256,
        ctx,
        limits,
        &[],
    )
    .await;
    match plugin {
        Ok(plugin) => Ok(Loaded {
            plugin,
            log,
            bytes: size,
            compile_ms: compiled.took.as_secs_f64() * 1000.0,
            cached: compiled.cached,
        }),
        Err(e) => {
            print_logs(&log);
            Err(anyhow::anyhow!("{e}"))
        }
    }
}

pub fn print_logs(log: &PluginLog) {
    let lines = log.recent(1000, usize::MAX);
    if lines.is_empty() {
        eprintln!("(the plugin logged nothing)");
    }
    for l in lines {
        let fields: Vec<String> = l.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // One line per log line: what the plugin wrote cannot start another.
        eprintln!(
            "[{} {:5}] {} {}",
            l.at,
            l.level,
            crate::cli::escape_controls(&l.message),
            crate::cli::escape_controls(&fields.join(" "))
        );
    }
}

/// `plugboard plugin check`: what the component exports and whether its init accepts the config.
pub fn describe(file: &Path, loaded: &Loaded) -> Value {
    json!({
        "file": file.display().to_string(),
        "bytes": loaded.bytes,
        "sha256": loaded.plugin.sha256,
        "wit": format!("plugboard:plugin@{WIT_VERSION}"),
        "exports": loaded.plugin.exports,
        "compile_ms": (loaded.compile_ms * 10.0).round() / 10.0,
        "compiled_from_cache": loaded.cached,
        "init": "ok",
    })
}

fn event_from_json(v: &Value) -> anyhow::Result<wf::Event> {
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let event_type = text("type").or_else(|| text("event_type")).ok_or_else(|| {
        anyhow::anyhow!("the input needs `type` (an event type such as connection.opened)")
    })?;
    let timestamp_ms = match (
        v.get("timestamp_ms").and_then(Value::as_i64),
        text("timestamp"),
    ) {
        (Some(ms), _) => ms,
        (None, Some(ts)) => humantime::parse_rfc3339(&ts)
            .map_err(|e| anyhow::anyhow!("`timestamp` is not RFC 3339: {e}"))?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        (None, None) => crate::now_ms(),
    };
    let data = match v.get("data") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "{}".to_string(),
    };
    Ok(wf::Event {
        id: text("id").unwrap_or_else(|| crate::new_id("evt")),
        event_type,
        timestamp_ms,
        data,
        endpoint: text("endpoint").unwrap_or_else(|| "cli".into()),
    })
}

/// The endpoint URL `run` checks a formatter's request against.
const CHECK_ENDPOINT_URL: &str = "https://endpoint.invalid/";

/// `plugboard plugin run`: calls `hook` once with `input` and returns the result as JSON.
pub async fn run(loaded: &Loaded, hook: &str, input: &Value) -> anyhow::Result<Value> {
    let p = &loaded.plugin;
    match hook {
        "webhook-formatter" => {
            let event = event_from_json(input)?;
            let out = p.format(&event).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(match out {
                None => json!({ "declined": true }),
                Some(req) => {
                    // The same checks the gateway makes before sending, for
                    // an endpoint URL without a path or a query of its own.
                    if let Err(m) = super::registry::check_request(req.clone(), CHECK_ENDPOINT_URL)
                    {
                        anyhow::bail!("the gateway would reject this result as malformed: {m}");
                    }
                    let body = match serde_json::from_slice::<Value>(&req.body) {
                        Ok(v) => v,
                        Err(_) => Value::String(String::from_utf8_lossy(&req.body).into_owned()),
                    };
                    json!({
                        "content_type": req.content_type,
                        "headers": req.headers.iter().map(|h| (h.key.clone(), Value::String(h.value.clone()))).collect::<serde_json::Map<_, _>>(),
                        "path_suffix": req.path_suffix,
                        "query": req.query,
                        "body": body,
                    })
                }
            })
        }
        "conversation-filter" => {
            let viewer: cf::Viewer =
                serde_json::from_value(input.get("viewer").cloned().unwrap_or(Value::Null))
                    .map_err(|e| anyhow::anyhow!("`viewer`: {e}"))?;
            let conversations: Vec<cf::Conversation> =
                serde_json::from_value(input.get("conversations").cloned().unwrap_or(Value::Null))
                    .map_err(|e| anyhow::anyhow!("`conversations`: {e}"))?;
            let verdicts = p
                .filter(&viewer, &conversations)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(json!({ "verdicts": verdicts }))
        }
        "control-handler" => {
            let request: ch::ControlRequest = serde_json::from_value(input.clone())
                .map_err(|e| anyhow::anyhow!("control request: {e}"))?;
            let decision = p
                .control(&request)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(json!({ "decision": decision }))
        }
        other => anyhow::bail!(
            "unknown hook `{other}` (use webhook-formatter, conversation-filter or control-handler)"
        ),
    }
}

/// The compile cache the command line uses.
pub fn default_cache_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("plugboard-plugin-cache")
}
