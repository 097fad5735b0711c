//! Hot reload over gRPC on loopback: no request lost or mixed while versions swap, broken
//! versions refused at the right phase, one reload at a time, compare-and-swap, drain
//! policies, rollback, and the admin token.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use swapd::config::Config;
use swapd::proto::{self, Phase};
use tonic::Code;

const LLM: &str = "tiny-llm";

fn tiny_with_token(dir: &Path) -> Config {
    let mut c = tiny_config(dir);
    c.admin_token = Some(TOKEN.into());
    c
}

fn reload_req(source: &str, pins: &BTreeMap<String, String>) -> proto::ReloadRequest {
    proto::ReloadRequest {
        model: LLM.into(),
        source: source.into(),
        sha256: pins.clone().into_iter().collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_lose_and_mix_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(tiny_with_token(dir.path())).await;
    let versions = [
        tiny_version(dir.path(), 1, ""),
        tiny_version(dir.path(), 2, ""),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..8 {
        let mut client = server.client().await;
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let (mut served, mut last_gen, mut gens) =
                (0u32, 0u64, std::collections::HashSet::new());
            while !stop.load(Ordering::Relaxed) {
                let out = collect(&mut client, greedy(LLM, &format!("hello {i}"), 12))
                    .await
                    .unwrap_or_else(|e| panic!("client {i}: request failed during reloads: {e}"));
                let first = &out.versions[0];
                assert!(
                    out.versions.iter().all(|v| v == first),
                    "client {i}: a stream mixed versions"
                );
                assert!(
                    first.generation >= last_gen,
                    "client {i}: generation went backwards"
                );
                last_gen = first.generation;
                gens.insert(first.generation);
                served += 1;
            }
            (served, gens.len())
        }));
    }
    let mut weak_dead = 0;
    for n in 0..50 {
        let (source, pins) = &versions[n % 2];
        let (phases, result) = reload(&server, reload_req(source, pins)).await;
        assert!(result.committed, "reload {n}: {}", result.error);
        assert_eq!(result.version.as_ref().unwrap().generation, n as u64 + 2);
        let seen: Vec<i32> = phases
            .iter()
            .filter(|p| p.state() == proto::PhaseState::Done)
            .map(|p| p.phase)
            .collect();
        let all = [
            Phase::Resolve,
            Phase::Verify,
            Phase::Admit,
            Phase::Load,
            Phase::Preflight,
            Phase::Swap,
            Phase::Drain,
            Phase::Free,
        ];
        assert_eq!(seen, all.map(|p| p as i32), "reload {n}: phases");
        weak_dead += result.previous_freed as u32;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (served, distinct) = c.await.unwrap();
        assert!(served > 0);
        total += served;
        let _ = distinct;
    }
    assert!(
        total >= 50,
        "only {total} requests served during 50 reloads"
    );
    assert_eq!(
        weak_dead, 50,
        "every replaced version was freed (its Weak is dead)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_versions_are_refused_at_the_right_phase_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_with_token(dir.path());
    // The serving version's own greedy output is the golden expectation.
    let golden_text = {
        let llm = swapd::model::Llm::load(
            "x",
            &dir.path().join("tiny-llm/tiny.gguf"),
            &candle_core::Device::Cpu,
            256,
        )
        .unwrap();
        llm.greedy_text("golden prompt", 8).unwrap().0
    };
    config.manifest.models[0].preflight.golden = vec![swapd::manifest::Golden {
        prompt: "golden prompt".into(),
        contains: Some(golden_text),
        token_prefix: vec![],
    }];
    let server = TestServer::start(config).await;
    let before = server
        .registry
        .slot(LLM)
        .unwrap()
        .active()
        .unwrap()
        .version
        .clone();

    let (nan_src, nan_pins) = tiny_version(dir.path(), 1, "-nan");
    let (inf_src, inf_pins) = tiny_version(dir.path(), 1, "-inf");
    let (v2_src, v2_pins) = tiny_version(dir.path(), 2, "");
    let truncated = dir.path().join("tiny-llm/truncated.gguf");
    let bytes = std::fs::read(dir.path().join("tiny-llm/v2.gguf")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let trunc_pins = BTreeMap::from([("truncated.gguf".to_string(), sha(&truncated))]);
    let wrong_pins = BTreeMap::from([("v2.gguf".to_string(), "ab".repeat(32))]);

    let cases = [
        (
            "truncated",
            reload_req("tiny-llm/truncated.gguf", &trunc_pins),
            Phase::Admit,
            "format",
            "truncated",
        ),
        (
            "NaN weights",
            reload_req(&nan_src, &nan_pins),
            Phase::Load,
            "finite_weights",
            "non-finite values",
        ),
        (
            "infinite logits",
            reload_req(&inf_src, &inf_pins),
            Phase::Preflight,
            "finite_logits",
            "not finite",
        ),
        (
            "wrong sha256",
            reload_req(&v2_src, &wrong_pins),
            Phase::Verify,
            "sha256",
            "sha256 mismatch",
        ),
        (
            "fails golden",
            reload_req(&v2_src, &v2_pins),
            Phase::Preflight,
            "golden",
            "lacks",
        ),
        (
            "outside root",
            reload_req("../elsewhere.gguf", &v2_pins),
            Phase::Resolve,
            "",
            "not found",
        ),
        (
            "missing file",
            reload_req("tiny-llm/nope.gguf", &v2_pins),
            Phase::Resolve,
            "",
            "not found",
        ),
    ];
    for (what, req, phase, check, needle) in cases {
        let (phases, result) = reload(&server, req).await;
        assert!(!result.committed, "{what} committed");
        assert_eq!(result.failed_phase(), phase, "{what}: {}", result.error);
        assert_eq!(result.failed_check, check, "{what}");
        assert!(
            result.error.contains(needle),
            "{what}: {:?} lacks {needle:?}",
            result.error
        );
        assert!(phases
            .iter()
            .any(|p| p.state() == proto::PhaseState::Failed && p.phase() == phase));
        // The old version keeps answering, untouched.
        let mut client = server.client().await;
        let out = collect(&mut client, greedy(LLM, "still there?", 3))
            .await
            .unwrap();
        assert_eq!(out.versions[0].version, before, "{what}");
        assert_eq!(out.versions[0].generation, 1, "{what}");
    }
    let mut ctl = control(&server).await;
    let st = ctl
        .status(proto::StatusRequest { model: LLM.into() })
        .await
        .unwrap()
        .into_inner();
    let last = st.models[0].last_result.clone().unwrap();
    assert!(!last.committed && last.error.contains("not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reload_at_a_time_compare_and_swap_and_cancel_drain() {
    let mut config = real_config();
    config.admin_token = Some(TOKEN.into());
    let server = TestServer::start(config).await;
    let real = "smollm2-135m-instruct";
    let mut client = server.client().await;
    // A long generation pins the serving version, so the reload waits in its drain phase.
    let mut straggler = client
        .generate(greedy(real, "1, 2, 3, 4, 5, 6,", 1500))
        .await
        .unwrap()
        .into_inner();
    straggler.message().await.unwrap().unwrap();
    let mut ctl = control(&server).await;
    let req = proto::ReloadRequest {
        model: real.into(),
        drain_timeout_ms: Some(1500),
        drain_policy: proto::DrainPolicy::Cancel as i32,
        // The same files again (the point is the drain): forced past "already active".
        force: true,
        ..Default::default()
    };
    let first = ctl.reload(req.clone()).await.unwrap().into_inner();
    // Wait until the first reload is draining, then try a second: ABORTED at once.
    let t = Instant::now();
    loop {
        let st = ctl
            .status(proto::StatusRequest { model: real.into() })
            .await
            .unwrap()
            .into_inner();
        if st.models[0].reload_phase() == Phase::Drain {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "reload never reached drain"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let asked = Instant::now();
    let e = ctl.reload(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(
        e.message().contains("already running") && e.message().contains("Drain"),
        "{}",
        e.message()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "the second reload was queued"
    );
    // The straggler is ended with a clear status after the deadline.
    let err = loop {
        match straggler.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("straggler finished normally"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("was replaced"), "{}", err.message());
    let (_, result) = reload_events(first).await;
    assert!(result.committed);
    assert_eq!(result.cancelled_requests, 1);
    assert!(result.previous_freed);
    assert_eq!(result.version.as_ref().unwrap().generation, 2);

    // Compare-and-swap: generation 1 is stale now.
    let e = ctl
        .reload(proto::ReloadRequest {
            expected_generation: Some(1),
            ..req.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains("serves generation 2, not the expected 1"),
        "{}",
        e.message()
    );
    let (_, ok) = reload(
        &server,
        proto::ReloadRequest {
            expected_generation: Some(2),
            ..req
        },
    )
    .await;
    assert!(ok.committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_from_a_resident_standby_needs_no_load() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(tiny_with_token(dir.path())).await;
    let original = server
        .registry
        .slot(LLM)
        .unwrap()
        .active()
        .unwrap()
        .version
        .clone();
    let (src, pins) = tiny_version(dir.path(), 2, "");
    let mut req = reload_req(&src, &pins);
    req.keep_previous = true;
    let (_, result) = reload(&server, req).await;
    assert!(result.committed);
    let mut ctl = control(&server).await;
    let st = ctl
        .status(proto::StatusRequest { model: LLM.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.models[0]
            .standby
            .as_ref()
            .unwrap()
            .version
            .as_ref()
            .unwrap()
            .version,
        original
    );

    let (phases, rb) = rollback(&server, LLM).await;
    assert!(rb.committed, "{}", rb.error);
    assert!(
        phases.iter().all(|p| p.phase() != Phase::Load),
        "rollback loaded"
    );
    let v = rb.version.unwrap();
    assert_eq!(v.version, original);
    assert_eq!(v.generation, 3, "generations never go backwards");
    let mut client = server.client().await;
    let out = collect(&mut client, greedy(LLM, "hello", 2)).await.unwrap();
    assert_eq!(out.versions[0].version, original);

    // Without a resident standby, rollback reloads the previous files through every check.
    let (_, r) = reload(&server, reload_req(&src, &pins)).await;
    assert!(r.committed);
    let (phases, rb) = rollback(&server, LLM).await;
    assert!(rb.committed, "{}", rb.error);
    assert!(phases.iter().any(|p| p.phase() == Phase::Load));
    assert!(phases.iter().any(|p| p.phase() == Phase::Preflight));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_calls_need_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(tiny_with_token(dir.path())).await;
    let mut bare = proto::model_control_client::ModelControlClient::new(server.channel().await);
    let e = bare
        .status(proto::StatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = bare
        .reload(proto::ReloadRequest {
            model: LLM.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut ctl = control(&server).await;
    let st = ctl
        .status(proto::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.models.len(), 2);
    drop(server);

    // No token configured: refused, saying how to fix it.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(tiny_config(dir.path())).await;
    let e = control(&server)
        .await
        .status(proto::StatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("SWAPD_ADMIN_TOKEN"), "{}", e.message());
    drop(server);

    // Explicitly turned off: allowed.
    let mut c = tiny_config(dir.path());
    c.control_auth = false;
    let server = TestServer::start(c).await;
    let mut bare = proto::model_control_client::ModelControlClient::new(server.channel().await);
    assert!(bare.status(proto::StatusRequest::default()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_manifest_change_reloads_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_with_token(dir.path());
    config.manifest_poll = Some(Duration::from_millis(100));
    let server = TestServer::start(config).await;
    let (src, pins) = tiny_version(dir.path(), 2, "");
    point_manifest_at(dir.path(), &src, &pins);
    let slot = server.registry.slot(LLM).unwrap();
    let t = Instant::now();
    while slot.active().unwrap().generation() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the manifest change was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(slot.active().unwrap().source, src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rollback_fires_on_an_error_spike() {
    // The real model, so that a generation outlives a short deadline: the spike is requests
    // missing their deadlines on the new version.
    let mut config = real_config();
    config.admin_token = Some(TOKEN.into());
    config
        .manifest
        .models
        .retain(|m| m.kind == swapd::model::ModelKind::Llm);
    config.auto_rollback = Some(swapd::registry::reload::AutoRollback {
        window: Duration::from_secs(60),
        min_requests: 5,
        max_error_rate: 0.5,
    });
    let real = "smollm2-135m-instruct";
    let server = TestServer::start(config).await;
    let slot = server.registry.slot(real).unwrap();
    let original = slot.active().unwrap();
    let mut ctl = control(&server).await;
    let (_, r) = reload(
        &server,
        proto::ReloadRequest {
            model: real.into(),
            keep_previous: true,
            // The same files again: a second copy of the version, which the standby keeps.
            force: true,
            ..Default::default()
        },
    )
    .await;
    assert!(r.committed);
    let new_generation = r.version.unwrap().generation;
    let mut client = server.client().await;
    // Healthy traffic: no rollback.
    for _ in 0..5 {
        collect(&mut client, greedy(real, "hello", 4))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(slot.active().unwrap().generation(), new_generation);
    // The spike: every request misses its deadline on the new version.
    for _ in 0..8 {
        let mut r = tonic::Request::new(greedy(real, "1, 2, 3, 4, 5, 6,", 500));
        r.set_timeout(Duration::from_millis(250));
        let e = async {
            let mut s = client.generate(r).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        }
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded);
    }
    let t = Instant::now();
    while !Arc::ptr_eq(&slot.active().unwrap(), &original) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no automatic rollback"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = ctl
        .status(proto::StatusRequest { model: real.into() })
        .await
        .unwrap()
        .into_inner();
    let why = &st.models[0].auto_rollback_reason;
    assert!(
        // The watch polls every 50 ms: it may count a failure or two more than the sixth.
        why.contains("automatic rollback")
            && (6..=8).any(|f| why.contains(&format!("{f} of {} requests failed", f + 5))),
        "{why}"
    );
    assert_eq!(
        st.models[0]
            .active
            .as_ref()
            .unwrap()
            .version
            .as_ref()
            .unwrap()
            .generation,
        new_generation + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_added_to_the_manifest_loads_through_the_same_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_with_token(dir.path());
    config.manifest_poll = Some(Duration::from_millis(50));
    let server = TestServer::start(config).await;
    let (src, pins) = tiny_version(dir.path(), 3, "");
    let manifest = dir.path().join("models.toml");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str(&format!(
        "\n[[model]]\nname = \"newcomer\"\nkind = \"llm\"\nsource = \"{src}\"\n[model.sha256]\n\"v3.gguf\" = \"{}\"\n",
        pins["v3.gguf"]
    ));
    std::fs::write(&manifest, text).unwrap();
    let t = Instant::now();
    let mut client = server.client().await;
    loop {
        match collect(&mut client, greedy("newcomer", "hello", 3)).await {
            Ok(out) => {
                assert_eq!(out.versions[0].generation, 1);
                break;
            }
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::NotFound | Code::Unavailable),
                    "{e:?}"
                );
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "newcomer never served"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let mut ctl = control(&server).await;
    let st = ctl
        .status(proto::StatusRequest {
            model: "newcomer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(st.models[0].last_result.as_ref().unwrap().committed);
}
