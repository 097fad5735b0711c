//! The `swapd` binary: parse the command line, start logging, hand off to the library.
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

fn main() -> ExitCode {
    let cli = swapd::cli::Cli::parse();
    // candle works out its thread count on every dense matrix product unless one of these is
    // set, reading /proc/cpuinfo each time (measured: 8% of a batched decode's CPU time).
    // Fixing it once here, before any thread starts, gives the same count for free.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none()
        && std::env::var_os("RAYON_NUM_THREADS").is_none()
    {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
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
