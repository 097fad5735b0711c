//! Memory admission: when two versions do not fit, a reload is refused, or (resource-
//! preserving) the old version drains and frees first while requests wait, so the peak stays
//! near one version; a new version that fails brings the old one back. Alone in its own test
//! binary because it measures the process's RSS.
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use swapd::proto::{self, MemoryPolicy, Phase};

const LLM: &str = "smollm2-135m-instruct";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_that_do_not_fit_are_refused_or_swapped_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = real_config();
    config.manifest.models.retain(|m| m.name == LLM);
    // Serve from a temp root holding a copy plus a poisoned version.
    let spec = &mut config.manifest.models[0];
    let smol = dir.path().join("smollm2");
    std::fs::create_dir_all(&smol).unwrap();
    std::fs::copy(repo_models().join(&spec.source), smol.join("a.gguf")).unwrap();
    swapd::model::synth::poison_gguf_nan(&smol.join("a.gguf"), &smol.join("nan.gguf")).unwrap();
    spec.source = "smollm2/a.gguf".into();
    spec.sha256 = [("a.gguf".to_string(), sha(&smol.join("a.gguf")))].into();
    let mut config = swapd::config::Config::with_manifest(dir.path(), config.manifest).unwrap();
    config.admin_token = Some(TOKEN.into());
    let weights = swapd::model::llm::weight_bytes_of(&smol.join("a.gguf"), test_on_cpu()).unwrap();
    // What admission counts for a version: its weights and its KV cache budget.
    let resident = swapd::model::llm::resident_bytes_of(
        &smol.join("a.gguf"),
        test_on_cpu(),
        config.limits.kv_cache_tokens,
    )
    .unwrap();
    config.memory_budget = Some(resident * 3 / 2);
    let server = TestServer::start(config).await;
    let original = server
        .registry
        .slot(LLM)
        .unwrap()
        .active()
        .unwrap()
        .version
        .clone();
    let mut ctl = control(&server).await;
    let req = |policy: MemoryPolicy, source: &str, file: &str| proto::ReloadRequest {
        model: LLM.into(),
        source: source.into(),
        sha256: [(file.to_string(), sha(&smol.join(file)))]
            .into_iter()
            .collect(),
        memory_policy: policy as i32,
        // The active version's files again (what matters here is the memory path).
        force: true,
        ..Default::default()
    };

    // Default policy: refused at admission, and the stream ends RESOURCE_EXHAUSTED.
    let mut stream = ctl
        .reload(req(MemoryPolicy::Default, "smollm2/a.gguf", "a.gguf"))
        .await
        .unwrap()
        .into_inner();
    let mut result = None;
    let status = loop {
        match stream.message().await {
            Ok(Some(ev)) => {
                if let Some(proto::reload_event::Event::Result(r)) = ev.event {
                    result = Some(r);
                }
            }
            Ok(None) => panic!("the refused reload ended OK"),
            Err(s) => break s,
        }
    };
    let r = result.unwrap();
    assert!(!r.committed);
    assert_eq!(r.failed_phase(), Phase::Admit);
    assert!(r.error.contains("memory budget"), "{}", r.error);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // Resource-preserving under load: nothing fails, the peak stays near one version.
    let mut client = server.client().await;
    collect(&mut client, greedy(LLM, "Hello", 4)).await.unwrap();
    let steady = swapd::memory::rss_bytes();
    let peak = Arc::new(AtomicU64::new(steady));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(swapd::memory::rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut clients = Vec::new();
    for i in 0..4 {
        let (mut c, stop) = (server.client().await, stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                collect(&mut c, greedy(LLM, &format!("Count to {i}:"), 6))
                    .await
                    .expect("no request fails during a resource-preserving reload");
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (phases, r) = reload(
        &server,
        req(MemoryPolicy::ResourcePreserving, "smollm2/a.gguf", "a.gguf"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for c in clients {
        served += c.await.unwrap();
    }
    sampler.await.unwrap();
    assert!(r.committed, "{}", r.error);
    let order: Vec<Phase> = phases
        .iter()
        .filter(|p| p.state() == proto::PhaseState::Done)
        .map(|p| p.phase())
        .collect();
    assert_eq!(
        order,
        [
            Phase::Resolve,
            Phase::Verify,
            Phase::Admit,
            Phase::Drain,
            Phase::Free,
            Phase::Load,
            Phase::Preflight,
            Phase::Swap
        ]
    );
    let peak = peak.load(Ordering::Relaxed);
    eprintln!("steady RSS {steady}, peak {peak}, one version {weights}, {served} requests served");
    assert!(served > 4);
    assert!(
        peak < steady + weights / 2,
        "peak RSS {peak} vs steady {steady}: more than half a version ({weights}) extra"
    );

    // A new version that fails its checks: the old one is loaded back and serves.
    let (_, r) = reload(
        &server,
        req(
            MemoryPolicy::ResourcePreserving,
            "smollm2/nan.gguf",
            "nan.gguf",
        ),
    )
    .await;
    assert!(!r.committed);
    assert!(r.error.contains("was loaded back"), "{}", r.error);
    let out = collect(&mut client, greedy(LLM, "The capital of France is", 3))
        .await
        .unwrap();
    assert_eq!(out.versions[0].version, original);
    assert_eq!(out.text, " Paris.\n");
}
