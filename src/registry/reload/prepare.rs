//! The steps before the swap: resolve → verify, then load → preflight beside the serving
//! version. A failure in any of them is reported and leaves the serving version untouched.
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::manifest::ModelSpec;
use crate::model::preflight;
use crate::model::{self, FileDigest, ModelError, ModelVersion};
use crate::registry::Slot;

use super::run::Run;
use super::types::*;
use super::{blocking_step, digests_of, pins_for, Reloader};

impl Reloader {
    /// resolve → verify: the spec to load and its verified files. `None` when a phase failed
    /// (reported).
    pub(super) async fn resolve_verify(
        &self,
        run: &mut Run,
        slot: &Arc<Slot>,
        req: &ReloadRequest,
    ) -> Option<(ModelSpec, Vec<FileDigest>)> {
        let name = slot.spec.name.clone();
        let (source, pins) = pins_for(slot, req);

        run.start(Phase::Resolve, source.clone());
        let files = match self.resolver.resolve(&name, slot.spec.kind, &source).await {
            Ok(f) => f,
            Err(e) => {
                run.fail(e, None);
                return None;
            }
        };
        run.done(run.event(PhaseState::Done, format!("{} file(s)", files.len())));

        run.start(Phase::Verify, "sha256");
        let (n, p, device) = (name.clone(), pins.clone(), self.device.clone());
        // Verifying takes turns at the CPU with the serving version's passes (loading does
        // too, inside `load_verified`).
        let digests = blocking_step(
            run,
            |_| "sha256",
            move || {
                crate::turns::in_background(device.candle(), || {
                    model::verify::verify_files(&n, &files, &p)
                })
            },
        )
        .await;
        let Some(digests) = digests else {
            // Files that do not match their pins say nothing about the files: the pins
            // (the request's, or the manifest's) are wrong. No cool-down for that.
            run.cools_down = false;
            return None;
        };
        if let Some(active) = slot.active().filter(|a| !req.force && a.source == source) {
            let verified: BTreeMap<String, String> = digests
                .iter()
                .map(|d| (d.name.clone(), d.sha256.clone()))
                .collect();
            if verified == digests_of(&active) {
                run.cools_down = false;
                run.fail(
                    format!(
                        "model `{name}`: these files are version {} (generation {}), which is already active; nothing to do (a reload of it would replace the rollback target; set force to reload it anyway)",
                        active.version,
                        active.generation()
                    ),
                    Some("already_active".into()),
                );
                return None;
            }
        }
        run.done(run.event(PhaseState::Done, "every file matches its sha256"));
        let mut spec = slot.spec.clone();
        spec.source = source;
        spec.sha256 = pins;
        Some((spec, digests))
    }

    /// load → preflight against `serving`. `None` when a phase failed (reported).
    pub(super) async fn load_preflight(
        &self,
        run: &mut Run,
        spec: ModelSpec,
        digests: Vec<FileDigest>,
        serving: Option<Arc<ModelVersion>>,
    ) -> Option<Arc<ModelVersion>> {
        let name = spec.name.clone();
        run.start(Phase::Load, format!("onto {}", self.device.label()));
        let checks = spec.preflight.clone();
        let device = self.device.clone();
        let new = blocking_step(run, ModelError::check_name, move || {
            model::load_verified(&spec, digests, &device, 0)
        })
        .await
        .map(Arc::new)?;
        run.done(run.event(
            PhaseState::Done,
            format!(
                "version {} ({} bytes of weights)",
                new.version, new.weight_bytes
            ),
        ));

        run.start(Phase::Preflight, "");
        let tx = run.tx.clone();
        let (new2, phase_started) = (new.clone(), run.phase_started);
        let results = tokio::task::spawn_blocking(move || {
            preflight::run(&new2, serving.as_deref(), &checks, &mut |c| {
                let mut ev = PhaseEvent::new(
                    Phase::Preflight,
                    PhaseState::Progress,
                    format!("{}: {}", c.name, c.detail),
                    phase_started.elapsed(),
                );
                ev.check = Some(c.clone());
                let _ = tx.send(ReloadEvent::Phase(ev));
            })
        })
        .await;
        match results {
            Ok(results) => {
                if let Some(bad) = results.iter().find(|c| !c.passed) {
                    run.fail(
                        format!(
                            "model `{name}`: preflight check `{}` failed: {}",
                            bad.name, bad.detail
                        ),
                        Some(bad.name.clone()),
                    );
                    return None;
                }
                run.done(run.event(PhaseState::Done, format!("{} checks passed", results.len())));
            }
            Err(e) => {
                run.fail(format!("preflight thread: {e}"), Some("preflight".into()));
                return None;
            }
        }
        Some(new)
    }
}
