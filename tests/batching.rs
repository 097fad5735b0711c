//! Continuous batching: a sequence's output does not depend on what it is batched with, and
//! a sequence that ends early (cancelled, past its deadline, its client not reading) leaves
//! the others' tokens alone and gives its place back.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use common::stall::{running, stalled, until};
use common::*;
use swapd::model::kv::{KvCache, StepItem};
use swapd::model::llm::{Llm, PREFILL_CHUNK};
use swapd::proto;

const SMOL: &str = "smollm2-135m-instruct";

fn smollm2() -> PathBuf {
    repo_models().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn tiny(dir: &Path, seed: u64) -> PathBuf {
    let p = dir.join(format!("tiny{seed}.gguf"));
    swapd::model::synth::write_tiny_llama_gguf(
        &p,
        &swapd::model::synth::TinyLlm {
            seed,
            ..Default::default()
        },
    )
    .unwrap();
    p
}

/// A long prompt: several prefill chunks on either model.
fn long_prompt(min_tokens: usize, llm: &Llm) -> String {
    let mut p = String::new();
    while llm.tokenizer.encode(&p).unwrap().len() < min_tokens {
        p.push_str("the quick brown fox jumps over the lazy dog, 12 34 56. ");
    }
    p
}

/// One sequence driven by hand: its prompt, its cache, and every logits vector it got (as
/// bits), greedy.
struct Driven {
    prompt: Vec<u32>,
    fed: usize,
    next: Vec<u32>,
    cache: KvCache,
    logits: Vec<Vec<u32>>,
    want: usize,
}

impl Driven {
    fn new(llm: &Llm, prompt: Vec<u32>, want: usize) -> Self {
        Self {
            cache: llm.new_cache(prompt.len() + want),
            prompt,
            fed: 0,
            next: Vec::new(),
            logits: Vec::new(),
            want,
        }
    }

    fn done(&self) -> bool {
        self.logits.len() >= self.want
    }

    fn item(&mut self) -> (StepItem<'_>, usize) {
        if self.fed < self.prompt.len() {
            let end = (self.fed + PREFILL_CHUNK).min(self.prompt.len());
            let n = end - self.fed;
            let item = StepItem {
                ids: &self.prompt[self.fed..end],
                logits: end == self.prompt.len(),
                cache: &mut self.cache,
            };
            (item, n)
        } else {
            let item = StepItem {
                ids: &self.next,
                logits: true,
                cache: &mut self.cache,
            };
            (item, 0)
        }
    }

    fn took(&mut self, prompt_fed: usize, logits: Option<candle_core::Tensor>) {
        self.fed += prompt_fed;
        if let Some(l) = logits {
            let v: Vec<f32> = l.to_vec1().unwrap();
            let best = v
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            self.next = vec![best as u32];
            self.logits.push(v.iter().map(|x| x.to_bits()).collect());
        }
    }
}

/// Steps every sequence in `seqs` that has joined (sequence `i` joins at step `join[i]`)
/// and is not done, all in one batch per step, until all are done.
fn run_batched(llm: &Llm, seqs: &mut [Driven], join: &[usize]) {
    let mut step = 0;
    while seqs.iter().any(|s| !s.done()) {
        let mut picked: Vec<&mut Driven> = seqs
            .iter_mut()
            .zip(join)
            .filter(|(s, &j)| j <= step && !s.done())
            .map(|(s, _)| s)
            .collect();
        if !picked.is_empty() {
            let mut fed = Vec::new();
            let mut items = Vec::new();
            for s in picked.iter_mut() {
                let (item, n) = s.item();
                items.push(item);
                fed.push(n);
            }
            let out = llm.step(&mut items).unwrap();
            drop(items);
            for ((s, n), l) in picked.iter_mut().zip(fed).zip(out) {
                s.took(n, l);
            }
        }
        step += 1;
    }
}

fn check_batch_invariance(llm: &Llm, prompts: &[String]) {
    let want = [12, 5, 9, 16, 3, 11, 7, 14];
    let alone: Vec<Driven> = prompts
        .iter()
        .zip(want)
        .map(|(p, w)| {
            let mut s = [Driven::new(llm, llm.tokenizer.encode(p).unwrap(), w)];
            run_batched(llm, &mut s, &[0]);
            let [s] = s;
            s
        })
        .collect();
    let mut batched: Vec<Driven> = prompts
        .iter()
        .zip(want)
        .map(|(p, w)| Driven::new(llm, llm.tokenizer.encode(p).unwrap(), w))
        .collect();
    // Staggered: each joins a batch that is already decoding (or prefilling) others.
    let join: Vec<usize> = (0..prompts.len()).map(|i| 2 * i).collect();
    run_batched(llm, &mut batched, &join);
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a.logits.len(), b.logits.len());
        for (t, (la, lb)) in a.logits.iter().zip(&b.logits).enumerate() {
            assert!(
                la == lb,
                "sequence {i} ({} prompt tokens), output {t}: batched logits differ from alone",
                a.prompt.len()
            );
        }
    }
}

fn prompts(llm: &Llm) -> Vec<String> {
    let mut p: Vec<String> = [
        "The capital of France is",
        "hello",
        "def fibonacci(n):\n",
        "One, two, three,",
        "Water boils at",
        "a",
        "Rust is a language that",
    ]
    .map(String::from)
    .to_vec();
    // Two and a half prefill chunks, joining while the others decode.
    p.insert(3, long_prompt(2 * PREFILL_CHUNK + 40, llm));
    p
}

#[test]
fn one_step_over_a_batch_gives_each_sequence_its_own_logits_bit_for_bit_tiny() {
    let dir = tempfile::tempdir().unwrap();
    let llm = Llm::load("tiny", &tiny(dir.path(), 3), &Device::Cpu, 512).unwrap();
    check_batch_invariance(&llm, &prompts(&llm));
}

#[test]
fn one_step_over_a_batch_gives_each_sequence_its_own_logits_bit_for_bit_smollm2() {
    let llm = Llm::load(SMOL, &smollm2(), &Device::Cpu, 2048).unwrap();
    check_batch_invariance(&llm, &prompts(&llm));
}

/// Each request alone, then all of them at once with staggered starts: every stream's token
/// ids are the same, and the server really batched (some step held more than one sequence).
async fn streams_alone_and_batched(
    server: &TestServer,
    reqs: Vec<proto::GenerateRequest>,
    stagger: Duration,
) {
    let mut client = server.client().await;
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(collect(&mut client, r.clone()).await.unwrap().ids);
    }
    let mut tasks = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(stagger * i as u32).await;
            collect(&mut c, r).await.unwrap().ids
        }));
    }
    for (i, (t, want)) in tasks.into_iter().zip(alone).enumerate() {
        assert_eq!(
            t.await.unwrap(),
            want,
            "stream {i}: batched ids differ from alone"
        );
    }
    let m = scrape(server.metrics_addr).await;
    let sum = value(&m, "swapd_batch_size_sum", &[]).unwrap();
    let count = value(&m, "swapd_batch_size_count", &[]).unwrap();
    assert!(
        sum > count,
        "no step held two sequences ({sum} over {count} steps)"
    );
}

fn greedy_long(model: &str, prompt: &str, max_tokens: u32) -> proto::GenerateRequest {
    let mut r = greedy(model, prompt, max_tokens);
    r.sampling.as_mut().unwrap().ignore_eos = true;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_staggered_streams_get_their_own_tokens_tiny() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(tiny_config(dir.path())).await;
    let long = "the quick brown fox jumps over the lazy dog again and again, ".repeat(3);
    let reqs = [
        ("hello", 160),
        ("The capital of France is", 60),
        (long.as_str(), 40),
        ("a", 190),
        ("One, two, three,", 93),
        ("xyz", 17),
        ("Water boils at", 150),
        ("def f(n):", 124),
    ]
    .map(|(p, n)| greedy_long("tiny-llm", p, n))
    .to_vec();
    // The tiny model is fast: starts 2 ms apart still overlap.
    streams_alone_and_batched(&server, reqs, Duration::from_millis(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_staggered_streams_get_their_own_tokens_smollm2() {
    let mut config = real_config();
    config.manifest.models.retain(|m| m.name == SMOL);
    let server = TestServer::start(config).await;
    let long = swapd::cli::peers::LONG_PROMPT;
    let reqs = [
        ("The capital of France is", 12),
        ("def fibonacci(n):\n", 20),
        (long, 8),
        ("One, two, three, four,", 16),
        ("Water boils at", 6),
        ("Hello", 18),
        ("The largest planet is", 10),
        ("1 + 1 =", 14),
    ]
    .map(|(p, n)| greedy_long(SMOL, p, n))
    .to_vec();
    streams_alone_and_batched(&server, reqs, Duration::from_millis(40)).await;
}

/// In the middle of a batch: one client leaves, one request's deadline passes, one client
/// stops reading. The others' tokens are unchanged, and every place comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_a_deadline_and_a_stalled_client_leave_the_batch_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(tiny_config(dir.path())).await;
    let mut client = server.client().await;
    let keep: Vec<proto::GenerateRequest> = [("hello", 200), ("One, two", 180), ("abc", 190)]
        .map(|(p, n)| greedy_long("tiny-llm", p, n))
        .to_vec();
    let mut alone = Vec::new();
    for r in &keep {
        alone.push(collect(&mut client, r.clone()).await.unwrap().ids);
    }
    let mut tasks = Vec::new();
    for r in keep {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            collect(&mut c, r).await.unwrap().ids
        }));
    }
    // A client that reads two messages and leaves.
    let mut c = server.client().await;
    let mut leaving = c
        .generate(greedy_long("tiny-llm", "bye", 200))
        .await
        .unwrap()
        .into_inner();
    leaving.message().await.unwrap().unwrap();
    leaving.message().await.unwrap().unwrap();
    drop(leaving);
    // A request whose deadline passes while it generates. How long 250 tokens of the tiny
    // model take depends on the machine (under 100 ms on a quiet one), so the deadline is
    // searched for: a try that finishes in time halves it. tonic's client ends a call whose
    // response has not started by the deadline itself, as CANCELLED ("Timeout expired"),
    // whatever the server answers; such a try doubles it. The subject here is a deadline
    // passing mid-stream.
    let mut c = server.client().await;
    let late = tokio::spawn(async move {
        let mut d = Duration::from_millis(100);
        for _ in 0..10 {
            let mut req = tonic::Request::new(greedy_long("tiny-llm", "late", 250));
            req.set_timeout(d);
            let started = std::time::Instant::now();
            let mut stream = match c.generate(req).await {
                Ok(stream) => stream.into_inner(),
                Err(s)
                    if s.code() == tonic::Code::Cancelled && s.message() == "Timeout expired" =>
                {
                    d *= 2;
                    continue;
                }
                Err(s) => return s.code(),
            };
            let mut finished = None;
            let code = loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        if let Some(proto::generate_response::Event::Finished(f)) = m.event {
                            finished = Some(f);
                        }
                    }
                    Ok(None) => break tonic::Code::Ok,
                    Err(s) => break s.code(),
                }
            };
            if code != tonic::Code::Ok {
                return code;
            }
            // Finished: in time, or the server ignored the deadline. The server's own
            // account says when it finished generating (the client may read the last
            // tokens later than that, on a loaded machine long after the deadline).
            let f = finished.expect("a stream that ends well ends with its Finished");
            let decode_ms = if f.tokens_per_second > 0.0 {
                (f.completion_tokens.saturating_sub(1)) as f64 / f.tokens_per_second * 1e3
            } else {
                0.0
            };
            let generated = Duration::from_secs_f64((f.time_to_first_token_ms + decode_ms) / 1e3);
            assert!(
                generated < d * 2,
                "generated in {generated:?} (read in {:?}), long after its {d:?} deadline",
                started.elapsed()
            );
            d /= 2;
        }
        panic!("in 10 tries, no deadline passed mid-stream (last {d:?})")
    });
    // A client that never reads, with a deadline.
    let stall = stalled(&server, Some(Duration::from_secs(2))).await;
    for (i, (t, want)) in tasks.into_iter().zip(alone).enumerate() {
        assert_eq!(t.await.unwrap(), want, "stream {i}: its tokens changed");
    }
    assert_eq!(late.await.unwrap(), tonic::Code::DeadlineExceeded);
    until("every place back", Duration::from_secs(30), || {
        running(&server) == 0 && server.engine.admitted() == 0
    })
    .await;
    drop(stall);
}

/// `max_batch` and the KV budget bound a batch: sequences past either wait for a place (and
/// still get their own tokens), and one that could never fit the budget is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batch_and_the_kv_budget_hold_sequences_back_and_refuse_what_cannot_fit() {
    // Each sequence below reserves its prompt and 75 tokens, under 80. First the batch size
    // binds (room for three in the budget), then the budget (room for two).
    for (max_batch, kv) in [(2, 3 * 80), (16, 2 * 80)] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = tiny_config(dir.path());
        config.limits.max_batch = max_batch;
        config.limits.kv_cache_tokens = kv;
        let server = TestServer::start(config).await;
        let reqs: Vec<proto::GenerateRequest> = ["hello", "abc", "xyz", "One", "a"]
            .map(|p| greedy_long("tiny-llm", p, 75))
            .to_vec();
        streams_alone_and_batched(&server, reqs, Duration::from_millis(2)).await;
        let m = scrape(server.metrics_addr).await;
        let count = value(&m, "swapd_batch_size_count", &[]).unwrap();
        let at_most_two = value(&m, "swapd_batch_size_bucket", &[("le", "2.0")]).unwrap();
        assert_eq!(
            at_most_two, count,
            "max_batch {max_batch}, kv {kv}: a step held more than two sequences"
        );
        let mut client = server.client().await;
        let err = collect(&mut client, greedy_long("tiny-llm", "hello", 250))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("kv_cache_tokens"), "{err:?}");
    }
}

/// Embed calls to one version within the queue delay share one forward pass, and each gets
/// the embeddings it gets alone (to float rounding: padding to a longer batch member may
/// change the last bits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_embed_calls_share_one_pass_and_get_their_own_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.limits.embed_queue_delay_us = 200_000;
    let server = TestServer::start(config).await;
    let calls: Vec<Vec<String>> = vec![
        vec!["hello world".into()],
        vec!["a much longer sentence than the others".into(), "x".into()],
        vec!["third call".into()],
    ];
    let embed = |texts: Vec<String>| {
        let server_url = server.url();
        async move {
            let ch = tonic::transport::Channel::from_shared(server_url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut c = proto::inference_client::InferenceClient::new(ch);
            c.embed(proto::EmbedRequest {
                model: "tiny-bert".into(),
                texts,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let mut alone = Vec::new();
    for t in &calls {
        alone.push(embed(t.clone()).await);
    }
    let (a, b, c) = tokio::join!(
        embed(calls[0].clone()),
        embed(calls[1].clone()),
        embed(calls[2].clone())
    );
    let together = [a, b, c];
    for (a, b) in alone.iter().zip(&together) {
        assert_eq!(a.embeddings.len(), b.embeddings.len());
        for (x, y) in a.embeddings.iter().zip(&b.embeddings) {
            assert_eq!(x.tokens, y.tokens);
            for (u, v) in x.values.iter().zip(&y.values) {
                assert!((u - v).abs() < 1e-5, "{u} vs {v}");
            }
        }
    }
    let m = scrape(server.metrics_addr).await;
    let l = [("model", "tiny-bert")];
    let sum = value(&m, "swapd_batch_size_sum", &l).unwrap();
    let count = value(&m, "swapd_batch_size_count", &l).unwrap();
    assert!(
        sum > count,
        "no pass served two calls ({sum} calls over {count} passes)"
    );
}
