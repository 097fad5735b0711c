//! End-to-end tests with the real models (SmolLM2-135M-Instruct Q4_1, all-MiniLM-L6-v2) over
//! gRPC on loopback, against references computed outside the project (llama.cpp's ids and
//! greedy tokens; independently computed embeddings).
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde::Deserialize;
use swapd::proto::{self, generate_request::Input};

const LLM: &str = "smollm2-135m-instruct";
const EMB: &str = "all-minilm-l6-v2";

#[derive(Deserialize)]
struct LlamaCppRef {
    id: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

#[derive(Deserialize)]
struct EmbRef {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f64>,
}

fn llama_refs() -> Vec<LlamaCppRef> {
    serde_json::from_str(include_str!("fixtures/smollm2-llamacpp-reference.json")).unwrap()
}

/// RSS is per process, and this binary's tests run in parallel, each loading the models: the
/// test that measures RSS growth runs alone, and every other one holds a shared guard while
/// it loads and runs models. (A parallel load once counted as "growth" and failed CI.)
static RSS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn rss_shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    RSS.read().await
}

async fn rss_alone() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    RSS.write().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_ids_and_greedy_tokens_equal_llama_cpp() {
    let _rss = rss_shared().await;
    let server = TestServer::start(real_config()).await;
    let mut client = server.client().await;
    for r in llama_refs() {
        let tok = client
            .tokenize(proto::TokenizeRequest {
                model: LLM.into(),
                input: Some(proto::tokenize_request::Input::Prompt(r.prompt.clone())),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(tok.ids, r.prompt_ids, "prompt ids of `{}`", r.id);
        assert_eq!(tok.version.unwrap().model, LLM);

        let out = collect(&mut client, greedy(LLM, &r.prompt, 8))
            .await
            .unwrap();
        assert_eq!(
            out.ids,
            r.greedy_ids[..8],
            "first 8 greedy tokens of `{}`",
            r.id
        );
        assert!(
            r.greedy_text.starts_with(&out.text),
            "`{}`: {:?} is not a prefix of llama.cpp's {:?}",
            r.id,
            out.text,
            r.greedy_text
        );
        let f = out.finished.unwrap();
        assert_eq!(f.prompt_tokens as usize, r.prompt_ids.len());
        assert_eq!(f.completion_tokens, 8);
        assert_eq!(f.reason(), proto::FinishReason::Length);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_uses_the_models_template_and_default_system_prompt() {
    let _rss = rss_shared().await;
    let server = TestServer::start(real_config()).await;
    let mut client = server.client().await;
    let chat_ref = llama_refs()
        .into_iter()
        .find(|r| r.id == "chat-hello")
        .unwrap();
    let chat = proto::Chat {
        messages: vec![proto::ChatMessage {
            role: "user".into(),
            content: "Hello! Who are you?".into(),
        }],
    };
    let tok = client
        .tokenize(proto::TokenizeRequest {
            model: LLM.into(),
            input: Some(proto::tokenize_request::Input::Chat(chat.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.text, chat_ref.prompt);
    assert_eq!(tok.ids, chat_ref.prompt_ids);
    // The whole greedy reply ends at <|im_end|> (EOS) with llama.cpp's text.
    let mut req = greedy(LLM, "", 64);
    req.input = Some(Input::Chat(chat));
    let out = collect(&mut client, req.clone()).await.unwrap();
    assert_eq!(out.text, chat_ref.greedy_text);
    let eos_at = out.finished.unwrap();
    assert_eq!(eos_at.reason(), proto::FinishReason::Eos);
    // With ignore_eos the same reply runs past <|im_end|> to max_tokens (benchmarks' fixed
    // lengths); what came before the end token is unchanged.
    req.sampling.as_mut().unwrap().ignore_eos = true;
    let long = collect(&mut client, req).await.unwrap();
    let f = long.finished.unwrap();
    assert!(eos_at.completion_tokens < 64, "{eos_at:?}");
    assert_eq!(f.completion_tokens, 64);
    assert_eq!(f.reason(), proto::FinishReason::Length);
    assert!(long.text.starts_with(&out.text), "{:?}", long.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_the_reference() {
    let _rss = rss_shared().await;
    let server = TestServer::start(real_config()).await;
    let mut client = server.client().await;
    let refs: Vec<EmbRef> =
        serde_json::from_str(include_str!("fixtures/minilm-reference.json")).unwrap();
    let resp = client
        .embed(proto::EmbedRequest {
            model: EMB.into(),
            texts: refs.iter().map(|r| r.text.clone()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.dimension, 384);
    assert_eq!(resp.version.unwrap().model, EMB);
    for (r, e) in refs.iter().zip(&resp.embeddings) {
        let dot: f64 = r
            .embedding
            .iter()
            .zip(&e.values)
            .map(|(a, b)| a * *b as f64)
            .sum();
        let na = r.embedding.iter().map(|a| a * a).sum::<f64>().sqrt();
        let nb = e
            .values
            .iter()
            .map(|b| (*b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let cos = dot / (na * nb);
        assert!(cos >= 0.999, "cosine {cos} for {:?}", r.text);
        assert!((nb - 1.0).abs() < 1e-4, "norm {nb}");
        assert_eq!(
            e.tokens as usize,
            r.ids.len(),
            "token count of {:?}",
            r.text
        );
    }
    // Batching pads to the longest input only; each text's vector is the same alone.
    let alone = client
        .embed(proto::EmbedRequest {
            model: EMB.into(),
            texts: vec![refs[3].text.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let d: f32 = alone.embeddings[0]
        .values
        .iter()
        .zip(&resp.embeddings[3].values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-4, "batched vs alone differ by {d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_inputs_are_truncated_at_256_tokens() {
    let _rss = rss_shared().await;
    let server = TestServer::start(real_config()).await;
    let mut client = server.client().await;
    let long = "word ".repeat(600);
    let resp = client
        .embed(proto::EmbedRequest {
            model: EMB.into(),
            texts: vec![long, "short".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.embeddings[0].tokens, 256);
    assert!(resp.embeddings[0].truncated);
    assert!(!resp.embeddings[1].truncated);
    assert_eq!(resp.embeddings[1].tokens, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_equal_sequential_and_share_one_copy_of_the_weights() {
    let _rss = rss_alone().await;
    let mut config = real_config();
    config.limits.max_concurrent = 8;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let prompts: Vec<String> = llama_refs()
        .into_iter()
        .map(|r| r.prompt)
        .chain(
            [
                "Once upon a time",
                "The best way to learn Rust is",
                "1, 1, 2, 3, 5,",
                "Water boils at",
            ]
            .map(String::from),
        )
        .collect();
    assert_eq!(prompts.len(), 8);
    let mut sequential = Vec::new();
    for p in &prompts {
        sequential.push(collect(&mut client, greedy(LLM, p, 16)).await.unwrap());
    }
    let weights = server
        .registry
        .slot(LLM)
        .unwrap()
        .active()
        .unwrap()
        .weight_bytes;
    let rss_before = swapd::memory::rss_bytes();
    let mut tasks = Vec::new();
    for p in prompts.clone() {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            collect(&mut c, greedy(LLM, &p, 16)).await
        }));
    }
    // Sample RSS while the 8 streams run.
    let mut peak = rss_before;
    while !tasks.iter().all(|t| t.is_finished()) {
        peak = peak.max(swapd::memory::rss_bytes());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (t, seq) in tasks.into_iter().zip(&sequential) {
        let conc = t.await.unwrap().unwrap();
        assert_eq!(conc.ids, seq.ids);
        assert_eq!(conc.text, seq.text);
    }
    let growth = peak.saturating_sub(rss_before);
    assert!(
        growth < weights / 2,
        "RSS grew by {growth} bytes with 8 streams; one copy of the weights is {weights} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_stops_and_releases_its_version() {
    let _rss = rss_shared().await;
    let server = TestServer::start(real_config()).await;
    let mut client = server.client().await;
    let slot = server.registry.slot(LLM).unwrap();
    let version = slot.active().unwrap();
    let mut stream = client
        .generate(greedy(LLM, "The capital of France is", 2000))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    assert_eq!(version.in_flight(), 1);
    assert_eq!(server.engine.admitted(), 1);
    drop(stream);
    let t = Instant::now();
    while version.in_flight() > 0 || server.engine.admitted() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "request still held after cancel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_seed_reproduces_a_sampled_output() {
    let _rss = rss_shared().await;
    let server = TestServer::start(real_config()).await;
    let mut client = server.client().await;
    let sampled = |seed| proto::GenerateRequest {
        sampling: Some(proto::SamplingParams {
            max_tokens: Some(20),
            temperature: Some(1.0),
            top_p: Some(0.95),
            seed: Some(seed),
            ..Default::default()
        }),
        ..greedy(LLM, "My favourite animal is", 20)
    };
    let a = collect(&mut client, sampled(42)).await.unwrap();
    let b = collect(&mut client, sampled(42)).await.unwrap();
    let c = collect(&mut client, sampled(43)).await.unwrap();
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.finished.unwrap().seed, 42);
    assert_ne!(a.ids, c.ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_generation_without_emitting_them() {
    let _rss = rss_shared().await;
    let server = TestServer::start(real_config()).await;
    let mut client = server.client().await;
    let mut req = greedy(LLM, "The capital of France is", 40);
    req.sampling.as_mut().unwrap().stop = vec!["United".into()];
    let out = collect(&mut client, req).await.unwrap();
    assert_eq!(out.text, " Paris.\n\nThe ");
    let f = out.finished.unwrap();
    assert_eq!(f.reason(), proto::FinishReason::Stop);
    assert_eq!(f.stop, "United");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_get_model_report_versions_and_devices() {
    let _rss = rss_shared().await;
    let server = TestServer::start(real_config()).await;
    let mut client = server.client().await;
    let models = client
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let names: Vec<_> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, [LLM, EMB]);
    for m in &models {
        assert_eq!(m.device, "cpu");
        assert_eq!(m.version.as_ref().unwrap().version.len(), 16);
        assert!(
            m.weight_bytes > 50_000_000,
            "{} holds {}",
            m.name,
            m.weight_bytes
        );
    }
    let llm = client
        .get_model(proto::GetModelRequest { model: LLM.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(llm.context_length, 2048);
    assert_eq!(llm.vocab_size, 49152);
    assert_eq!(
        llm.files[0].sha256,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
}

/// The peer benchmark's engines run the same greedy decode: the server over gRPC, swapd's
/// bare loop and candle's quantized_llama give the same tokens after the same prompt, and
/// the server counts the prompt as the bare loop tokenizes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decode_benchmark_engines_agree_on_the_tokens() {
    let _rss = rss_shared().await;
    use swapd::cli::peers::{decode_bench, DecodeBench, DecodeOutcome};
    let server = TestServer::start(real_config()).await;
    let gguf = repo_models()
        .join("smollm2-135m-instruct")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut reports = Vec::new();
    for engine in ["server", "local", "candle"] {
        let b = DecodeBench {
            engine: engine.into(),
            conn: swapd::cli::client::Conn {
                server: format!("http://{}", server.addr),
            },
            model: LLM.into(),
            gguf: gguf.clone(),
            decode_tokens: 12,
            rounds: 1,
            batch: None,
        };
        match decode_bench(b).await.unwrap() {
            DecodeOutcome::Single(r) => reports.push(r),
            DecodeOutcome::Batched(r) => panic!("no --batch, a batched report: {r:?}"),
        }
    }
    let (served, local, candle) = (&reports[0], &reports[1], &reports[2]);
    assert_eq!(served.prompt_tokens, local.prompt_tokens);
    assert!(local.prompt_tokens > 200, "{}", local.prompt_tokens);
    assert_eq!(served.short_prompt_tokens, local.short_prompt_tokens);
    assert_eq!(served.first_ids.len(), 13);
    assert_eq!(served.first_ids, local.first_ids);
    // candle's kernels round differently; the first tokens still agree.
    assert_eq!(served.first_ids[..8], candle.first_ids[..8]);
    for r in &reports {
        let m = &r.median;
        assert!(m.prefill_tok_s > 0.0 && m.decode_tok_s > 0.0, "{r:?}");
    }
}
