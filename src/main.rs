//! The `swapd` binary: parse the command line, start logging, hand off to the library.
use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = swapd::cli::Cli::parse();
    swapd::cli::run(cli).await
}
