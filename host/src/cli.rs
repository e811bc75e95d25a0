//! The `plugboard` command line: `serve`, `token`, `config check`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::auth::{mint_token, Secrets};
use crate::config::{Config, LogFormat};
use crate::server::Server;

#[derive(Debug, Parser)]
#[command(
    name = "plugboard",
    version,
    about = "An IM gateway with sandboxed WebAssembly plugins"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway. Without a config file it runs on embedded defaults:
    /// SQLite in ./plugboard-data, a loopback listener, generated dev secrets.
    Serve {
        /// TOML config file (see docs/configuration.md).
        #[arg(long, short, env = "PLUGBOARD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Mint a development client token (HS256 JWT) for a user.
    Token {
        /// The user id (`sub` claim).
        user: String,
        /// Device id (`device` claim).
        #[arg(long)]
        device: Option<String>,
        /// Lifetime, e.g. `1h`, `30d`; `0` for a token without expiry.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, short, env = "PLUGBOARD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check or try a plugin component without a running gateway.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Work with the config file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a component as the gateway would: which hooks it exports, the WIT
    /// version, and whether its init accepts the config. Exits 1 if refused.
    Check {
        file: PathBuf,
        /// A config entry handed to the plugin, `key=value` (repeatable).
        #[arg(long = "config", short = 'c', value_parser = parse_pair)]
        config: Vec<(String, String)>,
    },
    /// Call one hook once with a JSON input and print the result and the plugin's log.
    Run {
        file: PathBuf,
        /// webhook-formatter, conversation-filter or control-handler.
        #[arg(long)]
        hook: String,
        /// JSON input file (`-` for standard input); see docs/plugins.md.
        #[arg(long)]
        input: PathBuf,
        /// A config entry handed to the plugin, `key=value` (repeatable).
        #[arg(long = "config", short = 'c', value_parser = parse_pair)]
        config: Vec<(String, String)>,
        /// CPU deadline of the call.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        deadline: Duration,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate the config (file plus environment), then print it in full.
    Check {
        #[arg(long, short, env = "PLUGBOARD_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        // JSON escapes control characters by itself.
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.fmt_fields(escaping_fields()).try_init(),
    };
}

/// The text format's field formatter: `name=value` pairs separated by
/// spaces, the message bare, as tracing's default, except that control
/// characters in every message and value are escaped. Values come from
/// clients, tokens, plugins and receivers; escaping them here, once, means
/// no call site can forget to, so no value can end a line and forge
/// another record.
fn escaping_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        let text = escape_controls(&text);
        if field.name() == "message" {
            w.write_str(&text)
        } else {
            write!(w, "{}={text}", field.name().trim_start_matches("r#"))
        }
    })
    .delimited(" ")
}

/// Whether a character must not reach a text log as it is: control
/// characters, and the Unicode line and paragraph separators and
/// bidirectional overrides that make a viewer show text other than what
/// is there.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with every control character escaped (`\n`, `\r`, `\t`,
/// otherwise `\u{..}`), so that it stays on one line.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write as _;
    if !text.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Runs the command line; returns the process exit code.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let cfg = Config::load(config.as_deref())?;
            init_logging(&cfg);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(serve(cfg, config))
        }
        Command::Token {
            user,
            device,
            ttl,
            config,
        } => {
            let cfg = Config::load(config.as_deref())?;
            let secrets = Secrets::resolve(&cfg, |text| eprintln!("{text}"))?;
            let ttl = (!ttl.is_zero()).then_some(ttl);
            println!(
                "{}",
                mint_token(&user, device.as_deref(), ttl, secrets.jwt_secret.as_bytes())
            );
            Ok(())
        }
        Command::Plugin { command } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(plugin_command(command))
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let cfg = Config::load(config.as_deref())?;
            // Secrets are redacted: the output is meant to be shared when debugging.
            println!("{}", toml::to_string_pretty(&cfg.redacted())?);
            eprintln!("config is valid");
            Ok(())
        }
    }
}

/// Raises the soft open-files limit to the hard limit: every client holds a
/// descriptor, and the usual soft default (1024) caps a gateway far too low.
pub fn raise_nofile_limit() {
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = lim.rlim_max;
            lim.rlim_cur = wanted;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("cannot raise the open-files limit");
            }
        }
    }
}

/// Binds the listener with a backlog that absorbs reconnect storms (the
/// default of 128 drops SYNs when thousands of clients reconnect at once).
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn serve(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    raise_nofile_limit();
    let listener = bind(cfg.server.listen)
        .with_context(|| format!("cannot listen on {} (server.listen)", cfg.server.listen))?;
    // Handlers first: a signal that arrives as soon as the address is
    // announced must find them in place, not the default action.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let server = Server::start(cfg, config_path, listener).await?;
    println!("plugboard: listening on http://{}", server.local_addr());
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = server.app().reload().await;
            }
        }
    }
    tokio::spawn(async move {
        // A second signal during the graceful shutdown exits at once.
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(130);
    });
    server.shutdown().await;
    Ok(())
}

async fn plugin_command(command: PluginCommand) -> anyhow::Result<()> {
    use crate::plugins::tool;
    match command {
        PluginCommand::Check { file, config } => {
            let loaded = tool::load(
                &file,
                config,
                Duration::from_secs(1),
                &tool::default_cache_dir(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}: refused: {e}", file.display()))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&tool::describe(&file, &loaded))?
            );
            tool::print_logs(&loaded.log);
            Ok(())
        }
        PluginCommand::Run {
            file,
            hook,
            input,
            config,
            deadline,
        } => {
            let text = if input.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&input)
                    .with_context(|| format!("cannot read {}", input.display()))?
            };
            let input: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", input.display()))?;
            let loaded = tool::load(&file, config, deadline, &tool::default_cache_dir())
                .await
                .map_err(|e| anyhow::anyhow!("{}: refused: {e}", file.display()))?;
            let result = tool::run(&loaded, &hook, &input).await;
            tool::print_logs(&loaded.log);
            let result = result?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("plain text, é ✓"), "plain text, é ✓");
        assert_eq!(
            escape_controls("a\nb\r\tc\u{1b}[2K\u{0}\u{85}\u{2028}\u{202e}"),
            "a\\nb\\r\\tc\\u{1b}[2K\\u{0}\\u{85}\\u{2028}\\u{202e}"
        );
    }

    /// A writer into a shared buffer, for a subscriber under test.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_text_log_keeps_every_record_on_one_line() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(escaping_fields())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let hostile = "x\n2026-01-01T00:00:00.000000Z ERROR forged: line";
            tracing::info!(user_id = %hostile, quoted = hostile, n = 3, "message {hostile}");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(
                "message x\\n2026-01-01T00:00:00.000000Z ERROR forged: line user_id=x\\n2026"
            ),
            "{text}"
        );
        assert!(text.contains(" quoted=\"x\\n2026"), "{text}");
        assert!(text.trim_end().ends_with(" n=3"), "{text}");
    }
}
