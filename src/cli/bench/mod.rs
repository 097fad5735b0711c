//! `swapd bench`: benchmarks against a running server or in this process. `reload` (the
//! reload-under-load benchmark: K clients stream greedy generations for T seconds while a
//! reload alternates between versions every R seconds) is in `reload`, its analysis and
//! Markdown in `report`, its plots in `plot`; the others dispatch to their modules.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

mod plot;
mod reload;
mod report;

pub use reload::ReloadBench;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Stream from K clients while reloads alternate between versions; report and plot.
    Reload(ReloadBench),
    /// The soak's careless and hostile clients (cancels, slow readers, bad requests); exits 1
    /// on any outcome other than the expected one. See scripts/soak.sh.
    Chaos(super::chaos::ChaosBench),
    /// Write a perturbed copy of a GGUF (norm weights scaled by random factors): a second real
    /// version whose outputs differ, for reload benchmarks and tests.
    Perturb {
        input: PathBuf,
        output: PathBuf,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, default_value_t = 0.15)]
        scale: f32,
    },
    /// Write random-weight models (several LLM versions, a BERT) and a manifest serving
    /// them: what scripts/gpu-device.sh serves on a lent GPU, where no model file travels.
    Synth(super::device_check::SynthArgs),
    /// Logits of one GGUF on --device against the CPU's, along greedy paths, and batched
    /// against alone on the device; prints JSON, exits 1 past the tolerance.
    Parity(super::device_check::ParityArgs),
    /// Prefill and decode tokens/s of one stream (a running server, or swapd's or candle's
    /// model code in this process); prints JSON. See scripts/bench-peers.sh.
    Decode(super::peers::DecodeBench),
    /// This machine's memory read bandwidth and the decode floor it sets for a GGUF (every
    /// weight read once per token); prints JSON.
    Membw {
        #[arg(
            long,
            default_value = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
        )]
        gguf: PathBuf,
        /// Buffer size in MiB (far beyond the caches).
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        /// Reader threads [default: candle's thread count, as decode uses].
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
}

pub async fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Perturb {
            input,
            output,
            seed,
            scale,
        } => {
            crate::model::synth::perturb_gguf(&input, &output, seed, scale)
                .with_context(|| format!("perturbing {}", input.display()))?;
            println!("wrote {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Reload(b) => reload::reload_bench(b).await,
        BenchCommand::Synth(a) => super::device_check::synth(a),
        BenchCommand::Parity(a) => {
            tokio::task::spawn_blocking(move || super::device_check::parity(a))
                .await
                .context("the parity check panicked")?
        }
        BenchCommand::Chaos(b) => super::chaos::run(b).await,
        BenchCommand::Decode(b) => {
            let report = super::peers::decode_bench(b).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Membw {
            gguf,
            mib,
            threads,
            repeats,
        } => {
            let threads = threads.unwrap_or_else(candle_core::utils::get_num_threads);
            let weight_bytes = super::peers::quantized_weight_bytes(&gguf)?;
            let bw = super::peers::memory_bandwidth(mib << 20, threads, repeats);
            let report = serde_json::json!({
                "threads": threads,
                "bandwidth_bytes_per_s": bw,
                "weight_bytes": weight_bytes,
                "floor_tok_s": bw / weight_bytes as f64,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
