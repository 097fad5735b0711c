//! What operators see: Prometheus metrics moving through a real-model reload, health
//! transitions through `Watch`, and request ids echoed back.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use swapd::config::Config;
use swapd::manifest::Manifest;
use swapd::proto::{self, Phase, PhaseState};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const LLM: &str = "smollm2-135m-instruct";

fn phase_counts(s: &[swapd::metrics::Sample]) -> BTreeMap<String, f64> {
    s.iter()
        .filter(|x| x.name == "swapd_reload_phase_seconds_count" && x.label("model") == Some(LLM))
        .map(|x| (x.label("phase").unwrap().to_string(), x.value))
        .collect()
}

fn active_version(s: &[swapd::metrics::Sample]) -> String {
    let info: Vec<_> = s
        .iter()
        .filter(|x| x.name == "swapd_active_model_info" && x.label("model") == Some(LLM))
        .collect();
    assert_eq!(info.len(), 1, "one active version per model: {info:?}");
    assert_eq!(info[0].value, 1.0);
    info[0].label("version").unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_real_model_reload() {
    // The shipped SmolLM2 and a perturbed copy (a real second version).
    let dir = tempfile::tempdir().unwrap();
    let real = real_config();
    let mut spec = real.manifest.get(LLM).unwrap().clone();
    let smol = dir.path().join("smollm2");
    std::fs::create_dir_all(&smol).unwrap();
    std::fs::copy(repo_models().join(&spec.source), smol.join("a.gguf")).unwrap();
    swapd::model::synth::perturb_gguf(&smol.join("a.gguf"), &smol.join("b.gguf"), 7, 0.15).unwrap();
    spec.source = "smollm2/a.gguf".into();
    spec.sha256 = BTreeMap::from([("a.gguf".to_string(), sha(&smol.join("a.gguf")))]);
    let mut config = Config::with_manifest(dir.path(), Manifest { models: vec![spec] }).unwrap();
    config.admin_token = Some(TOKEN.into());
    let server = TestServer::start(config).await;

    let before = scrape(server.metrics_addr).await;
    let old = active_version(&before);
    let inflight = |s: &[swapd::metrics::Sample], v: &str| {
        value(
            s,
            "swapd_inflight_requests",
            &[("model", LLM), ("version", v)],
        )
    };
    assert_eq!(inflight(&before, &old), Some(0.0));
    assert!(
        value(&before, "swapd_model_memory_bytes", &[("version", &old)]).unwrap() > 9e7,
        "one SmolLM2 version holds over 90 MB (its quantized weights)"
    );
    let phases_before = phase_counts(&before);

    // A long stream holds the old version through the reload.
    let mut client = server.client().await;
    let mut stream = client
        .generate(greedy(LLM, "Once upon a time", 2000))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first delta");
    let during_stream = scrape(server.metrics_addr).await;
    assert_eq!(inflight(&during_stream, &old), Some(1.0));

    let mut ctl = control(&server).await;
    let mut events = ctl
        .reload(proto::ReloadRequest {
            model: LLM.into(),
            source: "smollm2/b.gguf".into(),
            sha256: [("b.gguf".to_string(), sha(&smol.join("b.gguf")))].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Wait for the drain to start: the new version is active, the old one still streams.
    loop {
        let ev = events.message().await.unwrap().expect("reload events");
        if let Some(proto::reload_event::Event::Phase(p)) = ev.event {
            if p.phase == Phase::Drain as i32 && p.state == PhaseState::Started as i32 {
                break;
            }
        }
    }
    let draining = scrape(server.metrics_addr).await;
    let new = active_version(&draining);
    assert_ne!(new, old, "the active version label changed at the swap");
    assert_eq!(
        inflight(&draining, &old),
        Some(1.0),
        "the old version still streams"
    );
    assert_eq!(
        draining
            .iter()
            .find(|x| x.name == "swapd_inflight_requests" && x.label("version") == Some(&old))
            .and_then(|x| x.label("role")),
        Some("retiring")
    );
    assert_eq!(
        value(&draining, "swapd_reload_in_progress", &[("model", LLM)]),
        Some(1.0)
    );
    // Both versions are resident during the drain.
    assert!(value(&draining, "swapd_model_memory_bytes", &[("version", &new)]).is_some());
    assert!(value(&draining, "swapd_model_memory_bytes", &[("version", &old)]).is_some());

    // The client leaves; the old version drains and is freed.
    drop(stream);
    let (_, result) = reload_events(events).await;
    assert!(result.committed, "{}", result.error);
    assert!(result.previous_freed);

    let after = scrape(server.metrics_addr).await;
    assert_eq!(active_version(&after), new);
    // The freed version's series is gone (nothing holds it); none may report in-flight work.
    assert!(
        inflight(&after, &old).unwrap_or(0.0) == 0.0,
        "old version still in flight"
    );
    assert!(value(&after, "swapd_model_memory_bytes", &[("version", &old)]).is_none());
    assert_eq!(inflight(&after, &new), Some(0.0));
    assert_eq!(
        value(&after, "swapd_reload_in_progress", &[("model", LLM)]),
        Some(0.0)
    );
    // One sample per phase, for each of the eight phases.
    let phases_after = phase_counts(&after);
    for phase in swapd::registry::reload::Phase::ALL.map(swapd::registry::reload::phase_name) {
        let was = phases_before.get(phase).copied().unwrap_or(0.0);
        assert_eq!(
            phases_after.get(phase).copied(),
            Some(was + 1.0),
            "phase {phase}: {phases_after:?}"
        );
    }
    assert_eq!(
        value(
            &after,
            "swapd_reload_total",
            &[
                ("model", LLM),
                ("action", "reload"),
                ("result", "committed")
            ]
        ),
        Some(1.0)
    );
    assert!(
        value(
            &after,
            "swapd_memory_reclaimed_bytes_total",
            &[("model", LLM)]
        )
        .unwrap_or(0.0)
            > 0.0,
        "freeing a replaced version (about 97 MB on the CPU) gave memory back"
    );
    // The device's memory as admission sees it: on the CPU, the machine's MemAvailable of
    // MemTotal, read by the running server.
    let device = common::test_device();
    let device = if device == "cuda" { "cuda:0" } else { &device };
    let free = value(
        &after,
        "swapd_device_memory_free_bytes",
        &[("device", device)],
    )
    .unwrap();
    let total = value(
        &after,
        "swapd_device_memory_total_bytes",
        &[("device", device)],
    )
    .unwrap();
    assert!(0.0 < free && free < total, "{free} of {total} bytes free");
    if device == "cpu" {
        assert_eq!(total as u64, swapd::memory::total_bytes().unwrap());
    }
    // The stream the client left counts as CANCELLED, with its tokens counted.
    assert_eq!(
        value(
            &after,
            "swapd_requests_total",
            &[("model", LLM), ("rpc", "Generate"), ("code", "CANCELLED")]
        ),
        Some(1.0)
    );
    assert!(value(&after, "swapd_generated_tokens_total", &[("model", LLM)]).unwrap() >= 1.0);
    assert!(
        value(
            &after,
            "swapd_time_to_first_token_seconds_count",
            &[("model", LLM)]
        )
        .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_preflight_and_requests_are_counted_by_their_labels() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.admin_token = Some(TOKEN.into());
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    collect(&mut client, greedy("tiny-llm", "hello", 4))
        .await
        .unwrap();
    let err = collect(&mut client, greedy("no-such-model", "hello", 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let (_, result) = reload(&server, reload_to_tiny(dir.path(), 5, "-inf")).await;
    assert!(!result.committed);
    let s = scrape(server.metrics_addr).await;
    let ok = [("model", "tiny-llm"), ("rpc", "Generate"), ("code", "OK")];
    assert_eq!(value(&s, "swapd_requests_total", &ok), Some(1.0));
    // An unknown model's name never becomes a label value.
    let unknown = [("model", "_unknown"), ("code", "NOT_FOUND")];
    assert_eq!(value(&s, "swapd_requests_total", &unknown), Some(1.0));
    assert!(!s.iter().any(|x| x.label("model") == Some("no-such-model")));
    let failed = [("model", "tiny-llm"), ("result", "failed")];
    assert_eq!(value(&s, "swapd_reload_total", &failed), Some(1.0));
    let check = [
        ("model", "tiny-llm"),
        ("check", result.failed_check.as_str()),
    ];
    assert_eq!(
        value(&s, "swapd_preflight_failures_total", &check),
        Some(1.0),
        "failed check {:?}",
        result.failed_check
    );
}

/// Reads a Watch stream's next status, failing after a while.
async fn next_status(stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> i32 {
    tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("a health transition")
        .unwrap()
        .expect("the watch stream is open")
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_transitions_are_reported_through_watch() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.admin_token = Some(TOKEN.into());
    // Two LLM versions do not fit: a reload takes the resource-preserving path, during
    // which the model has no active version.
    let llm = swapd::model::llm::resident_bytes_of(
        &dir.path().join("tiny-llm/tiny.gguf"),
        test_on_cpu(),
        config.limits.kv_cache_tokens,
    )
    .unwrap();
    let bert = std::fs::metadata(dir.path().join("tiny-bert/model.safetensors"))
        .unwrap()
        .len();
    config.memory_budget = Some(bert + llm + llm / 2);
    config.memory_policy = swapd::registry::reload::MemoryPolicy::ResourcePreserving;
    let server = TestServer::start(config).await;
    let mut health = HealthClient::new(server.channel().await);
    let watch = |service: &str| {
        let mut h = health.clone();
        let req = HealthCheckRequest {
            service: service.into(),
        };
        async move { h.watch(req).await.unwrap().into_inner() }
    };
    let (mut model, mut overall, mut other) = (
        watch("tiny-llm").await,
        watch("").await,
        watch("tiny-bert").await,
    );
    let (serving, not_serving) = (
        ServingStatus::Serving as i32,
        ServingStatus::NotServing as i32,
    );
    assert_eq!(next_status(&mut model).await, serving);
    assert_eq!(next_status(&mut overall).await, serving);
    assert_eq!(next_status(&mut other).await, serving);

    let preserving = reload_to_tiny(dir.path(), 2, "");
    // Resource-preserving: NOT_SERVING while the model has no version, then SERVING.
    // A stream that never reads holds the old version: the reload stays suspended in its
    // drain (NOT_SERVING) until it goes, so no watcher can miss the state (health keeps
    // only the latest state, and a 10 ms suspension could pass between two looks).
    let stuck = common::stall::stalled(&server, None).await;
    let mut ctl = control(&server).await;
    let events = ctl.reload(preserving).await.unwrap().into_inner();
    assert_eq!(next_status(&mut model).await, not_serving);
    assert_eq!(next_status(&mut overall).await, not_serving);
    drop(stuck);
    let (_, result) = reload_events(events).await;
    assert!(result.committed, "{}", result.error);
    assert_eq!(next_status(&mut model).await, serving);
    assert_eq!(next_status(&mut overall).await, serving);

    // Shutdown: everything NOT_SERVING at once, and Check agrees.
    server.health.shutting_down(&server.registry).await;
    assert_eq!(next_status(&mut model).await, not_serving);
    assert_eq!(next_status(&mut overall).await, not_serving);
    assert_eq!(next_status(&mut other).await, not_serving);
    let check = health
        .check(HealthCheckRequest {
            service: swapd::health::INFERENCE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.status, not_serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fits_keeps_the_model_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.admin_token = Some(TOKEN.into());
    let server = TestServer::start(config).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut model = health
        .watch(HealthCheckRequest {
            service: "tiny-llm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut model).await, ServingStatus::Serving as i32);
    for seed in [2, 3] {
        let (_, result) = reload(&server, reload_to_tiny(dir.path(), seed, "")).await;
        assert!(result.committed, "{}", result.error);
    }
    // No transition was published: the next one is shutdown's.
    server.health.shutting_down(&server.registry).await;
    assert_eq!(
        next_status(&mut model).await,
        ServingStatus::NotServing as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_generated() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(tiny_config(dir.path())).await;
    let mut client = server.client().await;
    let mut req = tonic::Request::new(proto::ListModelsRequest {});
    req.metadata_mut()
        .insert("x-request-id", "trace-me-42".parse().unwrap());
    let resp = client.list_models(req).await.unwrap();
    assert_eq!(
        resp.metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "trace-me-42"
    );
    // None sent, or one that could forge log fields: a fresh one comes back.
    for sent in [None, Some("two words")] {
        let mut req = tonic::Request::new(greedy("tiny-llm", "hi", 2));
        if let Some(id) = sent {
            req.metadata_mut()
                .insert("x-request-id", id.parse().unwrap());
        }
        let resp = client.generate(req).await.unwrap();
        let id = resp
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    // Errors carry it too.
    let mut req = tonic::Request::new(greedy("nope", "hi", 2));
    req.metadata_mut()
        .insert("x-request-id", "err-1".parse().unwrap());
    let err = client.generate(req).await.unwrap_err();
    assert_eq!(
        err.metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "err-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_removed_from_the_manifest_is_unloaded_and_reported_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.manifest_poll = Some(Duration::from_millis(100));
    let server = TestServer::start(config).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut bert = health
        .watch(HealthCheckRequest {
            service: "tiny-bert".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut bert).await, ServingStatus::Serving as i32);
    let weak =
        std::sync::Arc::downgrade(&server.registry.slot("tiny-bert").unwrap().active().unwrap());

    // Drop the tiny-bert entry (the second one) from the manifest.
    let path = dir.path().join("models.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let second = text.match_indices("[[model]]").nth(1).unwrap().0;
    std::fs::write(&path, &text[..second]).unwrap();

    assert_eq!(
        next_status(&mut bert).await,
        ServingStatus::NotServing as i32
    );
    let mut client = server.client().await;
    let err = client
        .embed(proto::EmbedRequest {
            model: "tiny-bert".into(),
            texts: vec!["hello".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let models = client
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1, "{models:?}");
    // Its weights are freed (nothing holds them any more).
    let t = std::time::Instant::now();
    while weak.strong_count() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the unloaded version was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The other model serves on, so overall is SERVING again (every configured model is).
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overall.status, ServingStatus::Serving as i32);
}
