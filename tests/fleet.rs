//! `scripts/fleet-reload` against three real `swapd serve` processes on loopback, each with
//! its own models root: a rollout that lands everywhere canary first, one that meets a bad
//! artifact on the last replica and rolls the others back, one whose canary dies while it is
//! watched, and the preflight that refuses to start.
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::process::{free_port, Served, BIN};
use std::time::{Duration, Instant};

use common::{sha, tiny_config, TOKEN};
use swapd::proto;

const LLM: &str = "tiny-llm";
/// The new version's path, the same on every replica.
const V2: &str = "tiny-llm/v2.gguf";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fleet-reload")
}

/// A `swapd serve` process with its own models root, killed on drop.
struct Replica {
    /// Dropping the replica kills its process.
    _served: Served,
    url: String,
    dir: tempfile::TempDir,
}

impl Replica {
    /// Writes the tiny models, starts `swapd serve` and waits for `serving`.
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        tiny_config(dir.path());
        let served = Served::start(
            &[
                "--models",
                LLM,
                "--models-root",
                dir.path().to_str().unwrap(),
                "--admin-token",
                TOKEN,
            ],
            &[],
        );
        let url = served.url.clone();
        Replica {
            _served: served,
            url,
            dir,
        }
    }

    /// Writes the tiny LLM's version 2 (poisoned with a NaN when `poison`) at [`V2`];
    /// returns its sha256.
    fn write_v2(&self, poison: bool) -> String {
        let path = self.dir.path().join(V2);
        let opts = swapd::model::synth::TinyLlm {
            seed: 2,
            poison_nan: poison,
            ..Default::default()
        };
        swapd::model::synth::write_tiny_llama_gguf(&path, &opts).unwrap();
        sha(&path)
    }

    /// The active version of the tiny LLM, from the replica's Status.
    fn active(&self) -> proto::VersionRef {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ch = tonic::transport::Channel::from_shared(self.url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let auth: tonic::metadata::MetadataValue<_> =
                format!("Bearer {TOKEN}").parse().unwrap();
            let mut ctl = proto::model_control_client::ModelControlClient::with_interceptor(
                ch,
                move |mut req: tonic::Request<()>| {
                    req.metadata_mut().insert("authorization", auth.clone());
                    Ok(req)
                },
            );
            let st = ctl
                .status(proto::StatusRequest { model: LLM.into() })
                .await
                .unwrap()
                .into_inner();
            st.models[0].active.clone().unwrap().version.unwrap()
        })
    }

    /// The audit log's records of reloads that ended, oldest first (a committed reload also
    /// has a `commit` line, written before its swap).
    fn audit(&self) -> Vec<serde_json::Value> {
        let path = self.dir.path().join(".swapd/audit.jsonl");
        let all: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let commits = all.iter().filter(|r| r["stage"] == "commit").count();
        let ends: Vec<_> = all.into_iter().filter(|r| r["stage"] == "end").collect();
        let committed = ends.iter().filter(|r| r["committed"] == true).count();
        assert_eq!(commits, committed, "one commit line per committed reload");
        ends
    }
}

/// Three replicas, started side by side.
fn three() -> [Replica; 3] {
    let handles: Vec<_> = (0..3).map(|_| std::thread::spawn(Replica::start)).collect();
    let mut r = handles.into_iter().map(|h| h.join().unwrap());
    [r.next().unwrap(), r.next().unwrap(), r.next().unwrap()]
}

fn fleet_cmd(replicas: &[&Replica], args: &[&str]) -> Command {
    let mut cmd = Command::new(script());
    cmd.arg(LLM);
    for r in replicas {
        cmd.args(["--replica", &r.url]);
    }
    cmd.args(args)
        .env("SWAPD_BIN", BIN)
        .env("SWAPD_ADMIN_TOKEN", TOKEN);
    cmd
}

fn fleet(replicas: &[&Replica], args: &[&str]) -> Output {
    fleet_cmd(replicas, args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The summary table's row for `url`: (before, after, result).
fn row(out: &str, url: &str) -> (String, String, String) {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{url} ")))
        .unwrap_or_else(|| panic!("no summary row for {url}:\n{out}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[1].into(), f[2].into(), f[3].into())
}

/// Index of the first output line that starts with `[url] ` and contains `what`.
fn line_of(out: &str, url: &str, what: &str) -> usize {
    out.lines()
        .position(|l| l.starts_with(&format!("[{url}] ")) && l.contains(what))
        .unwrap_or_else(|| panic!("no `{what}` line for {url}:\n{out}"))
}

fn pin(digest: &str) -> String {
    format!("v2.gguf={digest}")
}

#[test]
fn a_good_version_rolls_out_canary_first_to_every_replica() {
    let reps = three();
    let all: Vec<&Replica> = reps.iter().collect();
    let digests: Vec<String> = reps.iter().map(|r| r.write_v2(false)).collect();
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "same bytes everywhere"
    );
    let v1 = reps[0].active();
    let reload = ["--source", V2, "--sha256", &pin(&digests[0])];

    // Preflight: an unreachable replica stops the rollout before anything changes.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = fleet_cmd(&all, &reload)
        .args(["--replica", &dead])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert!(
        o.contains(&format!("[{dead}] preflight FAILED: unreachable")),
        "{o}"
    );
    assert!(e.contains("refusing to start"), "{e}");
    // A wrong token fails the preflight too.
    let out = fleet_cmd(&all, &reload)
        .env("SWAPD_ADMIN_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stdout).contains("admin token"),
        "{}",
        text(&out.stdout)
    );
    // A dry run prints the plan and changes nothing.
    let out = fleet(
        &all,
        &[&reload[..], &["--dry-run", "--batch-size", "2"]].concat(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(
        o.contains(&format!("plan: batch 1: {} {}", reps[1].url, reps[2].url)),
        "{o}"
    );
    assert!(o.contains("dry run: nothing was changed"), "{o}");
    for r in &reps {
        assert_eq!(r.active(), v1, "{} changed before the rollout", r.url);
        assert!(r.audit().is_empty());
    }

    let t = Instant::now();
    let out = fleet(
        &all,
        &[
            &reload[..],
            &[
                "--keep-previous",
                "--canary-window",
                "1s",
                "--batch-window",
                "300ms",
                "--poll-interval",
                "100ms",
            ],
        ]
        .concat(),
    );
    let o = text(&out.stdout);
    assert!(out.status.success(), "{o}{}", text(&out.stderr));
    // The canary is watched for its whole window before the next replica starts.
    assert!(t.elapsed() >= Duration::from_secs(1));
    let committed: Vec<usize> = reps
        .iter()
        .map(|r| line_of(&o, &r.url, "committed"))
        .collect();
    let canary_ok = line_of(&o, &reps[0].url, "watch ok");
    assert!(
        committed[0] < canary_ok && canary_ok < committed[1] && committed[1] < committed[2],
        "order: {committed:?}, canary watch ok at {canary_ok}:\n{o}"
    );
    // Phases stream, one line each, prefixed with the replica.
    line_of(&o, &reps[2].url, "reload ✓ preflight");
    let v2 = reps[0].active();
    assert_ne!(v2.version, v1.version);
    for r in &reps {
        let now = r.active();
        assert_eq!(
            now.version, v2.version,
            "{} is not on the new version",
            r.url
        );
        assert_eq!(now.generation, 2);
        let (before, after, result) = row(&o, &r.url);
        assert_eq!(before, format!("{}@1", v1.version));
        assert_eq!(after, format!("{}@2", v2.version));
        assert_eq!(result, "updated");
    }
    assert!(
        o.contains(&format!("every replica serves {}", v2.version)),
        "{o}"
    );
    // `swapd status` counts the new version's finished requests.
    for _ in 0..2 {
        let out = Command::new(BIN)
            .args([
                "generate",
                "--max-tokens",
                "3",
                "--server",
                &reps[0].url,
                "hi",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = Command::new(BIN)
        .args(["status", LLM, "--server", &reps[0].url, "--token", TOKEN])
        .output()
        .unwrap();
    let st = text(&out.stdout);
    assert!(st.contains("OK/FAILED"), "{st}");
    let fields: Vec<&str> = st
        .lines()
        .find(|l| l.starts_with(LLM))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(fields[1..5], [v2.version.as_str(), "2", "0", "2/0"], "{st}");
    // Each replica's own audit log agrees on the order, and names the tool.
    let at: Vec<u64> = reps
        .iter()
        .map(|r| {
            let a = r.audit();
            assert_eq!(a.len(), 1, "{a:?}");
            assert_eq!(a[0]["committed"], true);
            assert!(
                a[0]["actor"]
                    .as_str()
                    .unwrap()
                    .starts_with("swapd-fleet-reload@"),
                "{}",
                a[0]
            );
            a[0]["at_unix_ms"].as_u64().unwrap()
        })
        .collect();
    assert!(
        at[0] + 1000 <= at[1] && at[1] <= at[2],
        "audit times {at:?}"
    );

    // --json: one object on stdout.
    let out = fleet(
        &all,
        &[
            &reload[..],
            &["--json", "--canary-window", "0s", "--batch-window", "0s"],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["same_version"], v2.version.as_str());
    // Every replica already serves v2: each is left alone, its rollback target kept.
    assert_eq!(v["replicas"][2]["result"], "unchanged");
    assert_eq!(v["replicas"][2]["after"]["generation"], 2);
}

#[test]
fn a_bad_artifact_on_the_last_replica_rolls_the_others_back() {
    let reps = three();
    let all: Vec<&Replica> = reps.iter().collect();
    let good = reps[0].write_v2(false);
    reps[1].write_v2(false);
    // Replica 3's copy is corrupted: a NaN where the release has a number.
    assert_ne!(reps[2].write_v2(true), good);
    let v1 = reps[0].active();

    let out = fleet(
        &all,
        &[
            "--source",
            V2,
            "--sha256",
            &pin(&good),
            "--batch-size",
            "1",
            "--canary-window",
            "1s",
            "--batch-window",
            "200ms",
            "--poll-interval",
            "100ms",
        ],
    );
    let o = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{o}{}", text(&out.stderr));
    assert!(
        o.contains(&format!(
            "[{}] not committed: failed in verify: ",
            reps[2].url
        )) && o.contains("sha256 mismatch"),
        "{o}"
    );
    // Replica 2 was rolled back before replica 1 (the reverse of the rollout).
    let back: Vec<usize> = reps[..2]
        .iter()
        .map(|r| line_of(&o, &r.url, "rolled back to"))
        .collect();
    assert!(back[1] < back[0], "{o}");
    for (i, r) in reps.iter().enumerate() {
        let now = r.active();
        assert_eq!(now.version, v1.version, "{} is not back on v1", r.url);
        let (before, after, result) = row(&o, &r.url);
        assert_eq!(before, format!("{}@1", v1.version));
        assert_eq!(after, vname(&now));
        let audit = r.audit();
        if i < 2 {
            // Reloaded (generation 2), then rolled back (generation 3).
            assert_eq!(now.generation, 3);
            assert_eq!(result, "rolled-back");
            assert_eq!(audit.len(), 2, "{audit:?}");
            assert_eq!(audit[1]["action"], "rollback");
            assert_eq!(audit[1]["committed"], true);
        } else {
            assert_eq!(now.generation, 1);
            assert_eq!(result, "failed");
            assert_eq!(audit.len(), 1, "{audit:?}");
            assert_eq!(audit[0]["committed"], false);
            assert_eq!(audit[0]["failed_phase"], "verify");
        }
    }
    assert!(
        o.contains(&format!("every replica serves {}", v1.version)),
        "{o}"
    );
    assert!(o.contains("every changed replica was rolled back"), "{o}");
}

fn vname(v: &proto::VersionRef) -> String {
    format!("{}@{}", v.version, v.generation)
}

#[test]
fn a_canary_that_dies_while_watched_stops_the_rollout() {
    let [canary, r2, r3] = three();
    let digests: Vec<String> = [&canary, &r2, &r3]
        .iter()
        .map(|r| r.write_v2(false))
        .collect();
    let v1 = r2.active();
    let mut child = fleet_cmd(
        &[&canary, &r2, &r3],
        &[
            "--source",
            V2,
            "--sha256",
            &pin(&digests[0]),
            "--canary-window",
            "30s",
            "--poll-interval",
            "100ms",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut canary = Some(canary);
    let mut lines = Vec::new();
    let t = Instant::now();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // The canary crashes (think OOM-kill) while it is watched.
        if line.contains("] watch ") {
            drop(canary.take());
        }
        lines.push(line);
    }
    let status = child.wait().unwrap();
    let o = lines.join("\n") + "\n";
    let e = {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut s).unwrap();
        s
    };
    assert_eq!(status.code(), Some(1), "{o}{e}");
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "the watch did not trip"
    );
    assert!(canary.is_none(), "the canary was never watched:\n{o}");
    // The watch calls health, then Status, each poll: which of the two meets the dead canary
    // first is a race, and either is the right report (a call to the replica failed).
    assert!(
        o.contains("watch FAILED: health check: ") || o.contains("watch FAILED: Status: "),
        "{o}"
    );
    // The canary cannot be rolled back (it is gone), and says so; the others were never touched.
    let canary_row = o
        .lines()
        .find(|l| l.contains("rollback-failed"))
        .unwrap_or_else(|| panic!("{o}"));
    assert!(canary_row.contains("@1 "), "{canary_row}");
    assert!(o.contains("could not be rolled back"), "{o}");
    for r in [&r2, &r3] {
        assert_eq!(r.active(), v1, "{} was touched", r.url);
        assert!(r.audit().is_empty());
        assert_eq!(row(&o, &r.url).2, "skipped");
    }
}

/// Sends 240-token generations with a 2 ms deadline to `url` until `stop`: each is a request
/// the serving version fails (DEADLINE_EXCEEDED), as a version that hangs or crawls would.
/// (Even the tiny model with the SIMD kernels needs well over 2 ms for 240 tokens.) Returns
/// how many failed that way.
fn missed_deadlines(url: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u32 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ch = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = proto::inference_client::InferenceClient::new(ch);
        let mut missed = 0;
        let t = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed)
            && t.elapsed() < Duration::from_secs(30)
        {
            let mut req = tonic::Request::new(common::greedy(LLM, "count with me: 1, 2, 3,", 240));
            req.set_timeout(Duration::from_millis(2));
            let r = async {
                let mut s = client.generate(req).await?.into_inner();
                while s.message().await?.is_some() {}
                Ok::<_, tonic::Status>(())
            }
            .await;
            if r.is_err_and(|e| e.code() == tonic::Code::DeadlineExceeded) {
                missed += 1;
            }
        }
        missed
    })
}

#[test]
fn a_canary_that_fails_requests_while_watched_is_rolled_back() {
    let reps = [Replica::start(), Replica::start()];
    let digest = reps[0].write_v2(false);
    reps[1].write_v2(false);
    let v1 = reps[0].active();
    let mut child = fleet_cmd(
        &[&reps[0], &reps[1]],
        &[
            "--source",
            V2,
            "--sha256",
            &pin(&digest),
            "--keep-previous",
            "--canary-window",
            "20s",
            "--poll-interval",
            "100ms",
            "--max-failures",
            "2",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = None;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("] watch ") && load.is_none() {
            let (url, stop) = (reps[0].url.clone(), stop.clone());
            load = Some(std::thread::spawn(move || missed_deadlines(url, stop)));
        }
        lines.push(line);
    }
    let status = child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let missed = load.expect("the canary was never watched").join().unwrap();
    let o = lines.join("\n") + "\n";
    assert_eq!(status.code(), Some(1), "{o}");
    assert!(missed > 2, "only {missed} requests missed their deadline");
    // The limit is 2: the third failure trips the watch.
    let tripped = o
        .lines()
        .find(|l| l.contains("watch FAILED: the new version failed"))
        .unwrap_or_else(|| panic!("{o}"));
    let failed: u64 = tripped
        .split_once("version failed ")
        .and_then(|(_, s)| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{tripped}"));
    assert!(failed > 2, "{tripped}");
    // Back on v1 from the resident standby (no load phase), the second replica untouched.
    assert!(
        !o.lines()
            .any(|l| l.contains("rollback ✓ load") || l.contains("rollback … load")),
        "{o}"
    );
    let now = reps[0].active();
    assert_eq!(
        (now.version.as_str(), now.generation),
        (v1.version.as_str(), 3)
    );
    assert_eq!(row(&o, &reps[0].url).2, "rolled-back");
    assert_eq!(reps[1].active(), v1);
    assert_eq!(row(&o, &reps[1].url).2, "skipped");
}

#[test]
fn ctrl_c_during_the_canary_watch_rolls_the_canary_back() {
    let reps = [Replica::start(), Replica::start()];
    let digest = reps[0].write_v2(false);
    reps[1].write_v2(false);
    let v1 = reps[0].active();
    let mut child = fleet_cmd(
        &[&reps[0], &reps[1]],
        &[
            "--source",
            V2,
            "--sha256",
            &pin(&digest),
            "--canary-window",
            "30s",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t = Instant::now();
    let mut lines = Vec::new();
    let mut sent = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // Once: a second Ctrl-C quits at once.
        if line.contains("] watch ") && !sent {
            sent = true;
            // The script execs the binary: this is fleet-reload's own pid.
            let pid = child.id().to_string();
            assert!(Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap()
                .success());
        }
        lines.push(line);
    }
    let status = child.wait().unwrap();
    let o = lines.join("\n") + "\n";
    assert_eq!(status.code(), Some(1), "{o}");
    assert!(t.elapsed() < Duration::from_secs(20), "{o}");
    assert!(o.contains("watch FAILED: interrupted"), "{o}");
    let now = reps[0].active();
    assert_eq!(
        (now.version.as_str(), now.generation),
        (v1.version.as_str(), 3)
    );
    assert_eq!(row(&o, &reps[0].url).2, "rolled-back");
    assert_eq!(reps[1].active(), v1);
    assert_eq!(row(&o, &reps[1].url).2, "skipped");
}
