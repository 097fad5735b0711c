//! What survives a restart: the last committed version of each model (written atomically, so
//! a crash leaves the old file or the new one, never half of one) and the append-only audit
//! log of every reload.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The version of a model that was last made active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub source: String,
    pub sha256: BTreeMap<String, String>,
    pub version: String,
    pub generation: u64,
    pub committed_at_unix_ms: i64,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_unix_ms: i64,
    pub model: String,
    /// `reload` or `rollback`.
    pub action: String,
    /// `commit`: written before the swap, so a crash during the drain still leaves the
    /// record of what became active; `end`: written when the reload ends (every reload has
    /// one, committed or not, with its drain and free results).
    #[serde(default = "end_stage")]
    pub stage: String,
    /// Who asked: the peer address, and the `x-swapd-actor` header when sent.
    pub actor: String,
    pub source: String,
    pub sha256: BTreeMap<String, String>,
    pub from_version: Option<String>,
    pub from_generation: Option<u64>,
    pub to_version: Option<String>,
    pub to_generation: Option<u64>,
    pub committed: bool,
    pub error: Option<String>,
    pub failed_phase: Option<String>,
    pub failed_check: Option<String>,
    /// Milliseconds per phase, in order.
    pub phases_ms: Vec<(String, f64)>,
    pub cancelled_requests: u64,
    pub previous_freed: bool,
}

/// Milliseconds since the Unix epoch, as the records carry them.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn end_stage() -> String {
    "end".into()
}

/// Parses `committed.json`: the committed version of each model by name.
pub fn parse_committed(bytes: &[u8]) -> Result<BTreeMap<String, Committed>, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// Files under the state directory.
pub struct StateStore {
    dir: PathBuf,
    // Serializes read-modify-write of committed.json across concurrent reloads of
    // different models.
    lock: Mutex<()>,
}

const COMMITTED: &str = "committed.json";
const AUDIT: &str = "audit.jsonl";

impl StateStore {
    /// Uses (and creates) `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether files can be written here: creates, syncs and removes a probe file.
    pub fn check_writable(&self) -> std::io::Result<()> {
        let probe = self.dir.join(".write-probe");
        let r = std::fs::File::create(&probe).and_then(|mut f| {
            f.write_all(b"swapd")?;
            f.sync_all()
        });
        let _ = std::fs::remove_file(&probe);
        r
    }

    /// The committed versions by model name; empty when nothing was committed yet. A file
    /// that does not parse is an `InvalidData` error (see [`StateStore::set_aside`]).
    pub fn committed(&self) -> std::io::Result<BTreeMap<String, Committed>> {
        match std::fs::read(self.dir.join(COMMITTED)) {
            Ok(bytes) => parse_committed(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e),
        }
    }

    /// Renames an unreadable `committed.json` out of the way (kept for inspection) and
    /// returns its new path.
    pub fn set_aside(&self) -> std::io::Result<PathBuf> {
        let to = self
            .dir
            .join(format!("{COMMITTED}.unreadable-{}", unix_ms()));
        std::fs::rename(self.dir.join(COMMITTED), &to)?;
        Ok(to)
    }

    /// Records `c` as `model`'s committed version: temp file, fsync, rename, fsync the dir.
    /// Returns what was recorded before, for [`StateStore::restore`]. On failure nothing
    /// changed (the temp file is removed).
    pub fn commit(
        &self,
        model: &str,
        c: Committed,
    ) -> std::io::Result<BTreeMap<String, Committed>> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // An unreadable file was set aside at startup; one that became unreadable since is
        // replaced rather than blocking every swap.
        let before = match self.committed() {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => BTreeMap::new(),
            r => r?,
        };
        let mut all = before.clone();
        all.insert(model.to_string(), c);
        self.write_committed(&all)?;
        Ok(before)
    }

    /// Puts back what [`StateStore::commit`] returned (a swap that was refused after its
    /// commit was written).
    pub fn restore(&self, before: &BTreeMap<String, Committed>) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.write_committed(before)
    }

    fn write_committed(&self, all: &BTreeMap<String, Committed>) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{COMMITTED}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(all).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, self.dir.join(COMMITTED))?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        let r = write();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// The highest generation each model was ever committed at, by the audit log (a lost
    /// or unreadable committed.json must not send generations backwards); one read of it.
    pub fn highest_generations(&self) -> BTreeMap<String, u64> {
        let mut highest = BTreeMap::new();
        for r in self.audit_records().unwrap_or_default() {
            if let (true, Some(g)) = (r.committed, r.to_generation) {
                let h = highest.entry(r.model).or_insert(0);
                *h = g.max(*h);
            }
        }
        highest
    }

    /// Appends one line to the audit log.
    pub fn audit(&self, record: &AuditRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(AUDIT))?;
        // One write of a whole line: concurrent appends never interleave within a line.
        f.write_all(&line)?;
        f.sync_data()
    }

    /// Every audit record so far. A line that does not parse (a crash in the middle of an
    /// append, a hand edit) is skipped: the log is a record, not a lock.
    pub fn audit_records(&self) -> std::io::Result<Vec<AuditRecord>> {
        let bytes = match std::fs::read(self.dir.join(AUDIT)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(bytes
            .split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_replace_atomically_and_audit_appends() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(&dir.path().join("state")).unwrap();
        assert!(s.committed().unwrap().is_empty());
        let c = |v: &str, g| Committed {
            source: "m/a.gguf".into(),
            sha256: BTreeMap::from([("a.gguf".into(), "00".repeat(32))]),
            version: v.into(),
            generation: g,
            committed_at_unix_ms: 1,
        };
        s.commit("m", c("v1", 1)).unwrap();
        s.commit("n", c("w1", 1)).unwrap();
        s.commit("m", c("v2", 2)).unwrap();
        let all = s.committed().unwrap();
        assert_eq!(all["m"], c("v2", 2));
        assert_eq!(all["n"].version, "w1");
        assert!(!dir.path().join("state").join("committed.json.tmp").exists());
        for i in 0..3 {
            s.audit(&AuditRecord {
                at_unix_ms: i,
                model: "m".into(),
                action: "reload".into(),
                stage: "end".into(),
                actor: "test".into(),
                source: String::new(),
                sha256: BTreeMap::new(),
                from_version: None,
                from_generation: None,
                to_version: None,
                to_generation: None,
                committed: false,
                error: Some("x".into()),
                failed_phase: None,
                failed_check: None,
                phases_ms: vec![],
                cancelled_requests: 0,
                previous_freed: false,
            })
            .unwrap();
        }
        let recs = s.audit_records().unwrap();
        assert_eq!(
            recs.iter().map(|r| r.at_unix_ms).collect::<Vec<_>>(),
            [0, 1, 2]
        );
    }
}
