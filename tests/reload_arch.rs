//! Hot reload from one architecture to another under load: the tiny llama, qwen2, phi3,
//! llama 3 and qwen3 files (different layouts, tokenizers and vocabularies) take turns as
//! `tiny-llm` while clients stream. `compatibility` allows it and says what changed; no
//! request fails, no stream mixes versions, and every stream's tokens are its named
//! version's own greedy output.
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use swapd::model::synth::{write_tiny_llama_gguf, TinyLlm, Variant};
use swapd::proto;

const LLM: &str = "tiny-llm";
const PROMPTS: [&str; 3] = ["hello the world", "in the other", "an order"];

/// One served request: its version's generation, the prompt's index, the text and ids.
type Served = (u64, usize, String, Vec<u32>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_across_architectures_under_load_lose_and_mix_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.admin_token = Some(TOKEN.into());
    // The first version is the manifest's (llama); then the others in turn, and back.
    let order = [
        Variant::Qwen2,
        Variant::Phi3,
        Variant::Llama3,
        Variant::Qwen3,
        Variant::Llama,
    ];
    let mut files = HashMap::new();
    for v in Variant::ALL {
        let name = format!("{}.gguf", v.name());
        let path = dir.path().join("tiny-llm").join(&name);
        let opts = TinyLlm {
            seed: 1,
            variant: v,
            ..Default::default()
        };
        write_tiny_llama_gguf(&path, &opts).unwrap();
        // What each version must answer: its own greedy output, computed here.
        let llm = swapd::model::Llm::load(v.name(), &path, &candle_core::Device::Cpu, 256).unwrap();
        let want: Vec<(String, Vec<u32>)> = PROMPTS
            .iter()
            .map(|p| llm.greedy_text(p, 10).unwrap())
            .collect();
        files.insert(v, (format!("tiny-llm/{name}"), sha(&path), want));
    }
    let server = TestServer::start(config).await;

    // generation → the variant serving it (generation 1: the manifest's llama).
    let serving: Arc<Mutex<HashMap<u64, Variant>>> =
        Arc::new(Mutex::new(HashMap::from([(1, Variant::Llama)])));
    let seen: Arc<Mutex<Vec<Served>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..4 {
        let mut client = server.client().await;
        let (stop, seen) = (stop.clone(), seen.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let p = (i + n) % PROMPTS.len();
                let out = collect(&mut client, greedy(LLM, PROMPTS[p], 10))
                    .await
                    .unwrap_or_else(|e| panic!("client {i}: request failed during reloads: {e}"));
                let g = out.versions[0].generation;
                assert!(
                    out.versions.iter().all(|v| v.generation == g),
                    "client {i}: a stream mixed versions"
                );
                seen.lock().unwrap().push((g, p, out.text, out.ids));
                n += 1;
            }
        }));
    }

    let mut previous = Variant::Llama;
    for (n, v) in order.iter().cycle().take(2 * order.len()).enumerate() {
        let (source, digest, _) = &files[v];
        let file = source.rsplit('/').next().unwrap().to_string();
        let req = proto::ReloadRequest {
            model: LLM.into(),
            source: source.clone(),
            sha256: HashMap::from([(file, digest.clone())]),
            ..Default::default()
        };
        let (phases, result) = reload(&server, req).await;
        assert!(
            result.committed,
            "reload {n} to {}: {}",
            v.name(),
            result.error
        );
        let generation = result.version.as_ref().unwrap().generation;
        serving.lock().unwrap().insert(generation, *v);
        let compat = phases
            .iter()
            .filter_map(|p| p.check.as_ref())
            .find(|c| c.name == "compatibility")
            .expect("a compatibility check");
        assert!(compat.passed, "{compat:?}");
        if previous.arch() != v.arch() {
            let change = format!("architecture changed: {} → {}", previous.arch(), v.arch());
            assert!(compat.detail.contains(&change), "{compat:?}");
        }
        previous = *v;
        // Let every client finish a request or two on this version.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let serving = serving.lock().unwrap();
    let seen = seen.lock().unwrap();
    let mut per_variant: HashMap<Variant, usize> = HashMap::new();
    for (g, p, text, ids) in seen.iter() {
        let v = serving[g];
        let (want_text, want_ids) = &files[&v].2[*p];
        assert!(
            !ids.is_empty() && want_ids.starts_with(ids) && want_text.starts_with(text.as_str()),
            "generation {g} ({}), prompt {:?}: streamed {ids:?} {text:?}, its own output is {want_ids:?} {want_text:?}",
            v.name(),
            PROMPTS[*p]
        );
        *per_variant.entry(v).or_default() += 1;
    }
    for v in Variant::ALL {
        assert!(
            per_variant.get(&v).copied().unwrap_or(0) > 0,
            "no request was served by {}",
            v.name()
        );
    }
}
