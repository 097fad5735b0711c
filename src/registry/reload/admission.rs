//! Memory admission: does the new version fit beside what is resident, and the
//! resource-preserving path for when it does not.
use std::sync::Arc;

use super::super::Slot;
use super::run::Run;
use super::{digests_of, MemoryPolicy, Phase, PhaseState, ReloadRequest, Reloader, VersionName};
use crate::error::Error;
use crate::manifest::ModelSpec;
use crate::model::{self, FileDigest};

/// The admit phase's decision.
pub(super) enum Admission {
    Fits,
    Preserve,
    Refused,
}

impl Reloader {
    /// Whether the new version fits beside what is resident: the free memory of the device
    /// it loads onto (MemAvailable on the CPU, the driver's free bytes on a GPU) and the
    /// budget.
    pub(super) fn admit(
        &self,
        run: &mut Run,
        digests: &[FileDigest],
        req: &ReloadRequest,
    ) -> Admission {
        run.start(Phase::Admit, "");
        let name = run.slot.spec.name.clone();
        let on_cpu = self.device.candle().is_cpu();
        let needed = match model::estimate_bytes(
            run.slot.spec.kind,
            digests,
            on_cpu,
            self.kv_cache_tokens,
        ) {
            Ok(n) => n,
            Err(e) => {
                run.fail(e, Some("format".into()));
                return Admission::Refused;
            }
        };
        let device = self.device.label();
        let free = self.device.memory().free_total().map(|(free, _)| free);
        let resident = self.registry.resident_bytes(self.kv_cache_tokens);
        let mut ev = run.event(PhaseState::Done, "");
        ev.bytes_needed = needed;
        ev.bytes_available = free.unwrap_or(u64::MAX);
        let why = match fits(needed, free, resident, self.budget) {
            Ok(()) => {
                ev.detail = format!(
                    "needs ~{needed} bytes; {} free on {device}, {resident} resident",
                    free.map_or("unknown".into(), |f| f.to_string())
                );
                run.done(ev);
                return Admission::Fits;
            }
            Err(why) => format!("{why} on {device}"),
        };
        match req.memory_policy.unwrap_or(self.memory_policy) {
            MemoryPolicy::Refuse => {
                run.fail(Error::OutOfMemory(format!("model `{name}`: {why}")), None);
                Admission::Refused
            }
            MemoryPolicy::ResourcePreserving => {
                ev.detail =
                    format!("{why}: resource-preserving, the old version drains and frees first");
                run.done(ev);
                Admission::Preserve
            }
        }
    }

    /// The resource-preserving path: drain and free the old version, then load the new one
    /// while requests for the model wait; if the new one fails, load the old one back.
    pub(super) async fn preserving(
        &self,
        run: &mut Run,
        slot: &Arc<Slot>,
        spec: ModelSpec,
        digests: Vec<FileDigest>,
        req: &ReloadRequest,
    ) {
        let old = slot.suspend();
        let old_generation = old.as_ref().map(|o| o.generation()).unwrap_or(0);
        let old_spec = old.as_ref().map(|o| {
            let mut s = slot.spec.clone();
            s.source = o.source.clone();
            s.sha256 = digests_of(o);
            s
        });
        if let Some(old) = old {
            let left = self.drain(run, &old, req).await;
            run.outcome.previous = Some(VersionName::of(&old));
            self.free(run, slot, old, false, left).await;
        }
        if let Some(new) = self.load_preflight(run, spec, digests, None).await {
            // The old version is already gone: nothing comes back from the swap.
            if self.swap_phase(run, slot, new).is_ok() {
                return;
            }
        }
        let Some(old_spec) = old_spec else {
            slot.resume();
            return;
        };
        // The new version failed: the old one comes back, through the same loader.
        let failure = run.outcome.error.clone().unwrap_or_default();
        run.start(Phase::Load, "loading the previous version back");
        match model::load(&old_spec, &self.resolver, &self.device, old_generation).await {
            Ok(v) => {
                // Back at its own generation, which is what committed.json still says: the
                // failed reload committed nothing.
                slot.activate(v.clone());
                run.done(run.event(
                    PhaseState::Done,
                    format!(
                        "previous version {} is active again (generation {})",
                        v.version,
                        v.generation()
                    ),
                ));
                run.outcome.error = Some(format!(
                    "{failure}; the previous version {} was loaded back",
                    v.version
                ));
            }
            Err(e) => {
                slot.resume();
                run.fail(
                    format!(
                        "{failure}; loading the previous version back failed too: {e}; model `{}` has no active version",
                        slot.spec.name
                    ),
                    None,
                );
            }
        }
    }
}

/// The admission decision: `needed` more bytes beside `resident` fit when the device has
/// them free (`None`: it cannot tell, so only the budget limits) and the budget allows.
pub(super) fn fits(
    needed: u64,
    free: Option<u64>,
    resident: u64,
    budget: Option<u64>,
) -> Result<(), String> {
    if let Some(b) = budget.filter(|&b| resident + needed > b) {
        return Err(format!(
            "the new version needs ~{needed} bytes; with {resident} resident that exceeds the memory budget of {b} bytes"
        ));
    }
    match free {
        Some(free) if needed > free => Err(format!(
            "the new version needs ~{needed} bytes but only {free} are free"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::fits;

    #[test]
    fn fits_when_the_device_has_the_bytes_and_the_budget_allows() {
        assert_eq!(fits(100, Some(100), 0, None), Ok(()));
        assert_eq!(fits(100, None, 10_000, None), Ok(()));
        assert_eq!(fits(100, Some(1_000), 900, Some(1_000)), Ok(()));
        let e = fits(101, Some(100), 0, None).unwrap_err();
        assert!(e.contains("only 100 are free"), "{e}");
        let e = fits(100, Some(1_000), 901, Some(1_000)).unwrap_err();
        assert!(e.contains("memory budget of 1000"), "{e}");
        // The budget is checked even when the device cannot say what is free.
        assert!(fits(100, None, 901, Some(1_000)).is_err());
    }
}
