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
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
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
