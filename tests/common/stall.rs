//! Clients that misbehave on purpose: one that never reads, with a 16-byte HTTP/2 window.
use std::path::Path;
use std::time::{Duration, Instant};

use swapd::proto;
use tonic::transport::{Channel, Endpoint};

use super::*;

pub const LLM: &str = "tiny-llm";

/// A request that generates far more than a stream buffers (the tiny model's whole context).
pub fn long() -> proto::GenerateRequest {
    let mut req = greedy(LLM, "hello", 250);
    req.sampling.as_mut().unwrap().ignore_eos = true;
    req
}

/// A client whose HTTP/2 stream window is 16 bytes and which never reads: the server can send
/// it almost nothing, so its generation fills its buffer and waits.
pub struct Stalled {
    _stream: tonic::Streaming<proto::GenerateResponse>,
    _channel: Channel,
}

pub async fn stalled(server: &TestServer, timeout: Option<Duration>) -> Stalled {
    stalled_at(server.url(), timeout).await
}

pub async fn stalled_at(url: String, timeout: Option<Duration>) -> Stalled {
    let channel = Endpoint::from_shared(url)
        .unwrap()
        .initial_stream_window_size(16)
        .initial_connection_window_size(16)
        .connect()
        .await
        .unwrap();
    let mut client = proto::inference_client::InferenceClient::new(channel.clone());
    let mut req = tonic::Request::new(long());
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let stream = client.generate(req).await.unwrap().into_inner();
    Stalled {
        _stream: stream,
        _channel: channel,
    }
}

/// Waits (generously: the machine may be slow) until `f` holds.
pub async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn running(server: &TestServer) -> usize {
    server.engine.load().0
}

pub fn with_token(dir: &Path) -> swapd::config::Config {
    let mut c = tiny_config(dir);
    c.admin_token = Some(TOKEN.into());
    c
}
