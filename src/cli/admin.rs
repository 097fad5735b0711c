//! Operator commands for the control service: reload, rollback, status.
use std::process::ExitCode;

use anyhow::{Context, Result};
use tonic::metadata::{Ascii, MetadataValue};
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
    /// Refuse unless this generation is serving (compare-and-swap).
    #[arg(long)]
    pub expected_generation: Option<u64>,
    #[command(flatten)]
    pub options: ReloadOptions,
}

/// What to load and how to swap it in: shared by `reload` and `fleet-reload`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReloadOptions {
    /// New source (path inside the models root or hf://…) [default: the current one].
    #[arg(long)]
    pub source: Option<String>,
    /// Expected digest of a file, as NAME=HEX (repeatable) [default: the manifest's].
    #[arg(long, value_parser = parse_pin)]
    pub sha256: Vec<(String, String)>,
    /// How long requests on the old version get to finish [default: 30000].
    #[arg(long)]
    pub drain_timeout_ms: Option<u32>,
    /// wait | cancel: what happens to requests still running after the drain timeout.
    #[arg(long, default_value = "wait")]
    pub drain_policy: String,
    /// Keep the old version resident for an instant rollback.
    #[arg(long)]
    pub keep_previous: bool,
    /// Reload even if this source is cooling down after repeated failures, or if its files
    /// are the version already active (which replaces the rollback target with a copy of it).
    #[arg(long)]
    pub force: bool,
    /// When two versions do not fit: drain and free the old one first, then load the new.
    #[arg(long)]
    pub resource_preserving: bool,
}

impl ReloadOptions {
    /// The Reload request these options ask for.
    pub(crate) fn request(
        &self,
        model: &str,
        expected_generation: Option<u64>,
    ) -> Result<proto::ReloadRequest> {
        Ok(proto::ReloadRequest {
            model: model.to_string(),
            source: self.source.clone().unwrap_or_default(),
            sha256: self.sha256.iter().cloned().collect(),
            expected_generation,
            drain_timeout_ms: self.drain_timeout_ms,
            drain_policy: drain_policy(&self.drain_policy)?,
            keep_previous: self.keep_previous,
            force: self.force,
            memory_policy: if self.resource_preserving {
                proto::MemoryPolicy::ResourcePreserving as i32
            } else {
                proto::MemoryPolicy::Default as i32
            },
        })
    }
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

/// Adds the bearer token (and, when set, the `x-swapd-actor` the audit log records) to each
/// call.
#[derive(Clone)]
pub(crate) struct AddToken {
    auth: Option<MetadataValue<Ascii>>,
    actor: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.auth {
            req.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(v) = &self.actor {
            req.metadata_mut().insert("x-swapd-actor", v.clone());
        }
        Ok(req)
    }
}

pub(crate) type Ctl =
    ModelControlClient<tonic::service::interceptor::InterceptedService<Channel, AddToken>>;

/// A control client on `ch` that sends `token` (and `actor`) with every call.
pub(crate) fn control_client(ch: Channel, token: Option<&str>, actor: Option<&str>) -> Result<Ctl> {
    let auth = token
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .context("the token is not a valid header value")?;
    let actor = actor
        .map(|a| a.parse())
        .transpose()
        .context("the actor is not a valid header value")?;
    Ok(ModelControlClient::with_interceptor(
        ch,
        AddToken { auth, actor },
    ))
}

async fn client(a: &AdminConn) -> Result<Ctl> {
    control_client(channel(&a.conn).await?, a.token.as_deref(), None)
}

pub(crate) fn phase_name(p: i32) -> String {
    proto::Phase::try_from(p)
        .map(|p| format!("{p:?}").to_lowercase())
        .unwrap_or_else(|_| "?".into())
}

/// One phase event as the operator reads it: state, phase, elapsed time, detail.
pub(crate) fn phase_line(p: &proto::PhaseEvent) -> String {
    let state = match p.state() {
        proto::PhaseState::Started => "…",
        proto::PhaseState::Progress => "·",
        proto::PhaseState::Done => "✓",
        proto::PhaseState::Failed => "✗",
        proto::PhaseState::Unspecified => "?",
    };
    format!(
        "{state} {:<10} {:>8.1} ms  {}",
        phase_name(p.phase),
        p.elapsed_ms,
        p.detail
    )
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
            Some(Event::Phase(p)) => println!("{}", phase_line(&p)),
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

pub(crate) fn drain_policy(s: &str) -> Result<i32> {
    match s {
        "wait" => Ok(proto::DrainPolicy::Wait as i32),
        "cancel" => Ok(proto::DrainPolicy::Cancel as i32),
        other => anyhow::bail!("--drain-policy `{other}`: expected wait or cancel"),
    }
}

pub async fn reload(a: ReloadArgs) -> Result<ExitCode> {
    let mut ctl = client(&a.admin).await?;
    let req = a.options.request(&a.model, a.expected_generation)?;
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
