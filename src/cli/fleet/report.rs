//! The rollout's end: each replica's state from its own Status, the verdict, and the summary
//! table (or JSON).
use std::process::ExitCode;

use crate::proto;

use super::replica::{active_of, status_of, vname, Replica};
use super::{FleetArgs, Outcome};

/// Checks where every replica ended, prints the summary and returns the exit status.
pub(super) async fn finish(
    a: &FleetArgs,
    mut replicas: Vec<Replica>,
    target: Option<proto::VersionRef>,
    failure: Option<String>,
) -> ExitCode {
    // The end state, from each replica's own Status.
    for r in replicas.iter_mut() {
        match status_of(&mut r.ctl, &a.model).await {
            Ok(m) => r.after = active_of(&m).map(|(v, _)| v),
            Err(e) => {
                r.after = None;
                if r.detail.is_empty() {
                    r.detail = format!("final check: {e:#}");
                }
            }
        }
    }
    let mut ok = failure.is_none();
    if ok {
        let t = target.clone().unwrap_or_default();
        for r in replicas.iter_mut() {
            if r.after.as_ref().map(|v| &v.version) != Some(&t.version) {
                r.result = Outcome::Mismatch;
                r.detail = format!("final check: {} is not on {}", r.url, t.version);
                ok = false;
            }
        }
    }
    let mut ends: Vec<Option<&str>> = replicas
        .iter()
        .map(|r| r.after.as_ref().map(|v| v.version.as_str()))
        .collect();
    ends.sort();
    ends.dedup();
    let same = match ends.as_slice() {
        [Some(v)] => Some(v.to_string()),
        _ => None,
    };
    let verdict = match (&failure, ok) {
        (None, true) => format!(
            "ok: {} replica(s) serve {} {}",
            replicas.len(),
            a.model,
            target.as_ref().map(|t| t.version.as_str()).unwrap_or("?")
        ),
        (None, false) => "FAILED: the final check found replicas off the new version".into(),
        (Some(why), _) => {
            let stuck = replicas
                .iter()
                .filter(|r| r.result == Outcome::RollbackFailed)
                .count();
            if stuck > 0 {
                format!("FAILED: {why}; {stuck} replica(s) could not be rolled back: see the table")
            } else {
                format!("FAILED: {why}; every changed replica was rolled back")
            }
        }
    };

    if a.json {
        let v = serde_json::json!({
            "model": a.model,
            "ok": ok,
            "target_version": target.as_ref().map(|t| &t.version),
            "same_version": same,
            "error": failure,
            "replicas": replicas.iter().map(|r| serde_json::json!({
                "replica": r.url,
                "before": {"version": r.before.version, "generation": r.before.generation},
                "after": r.after.as_ref().map(|v| serde_json::json!({"version": v.version, "generation": v.generation})),
                "result": r.result.as_str(),
                "detail": r.detail,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        eprintln!("fleet-reload: {verdict}");
    } else {
        let w = replicas
            .iter()
            .map(|r| r.url.len())
            .max()
            .unwrap_or(7)
            .max(7);
        println!(
            "{:<w$}  {:<22}  {:<22}  {:<15}  DETAIL",
            "REPLICA", "BEFORE", "AFTER", "RESULT"
        );
        for r in &replicas {
            println!(
                "{:<w$}  {:<22}  {:<22}  {:<15}  {}",
                r.url,
                vname(&r.before),
                r.after.as_ref().map(vname).unwrap_or_else(|| "?".into()),
                r.result.as_str(),
                if r.detail.is_empty() { "-" } else { &r.detail }
            );
        }
        match &same {
            Some(v) => println!("fleet-reload: every replica serves {v}"),
            None => println!("fleet-reload: the replicas serve different versions"),
        }
        println!("fleet-reload: {verdict}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
