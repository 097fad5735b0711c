//! `swapd bench reload`: K clients stream greedy generations for T seconds while a reload
//! alternates between versions every R seconds; every token's arrival, every reload phase and
//! the server's RSS (from its `/metrics`) are recorded, then split into steady windows and
//! reload windows. Writes `NAME.json`, `NAME.md` and `NAME.svg` (inter-token latency and RSS
//! over time, reload phases shaded).
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::Mutex;

use super::plot::plot;
use super::report::{analyze, markdown, PhaseRecord, ReloadRecord, RequestRecord, RunInfo};
use crate::cli::admin::{control_client, phase_name};
use crate::cli::client::{channel, Conn};
use crate::proto::{self, inference_client::InferenceClient, reload_event::Event};

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

fn parse_version(s: &str) -> Result<(String, String, String)> {
    let (source, sha) = s
        .split_once('=')
        .with_context(|| format!("--version `{s}`: expected SOURCE=SHA256"))?;
    let file = source.rsplit('/').next().unwrap_or(source).to_string();
    Ok((source.to_string(), file, sha.to_string()))
}

pub(super) async fn reload_bench(b: ReloadBench) -> Result<ExitCode> {
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
    let run = RunInfo {
        label: b.label.clone(),
        model: b.model.clone(),
        clients: b.clients,
        duration: b.duration,
        reload_every: b.reload_every,
        resource_preserving: b.resource_preserving,
    };
    let report = analyze(&run, records.clone(), &rss, reloads);
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
