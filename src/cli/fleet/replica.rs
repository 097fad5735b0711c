//! One replica's part of a rollout: its preflight, reload, watch and rollback, each over the
//! replica's own control, inference-health and status calls.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::cli::admin::{control_client, phase_line, phase_name, Ctl};
use crate::proto::{self, reload_event::Event};

use super::{Out, Outcome};

/// How long to wait for a replica to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a Status or health call may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a rollback waits for a reload already running on the replica to end.
const BUSY_WAIT: Duration = Duration::from_secs(120);
/// What the replicas' audit logs record as the caller.
const ACTOR: &str = "swapd-fleet-reload";

pub(super) struct Replica {
    pub(super) url: String,
    pub(super) ctl: Ctl,
    pub(super) health: HealthClient<Channel>,
    /// Active version at preflight.
    pub(super) before: proto::VersionRef,
    /// The version this rollout made active here, if it did.
    pub(super) committed: Option<proto::VersionRef>,
    /// Active version at the end.
    pub(super) after: Option<proto::VersionRef>,
    pub(super) result: Outcome,
    pub(super) detail: String,
}

pub(super) fn vname(v: &proto::VersionRef) -> String {
    format!("{}@{}", v.version, v.generation)
}

/// An error and its causes on one line, each cause once (tonic repeats them).
pub(super) fn chain(first: String, mut src: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut msg = first;
    while let Some(e) = src {
        let s = e.to_string();
        if !msg.contains(&s) {
            msg.push_str(&format!(": {s}"));
        }
        src = e.source();
    }
    msg
}

pub(super) fn status_text(s: &tonic::Status) -> String {
    chain(
        format!("{:?}: {}", s.code(), s.message()),
        std::error::Error::source(s),
    )
}

pub(super) async fn connect(url: &str) -> Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad URL `{url}`"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect: {}",
                chain(e.to_string(), std::error::Error::source(&e))
            )
        })
}

pub(super) async fn health_of(
    health: &mut HealthClient<Channel>,
    model: &str,
) -> Result<ServingStatus> {
    let call = health.check(HealthCheckRequest {
        service: model.to_string(),
    });
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Err(_) => bail!("health check: no answer in {RPC_TIMEOUT:?}"),
        Ok(Err(s)) => bail!("health check: {}", status_text(&s)),
        Ok(Ok(r)) => Ok(r.into_inner().status()),
    }
}

pub(super) async fn status_of(ctl: &mut Ctl, model: &str) -> Result<proto::ModelStatus> {
    let call = ctl.status(proto::StatusRequest {
        model: model.to_string(),
    });
    let st = match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Err(_) => bail!("Status: no answer in {RPC_TIMEOUT:?}"),
        Ok(Err(s)) => bail!("Status: {}", status_text(&s)),
        Ok(Ok(r)) => r.into_inner(),
    };
    st.models
        .into_iter()
        .find(|m| m.name == model)
        .with_context(|| format!("Status does not list model `{model}`"))
}

pub(super) fn active_of(
    m: &proto::ModelStatus,
) -> Option<(proto::VersionRef, &proto::VersionStatus)> {
    let a = m.active.as_ref()?;
    Some((a.version.clone()?, a))
}

/// Checks one replica before anything changes: reachable, the token accepted, the model
/// SERVING on gRPC health, an active version, no reload running.
pub(super) async fn preflight(
    url: String,
    token: Option<String>,
    model: String,
) -> Result<Replica> {
    let ch = connect(&url).await.context("unreachable")?;
    let ctl = control_client(ch.clone(), token.as_deref(), Some(ACTOR))?;
    let mut health = HealthClient::new(ch);
    let h = health_of(&mut health, &model).await?;
    if h != ServingStatus::Serving {
        bail!("not serving: gRPC health for `{model}` is {h:?}");
    }
    let mut r = Replica {
        url,
        ctl,
        health,
        before: Default::default(),
        committed: None,
        after: None,
        result: Outcome::Skipped,
        detail: String::new(),
    };
    let m = status_of(&mut r.ctl, &model).await?;
    if m.reloading {
        bail!(
            "already reloading `{model}` (phase {})",
            phase_name(m.reload_phase)
        );
    }
    r.before = active_of(&m)
        .with_context(|| format!("`{model}` has no active version"))?
        .0;
    r.after = Some(r.before.clone());
    Ok(r)
}

/// How one reload ended.
pub(super) enum Reloaded {
    Committed(proto::VersionRef),
    /// The replica already serves these files (the server refused them as already active).
    Unchanged(proto::VersionRef),
    Failed(String),
}

/// Runs the Reload call on one replica, printing its phases.
pub(super) async fn reload_one(
    out: Out,
    url: String,
    mut ctl: Ctl,
    req: proto::ReloadRequest,
    before: proto::VersionRef,
) -> Reloaded {
    let model = req.model.clone();
    let mut stream = match ctl.reload(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Reloaded::Failed(format!("Reload refused: {}", status_text(&s))),
    };
    let mut result = None;
    let mut broken = None;
    loop {
        match stream.message().await {
            Ok(Some(ev)) => match ev.event {
                Some(Event::Phase(p)) => out.line(&url, format!("reload {}", phase_line(&p))),
                Some(Event::Result(r)) => result = Some(r),
                None => {}
            },
            Ok(None) => break,
            // A reload that did not commit ends its stream with an error after its result.
            Err(_) if result.is_some() => break,
            Err(s) => {
                broken = Some(status_text(&s));
                break;
            }
        }
    }
    match result {
        Some(r) if r.committed => match r.version {
            Some(v) => {
                out.line(
                    &url,
                    format!("committed {} -> {}", vname(&before), vname(&v)),
                );
                Reloaded::Committed(v)
            }
            None => Reloaded::Failed("the result names no version".into()),
        },
        Some(r) if r.failed_check == "already_active" => {
            out.line(
                &url,
                format!("unchanged: already serves {}", vname(&before)),
            );
            Reloaded::Unchanged(before)
        }
        Some(r) => {
            let why = format!("failed in {}: {}", phase_name(r.failed_phase), r.error);
            out.line(&url, format!("not committed: {why}"));
            Reloaded::Failed(why)
        }
        None => {
            // The stream broke: ask what is active now, so a version that did go in is
            // rolled back with the rest.
            let why = format!(
                "the reload stream broke: {}",
                broken.unwrap_or_else(|| "it ended without a result".into())
            );
            out.line(&url, &why);
            match status_of(&mut ctl, &model).await {
                Ok(m) => match active_of(&m) {
                    Some((v, _)) if v != before => {
                        out.line(&url, format!("the active version is now {}", vname(&v)));
                        Reloaded::Committed(v)
                    }
                    _ => Reloaded::Failed(why),
                },
                Err(e) => Reloaded::Failed(format!("{why}; then {e:#}")),
            }
        }
    }
}

/// What a watch looks for.
#[derive(Clone)]
pub(super) struct Watch {
    pub(super) model: String,
    pub(super) window: Duration,
    pub(super) poll: Duration,
    pub(super) max_failures: u64,
    pub(super) interrupted: Arc<AtomicBool>,
}

/// Watches a replica that just swapped `target` in: health must stay SERVING, `target` must
/// stay active (the server may roll back on its own) and fail at most `max_failures`
/// requests. Returns a summary, or why it tripped.
pub(super) async fn watch_one(
    out: Out,
    url: String,
    mut ctl: Ctl,
    mut health: HealthClient<Channel>,
    target: proto::VersionRef,
    w: Watch,
) -> Result<String, String> {
    let start = Instant::now();
    let deadline = start + w.window;
    let model = &w.model;
    out.line(
        &url,
        format!(
            "watch {:?} every {:?}: health SERVING, {} active, at most {} failed request(s)",
            w.window,
            w.poll,
            vname(&target),
            w.max_failures
        ),
    );
    let mut checks = 0u64;
    loop {
        if w.interrupted.load(Ordering::Relaxed) {
            return Err("interrupted".into());
        }
        let h = health_of(&mut health, model)
            .await
            .map_err(|e| format!("{e:#}"))?;
        if h != ServingStatus::Serving {
            return Err(format!("gRPC health for `{model}` is {h:?}"));
        }
        let m = status_of(&mut ctl, model)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let Some((active, vs)) = active_of(&m) else {
            return Err(format!("`{model}` has no active version"));
        };
        if active != target {
            let why = if m.auto_rollback_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", m.auto_rollback_reason)
            };
            return Err(format!(
                "{} is active instead of {}{why}",
                vname(&active),
                vname(&target)
            ));
        }
        if vs.requests_failed > w.max_failures {
            return Err(format!(
                "the new version failed {} request(s) (limit {}), {} succeeded",
                vs.requests_failed, w.max_failures, vs.requests_ok
            ));
        }
        checks += 1;
        let now = Instant::now();
        if now >= deadline {
            return Ok(format!(
                "{checks} check(s) over {:.1} s: health SERVING, requests ok {} failed {}",
                start.elapsed().as_secs_f64(),
                vs.requests_ok,
                vs.requests_failed
            ));
        }
        tokio::time::sleep(w.poll.min(deadline - now)).await;
    }
}

/// Rolls one replica back from `committed` to `before` and checks it got there.
pub(super) async fn rollback_one(
    out: Out,
    url: String,
    mut ctl: Ctl,
    req: proto::RollbackRequest,
    before: proto::VersionRef,
    committed: proto::VersionRef,
) -> Result<proto::VersionRef, String> {
    let model = req.model.clone();
    let started = Instant::now();
    let m = loop {
        let m = status_of(&mut ctl, &model)
            .await
            .map_err(|e| format!("{e:#}"))?;
        if !m.reloading {
            break m;
        }
        if started.elapsed() > BUSY_WAIT {
            return Err(format!(
                "a reload is still running there after {BUSY_WAIT:?} (phase {})",
                phase_name(m.reload_phase)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let active = active_of(&m).map(|(v, _)| v);
    match &active {
        Some(v) if v.version == before.version => {
            out.line(
                &url,
                format!("already back on {} (the server rolled back)", vname(v)),
            );
            return Ok(v.clone());
        }
        Some(v) if *v == committed => {}
        other => {
            return Err(format!(
                "left alone: {} is active, neither {} from before nor {} from this rollout",
                other
                    .as_ref()
                    .map(vname)
                    .unwrap_or_else(|| "nothing".into()),
                vname(&before),
                vname(&committed)
            ))
        }
    }
    let mut stream = ctl
        .rollback(req)
        .await
        .map_err(|s| format!("Rollback refused: {}", status_text(&s)))?
        .into_inner();
    let mut result = None;
    loop {
        match stream.message().await {
            Ok(Some(ev)) => match ev.event {
                Some(Event::Phase(p)) => out.line(&url, format!("rollback {}", phase_line(&p))),
                Some(Event::Result(r)) => result = Some(r),
                None => {}
            },
            Ok(None) => break,
            Err(_) if result.is_some() => break,
            Err(s) => {
                out.line(
                    &url,
                    format!("the rollback stream broke: {}", status_text(&s)),
                );
                break;
            }
        }
    }
    if let Some(r) = &result {
        if !r.committed {
            return Err(format!(
                "rollback failed in {}: {}",
                phase_name(r.failed_phase),
                r.error
            ));
        }
    }
    // Whatever the stream said, the replica's own Status is the proof.
    let m = status_of(&mut ctl, &model)
        .await
        .map_err(|e| format!("{e:#}"))?;
    match active_of(&m) {
        Some((v, _)) if v.version == before.version => {
            out.line(&url, format!("rolled back to {}", vname(&v)));
            Ok(v)
        }
        Some((v, _)) => Err(format!(
            "after the rollback {} is active, not {}",
            vname(&v),
            vname(&before)
        )),
        None => Err("after the rollback no version is active".into()),
    }
}
