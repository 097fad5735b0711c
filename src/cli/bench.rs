//! `swapd bench`: the reload-under-load benchmark against a running server. K clients stream
//! greedy generations for T seconds while a reload alternates between versions every R
//! seconds; every token's arrival, every reload phase and the server's RSS (from its
//! `/metrics`) are recorded, then split into steady windows and reload windows. Writes
//! `NAME.json`, `NAME.md` and `NAME.svg` (inter-token latency and RSS over time, reload phases
//! shaded).
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::sync::Mutex;

use super::admin::{control_client, phase_name};
use super::client::{channel, Conn};
use super::stats::percentile;
use crate::proto::{self, inference_client::InferenceClient, reload_event::Event};

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

#[derive(Debug, clap::Args)]
pub struct ReloadBench {
    #[command(flatten)]
    pub conn: Conn,
    /// Admin token for the reloads.
    #[arg(long, env = "SWAPD_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The server's metrics endpoint, for its RSS (e.g. http://127.0.0.1:9464/metrics).
    #[arg(long)]
    pub metrics: Option<String>,
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seconds between reload starts; 0: no reloads (the steady baseline).
    #[arg(long, default_value_t = 10.0)]
    pub reload_every: f64,
    /// The versions to alternate, as SOURCE=SHA256 (the source's file pinned), in order; the
    /// first reload goes to the second one listed.
    #[arg(long = "version")]
    pub versions: Vec<String>,
    /// Reload with the resource-preserving memory policy.
    #[arg(long)]
    pub resource_preserving: bool,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Output path prefix: writes PREFIX.json, PREFIX.md and PREFIX.svg.
    #[arg(long, default_value = "target/bench/reload")]
    pub out: PathBuf,
    /// A label for this run in the report.
    #[arg(long, default_value = "run")]
    pub label: String,
}

/// One request as the client saw it; times in seconds since the benchmark started.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub client: usize,
    pub start: f64,
    /// Arrival of each delta carrying text or ids.
    pub tokens: Vec<f64>,
    pub code: String,
    /// Distinct (version, generation) pairs its messages named.
    pub versions: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseRecord {
    pub phase: String,
    pub start: f64,
    pub end: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadRecord {
    pub source: String,
    pub start: f64,
    pub end: f64,
    pub committed: bool,
    pub error: String,
    pub phases: Vec<PhaseRecord>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct WindowStats {
    pub seconds: f64,
    pub tokens: usize,
    pub aggregate_tokens_per_s: f64,
    pub per_stream_tokens_per_s_p50: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p99: f64,
    pub itl_ms_p50: f64,
    pub itl_ms_p99: f64,
    pub itl_samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub model: String,
    pub clients: usize,
    pub duration_s: f64,
    pub reload_every_s: f64,
    pub resource_preserving: bool,
    pub requests: usize,
    pub failed_requests: usize,
    pub mixed_version_streams: usize,
    pub reloads: usize,
    pub reloads_committed: usize,
    pub steady: WindowStats,
    pub during_reload: WindowStats,
    /// Median RSS outside reloads, and the highest RSS seen during one.
    pub steady_rss_bytes: Option<u64>,
    pub peak_rss_during_reload_bytes: Option<u64>,
    pub peak_over_steady: Option<f64>,
    /// Per reload: from the drain's end until RSS was back within 2% of steady (ms).
    pub memory_back_ms: Vec<Option<f64>>,
    /// Inter-token latency by the reload phase running when the token arrived (all reloads).
    pub itl_by_phase: Vec<PhaseItl>,
    pub reload_details: Vec<ReloadRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseItl {
    pub phase: String,
    pub samples: usize,
    pub itl_ms_p50: f64,
    pub itl_ms_p99: f64,
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
        BenchCommand::Reload(b) => reload_bench(b).await,
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

fn parse_version(s: &str) -> Result<(String, String, String)> {
    let (source, sha) = s
        .split_once('=')
        .with_context(|| format!("--version `{s}`: expected SOURCE=SHA256"))?;
    let file = source.rsplit('/').next().unwrap_or(source).to_string();
    Ok((source.to_string(), file, sha.to_string()))
}

async fn reload_bench(b: ReloadBench) -> Result<ExitCode> {
    let versions: Vec<_> = b
        .versions
        .iter()
        .map(|v| parse_version(v))
        .collect::<Result<_>>()?;
    if b.reload_every > 0.0 && versions.len() < 2 {
        bail!("reloads need at least two --version SOURCE=SHA256 to alternate");
    }
    if b.clients == 0 || b.duration <= 0.0 {
        bail!("--clients and --duration must be positive");
    }
    let ch = channel(&b.conn).await?;
    let t0 = Instant::now();
    let secs = move || t0.elapsed().as_secs_f64();
    let end = Duration::from_secs_f64(b.duration);
    let records = Arc::new(Mutex::new(Vec::<RequestRecord>::new()));

    // The clients.
    let mut clients = Vec::new();
    for client in 0..b.clients {
        let (ch, records, model) = (ch.clone(), records.clone(), b.model.clone());
        let max_tokens = b.max_tokens;
        clients.push(tokio::spawn(async move {
            let mut c = InferenceClient::new(ch);
            let mut n = 0u64;
            while t0.elapsed() < end {
                n += 1;
                let req = proto::GenerateRequest {
                    model: model.clone(),
                    input: Some(proto::generate_request::Input::Prompt(format!(
                        "Story {client}.{n}: Once upon a time, in a quiet town,"
                    ))),
                    sampling: Some(proto::SamplingParams {
                        max_tokens: Some(max_tokens),
                        temperature: Some(0.0),
                        ..Default::default()
                    }),
                    return_token_ids: true,
                };
                let mut rec = RequestRecord {
                    client,
                    start: secs(),
                    tokens: Vec::new(),
                    code: "OK".into(),
                    versions: Vec::new(),
                };
                let mut seen = BTreeSet::new();
                let outcome = async {
                    let mut s = c.generate(req).await?.into_inner();
                    while let Some(m) = s.message().await? {
                        if let Some(v) = &m.version {
                            seen.insert(format!("{}@{}", v.version, v.generation));
                        }
                        if let Some(proto::generate_response::Event::Delta(_)) = m.event {
                            rec.tokens.push(secs());
                        }
                    }
                    Ok::<_, tonic::Status>(())
                }
                .await;
                if let Err(e) = outcome {
                    rec.code = crate::metrics::code_name(e.code()).to_string();
                }
                rec.versions = seen.into_iter().collect();
                records.lock().await.push(rec);
            }
        }));
    }

    // RSS from the metrics endpoint.
    let rss = Arc::new(Mutex::new(Vec::<(f64, u64)>::new()));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = b.metrics.clone().map(|url| {
        let (rss, sampling) = (rss.clone(), sampling.clone());
        tokio::spawn(async move {
            // Until the last reload has ended and memory had a second to settle.
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(v) = scrape_rss(&url).await {
                    rss.lock().await.push((secs(), v));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    });

    // The reloads.
    let mut reloads = Vec::new();
    if b.reload_every > 0.0 {
        let mut ctl = control_client(ch.clone(), b.token.as_deref(), Some("swapd-bench"))?;
        let mut next = 1;
        let every = Duration::from_secs_f64(b.reload_every);
        let mut at = every;
        while at < end {
            tokio::time::sleep_until((t0 + at).into()).await;
            // A reload that ran long may have used up the rest of the run.
            if t0.elapsed() >= end {
                break;
            }
            let (source, file, sha) = &versions[next % versions.len()];
            next += 1;
            let req = proto::ReloadRequest {
                model: b.model.clone(),
                source: source.clone(),
                sha256: [(file.clone(), sha.clone())].into_iter().collect(),
                memory_policy: if b.resource_preserving {
                    proto::MemoryPolicy::ResourcePreserving as i32
                } else {
                    proto::MemoryPolicy::Default as i32
                },
                ..Default::default()
            };
            let mut rec = ReloadRecord {
                source: source.clone(),
                start: secs(),
                end: 0.0,
                committed: false,
                error: String::new(),
                phases: Vec::new(),
            };
            match ctl.reload(req).await {
                Err(e) => rec.error = e.message().to_string(),
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    while let Ok(Some(ev)) = stream.message().await {
                        match ev.event {
                            Some(Event::Phase(p)) => {
                                let name = phase_name(p.phase);
                                match p.state() {
                                    proto::PhaseState::Started => rec.phases.push(PhaseRecord {
                                        phase: name,
                                        start: secs(),
                                        end: secs(),
                                    }),
                                    proto::PhaseState::Done | proto::PhaseState::Failed => {
                                        if let Some(last) = rec.phases.last_mut() {
                                            last.end = secs();
                                        }
                                    }
                                    _ => {}
                                }
                            }
                            Some(Event::Result(r)) => {
                                rec.committed = r.committed;
                                rec.error = r.error;
                            }
                            None => {}
                        }
                    }
                }
            }
            rec.end = secs();
            eprintln!(
                "[{:7.2}s] reload to {} {} in {:.0} ms{}",
                rec.start,
                rec.source,
                if rec.committed { "committed" } else { "FAILED" },
                (rec.end - rec.start) * 1e3,
                if rec.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", rec.error)
                }
            );
            reloads.push(rec);
            at += every;
        }
    }
    for c in clients {
        let _ = c.await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(s) = sampler {
        let _ = s.await;
    }
    let records = records.lock().await.clone();
    let rss = rss.lock().await.clone();
    let report = analyze(&b, records.clone(), &rss, reloads);
    if let Some(dir) = b.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let path = |ext: &str| b.out.with_extension(ext);
    std::fs::write(path("json"), serde_json::to_string_pretty(&report)?)?;
    let md = markdown(&report);
    std::fs::write(path("md"), &md)?;
    plot(
        &path("svg"),
        &report,
        &records,
        &rss,
        (0.0, report.duration_s + 1.0),
    )?;
    // A close-up of the first three reloads, small enough to publish.
    if let (Some(first), Some(third)) = (
        report.reload_details.first(),
        report.reload_details.iter().take(3).next_back(),
    ) {
        let window = ((first.start - 2.0).max(0.0), third.end + 2.0);
        plot(&path("zoom.svg"), &report, &records, &rss, window)?;
    }
    println!("{md}");
    println!(
        "wrote {}, {}, {}",
        path("json").display(),
        path("md").display(),
        path("svg").display()
    );
    Ok(
        if report.failed_requests == 0 && report.mixed_version_streams == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// The `swapd_resident_memory_bytes` value of one scrape (plain HTTP/1.0).
async fn scrape_rss(url: &str) -> Result<u64> {
    let rest = url
        .strip_prefix("http://")
        .context("metrics URL must be http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, "metrics"));
    let (_, body) = crate::metrics::fetch(host, path).await?;
    let v = crate::metrics::parse(&body)
        .into_iter()
        .find(|s| s.name == "swapd_resident_memory_bytes")
        .context("no swapd_resident_memory_bytes")?;
    Ok(v.value as u64)
}

fn analyze(
    b: &ReloadBench,
    records: Vec<RequestRecord>,
    rss: &[(f64, u64)],
    reloads: Vec<ReloadRecord>,
) -> Report {
    let windows: Vec<(f64, f64)> = reloads.iter().map(|r| (r.start, r.end)).collect();
    let in_reload = |t: f64| windows.iter().any(|(a, z)| t >= *a && t <= *z);
    let reload_secs: f64 = windows
        .iter()
        .map(|(a, z)| (z.min(b.duration) - a.min(b.duration)).max(0.0))
        .sum::<f64>()
        + 0.0; // An empty float sum is -0.0.
    let stats = |during: bool| {
        let mut s = WindowStats {
            seconds: if during {
                reload_secs
            } else {
                (b.duration - reload_secs).max(0.0)
            },
            ..Default::default()
        };
        let (mut ttft, mut itl, mut per_stream) = (Vec::new(), Vec::new(), Vec::new());
        for r in &records {
            for (i, t) in r.tokens.iter().enumerate() {
                if in_reload(*t) == during && *t <= b.duration {
                    s.tokens += 1;
                    if i > 0 {
                        itl.push((t - r.tokens[i - 1]) * 1e3);
                    }
                }
            }
            if let Some(first) = r.tokens.first() {
                if in_reload(r.start) == during {
                    ttft.push((first - r.start) * 1e3);
                }
                if r.tokens.len() > 1 && in_reload(*first) == during {
                    let span = r.tokens[r.tokens.len() - 1] - first;
                    if span > 0.0 {
                        per_stream.push((r.tokens.len() - 1) as f64 / span);
                    }
                }
            }
        }
        s.aggregate_tokens_per_s = if s.seconds > 0.0 {
            s.tokens as f64 / s.seconds
        } else {
            0.0
        };
        s.itl_samples = itl.len();
        s.ttft_ms_p50 = percentile(&mut ttft, 50.0);
        s.ttft_ms_p99 = percentile(&mut ttft, 99.0);
        s.itl_ms_p50 = percentile(&mut itl, 50.0);
        s.itl_ms_p99 = percentile(&mut itl, 99.0);
        s.per_stream_tokens_per_s_p50 = percentile(&mut per_stream, 50.0);
        s
    };
    let steady = stats(false);
    let during_reload = stats(true);
    let mut steady_rss: Vec<f64> = rss
        .iter()
        .filter(|(t, _)| !in_reload(*t))
        .map(|(_, v)| *v as f64)
        .collect();
    let steady_rss = (!steady_rss.is_empty()).then(|| percentile(&mut steady_rss, 50.0) as u64);
    let peak = rss
        .iter()
        .filter(|(t, _)| in_reload(*t))
        .map(|(_, v)| *v)
        .max();
    let memory_back_ms = reloads
        .iter()
        .map(|r| {
            let drain_end = r.phases.iter().find(|p| p.phase == "drain")?.end;
            let steady = steady_rss? as f64;
            rss.iter()
                .find(|(t, v)| *t >= drain_end && (*v as f64) <= steady * 1.02)
                .map(|(t, _)| (t - drain_end).max(0.0) * 1e3)
        })
        .collect();
    // Which phase each inter-token gap ended in: where the latency during reloads comes from.
    let phase_at = |t: f64| {
        reloads
            .iter()
            .filter(|r| t >= r.start && t <= r.end)
            .flat_map(|r| &r.phases)
            .find(|p| t >= p.start && t <= p.end)
            .map(|p| p.phase.as_str())
    };
    let mut by_phase: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for r in &records {
        for w in r.tokens.windows(2) {
            if let Some(phase) = phase_at(w[1]) {
                by_phase.entry(phase).or_default().push((w[1] - w[0]) * 1e3);
            }
        }
    }
    let itl_by_phase = crate::registry::reload::Phase::ALL
        .map(crate::registry::reload::phase_name)
        .into_iter()
        .filter_map(|name| {
            let mut v = by_phase.remove(name)?;
            Some(PhaseItl {
                phase: name.to_string(),
                samples: v.len(),
                itl_ms_p50: percentile(&mut v, 50.0),
                itl_ms_p99: percentile(&mut v, 99.0),
            })
        })
        .collect();
    Report {
        label: b.label.clone(),
        model: b.model.clone(),
        clients: b.clients,
        duration_s: b.duration,
        reload_every_s: b.reload_every,
        resource_preserving: b.resource_preserving,
        requests: records.len(),
        failed_requests: records.iter().filter(|r| r.code != "OK").count(),
        mixed_version_streams: records.iter().filter(|r| r.versions.len() > 1).count(),
        reloads: reloads.len(),
        reloads_committed: reloads.iter().filter(|r| r.committed).count(),
        steady,
        during_reload,
        steady_rss_bytes: steady_rss,
        peak_rss_during_reload_bytes: peak,
        peak_over_steady: match (peak, steady_rss) {
            (Some(p), Some(s)) if s > 0 => Some(p as f64 / s as f64),
            _ => None,
        },
        memory_back_ms,
        itl_by_phase,
        reload_details: reloads,
    }
}

/// The report as Markdown: one summary table, then each reload's phases.
pub fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### {}: {} clients, {:.0} s, reload every {} s{}\n",
        r.label,
        r.clients,
        r.duration_s,
        r.reload_every_s,
        if r.resource_preserving {
            ", resource-preserving"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "| | steady | during reloads |\n|---|---|---|");
    let row = |s: &mut String, name: &str, a: String, b: String| {
        let _ = writeln!(s, "| {name} | {a} | {b} |");
    };
    let (a, b) = (&r.steady, &r.during_reload);
    row(
        &mut s,
        "seconds",
        format!("{:.1}", a.seconds),
        format!("{:.1}", b.seconds),
    );
    row(
        &mut s,
        "aggregate decode tokens/s",
        format!("{:.1}", a.aggregate_tokens_per_s),
        format!("{:.1}", b.aggregate_tokens_per_s),
    );
    row(
        &mut s,
        "per-stream tokens/s (p50)",
        format!("{:.1}", a.per_stream_tokens_per_s_p50),
        format!("{:.1}", b.per_stream_tokens_per_s_p50),
    );
    row(
        &mut s,
        "time to first token p50 / p99 (ms)",
        format!("{:.0} / {:.0}", a.ttft_ms_p50, a.ttft_ms_p99),
        format!("{:.0} / {:.0}", b.ttft_ms_p50, b.ttft_ms_p99),
    );
    row(
        &mut s,
        "inter-token latency p50 / p99 (ms)",
        format!("{:.1} / {:.1}", a.itl_ms_p50, a.itl_ms_p99),
        format!("{:.1} / {:.1}", b.itl_ms_p50, b.itl_ms_p99),
    );
    let _ = writeln!(
        s,
        "\nrequests {}, failed {}, mixed-version streams {}, reloads {} ({} committed)",
        r.requests, r.failed_requests, r.mixed_version_streams, r.reloads, r.reloads_committed
    );
    if let (Some(st), Some(pk)) = (r.steady_rss_bytes, r.peak_rss_during_reload_bytes) {
        let back: Vec<String> = r
            .memory_back_ms
            .iter()
            .map(|m| m.map(|v| format!("{v:.0}")).unwrap_or("-".into()))
            .collect();
        let _ = writeln!(
            s,
            "\nsteady RSS {:.1} MB, peak during reloads {:.1} MB ({:.2}×); memory back after drain (ms): {}",
            st as f64 / 1e6,
            pk as f64 / 1e6,
            pk as f64 / st as f64,
            back.join(", ")
        );
    }
    if !r.itl_by_phase.is_empty() {
        let _ = writeln!(
            s,
            "\n| inter-token latency by reload phase | samples | p50 (ms) | p99 (ms) |\n|---|---|---|---|"
        );
        for p in &r.itl_by_phase {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} |",
                p.phase, p.samples, p.itl_ms_p50, p.itl_ms_p99
            );
        }
    }
    if !r.reload_details.is_empty() {
        let names = crate::registry::reload::Phase::ALL.map(crate::registry::reload::phase_name);
        let _ = writeln!(
            s,
            "\n| reload | {} | total |\n|---|{}---|",
            names.join(" | "),
            "---|".repeat(names.len())
        );
        for (i, rl) in r.reload_details.iter().enumerate() {
            let cells: Vec<String> = names
                .iter()
                .map(|n| {
                    rl.phases
                        .iter()
                        .find(|p| p.phase == *n)
                        .map(|p| format!("{:.0}", (p.end - p.start) * 1e3))
                        .unwrap_or("-".into())
                })
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} ms |",
                i + 1,
                cells.join(" | "),
                (rl.end - rl.start) * 1e3
            );
        }
    }
    s
}

/// Inter-token latency (dots) and RSS (line) over time, reload phases shaded.
/// Plots the seconds `x0..x1` of the run.
fn plot(
    path: &std::path::Path,
    r: &Report,
    records: &[RequestRecord],
    rss: &[(f64, u64)],
    (x0, x1): (f64, f64),
) -> Result<()> {
    use plotters::prelude::*;
    let inside = |t: f64| t >= x0 && t <= x1;
    let points: Vec<(f64, f64)> = records
        .iter()
        .flat_map(|rec| {
            rec.tokens
                .windows(2)
                .map(|w| (w[1], (w[1] - w[0]) * 1e3))
                .filter(|(t, _)| inside(*t))
                .collect::<Vec<_>>()
        })
        .collect();
    let rss: Vec<(f64, u64)> = rss.iter().copied().filter(|(t, _)| inside(*t)).collect();
    let mut sorted: Vec<f64> = points.iter().map(|p| p.1).collect();
    // One median and one maximum per 100 ms keep the file small and every spike visible.
    let mut bins: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for (t, v) in &points {
        bins.entry((t * 10.0) as u64).or_default().push(*v);
    }
    let (mut medians, mut maxima) = (Vec::new(), Vec::new());
    for (bin, mut vs) in bins {
        let t = bin as f64 / 10.0 + 0.05;
        medians.push((t, percentile(&mut vs, 50.0)));
        maxima.push((t, vs[vs.len() - 1]));
    }
    let y_max = (percentile(&mut sorted, 99.9) * 1.2).max(1.0);
    let rss_max = rss.iter().map(|x| x.1).max().unwrap_or(1) as f64 / 1e6 * 1.1;
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: inter-token latency per 100 ms (blue median, magenta max, ms), RSS (red, MB); reload phases shaded",
                r.label
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .right_y_label_area_size(55)
        .build_cartesian_2d(x0..x1, 0f64..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .set_secondary_coord(x0..x1, 0f64..rss_max.max(1.0));
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("inter-token latency (ms)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_secondary_axes()
        .y_desc("RSS (MB)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let shade = |phase: &str| match phase {
        "load" => RGBColor(255, 200, 120),
        "preflight" => RGBColor(255, 230, 150),
        "drain" => RGBColor(170, 210, 255),
        "free" => RGBColor(180, 240, 180),
        _ => RGBColor(220, 220, 220),
    };
    for rl in &r.reload_details {
        chart
            .draw_series(
                rl.phases
                    .iter()
                    .filter(|p| p.end >= x0 && p.start <= x1)
                    .map(|p| {
                        Rectangle::new(
                            [
                                (p.start.max(x0), 0.0),
                                (p.end.max(p.start + 0.01).min(x1), y_max),
                            ],
                            shade(&p.phase).mix(0.6).filled(),
                        )
                    }),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for (series, color) in [(&maxima, MAGENTA.mix(0.5)), (&medians, BLUE.mix(0.7))] {
        chart
            .draw_series(
                series
                    .iter()
                    .map(|(t, v)| Circle::new((*t, v.min(y_max)), 1, color.filled())),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .draw_secondary_series(LineSeries::new(
            rss.iter().map(|(t, v)| (*t, *v as f64 / 1e6)),
            RED.stroke_width(2),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(duration: f64) -> ReloadBench {
        ReloadBench {
            conn: Conn {
                server: "http://127.0.0.1:1".into(),
            },
            token: None,
            metrics: None,
            model: "m".into(),
            clients: 1,
            duration,
            reload_every: 5.0,
            versions: vec![],
            resource_preserving: false,
            max_tokens: 8,
            out: PathBuf::from("unused"),
            label: "t".into(),
        }
    }

    fn phase(name: &str, start: f64, end: f64) -> PhaseRecord {
        PhaseRecord {
            phase: name.into(),
            start,
            end,
        }
    }

    #[test]
    fn analysis_splits_windows_and_attributes_latency_to_reload_phases() {
        // One stream, a token every 100 ms for 10 s, but 400 ms gaps while the reload
        // (4–6 s) is in its load phase (4–5 s); the drain (5–6 s) is fast again.
        let mut tokens = vec![];
        let mut t = 0.0;
        while t < 10.0 {
            tokens.push(t);
            t += if (4.0..5.0).contains(&t) { 0.4 } else { 0.1 };
        }
        let records = vec![RequestRecord {
            client: 0,
            start: 0.0,
            tokens,
            code: "OK".into(),
            versions: vec!["v1@1".into()],
        }];
        let reloads = vec![ReloadRecord {
            source: "b".into(),
            start: 4.0,
            end: 6.0,
            committed: true,
            error: String::new(),
            phases: vec![phase("load", 4.0, 5.0), phase("drain", 5.0, 6.0)],
        }];
        let rss = [(1.0, 100), (4.5, 190), (5.5, 150), (6.2, 101), (8.0, 100)];
        let r = analyze(&bench(10.0), records, &rss, reloads);
        assert_eq!((r.failed_requests, r.mixed_version_streams), (0, 0));
        assert!((r.during_reload.seconds - 2.0).abs() < 1e-9);
        assert!((r.steady.itl_ms_p99 - 100.0).abs() < 1e-6, "{:?}", r.steady);
        assert!((r.during_reload.itl_ms_p99 - 400.0).abs() < 1e-6);
        let phases: Vec<_> = r.itl_by_phase.iter().map(|p| p.phase.as_str()).collect();
        assert_eq!(phases, ["load", "drain"], "in Phase::ALL order");
        assert!((r.itl_by_phase[0].itl_ms_p50 - 400.0).abs() < 1e-6);
        assert!((r.itl_by_phase[1].itl_ms_p50 - 100.0).abs() < 1e-6);
        assert_eq!(r.steady_rss_bytes, Some(100));
        assert_eq!(r.peak_rss_during_reload_bytes, Some(190));
        // Back within 2% of steady 200 ms after the drain ended at 6 s.
        assert!((r.memory_back_ms[0].unwrap() - 200.0).abs() < 1e-6);
        assert!(markdown(&r).contains("| load | "));
    }
}
