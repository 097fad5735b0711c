//! Operator commands for the control service: reload, rollback, status.
use std::process::ExitCode;

use anyhow::{Context, Result};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::client::{channel, Conn};
use crate::proto::model_control_client::ModelControlClient;
use crate::proto::{self, reload_event::Event};

/// Connection plus the admin token.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminConn {
    #[command(flatten)]
    pub conn: Conn,
    /// Admin token for control calls.
    #[arg(long, env = "SWAPD_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub admin: AdminConn,
    pub model: String,
    /// New source (path inside the models root or hf://…) [default: the current one].
    #[arg(long)]
    pub source: Option<String>,
    /// Expected digest of a file, as NAME=HEX (repeatable) [default: the manifest's].
    #[arg(long, value_parser = parse_pin)]
    pub sha256: Vec<(String, String)>,
    /// Refuse unless this generation is serving (compare-and-swap).
    #[arg(long)]
    pub expected_generation: Option<u64>,
    /// How long requests on the old version get to finish [default: 30000].
    #[arg(long)]
    pub drain_timeout_ms: Option<u32>,
    /// wait | cancel: what happens to requests still running after the drain timeout.
    #[arg(long, default_value = "wait")]
    pub drain_policy: String,
    /// Keep the old version resident for an instant rollback.
    #[arg(long)]
    pub keep_previous: bool,
    /// Reload even if this source is cooling down after repeated failures.
    #[arg(long)]
    pub force: bool,
    /// When two versions do not fit: drain and free the old one first, then load the new.
    #[arg(long)]
    pub resource_preserving: bool,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub admin: AdminConn,
    pub model: String,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub admin: AdminConn,
    /// One model [default: all].
    pub model: Option<String>,
}

fn parse_pin(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, h)| (n.to_string(), h.to_string()))
        .ok_or_else(|| format!("`{s}`: expected NAME=HEX"))
}

/// Adds the bearer token to each call.
type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Ctl = ModelControlClient<tonic::service::interceptor::InterceptedService<Channel, AddToken>>;

async fn client(a: &AdminConn) -> Result<Ctl> {
    let ch = channel(&a.conn).await?;
    let auth: Option<MetadataValue<_>> = match &a.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("the token is not a valid header value")?,
        ),
        None => None,
    };
    let f: AddToken = Box::new(move |mut req| {
        if let Some(v) = &auth {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    });
    Ok(ModelControlClient::with_interceptor(ch, f))
}

fn phase_name(p: i32) -> String {
    proto::Phase::try_from(p)
        .map(|p| format!("{p:?}").to_lowercase())
        .unwrap_or_else(|_| "?".into())
}

/// Prints the phases as they happen; returns the result.
async fn follow(mut stream: tonic::Streaming<proto::ReloadEvent>) -> Result<ExitCode> {
    let mut result = None;
    // A reload that did not commit ends its stream with an error status after its result.
    while let Some(ev) = stream.message().await.transpose() {
        let ev = match ev {
            Ok(ev) => ev,
            Err(_) if result.is_some() => break,
            Err(e) => return Err(e).context("reload stream"),
        };
        match ev.event {
            Some(Event::Phase(p)) => {
                let state = match p.state() {
                    proto::PhaseState::Started => "…",
                    proto::PhaseState::Progress => "·",
                    proto::PhaseState::Done => "✓",
                    proto::PhaseState::Failed => "✗",
                    proto::PhaseState::Unspecified => "?",
                };
                println!(
                    "{state} {:<10} {:>8.1} ms  {}",
                    phase_name(p.phase),
                    p.elapsed_ms,
                    p.detail
                );
            }
            Some(Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    let r = result.context("the stream ended without a result")?;
    let total: f64 = r.timings.iter().map(|t| t.elapsed_ms).sum();
    let name = |v: &Option<proto::VersionRef>| {
        v.as_ref()
            .map(|v| format!("{} (generation {})", v.version, v.generation))
            .unwrap_or_else(|| "none".into())
    };
    if r.committed {
        println!(
            "committed: {} → {} in {total:.0} ms{}",
            name(&r.previous),
            name(&r.version),
            if r.previous_freed {
                ", previous freed"
            } else {
                ""
            }
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "not committed: failed in {} — {}",
            phase_name(r.failed_phase),
            r.error
        );
        Ok(ExitCode::FAILURE)
    }
}

fn drain_policy(s: &str) -> Result<i32> {
    match s {
        "wait" => Ok(proto::DrainPolicy::Wait as i32),
        "cancel" => Ok(proto::DrainPolicy::Cancel as i32),
        other => anyhow::bail!("--drain-policy `{other}`: expected wait or cancel"),
    }
}

pub async fn reload(a: ReloadArgs) -> Result<ExitCode> {
    let mut ctl = client(&a.admin).await?;
    let req = proto::ReloadRequest {
        model: a.model,
        source: a.source.unwrap_or_default(),
        sha256: a.sha256.into_iter().collect(),
        expected_generation: a.expected_generation,
        drain_timeout_ms: a.drain_timeout_ms,
        drain_policy: drain_policy(&a.drain_policy)?,
        keep_previous: a.keep_previous,
        force: a.force,
        memory_policy: if a.resource_preserving {
            proto::MemoryPolicy::ResourcePreserving as i32
        } else {
            proto::MemoryPolicy::Default as i32
        },
    };
    follow(ctl.reload(req).await.context("Reload")?.into_inner()).await
}

pub async fn rollback(a: RollbackArgs) -> Result<ExitCode> {
    let mut ctl = client(&a.admin).await?;
    let req = proto::RollbackRequest {
        model: a.model,
        ..Default::default()
    };
    follow(ctl.rollback(req).await.context("Rollback")?.into_inner()).await
}

pub async fn status(a: StatusArgs) -> Result<ExitCode> {
    let mut ctl = client(&a.admin).await?;
    let st = ctl
        .status(proto::StatusRequest {
            model: a.model.unwrap_or_default(),
        })
        .await
        .context("Status")?
        .into_inner();
    println!(
        "{:<24} {:<17} {:>4} {:>9} {:>15} {:<17} {:<10} LAST RELOAD",
        "MODEL", "ACTIVE", "GEN", "IN-FLIGHT", "OK/FAILED", "STANDBY/PREVIOUS", "RELOADING"
    );
    for m in st.models {
        let active = m.active.clone().unwrap_or_default();
        let av = active.version.clone().unwrap_or_default();
        let prev = match (&m.standby, &m.previous) {
            (Some(s), _) => format!(
                "{} (resident)",
                s.version.clone().unwrap_or_default().version
            ),
            (None, Some(p)) => p.version.clone(),
            (None, None) => "-".into(),
        };
        let reloading = if m.reloading {
            phase_name(m.reload_phase)
        } else {
            "-".into()
        };
        let last = match &m.last_result {
            Some(r) if r.committed => "committed".to_string(),
            Some(r) => format!("failed: {}", r.error),
            None => "-".into(),
        };
        let outcomes = format!("{}/{}", active.requests_ok, active.requests_failed);
        println!(
            "{:<24} {:<17} {:>4} {:>9} {:>15} {:<17} {:<10} {}",
            m.name, av.version, av.generation, active.in_flight, outcomes, prev, reloading, last
        );
    }
    Ok(ExitCode::SUCCESS)
}
