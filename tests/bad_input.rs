//! Every bad request gets a clear status and loses nothing: over gRPC on loopback, against
//! tiny generated models.
mod common;

use std::time::{Duration, Instant};

use common::*;
use swapd::proto::{self, generate_request::Input};
use tonic::Code;

const LLM: &str = "tiny-llm";
const EMB: &str = "tiny-bert";

async fn tiny_server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(tiny_config(dir.path())).await;
    (dir, server)
}

async fn generate_status(server: &TestServer, req: proto::GenerateRequest) -> tonic::Status {
    let mut client = server.client().await;
    match collect(&mut client, req).await {
        Ok(out) => panic!("expected an error, got {out:?}"),
        Err(s) => s,
    }
}

fn with_sampling(f: impl FnOnce(&mut proto::SamplingParams)) -> proto::GenerateRequest {
    let mut req = greedy(LLM, "hello", 4);
    f(req.sampling.as_mut().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_rejects_bad_requests_with_invalid_argument() {
    let (_dir, server) = tiny_server().await;
    let cases: Vec<(&str, proto::GenerateRequest, &str)> = vec![
        ("empty prompt", greedy(LLM, "", 4), "`prompt` is empty"),
        (
            "no input",
            proto::GenerateRequest {
                input: None,
                ..greedy(LLM, "x", 4)
            },
            "either `prompt` or `chat`",
        ),
        ("no model", greedy("", "x", 4), "`model` is required"),
        ("max_tokens 0", greedy(LLM, "hello", 0), "max_tokens 0"),
        (
            "absurd max_tokens",
            greedy(LLM, "hello", 1_000_000_000),
            "max_tokens 1000000000",
        ),
        (
            "negative temperature",
            with_sampling(|s| s.temperature = Some(-0.5)),
            "temperature -0.5",
        ),
        (
            "NaN temperature",
            with_sampling(|s| s.temperature = Some(f32::NAN)),
            "temperature NaN",
        ),
        ("top_p 0", with_sampling(|s| s.top_p = Some(0.0)), "top_p 0"),
        (
            "top_p 1.5",
            with_sampling(|s| s.top_p = Some(1.5)),
            "top_p 1.5",
        ),
        (
            "penalty 0",
            with_sampling(|s| s.repetition_penalty = Some(0.0)),
            "repetition_penalty 0",
        ),
        (
            "empty stop",
            with_sampling(|s| s.stop = vec![String::new()]),
            "stop string of 0 bytes",
        ),
        (
            "empty chat",
            proto::GenerateRequest {
                input: Some(Input::Chat(proto::Chat { messages: vec![] })),
                ..greedy(LLM, "x", 4)
            },
            "`chat.messages` is empty",
        ),
        (
            "bad role",
            proto::GenerateRequest {
                input: Some(Input::Chat(proto::Chat {
                    messages: vec![proto::ChatMessage {
                        role: "wizard".into(),
                        content: "hi".into(),
                    }],
                })),
                ..greedy(LLM, "x", 4)
            },
            "role `wizard`",
        ),
        (
            "wrong kind",
            greedy(EMB, "hello", 4),
            "Generate needs an llm model",
        ),
    ];
    for (what, req, needle) in cases {
        let s = generate_status(&server, req).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(
            s.message().contains(needle),
            "{what}: {:?} lacks {needle:?}",
            s.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_are_not_found() {
    let (_dir, server) = tiny_server().await;
    let s = generate_status(&server, greedy("nope", "hello", 4)).await;
    assert_eq!(s.code(), Code::NotFound);
    assert!(s.message().contains("unknown model `nope`"));
    let mut client = server.client().await;
    let e = client
        .embed(proto::EmbedRequest {
            model: "nope".into(),
            texts: vec!["x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = client
        .get_model(proto::GetModelRequest {
            model: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_context_is_refused() {
    let (_dir, server) = tiny_server().await;
    let long = "abc ".repeat(400);
    let s = generate_status(&server, greedy(LLM, &long, 4)).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("does not fit model `tiny-llm`"),
        "{}",
        s.message()
    );
    assert!(s.message().contains("256 tokens"), "{}", s.message());
    // A prompt that fits, with max_tokens past the end of the context, stops at the context.
    let mut client = server.client().await;
    let ids = client
        .tokenize(proto::TokenizeRequest {
            model: LLM.into(),
            input: Some(proto::tokenize_request::Input::Prompt("abc ".repeat(60))),
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    let out = collect(&mut client, greedy(LLM, &"abc ".repeat(60), 256))
        .await
        .unwrap();
    let f = out.finished.unwrap();
    assert_eq!(f.prompt_tokens as usize, ids.len());
    assert!(f.prompt_tokens + f.completion_tokens <= 256);
    if f.reason() == proto::FinishReason::Length {
        assert_eq!(f.prompt_tokens + f.completion_tokens, 256);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_rejects_empty_and_oversized_batches_and_wrong_kinds() {
    let (_dir, server) = tiny_server().await;
    let mut client = server.client().await;
    let embed = |model: &str, n: usize| proto::EmbedRequest {
        model: model.into(),
        texts: vec!["hello".to_string(); n],
    };
    let e = client.embed(embed(EMB, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("`texts` is empty"));
    let e = client.embed(embed(EMB, 65)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at most 64"), "{}", e.message());
    let e = client.embed(embed(LLM, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("Embed needs an embedding model"),
        "{}",
        e.message()
    );
    let ok = client.embed(embed(EMB, 2)).await.unwrap().into_inner();
    assert_eq!(ok.embeddings.len(), 2);
    assert_eq!(ok.dimension, 32);
}

/// A GenerateRequest whose prompt field is raw bytes, to send what a Rust client can't.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGenerate {
    #[prost(string, tag = "1")]
    model: String,
    #[prost(bytes = "vec", tag = "2")]
    prompt: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_and_oversized_requests_get_clear_errors() {
    let (_dir, server) = tiny_server().await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/swapd.v1.Inference/Generate");
    let send = |prompt: Vec<u8>| {
        let mut grpc = grpc.clone();
        let path = path.clone();
        async move {
            grpc.ready().await.unwrap();
            grpc.server_streaming::<_, proto::GenerateResponse, _>(
                tonic::Request::new(RawGenerate {
                    model: LLM.into(),
                    prompt,
                }),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
        }
    };
    let e = send(vec![b'h', 0xFF, 0xFE, b'i']).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("malformed request") && e.message().contains("UTF-8"),
        "{e:?}"
    );
    let e = send(vec![b'a'; 2 << 20]).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{e:?}");
    // The server still answers.
    let mut client = server.client().await;
    collect(&mut client, greedy(LLM, "hello", 2)).await.unwrap();
}

/// The real LLM, for tests that need a generation to last (a tiny model finishes at once).
const REAL_LLM: &str = "smollm2-135m-instruct";

/// A greedy generation of the real model that goes on for many seconds.
fn endless() -> proto::GenerateRequest {
    greedy(REAL_LLM, "1, 2, 3, 4, 5, 6,", 1500)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_is_bounded_and_fails_fast() {
    let mut config = real_config();
    config.limits.max_concurrent = 1;
    config.limits.max_queue = 1;
    let server = TestServer::start(config).await;
    // Two long streams fill the running slot and the queue place.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut client = server.client().await;
        streams.push(client.generate(endless()).await.unwrap().into_inner());
    }
    assert_eq!(server.engine.admitted(), 2);
    let started = Instant::now();
    let s = generate_status(&server, greedy(REAL_LLM, "hello", 4)).await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("limits 1 + 1"), "{}", s.message());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not failed fast"
    );
    drop(streams);
    let t = Instant::now();
    while server.engine.admitted() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "admission not released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut client = server.client().await;
    collect(&mut client, greedy(REAL_LLM, "hello", 2))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_ends_the_stream_and_frees_the_request() {
    let mut config = real_config();
    config.limits.max_concurrent = 1;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    // Hold the only running slot so the next request waits in the queue past its deadline.
    let blocker = client.generate(endless()).await.unwrap().into_inner();
    // Its headers come back before it takes the slot: wait until it holds it.
    let t = Instant::now();
    while server.engine.load().0 < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the blocker never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut req = tonic::Request::new(greedy(REAL_LLM, "hello", 4));
    req.set_timeout(Duration::from_millis(300));
    let result = async {
        let mut stream = client.generate(req).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    let e = result.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    drop(blocker);
    let t = Instant::now();
    while server.engine.admitted() > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "request not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_mid_generation_ends_the_stream() {
    let server = TestServer::start(real_config()).await;
    let mut client = server.client().await;
    // Room for the first token behind sibling tests on the shared CPU turn queue; far short
    // of 2000 tokens.
    let mut req = tonic::Request::new(greedy(REAL_LLM, "1, 2, 3, 4, 5, 6,", 2000));
    req.set_timeout(Duration::from_secs(3));
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut deltas = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => deltas += 1,
            Ok(None) => panic!("stream ended without the deadline error"),
            Err(e) => break e,
        }
    };
    assert!(deltas > 0, "some tokens before the deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let t = Instant::now();
    while server.engine.admitted() > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "request not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
