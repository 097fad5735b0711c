//! Test helpers: a real swapd server on a loopback port chosen by the OS, stopped when the
//! handle drops, and clients for it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use swapd::config::Config;
use swapd::manifest::Manifest;
use swapd::proto::inference_client::InferenceClient;
use swapd::proto::{self, generate_request::Input, generate_response::Event};
use swapd::registry::Registry;
use swapd::server::Server;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The repository's models directory (filled by scripts/fetch-models.sh).
pub fn repo_models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// Config serving the real models of the repo's manifest; panics with the fix if they are
/// missing.
pub fn real_config() -> Config {
    let root = repo_models();
    let manifest = Manifest::load(&root.join("models.toml")).expect("models/models.toml");
    for m in &manifest.models {
        for file in m.sha256.keys() {
            let dir = match m.kind {
                swapd::model::ModelKind::Llm => {
                    root.join(&m.source).parent().unwrap().to_path_buf()
                }
                swapd::model::ModelKind::Embedding => root.join(&m.source),
            };
            assert!(
                dir.join(file).is_file(),
                "{} is missing: run scripts/fetch-models.sh first",
                dir.join(file).display()
            );
        }
    }
    Config::with_manifest(&root, manifest).unwrap()
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// Where its `/metrics` endpoint listens.
    pub metrics_addr: SocketAddr,
    pub health: Arc<swapd::health::Health>,
    pub registry: Arc<Registry>,
    pub engine: swapd::engine::Engine,
    shutdown: Option<oneshot::Sender<()>>,
}

/// The device test servers use: `SWAPD_TEST_DEVICE` (`cuda`, `cuda:1`, `auto`; what
/// scripts/gpu-check.sh sets), else the CPU.
pub fn test_device() -> String {
    std::env::var("SWAPD_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// Whether the tests' models load onto the CPU (what some memory figures depend on).
pub fn test_on_cpu() -> bool {
    !test_device().starts_with("cuda")
}

impl TestServer {
    pub async fn start(mut config: Config) -> Self {
        config.device = test_device().parse().expect("SWAPD_TEST_DEVICE");
        let server = Server::start(config).await.expect("server starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let registry = server.registry.clone();
        let engine = server.engine.clone();
        let health = server.health.clone();
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics_listener.local_addr().unwrap();
        tokio::spawn(swapd::scrape::serve(
            metrics_listener,
            server.metrics_endpoint(),
            std::future::pending(),
        ));
        tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
                .expect("server runs");
        });
        Self {
            addr,
            metrics_addr,
            health,
            registry,
            engine,
            shutdown: Some(tx),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel().await)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A greedy raw-prompt request: plain argmax, no repetition penalty.
pub fn greedy(model: &str, prompt: &str, max_tokens: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: model.into(),
        input: Some(Input::Prompt(prompt.into())),
        sampling: Some(proto::SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            repetition_penalty: Some(1.0),
            ..Default::default()
        }),
        return_token_ids: true,
    }
}

/// A whole generation collected from its stream.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub text: String,
    pub ids: Vec<u32>,
    /// Every version reference the stream carried, one per message.
    pub versions: Vec<proto::VersionRef>,
    pub finished: Option<proto::Finished>,
}

pub async fn collect(
    client: &mut InferenceClient<Channel>,
    req: proto::GenerateRequest,
) -> Result<Collected, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Collected::default();
    while let Some(msg) = stream.message().await? {
        out.versions.push(
            msg.version
                .clone()
                .expect("every message names its version"),
        );
        match msg.event {
            Some(Event::Delta(d)) => {
                out.text.push_str(&d.text);
                out.ids.extend(d.token_ids);
            }
            Some(Event::Finished(f)) => out.finished = Some(f),
            None => panic!("message without an event"),
        }
    }
    Ok(out)
}

/// sha256 of a file.
pub fn sha(path: &Path) -> String {
    swapd::model::verify::sha256_file(path).unwrap().0
}

/// Writes a tiny LLM (`tiny-llm`, context 256) and a tiny BERT (`tiny-bert`) under `dir`,
/// with a manifest pinning them, and returns the config serving them.
pub fn tiny_config(dir: &Path) -> Config {
    use swapd::model::synth;
    let gguf = dir.join("tiny-llm").join("tiny.gguf");
    std::fs::create_dir_all(gguf.parent().unwrap()).unwrap();
    synth::write_tiny_llama_gguf(
        &gguf,
        &synth::TinyLlm {
            seed: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let bert = dir.join("tiny-bert");
    synth::write_tiny_bert(&bert, &synth::TinyBert::default()).unwrap();
    let manifest = format!(
        r#"
[[model]]
name = "tiny-llm"
kind = "llm"
source = "tiny-llm/tiny.gguf"
[model.sha256]
"tiny.gguf" = "{}"
[model.defaults]
context_length = 256
max_tokens = 16

[[model]]
name = "tiny-bert"
kind = "embedding"
source = "tiny-bert"
[model.sha256]
"config.json" = "{}"
"model.safetensors" = "{}"
"tokenizer.json" = "{}"
[model.defaults]
context_length = 64
"#,
        sha(&gguf),
        sha(&bert.join("config.json")),
        sha(&bert.join("model.safetensors")),
        sha(&bert.join("tokenizer.json")),
    );
    std::fs::write(dir.join("models.toml"), &manifest).unwrap();
    let manifest = Manifest::load(&dir.join("models.toml")).unwrap();
    Config::with_manifest(dir, manifest).unwrap()
}

/// The admin token test servers use.
pub const TOKEN: &str = "test-admin-token";

/// A control client that sends the admin token.
pub async fn control(
    server: &TestServer,
) -> swapd::proto::model_control_client::ModelControlClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
    >,
> {
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse().unwrap();
    swapd::proto::model_control_client::ModelControlClient::with_interceptor(
        server.channel().await,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", auth.clone());
            Ok(req)
        },
    )
}

/// Every event of a reload stream, and its result. A reload that did not commit must end
/// its stream with a non-OK status after the result; one that did, with OK.
pub async fn reload_events(
    stream: tonic::Streaming<proto::ReloadEvent>,
) -> (Vec<proto::PhaseEvent>, proto::ReloadResult) {
    use swapd::proto::reload_event::Event;
    let mut stream = stream;
    let mut phases = Vec::new();
    let result = loop {
        let ev = stream
            .message()
            .await
            .expect("reload stream")
            .expect("a result");
        match ev.event.expect("event") {
            Event::Phase(p) => phases.push(p),
            Event::Result(r) => break r,
        }
    };
    match stream.message().await {
        Ok(None) => assert!(result.committed, "a failed reload ended its stream with OK"),
        Err(s) => {
            assert!(!result.committed, "a committed reload ended with {s:?}");
            assert!(
                s.message().contains(&result.error),
                "{s:?} vs {}",
                result.error
            );
        }
        Ok(Some(m)) => panic!("message after the result: {m:?}"),
    }
    (phases, result)
}

/// Runs a reload through the control service and collects its events and result.
pub async fn reload(
    server: &TestServer,
    req: proto::ReloadRequest,
) -> (Vec<proto::PhaseEvent>, proto::ReloadResult) {
    let mut ctl = control(server).await;
    reload_events(ctl.reload(req).await.unwrap().into_inner()).await
}

/// Rolls `model` back through the control service and collects its events and result.
pub async fn rollback(
    server: &TestServer,
    model: &str,
) -> (Vec<proto::PhaseEvent>, proto::ReloadResult) {
    let req = proto::RollbackRequest {
        model: model.into(),
        ..Default::default()
    };
    let mut ctl = control(server).await;
    reload_events(ctl.rollback(req).await.unwrap().into_inner()).await
}

/// Writes version `seed` of the tiny LLM as `tiny-llm/v<seed>.gguf`; returns (source, pins).
pub fn tiny_version(
    dir: &Path,
    seed: u64,
    poison: &str,
) -> (String, std::collections::BTreeMap<String, String>) {
    let name = format!("v{seed}{poison}.gguf");
    let opts = swapd::model::synth::TinyLlm {
        seed,
        poison_nan: poison == "-nan",
        overflow: poison == "-inf",
        ..Default::default()
    };
    let path = dir.join("tiny-llm").join(&name);
    swapd::model::synth::write_tiny_llama_gguf(&path, &opts).unwrap();
    let pins = std::collections::BTreeMap::from([(name.clone(), sha(&path))]);
    (format!("tiny-llm/{name}"), pins)
}

/// Rewrites the tiny manifest so `tiny-llm` points at `source`, pinned by `pins` (one file).
pub fn point_manifest_at(
    dir: &Path,
    source: &str,
    pins: &std::collections::BTreeMap<String, String>,
) {
    let manifest = dir.join("models.toml");
    let before = std::fs::read_to_string(&manifest).unwrap();
    let old_sha = sha(&dir.join("tiny-llm/tiny.gguf"));
    let (file, digest) = pins.iter().next().unwrap();
    let after = before
        .replace(
            "source = \"tiny-llm/tiny.gguf\"",
            &format!("source = \"{source}\""),
        )
        .replace(
            &format!("\"tiny.gguf\" = \"{old_sha}\""),
            &format!("\"{file}\" = \"{digest}\""),
        );
    assert_ne!(after, before, "the manifest did not change");
    std::fs::write(&manifest, after).unwrap();
}

/// One scrape of a `/metrics` endpoint, over plain HTTP/1.0, parsed.
pub async fn scrape(addr: SocketAddr) -> Vec<swapd::metrics::Sample> {
    let (status, text) = swapd::metrics::fetch(&addr.to_string(), "metrics")
        .await
        .unwrap();
    assert!(status.contains(" 200 "), "{status}");
    assert!(text.ends_with("# EOF\n"), "not OpenMetrics text: {text}");
    swapd::metrics::parse(&text)
}

/// The value of the one sample named `name` with these labels (others ignored).
pub fn value(
    samples: &[swapd::metrics::Sample],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
}
pub mod process;
pub mod stall;

/// A reload request that makes tiny version `seed` (see [`tiny_version`]) the `tiny-llm`.
pub fn reload_to_tiny(dir: &Path, seed: u64, poison: &str) -> proto::ReloadRequest {
    let (source, pins) = tiny_version(dir, seed, poison);
    proto::ReloadRequest {
        model: "tiny-llm".into(),
        source,
        sha256: pins.into_iter().collect(),
        ..Default::default()
    }
}
