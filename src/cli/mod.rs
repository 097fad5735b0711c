//! The command line: `swapd serve` and the client commands operators and scripts use.
pub mod admin;
mod batched;
pub mod bench;
pub mod chaos;
pub mod client;
pub mod device_check;
pub mod fleet;
pub mod peers;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, ServeArgs};
use crate::server::Server;

/// swapd: a gRPC model server that swaps model versions while it keeps serving.
#[derive(Debug, Parser)]
#[command(name = "swapd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the manifest's models and serve them over gRPC.
    Serve(Box<ServeArgs>),
    /// Stream a generation to the terminal.
    Generate(client::GenerateArgs),
    /// Embed texts.
    Embed(client::EmbedArgs),
    /// List the served models and their active versions.
    Models(client::Conn),
    /// Check a running server end to end: health, a generation, an embedding.
    Smoke(client::SmokeArgs),
    /// Load a new version of a model and swap it in, showing each phase.
    Reload(admin::ReloadArgs),
    /// Make the previous version of a model active again.
    Rollback(admin::RollbackArgs),
    /// Active, standby and previous versions, reloads in progress and their last result.
    Status(admin::StatusArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Benchmarks against a running server.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Roll a new model version across replicas: a canary, then batches, each watched;
    /// on any failure stop and roll back every replica changed.
    FleetReload(fleet::FleetArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file (with the SWAPD_* environment applied, as `serve` would) and
    /// the manifest it names, without binding or loading anything. Exits 2 listing every
    /// problem: file, key, why.
    Check {
        /// The TOML config file.
        file: std::path::PathBuf,
    },
}

/// Runs a parsed command; the exit code says whether it worked.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => return serve(*args).await,
        Command::Generate(a) => client::generate(a).await,
        Command::Embed(a) => client::embed(a).await,
        Command::Models(c) => client::models(c).await,
        Command::Smoke(a) => client::smoke(a).await,
        Command::Reload(a) => admin::reload(a).await,
        Command::Rollback(a) => admin::rollback(a).await,
        Command::Status(a) => admin::status(a).await,
        Command::Config(ConfigCommand::Check { file }) => return config_check(file),
        Command::Bench(b) => bench::run(b).await,
        Command::FleetReload(a) => fleet::fleet_reload(a).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("swapd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `swapd config check FILE`.
fn config_check(file: std::path::PathBuf) -> ExitCode {
    /// The serve options as the environment sets them (no flags).
    #[derive(Parser)]
    struct FromEnv {
        #[command(flatten)]
        args: ServeArgs,
    }
    let mut args = match FromEnv::try_parse_from(["swapd"]) {
        Ok(e) => e.args,
        Err(e) => {
            eprintln!("swapd: environment: {e}");
            return ExitCode::from(2);
        }
    };
    args.config = Some(file.clone());
    match Config::check(&args) {
        Ok(c) => {
            println!("{}: ok", file.display());
            println!("  listen          {}", c.listen);
            if let Some(a) = c.control_listen {
                println!("  control_listen  {a}");
            }
            match c.metrics_listen {
                Some(a) => println!("  metrics         http://{a}/metrics"),
                None => println!("  metrics         off"),
            }
            println!("  device          {:?}", c.device);
            println!("  manifest        {}", c.manifest_path.display());
            let names: Vec<_> = c.manifest.models.iter().map(|m| m.name.as_str()).collect();
            println!("  models          {}", names.join(", "));
            println!(
                "  admin token     {}",
                match (&c.admin_token, c.control_auth) {
                    (_, false) => "not required (control_auth = false)",
                    (Some(_), true) => "set",
                    (None, true) => "NOT SET: control calls will be refused",
                }
            );
            println!("  shutdown grace  {} s", c.shutdown_grace.as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{}: {} problem(s)", file.display(), errors.len());
            ExitCode::from(2)
        }
    }
}

/// Starts logging. `RUST_LOG`, when set, wins over `level` (a level or a tracing filter).
pub fn init_tracing(format: LogFormat, level: &str) {
    let filter = std::env::var("RUST_LOG")
        .map_err(|e| e.to_string())
        .and_then(|v| crate::config::log_filter(&v))
        .or_else(|_| crate::config::log_filter(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

async fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("swapd: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format, &config.log_level);
    let (listen, control_listen, metrics_listen) =
        (config.listen, config.control_listen, config.metrics_listen);
    // Registered before the models load, so a SIGTERM during startup is not fatal.
    let shutdown = signals();
    let server = match Server::start(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            eprintln!("swapd: startup failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bind = |addr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            eprintln!("swapd: cannot listen on {addr} ({what}): {e}");
        })
    };
    let Ok(listener) = bind(listen, "gRPC").await else {
        return ExitCode::FAILURE;
    };
    let control = match control_listen {
        Some(addr) => match bind(addr, "control").await {
            Ok(l) => Some(l),
            Err(()) => return ExitCode::FAILURE,
        },
        None => None,
    };
    if let Some(addr) = metrics_listen {
        let Ok(l) = bind(addr, "metrics").await else {
            return ExitCode::FAILURE;
        };
        // Scrapes keep working through the drain; the endpoint ends with the process.
        tokio::spawn(crate::scrape::serve(
            l,
            server.metrics_endpoint(),
            std::future::pending(),
        ));
    }
    match server.serve_split(listener, control, shutdown).await {
        // Clean or not, a drain that ran its course is a normal exit; the log says which.
        Ok(_report) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swapd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits the process at once (with
/// 128 + the signal number). The handlers are registered here, at once, not when the
/// future is first polled: until they are, these signals' default action kills the process.
fn signals() -> impl std::future::Future<Output = ()> + Send + 'static {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::spawn(async move {
                    let (name, _) = next_signal(&mut term, &mut int).await;
                    tracing::info!(
                        signal = name,
                        "shutting down; a second signal exits at once"
                    );
                    let _ = tx.send(());
                    let (name, number) = next_signal(&mut term, &mut int).await;
                    tracing::warn!(
                        signal = name,
                        "second signal: exiting now, without waiting for the drain"
                    );
                    std::process::exit(128 + number);
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM/SIGINT; the default actions apply");
                std::mem::forget(tx);
            }
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(());
    });
    async move {
        // A dropped sender (no handlers) never resolves.
        if rx.await.is_err() {
            std::future::pending::<()>().await
        }
    }
}

#[cfg(unix)]
async fn next_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> (&'static str, i32) {
    tokio::select! {
        _ = term.recv() => ("SIGTERM", 15),
        _ = int.recv() => ("SIGINT", 2),
    }
}
