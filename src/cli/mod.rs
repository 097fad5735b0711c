//! The command line: `swapd serve` and the client commands operators and scripts use.
pub mod admin;
pub mod client;

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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("swapd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts logging: `RUST_LOG` sets the level (default info), `format` the line format.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
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
    init_tracing(config.log_format);
    let (listen, control_listen) = (config.listen, config.control_listen);
    let shutdown = shutdown_signal();
    let server = match Server::start(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            eprintln!("swapd: startup failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("swapd: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let control = match control_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("swapd: cannot listen on {addr} (control): {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    match server.serve_split(listener, control, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swapd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are registered here, at once, not when the
/// future is first polled: until they are, these signals' default action kills the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
                        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM/SIGINT; the default actions apply");
                    std::future::pending::<()>().await
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
