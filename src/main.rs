//! The `swapd` binary: parse the command line, start logging, hand off to the library.
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

fn main() -> ExitCode {
    let cli = swapd::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("swapd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(swapd::cli::run(cli));
    // A blocking thread still busy (a model load that shutdown abandoned) must not hold up
    // the exit: its work is discarded anyway.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}
