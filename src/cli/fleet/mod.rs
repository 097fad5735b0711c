//! `swapd fleet-reload`: rolls a new version of one model across a fleet of replicas. Every
//! replica is checked first; then a canary is reloaded and watched, then the rest in batches,
//! each watched. On any failure the rollout stops, leaves the remaining replicas alone and
//! rolls back every replica it changed, checking that each is back on its version from before.
//!
//! Output is one line per event, each prefixed with `[REPLICA]`, then a summary table (or JSON
//! with `--json`, when the progress lines go to stderr). Exit status: 0 when every replica
//! serves the new version, 1 when the rollout failed (whether or not the rollback worked: the
//! summary says), 2 when it never started (bad arguments, or a replica failed its preflight).
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::task::JoinSet;
use tonic::transport::Endpoint;

use super::admin::{drain_policy, ReloadOptions};
use crate::proto;

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// The model to roll out.
    pub model: String,
    /// A replica's control URL (repeatable), in rollout order: the first is the canary.
    #[arg(long = "replica", value_name = "URL")]
    pub replicas: Vec<String>,
    /// A file of replica URLs, one per line (blank lines and `#` comments skipped); they come
    /// after any --replica.
    #[arg(long, value_name = "FILE")]
    pub replicas_file: Option<PathBuf>,
    /// Admin token for the control calls (the same on every replica).
    #[arg(long, env = "SWAPD_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub options: ReloadOptions,
    /// How long the canary is watched after its swap (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub canary_window: Duration,
    /// Replicas reloaded at once after the canary.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// How long each later batch is watched after its swaps.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub batch_window: Duration,
    /// How often a watch checks health and the new version's failed requests.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Requests the new version may fail on one replica during its watch (missed deadlines,
    /// inference errors; not bad input).
    #[arg(long, default_value_t = 0)]
    pub max_failures: u64,
    /// Check every replica and print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as one JSON object on stdout; progress lines go to stderr.
    #[arg(long)]
    pub json: bool,
}

/// Parses `500ms`, `10s`, `2m`, `1h` or `0`; fractions are allowed (`1.5s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}`: missing unit (ms, s, m or h), e.g. 10s"))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("`{s}`: expected a number then ms, s, m or h, e.g. 500ms"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// Where progress lines go: stdout, or stderr when stdout carries the JSON summary.
#[derive(Debug, Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    fn line(self, replica: &str, text: impl std::fmt::Display) {
        if self.json {
            eprintln!("[{replica}] {text}");
        } else {
            println!("[{replica}] {text}");
        }
    }

    fn note(self, text: impl std::fmt::Display) {
        if self.json {
            eprintln!("fleet-reload: {text}");
        } else {
            println!("fleet-reload: {text}");
        }
    }
}

/// What happened to one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not reached: the rollout stopped first.
    Skipped,
    /// Serves the new version.
    Updated,
    /// Already served the new version's files: left alone (its standby and rollback target
    /// are not replaced by a copy of what it serves).
    Unchanged,
    /// Its reload did not commit, or its watch tripped.
    Failed,
    /// Changed, then rolled back and checked to be on its version from before.
    RolledBack,
    /// Changed, and the rollback failed or did not end on the version from before.
    RollbackFailed,
    /// Reported updated, but the final check found another version active.
    Mismatch,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Skipped => "skipped",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolled-back",
            Outcome::RollbackFailed => "rollback-failed",
            Outcome::Mismatch => "mismatch",
        }
    }
}

mod replica;
mod report;

use replica::{preflight, reload_one, rollback_one, vname, watch_one, Reloaded, Replica, Watch};

/// The replica URLs, in order: --replica, then the file's.
fn replica_urls(a: &FleetArgs) -> Result<Vec<String>> {
    let mut urls: Vec<String> = a.replicas.iter().map(|u| u.trim().to_string()).collect();
    if let Some(path) = &a.replicas_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--replicas-file {}", path.display()))?;
        urls.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    if urls.is_empty() {
        bail!("no replicas: give --replica URL (repeatable) or --replicas-file FILE");
    }
    for (i, u) in urls.iter().enumerate() {
        if u.starts_with("https://") {
            bail!("replica `{u}`: swapd serves plaintext gRPC only; use http://");
        }
        if !u.starts_with("http://") {
            bail!("replica `{u}`: expected a URL such as http://10.0.0.5:50052");
        }
        Endpoint::from_shared(u.clone()).with_context(|| format!("replica `{u}`: bad URL"))?;
        if urls[..i].contains(u) {
            bail!("replica `{u}` is listed twice");
        }
    }
    Ok(urls)
}

pub async fn fleet_reload(a: FleetArgs) -> Result<ExitCode> {
    let out = Out { json: a.json };
    let usage = |e: anyhow::Error| {
        eprintln!("swapd fleet-reload: {e:#}");
        Ok(ExitCode::from(2))
    };
    let urls = match replica_urls(&a) {
        Ok(u) => u,
        Err(e) => return usage(e),
    };
    if a.poll_interval.is_zero() {
        return usage(anyhow::anyhow!("--poll-interval must be above 0"));
    }
    let template = match a.options.request(&a.model, None) {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    let rollback_req = proto::RollbackRequest {
        model: a.model.clone(),
        drain_timeout_ms: a.options.drain_timeout_ms,
        drain_policy: drain_policy(&a.options.drain_policy)?,
    };

    // Preflight: every replica, at once; nothing changes unless all pass.
    let mut checks = JoinSet::new();
    for (i, url) in urls.iter().enumerate() {
        let (url, token, model) = (url.clone(), a.token.clone(), a.model.clone());
        checks.spawn(async move { (i, preflight(url, token, model).await) });
    }
    let mut found: Vec<Option<Result<Replica>>> = urls.iter().map(|_| None).collect();
    while let Some(j) = checks.join_next().await {
        let (i, r) = j.context("preflight task")?;
        found[i] = Some(r);
    }
    let mut replicas = Vec::new();
    let mut refused = 0;
    for (url, r) in urls.iter().zip(found) {
        match r.context("preflight result")? {
            Ok(r) => {
                out.line(url, format!("preflight ok: {} active", vname(&r.before)));
                replicas.push(r);
            }
            Err(e) => {
                out.line(url, format!("preflight FAILED: {e:#}"));
                refused += 1;
            }
        }
    }
    if refused > 0 {
        eprintln!(
            "swapd fleet-reload: refusing to start: {refused} of {} replica(s) failed the preflight; nothing was changed",
            urls.len()
        );
        return Ok(ExitCode::from(2));
    }
    let mut befores: Vec<&str> = replicas.iter().map(|r| r.before.version.as_str()).collect();
    befores.sort_unstable();
    befores.dedup();
    if befores.len() > 1 {
        out.note("note: the replicas do not all serve the same version now");
    }

    // The plan: the canary alone, then batches.
    let mut groups: Vec<Vec<usize>> = vec![vec![0]];
    let rest: Vec<usize> = (1..replicas.len()).collect();
    groups.extend(rest.chunks(a.batch_size as usize).map(<[usize]>::to_vec));
    out.note(format!(
        "plan: model {} on {} replica(s); source {}; canary {} watched {:?}; then {} batch(es) of up to {} watched {:?}; poll {:?}; at most {} failed request(s) per replica",
        a.model,
        replicas.len(),
        a.options.source.as_deref().unwrap_or("(current)"),
        replicas[0].url,
        a.canary_window,
        groups.len() - 1,
        a.batch_size,
        a.batch_window,
        a.poll_interval,
        a.max_failures
    ));
    for (n, g) in groups.iter().enumerate().skip(1) {
        let names: Vec<&str> = g.iter().map(|&i| replicas[i].url.as_str()).collect();
        out.note(format!("plan: batch {n}: {}", names.join(" ")));
    }
    if a.dry_run {
        out.note("dry run: nothing was changed");
        return Ok(ExitCode::SUCCESS);
    }

    // Ctrl-C (or SIGTERM) stops the rollout at its next step and rolls back what it
    // changed; a second one exits at once. Registered now: until then the default action
    // (exit) applies, which is right while nothing has changed yet.
    let interrupted = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            let flag = interrupted.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                eprintln!("fleet-reload: interrupted: stopping after the reloads running now, then rolling back (again to quit at once)");
                flag.store(true, Ordering::Relaxed);
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                std::process::exit(130);
            });
        }
    }

    let mut target: Option<proto::VersionRef> = None;
    let mut failure: Option<String> = None;
    for (n, group) in groups.iter().enumerate() {
        if interrupted.load(Ordering::Relaxed) {
            failure = Some("interrupted".into());
            break;
        }
        if n == 0 {
            out.note(format!("canary: {}", replicas[0].url));
        } else {
            out.note(format!("batch {n} of {}", groups.len() - 1));
        }
        let mut reloads = JoinSet::new();
        for &i in group {
            let r = &replicas[i];
            let mut req = template.clone();
            // Compare-and-swap: refuse if the replica changed since its preflight.
            req.expected_generation = Some(r.before.generation);
            let (url, ctl, before) = (r.url.clone(), r.ctl.clone(), r.before.clone());
            reloads.spawn(async move { (i, reload_one(out, url, ctl, req, before).await) });
        }
        while let Some(j) = reloads.join_next().await {
            let (i, done) = j.context("reload task")?;
            let r = &mut replicas[i];
            match done {
                Reloaded::Committed(v) => {
                    r.committed = Some(v.clone());
                    r.after = Some(v.clone());
                    match &target {
                        None => target = Some(v),
                        Some(t) if t.version != v.version => {
                            r.result = Outcome::Failed;
                            r.detail = format!(
                                "committed version {} but the canary committed {}",
                                v.version, t.version
                            );
                            failure.get_or_insert(format!("{}: {}", r.url, r.detail));
                        }
                        Some(_) => {}
                    }
                }
                Reloaded::Unchanged(v) => {
                    r.result = Outcome::Unchanged;
                    r.after = Some(v.clone());
                    if target.is_none() {
                        target = Some(v);
                    }
                }
                Reloaded::Failed(why) => {
                    r.result = Outcome::Failed;
                    r.detail = why;
                    failure.get_or_insert(format!("{}: {}", r.url, r.detail));
                }
            }
        }
        if failure.is_some() {
            break;
        }
        let w = Watch {
            model: a.model.clone(),
            window: if n == 0 {
                a.canary_window
            } else {
                a.batch_window
            },
            poll: a.poll_interval,
            max_failures: a.max_failures,
            interrupted: interrupted.clone(),
        };
        let mut watches = JoinSet::new();
        for &i in group {
            let r = &replicas[i];
            let Some(v) = r.committed.clone() else {
                continue;
            };
            let (url, ctl, health, w) = (r.url.clone(), r.ctl.clone(), r.health.clone(), w.clone());
            watches.spawn(async move { (i, watch_one(out, url, ctl, health, v, w).await) });
        }
        while let Some(j) = watches.join_next().await {
            let (i, watched) = j.context("watch task")?;
            let r = &mut replicas[i];
            match watched {
                Ok(summary) => {
                    out.line(&r.url, format!("watch ok: {summary}"));
                    r.result = Outcome::Updated;
                }
                Err(why) => {
                    out.line(&r.url, format!("watch FAILED: {why}"));
                    r.result = Outcome::Failed;
                    r.detail = format!("watch: {why}");
                    failure.get_or_insert(format!("{}: watch: {why}", r.url));
                }
            }
        }
        if failure.is_some() {
            break;
        }
    }

    if let Some(why) = &failure {
        let changed: Vec<usize> = (0..replicas.len())
            .filter(|&i| replicas[i].committed.is_some())
            .rev()
            .collect();
        out.note(format!(
            "stopping: {why}; rolling back {} replica(s)",
            changed.len()
        ));
        for i in changed {
            let r = &mut replicas[i];
            let committed = r.committed.clone().unwrap_or_default();
            let rolled = rollback_one(
                out,
                r.url.clone(),
                r.ctl.clone(),
                rollback_req.clone(),
                r.before.clone(),
                committed,
            )
            .await;
            match rolled {
                Ok(v) => {
                    if r.result != Outcome::Failed {
                        r.detail = "rollout stopped".into();
                    }
                    r.result = Outcome::RolledBack;
                    r.after = Some(v);
                }
                Err(e) => {
                    out.line(&r.url, format!("rollback FAILED: {e}"));
                    r.result = Outcome::RollbackFailed;
                    r.detail = e;
                }
            }
        }
    }

    Ok(report::finish(&a, replicas, target, failure).await)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "-1s", "10 s", "1x", "1..2s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }
}
