//! `swapd.v1.ModelControl`: Reload, Rollback, Status, behind a bearer-token check.
use std::pin::Pin;
use std::time::Duration;

use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use super::status;
use crate::error::Error;
use crate::model::ModelVersion;
use crate::proto;
use crate::proto::model_control_server::ModelControl;
use crate::registry::reload::{
    self, DrainPolicy, Phase, PhaseState, ReloadEvent, ReloadOutcome, Reloader, VersionName,
};

/// Checks `authorization: Bearer <token>` on every control call.
#[derive(Clone)]
pub struct AdminAuth {
    /// `None` with `required` means no token is configured: every call is refused.
    pub token: Option<crate::config::Secret>,
    pub required: bool,
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if !self.required {
            return Ok(req);
        }
        let Some(token) = &self.token else {
            return Err(status(Error::Unauthenticated(
                "control calls need an admin token, and none is configured: set SWAPD_ADMIN_TOKEN (or admin_token), or turn control_auth off".into(),
            )));
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
            Ok(req)
        } else {
            Err(status(Error::Unauthenticated(
                "missing or wrong admin token (expected `authorization: Bearer <token>`)".into(),
            )))
        }
    }
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who made a control call, for the audit log: the peer address and the `x-swapd-actor`
/// header when the client sends one.
fn actor<T>(req: &Request<T>) -> String {
    let peer = req
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    match req
        .metadata()
        .get("x-swapd-actor")
        .and_then(|v| v.to_str().ok())
    {
        Some(who) => format!("{who}@{peer}"),
        None => peer,
    }
}

/// The control service.
#[derive(Clone)]
pub struct ControlService {
    pub reloader: Reloader,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::ReloadEvent, Status>> + Send>>;

fn phase(p: Phase) -> proto::Phase {
    match p {
        Phase::Resolve => proto::Phase::Resolve,
        Phase::Verify => proto::Phase::Verify,
        Phase::Admit => proto::Phase::Admit,
        Phase::Load => proto::Phase::Load,
        Phase::Preflight => proto::Phase::Preflight,
        Phase::Swap => proto::Phase::Swap,
        Phase::Drain => proto::Phase::Drain,
        Phase::Free => proto::Phase::Free,
    }
}

fn vref(v: &VersionName) -> proto::VersionRef {
    proto::VersionRef {
        model: v.model.clone(),
        version: v.version.clone(),
        generation: v.generation,
    }
}

fn outcome(o: ReloadOutcome) -> proto::ReloadResult {
    proto::ReloadResult {
        committed: o.committed,
        version: o.version.as_ref().map(vref),
        previous: o.previous.as_ref().map(vref),
        timings: o
            .timings
            .iter()
            .map(|(p, d)| proto::PhaseTiming {
                phase: phase(*p) as i32,
                elapsed_ms: d.as_secs_f64() * 1e3,
            })
            .collect(),
        error: o.error.unwrap_or_default(),
        failed_check: o.failed_check.unwrap_or_default(),
        failed_phase: o.failed_phase.map(phase).unwrap_or_default() as i32,
        previous_freed: o.previous_freed,
        cancelled_requests: o.cancelled_requests,
    }
}

fn event(ev: ReloadEvent) -> proto::ReloadEvent {
    use proto::reload_event::Event;
    let event = match ev {
        ReloadEvent::Phase(p) => Event::Phase(proto::PhaseEvent {
            phase: phase(p.phase) as i32,
            state: match p.state {
                PhaseState::Started => proto::PhaseState::Started,
                PhaseState::Progress => proto::PhaseState::Progress,
                PhaseState::Done => proto::PhaseState::Done,
                PhaseState::Failed => proto::PhaseState::Failed,
            } as i32,
            detail: p.detail,
            elapsed_ms: p.elapsed.as_secs_f64() * 1e3,
            check: p.check.map(|c| proto::CheckResult {
                name: c.name,
                passed: c.passed,
                detail: c.detail,
                elapsed_ms: c.elapsed_ms,
            }),
            in_flight: p.in_flight,
            bytes_released: p.bytes_released,
            bytes_needed: p.bytes_needed,
            bytes_available: p.bytes_available,
        }),
        ReloadEvent::Done(o) => Event::Result(outcome(o)),
    };
    proto::ReloadEvent { event: Some(event) }
}

/// The status a reload that did not commit ends its stream with, after its result: scripts
/// and generic clients see the failure as a code, the result message says the details.
fn failure_status(o: &ReloadOutcome) -> Status {
    let msg = o.error.clone().unwrap_or_default();
    let err = match o.failed_phase {
        Some(Phase::Admit) if o.failed_check.is_none() => Error::OutOfMemory(msg),
        _ => Error::FailedPrecondition(msg),
    };
    status(err)
}

/// Phase events, the result, then for a reload that did not commit, its failure status.
fn events(mut rx: tokio::sync::mpsc::UnboundedReceiver<ReloadEvent>) -> Response<EventStream> {
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let failed = match &ev {
                ReloadEvent::Done(o) if !o.committed => Some(failure_status(o)),
                _ => None,
            };
            let _ = tx.send(Ok(event(ev)));
            if let Some(s) = failed {
                let _ = tx.send(Err(s));
            }
        }
    });
    Response::new(Box::pin(UnboundedReceiverStream::new(out)))
}

fn drain_policy(p: i32) -> Result<DrainPolicy, Error> {
    match proto::DrainPolicy::try_from(p) {
        Ok(proto::DrainPolicy::Wait) => Ok(DrainPolicy::Wait),
        Ok(proto::DrainPolicy::Cancel) => Ok(DrainPolicy::Cancel),
        Err(_) => Err(Error::InvalidArgument(format!(
            "drain_policy {p}: expected WAIT or CANCEL"
        ))),
    }
}

fn version_status(v: &ModelVersion) -> proto::VersionStatus {
    let info = convert::model_info(v);
    let (requests_ok, requests_failed) = v.outcomes();
    proto::VersionStatus {
        version: info.version,
        source: info.source,
        files: info.files,
        device: info.device,
        weight_bytes: info.weight_bytes,
        loaded_at_unix_ms: info.loaded_at_unix_ms,
        in_flight: v.in_flight(),
        requests_ok,
        requests_failed,
    }
}

impl ControlService {
    /// Counts a control call by whether it started (the reload's own result is counted by
    /// `swapd_reload_total` when it ends).
    fn record<T>(&self, model: &str, rpc: &'static str, r: &Result<T, Status>) {
        let code = super::code_of(r);
        let label = super::model_label(&self.reloader.registry, model);
        self.reloader.metrics.request(label, rpc, code);
        tracing::info!(
            model = label,
            rpc,
            code = crate::metrics::code_name(code),
            "control call"
        );
    }
}

#[tonic::async_trait]
impl ModelControl for ControlService {
    type ReloadStream = EventStream;
    type RollbackStream = EventStream;

    async fn reload(
        &self,
        req: Request<proto::ReloadRequest>,
    ) -> Result<Response<Self::ReloadStream>, Status> {
        let actor = actor(&req);
        let r = req.into_inner();
        let req = reload::ReloadRequest {
            model: convert::model_name(&r.model).map_err(status)?,
            source: Some(r.source).filter(|s| !s.trim().is_empty()),
            sha256: r.sha256.into_iter().collect(),
            expected_generation: r.expected_generation,
            drain_timeout: r
                .drain_timeout_ms
                .map(|ms| Duration::from_millis(ms as u64)),
            drain_policy: drain_policy(r.drain_policy).map_err(status)?,
            keep_previous: r.keep_previous,
            actor,
            rollback: false,
            force: r.force,
            memory_policy: match proto::MemoryPolicy::try_from(r.memory_policy) {
                Ok(proto::MemoryPolicy::Default) => None,
                Ok(proto::MemoryPolicy::Refuse) => Some(reload::MemoryPolicy::Refuse),
                Ok(proto::MemoryPolicy::ResourcePreserving) => {
                    Some(reload::MemoryPolicy::ResourcePreserving)
                }
                Err(_) => {
                    return Err(status(Error::InvalidArgument(format!(
                        "memory_policy {}: unknown",
                        r.memory_policy
                    ))))
                }
            },
        };
        tracing::info!(model = %req.model, source = ?req.source, "reload requested");
        let model = req.model.clone();
        let r = self.reloader.reload(req).map(events).map_err(status);
        self.record(&model, "Reload", &r);
        r
    }

    async fn rollback(
        &self,
        req: Request<proto::RollbackRequest>,
    ) -> Result<Response<Self::RollbackStream>, Status> {
        let actor = actor(&req);
        let r = req.into_inner();
        let model = convert::model_name(&r.model).map_err(status)?;
        let policy = drain_policy(r.drain_policy).map_err(status)?;
        let timeout = r
            .drain_timeout_ms
            .map(|ms| Duration::from_millis(ms as u64));
        tracing::info!(model = %model, "rollback requested");
        let r = self
            .reloader
            .rollback(&model, timeout, policy, &actor)
            .map(events)
            .map_err(status);
        self.record(&model, "Rollback", &r);
        r
    }

    async fn status(
        &self,
        req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let name = req.into_inner().model;
        let slots = if name.is_empty() {
            self.reloader.registry.slots()
        } else {
            vec![self.reloader.registry.slot(&name).map_err(status)?]
        };
        let models = slots
            .iter()
            .map(|slot| {
                let st = slot.state();
                proto::ModelStatus {
                    name: slot.spec.name.clone(),
                    active: slot.active().as_deref().map(version_status),
                    standby: slot.standby().as_deref().map(version_status),
                    previous: st.previous.as_ref().map(|p| proto::VersionRef {
                        model: slot.spec.name.clone(),
                        version: p.version.clone(),
                        generation: p.generation,
                    }),
                    reloading: st.reloading.is_some(),
                    reload_phase: st.reloading.map(|(p, _)| phase(p)).unwrap_or_default() as i32,
                    last_result: st.last_result.clone().map(outcome),
                    auto_rollback_reason: st.auto_rollback.clone().unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(proto::StatusResponse { models }))
    }
}
