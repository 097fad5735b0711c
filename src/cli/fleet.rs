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
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::admin::{control_client, drain_policy, phase_line, phase_name, Ctl, ReloadOptions};
use crate::proto::{self, reload_event::Event};

/// How long to wait for a replica to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a Status or health call may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a rollback waits for a reload already running on the replica to end.
const BUSY_WAIT: Duration = Duration::from_secs(120);
/// What the replicas' audit logs record as the caller.
const ACTOR: &str = "swapd-fleet-reload";

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

struct Replica {
    url: String,
    ctl: Ctl,
    health: HealthClient<Channel>,
    /// Active version at preflight.
    before: proto::VersionRef,
    /// The version this rollout made active here, if it did.
    committed: Option<proto::VersionRef>,
    /// Active version at the end.
    after: Option<proto::VersionRef>,
    result: Outcome,
    detail: String,
}

fn vname(v: &proto::VersionRef) -> String {
    format!("{}@{}", v.version, v.generation)
}

/// An error and its causes on one line, each cause once (tonic repeats them).
fn chain(first: String, mut src: Option<&(dyn std::error::Error + 'static)>) -> String {
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

fn status_text(s: &tonic::Status) -> String {
    chain(
        format!("{:?}: {}", s.code(), s.message()),
        std::error::Error::source(s),
    )
}

async fn connect(url: &str) -> Result<Channel> {
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

async fn health_of(health: &mut HealthClient<Channel>, model: &str) -> Result<ServingStatus> {
    let call = health.check(HealthCheckRequest {
        service: model.to_string(),
    });
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Err(_) => bail!("health check: no answer in {RPC_TIMEOUT:?}"),
        Ok(Err(s)) => bail!("health check: {}", status_text(&s)),
        Ok(Ok(r)) => Ok(r.into_inner().status()),
    }
}

async fn status_of(ctl: &mut Ctl, model: &str) -> Result<proto::ModelStatus> {
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

fn active_of(m: &proto::ModelStatus) -> Option<(proto::VersionRef, &proto::VersionStatus)> {
    let a = m.active.as_ref()?;
    Some((a.version.clone()?, a))
}

/// Checks one replica before anything changes: reachable, the token accepted, the model
/// SERVING on gRPC health, an active version, no reload running.
async fn preflight(url: String, token: Option<String>, model: String) -> Result<Replica> {
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
enum Reloaded {
    Committed(proto::VersionRef),
    /// The replica already serves these files (the server refused them as already active).
    Unchanged(proto::VersionRef),
    Failed(String),
}

/// Runs the Reload call on one replica, printing its phases.
async fn reload_one(
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
struct Watch {
    model: String,
    window: Duration,
    poll: Duration,
    max_failures: u64,
    interrupted: Arc<AtomicBool>,
}

/// Watches a replica that just swapped `target` in: health must stay SERVING, `target` must
/// stay active (the server may roll back on its own) and fail at most `max_failures`
/// requests. Returns a summary, or why it tripped.
async fn watch_one(
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
async fn rollback_one(
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
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
