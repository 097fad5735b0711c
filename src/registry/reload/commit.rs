//! The swap phase: a commit is recorded (committed.json, then the audit log's commit line)
//! before the one `ArcSwap` store that makes it active, or the swap is refused.
use std::sync::Arc;

use super::super::persist::{unix_ms, Committed, StateStore};
use super::super::{PreviousVersion, Slot};
use super::run::Run;
use super::{digests_of, Phase, PhaseState, Reloader, VersionName};
use crate::model::ModelVersion;

impl Reloader {
    /// The swap phase: `new` becomes active and the run commits. Returns the replaced version;
    /// `Err` (reported) when the commit could not be recorded, and nothing changed.
    pub(super) fn swap_phase(
        &self,
        run: &mut Run,
        slot: &Slot,
        new: Arc<ModelVersion>,
    ) -> std::result::Result<Option<Arc<ModelVersion>>, ()> {
        run.start(Phase::Swap, "");
        let old = match self.activate(run, slot, &new) {
            Ok(old) => old,
            Err(e) => {
                // The state directory's fault, not the version's: no cool-down.
                run.cools_down = false;
                run.fail(e, Some("record".into()));
                return Err(());
            }
        };
        run.outcome.committed = true;
        run.outcome.version = Some(VersionName::of(&new));
        run.done(run.event(
            PhaseState::Done,
            format!(
                "generation {} (version {}) is active",
                new.generation(),
                new.version
            ),
        ));
        Ok(old)
    }

    /// Records `new` as committed at the next generation (committed.json, then the audit
    /// line of the commit), then makes it active and records the version it replaced (for
    /// rollback). Returns the replaced version.
    ///
    /// The contract: a swap that cannot be recorded is refused. A swap that a restart would
    /// silently undo (serving the older commit at a lower generation) is worse than a
    /// reload that fails and says why: the serving version stays, nothing changed.
    fn activate(
        &self,
        run: &Run,
        slot: &Slot,
        new: &Arc<ModelVersion>,
    ) -> std::result::Result<Option<Arc<ModelVersion>>, String> {
        // Only this reload changes the generation (it holds the slot's reload lock).
        let generation = slot.state().generation + 1;
        if let Some(store) = &self.store {
            self.record_commit(run, store, slot, new, generation)?;
        }
        let old = {
            let mut st = slot.state();
            st.generation = generation;
            new.set_generation(generation);
            let old = slot.activate(new.clone());
            if let Some(o) = &old {
                st.previous = Some(PreviousVersion {
                    version: o.version.clone(),
                    generation: o.generation(),
                    source: o.source.clone(),
                    sha256: digests_of(o),
                });
            }
            old
        };
        Ok(old)
    }

    /// Writes committed.json and the audit line of a commit of `new` at `generation`; on
    /// failure puts committed.json back and says what could not be written.
    fn record_commit(
        &self,
        run: &Run,
        store: &StateStore,
        slot: &Slot,
        new: &ModelVersion,
        generation: u64,
    ) -> std::result::Result<(), String> {
        let committed = Committed {
            source: new.source.clone(),
            sha256: digests_of(new),
            version: new.version.clone(),
            generation,
            committed_at_unix_ms: unix_ms(),
        };
        let refused = |what: String| {
            format!(
                "the swap was refused because it could not be recorded: {what}; the serving version stays active (make the state directory {} writable)",
                store.dir().display()
            )
        };
        let before = store
            .commit(&slot.spec.name, committed)
            .map_err(|e| refused(format!("writing committed.json: {e}")))?;
        let mut line = run.record("commit");
        let old = slot.active();
        line.committed = true;
        line.from_version = old.as_ref().map(|o| o.version.clone());
        line.from_generation = old.as_ref().map(|o| o.generation());
        line.to_version = Some(new.version.clone());
        line.to_generation = Some(generation);
        if let Err(e) = store.audit(&line) {
            let restored = match store.restore(&before) {
                Ok(()) => String::new(),
                Err(r) => format!(" (putting committed.json back failed too: {r})"),
            };
            return Err(refused(format!("appending to audit.jsonl: {e}{restored}")));
        }
        Ok(())
    }
}
