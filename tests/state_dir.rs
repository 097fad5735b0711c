//! The state directory: a swap that cannot be recorded, an unreadable committed.json, and a
//! crash in the middle of a drain.
mod common;

use std::path::Path;
use std::time::Duration;

use common::stall::*;
use common::*;
use swapd::proto;
use tonic::transport::Endpoint;

fn state_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("state")
}

fn committed_json(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(state_dir(dir).join("committed.json")).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

fn audit_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state_dir(dir).join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_that_cannot_be_recorded_is_refused_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = with_token(dir.path());
    config.state_dir = Some(state_dir(dir.path()));
    let server = TestServer::start(config).await;
    let slot = server.registry.slot(LLM).unwrap();
    let v1 = slot.active().unwrap();
    // committed.json cannot be written (root ignores permission bits, so a directory stands
    // where the temp file goes).
    let tmp = state_dir(dir.path()).join("committed.json.tmp");
    std::fs::create_dir_all(tmp.join("x")).unwrap();
    let (_, r) = reload(&server, reload_to_tiny(dir.path(), 2, "")).await;
    assert!(!r.committed);
    assert_eq!(r.failed_phase(), proto::Phase::Swap, "{}", r.error);
    assert_eq!(r.failed_check, "record");
    assert!(r.error.contains("could not be recorded"), "{}", r.error);
    assert!(std::sync::Arc::ptr_eq(&slot.active().unwrap(), &v1));
    assert_eq!(v1.generation(), 1);
    assert!(committed_json(dir.path()).is_none());
    std::fs::remove_dir_all(&tmp).unwrap();

    // The audit line cannot be appended: refused too, and committed.json is put back.
    let audit = state_dir(dir.path()).join("audit.jsonl");
    let lines_before = std::fs::read_to_string(&audit).unwrap_or_default();
    std::fs::remove_file(&audit).ok();
    std::fs::create_dir_all(&audit).unwrap();
    let (_, r) = reload(&server, reload_to_tiny(dir.path(), 3, "")).await;
    assert!(!r.committed);
    assert!(r.error.contains("audit.jsonl"), "{}", r.error);
    assert!(std::sync::Arc::ptr_eq(&slot.active().unwrap(), &v1));
    assert_eq!(committed_json(dir.path()), Some(serde_json::json!({})));
    std::fs::remove_dir_all(&audit).unwrap();
    std::fs::write(&audit, lines_before).unwrap();

    // Writable again: the swap commits, at generation 2, recorded in both files, the audit
    // line of the commit before the reload's end line; no temp file stays behind.
    let (_, r) = reload(&server, reload_to_tiny(dir.path(), 7, "")).await;
    assert!(r.committed, "{}", r.error);
    let c = committed_json(dir.path()).unwrap();
    assert_eq!(c[LLM]["generation"], 2);
    let lines = audit_lines(dir.path());
    let commit = lines
        .iter()
        .position(|l| l["stage"] == "commit")
        .expect("a commit line");
    assert_eq!(lines[commit]["to_generation"], 2);
    assert_eq!(lines[commit]["from_generation"], 1);
    assert!(lines[commit + 1..]
        .iter()
        .any(|l| l["stage"] == "end" && l["committed"] == true));
    assert!(!tmp.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_committed_json_is_set_aside_and_generations_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_dir(dir.path());
    std::fs::create_dir_all(&state).unwrap();
    // An audit log that saw generation 6, and a committed.json cut short by a crash.
    let line = serde_json::json!({
        "at_unix_ms": 1, "model": LLM, "action": "reload", "stage": "commit",
        "actor": "t", "source": "tiny-llm/v6.gguf", "sha256": {},
        "from_version": null, "from_generation": 5, "to_version": "x", "to_generation": 6,
        "committed": true, "error": null, "failed_phase": null, "failed_check": null,
        "phases_ms": [], "cancelled_requests": 0, "previous_freed": false
    });
    std::fs::write(state.join("audit.jsonl"), format!("{line}\n{{\"trunc")).unwrap();
    std::fs::write(state.join("committed.json"), "{\"tiny-llm\": {\"sour").unwrap();
    let mut config = with_token(dir.path());
    config.state_dir = Some(state.clone());
    let server = TestServer::start(config).await;
    let slot = server.registry.slot(LLM).unwrap();
    // Served (the manifest's version, as if nothing was committed), at the next generation.
    assert_eq!(slot.active().unwrap().generation(), 7);
    let aside: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("committed.json.unreadable-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the unreadable file is kept aside");
    let (_, r) = reload(&server, reload_to_tiny(dir.path(), 2, "")).await;
    assert!(r.committed, "{}", r.error);
    assert_eq!(r.version.unwrap().generation, 8);
    assert_eq!(committed_json(dir.path()).unwrap()[LLM]["generation"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_the_drain_leaves_the_commit_in_the_audit_log() {
    use swapd::proto::reload_event::Event;
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let root = dir.path().to_str().unwrap().to_string();
    let args = ["--models-root", root.as_str(), "--admin-token", TOKEN];
    let mut s = common::process::Served::start(&args, &[]);
    let stuck = stalled_at(s.url.clone(), None).await;
    let channel = Endpoint::from_shared(s.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse().unwrap();
    let mut ctl = proto::model_control_client::ModelControlClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", auth.clone());
            Ok(r)
        },
    );
    let mut req = reload_to_tiny(dir.path(), 2, "");
    req.drain_timeout_ms = Some(600_000);
    let mut events = ctl.reload(req).await.unwrap().into_inner();
    // The stalled stream keeps the old version in flight: the reload stays in its drain.
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.message())
            .await
            .expect("no drain within 60 s")
            .unwrap()
            .expect("the reload ended without draining");
        if let Some(Event::Phase(p)) = ev.event {
            if p.phase() == proto::Phase::Drain {
                break;
            }
        }
    }
    s.child.kill().unwrap(); // SIGKILL at drain start: no chance to clean up
    s.child.wait().unwrap();
    drop(stuck);
    let audit = std::fs::read_to_string(dir.path().join(".swapd/audit.jsonl")).unwrap();
    let commit: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["stage"] == "commit")
        .unwrap_or_else(|| panic!("no commit line: {audit}"));
    assert_eq!(commit["committed"], true);
    assert_eq!(commit["to_generation"], 2);
    assert_eq!(commit["from_generation"], 1);
    // The restart serves what the audit line says was committed.
    let s = common::process::Served::start(&args, &[]);
    let mut client = proto::inference_client::InferenceClient::new(
        Endpoint::from_shared(s.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let info = client
        .get_model(proto::GetModelRequest { model: LLM.into() })
        .await
        .unwrap()
        .into_inner();
    let v = info.version.unwrap();
    assert_eq!(v.generation, 2);
    assert_eq!(Some(v.version.as_str()), commit["to_version"].as_str());
}
