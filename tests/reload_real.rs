//! Hot reload with the real SmolLM2: two real versions (the shipped GGUF and a perturbed
//! copy whose greedy outputs differ) alternate under streaming load, and every stream's text
//! is exactly what its named version produces alone.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use swapd::config::Config;
use swapd::manifest::Manifest;
use swapd::proto;

const LLM: &str = "smollm2-135m-instruct";
const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "One, two, three, four,",
    "def fibonacci(n):\n",
    "Water boils at",
];

/// A version's source and the digests that pin it.
type Pinned = (String, BTreeMap<String, String>);

/// A models root holding the real GGUF and a perturbed copy; returns the config and both
/// versions.
fn two_real_versions(root: &Path) -> (Config, [Pinned; 2]) {
    let real = real_config();
    let spec = real.manifest.get(LLM).unwrap().clone();
    let original = repo_models().join(&spec.source);
    let dir = root.join("smollm2");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&original, dir.join("a.gguf")).unwrap();
    swapd::model::synth::perturb_gguf(&original, &dir.join("b.gguf"), 7, 0.15).unwrap();
    let version = |name: &str| {
        (
            format!("smollm2/{name}"),
            BTreeMap::from([(name.to_string(), sha(&dir.join(name)))]),
        )
    };
    let (a, b) = (version("a.gguf"), version("b.gguf"));
    let mut spec = spec;
    spec.source = a.0.clone();
    spec.sha256 = a.1.clone();
    let mut config = Config::with_manifest(root, Manifest { models: vec![spec] }).unwrap();
    config.admin_token = Some(TOKEN.into());
    config.limits.max_concurrent = 8;
    (config, [a, b])
}

/// A reload request that makes `v` the active version.
fn switch_to((source, pins): &Pinned) -> proto::ReloadRequest {
    proto::ReloadRequest {
        model: LLM.into(),
        source: source.clone(),
        sha256: pins.clone().into_iter().collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_versions_swap_under_load_and_every_stream_is_one_versions_output() {
    let dir = tempfile::tempdir().unwrap();
    let (config, versions) = two_real_versions(dir.path());
    let server = TestServer::start(config).await;
    let mut client = server.client().await;

    // Each version's greedy output for each prompt, measured alone.
    let mut expected: HashMap<(String, &str), String> = HashMap::new();
    for i in [1, 0] {
        let (_, r) = reload(&server, switch_to(&versions[i])).await;
        assert!(r.committed, "{}", r.error);
        for p in PROMPTS {
            let out = collect(&mut client, greedy(LLM, p, 10)).await.unwrap();
            expected.insert((out.versions[0].version.clone(), p), out.text);
        }
    }
    let version_ids: Vec<&String> = expected.keys().map(|(v, _)| v).collect();
    let (va, vb) = (
        version_ids[0].clone(),
        version_ids
            .iter()
            .find(|v| **v != version_ids[0])
            .unwrap()
            .to_string(),
    );
    assert!(
        PROMPTS
            .iter()
            .any(|p| expected[&(va.clone(), *p)] != expected[&(vb.clone(), *p)]),
        "the two versions should answer differently"
    );
    let expected = Arc::new(expected);

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..8 {
        let (mut c, stop, expected) = (server.client().await, stop.clone(), expected.clone());
        clients.push(tokio::spawn(async move {
            let mut served = 0;
            let mut last_gen = 0;
            while !stop.load(Ordering::Relaxed) {
                let p = PROMPTS[(i + served) % PROMPTS.len()];
                let out = collect(&mut c, greedy(LLM, p, 10))
                    .await
                    .expect("no request fails during reloads");
                let v = &out.versions[0];
                assert!(
                    out.versions.iter().all(|x| x == v),
                    "a stream mixed versions"
                );
                assert!(v.generation >= last_gen, "generation went backwards");
                last_gen = v.generation;
                assert_eq!(
                    out.text,
                    expected[&(v.version.clone(), p)],
                    "stream text is not version {}'s",
                    v.version
                );
                served += 1;
            }
            served
        }));
    }
    // Version 0 is active after the warm-up: alternate 1, 0, 1, ...
    for n in 0..6 {
        let (_, r) = reload(&server, switch_to(&versions[(n + 1) % 2])).await;
        assert!(r.committed, "reload {n}: {}", r.error);
        assert!(
            r.previous_freed,
            "reload {n}: the old version was not freed"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    assert!(total >= 8, "only {total} streams completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_real_versions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = two_real_versions(dir.path());
    let server = TestServer::start(config).await;
    let smol = dir.path().join("smollm2");
    // A truncated download.
    let bytes = std::fs::read(smol.join("a.gguf")).unwrap();
    std::fs::write(smol.join("cut.gguf"), &bytes[..bytes.len() - 4096]).unwrap();
    // A NaN in a norm: the quantized matmuls would hide it from the logits.
    swapd::model::synth::poison_gguf_nan(&smol.join("a.gguf"), &smol.join("nan.gguf")).unwrap();
    for (file, phase, check) in [
        ("cut.gguf", proto::Phase::Admit, "format"),
        ("nan.gguf", proto::Phase::Load, "finite_weights"),
    ] {
        let (_, r) = reload(
            &server,
            proto::ReloadRequest {
                model: LLM.into(),
                source: format!("smollm2/{file}"),
                sha256: [(file.to_string(), sha(&smol.join(file)))]
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
        )
        .await;
        assert!(!r.committed, "{file} committed");
        assert_eq!(
            (r.failed_phase(), r.failed_check.as_str()),
            (phase, check),
            "{file}: {}",
            r.error
        );
    }
    let mut client = server.client().await;
    let out = collect(&mut client, greedy(LLM, "The capital of France is", 3))
        .await
        .unwrap();
    assert_eq!(out.text, " Paris.\n");
}
