//! Models: where their files come from, how they are verified and loaded, and the loaded
//! version every request holds for its whole life.
mod activation;
pub mod arch;
pub(crate) mod attention;
pub mod chat;
pub mod embed;
mod error;
pub mod greedy;
pub mod header;
pub mod kind;
pub mod kv;
mod lifetime;
pub mod llama_meta;
pub mod llm;
pub mod moe;
pub mod norm;
pub mod preflight;
pub use arch::llama as qllama;
pub mod safetensors;
pub mod sampling;
pub mod source;
pub mod spm;
pub mod stream;
pub mod synth;
pub mod tokenizer;
pub mod verify;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use crate::manifest::{ModelDefaults, ModelSpec};

pub use embed::Embedder;
pub use error::{device_label, LoadFault, ModelError};
pub use kind::ModelKind;
pub use lifetime::{DropSignal, DropWatch};
pub use llm::Llm;
pub use source::{Resolver, Source};

/// One verified file of a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// Name as the manifest pins it (e.g. `model.safetensors`).
    pub name: String,
    /// Where it was read from.
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

/// The loaded weights of one version.
// One value per loaded version, never moved in a hot path: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum LoadedModel {
    Llm(Llm),
    Embedding(Embedder),
}

/// One loaded, immutable version of a model. Requests hold it through an `Arc` from
/// admission to their last byte, so a version lives exactly as long as someone uses it.
pub struct ModelVersion {
    /// Model name from the manifest.
    pub name: String,
    /// Content hash of the files: first 16 hex digits of a sha256 over their digests.
    pub version: String,
    /// Position of this version in the model's history of activations (1 = first load); set
    /// again each time the version becomes active, so generations never go backwards.
    generation: AtomicU64,
    /// The source as configured (a path or an `hf://` URI).
    pub source: String,
    pub files: Vec<FileDigest>,
    pub loaded_at: SystemTime,
    /// Bytes of weights held on the device.
    pub weight_bytes: u64,
    pub defaults: ModelDefaults,
    pub model: LoadedModel,
    /// Set when a drain with the cancel policy gives up on this version's stragglers.
    cancelled: AtomicBool,
    /// Its request counters, shared (without the weights) with the metrics.
    stats: std::sync::Arc<VersionStats>,
    /// The device it loaded on, holding its pooled stream (a GPU) until the version drops.
    on: crate::device::Device,
    /// Fires when the version has dropped. It must stay the last field: fields drop in
    /// declaration order, so by the time it fires the weights' destructors have run (on a
    /// GPU: their frees are queued on the version's stream) and the stream went back.
    dropped: DropSignal,
}

/// A version's request counters. They live apart from the weights so that metrics can read
/// them without holding the version (which would keep its weights alive).
#[derive(Debug, Default)]
pub struct VersionStats {
    in_flight: AtomicU64,
    /// Requests this version finished, and those that failed for reasons of its own (not
    /// the caller's): what automatic rollback watches.
    requests_ok: AtomicU64,
    requests_failed: AtomicU64,
}

impl VersionStats {
    /// Requests holding the version right now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// (finished, failed) requests so far.
    pub fn outcomes(&self) -> (u64, u64) {
        (
            self.requests_ok.load(Ordering::Relaxed),
            self.requests_failed.load(Ordering::Relaxed),
        )
    }
}

impl ModelVersion {
    pub fn kind(&self) -> ModelKind {
        match self.model {
            LoadedModel::Llm(_) => ModelKind::Llm,
            LoadedModel::Embedding(_) => ModelKind::Embedding,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Fires once this version, its weights and its stream lease have all dropped.
    pub fn drop_watch(&self) -> DropWatch {
        self.dropped.watch()
    }

    /// `cpu` or `cuda:N`: where it loaded.
    pub fn device(&self) -> String {
        self.on.label()
    }

    /// The pooled stream it runs on (a GPU only).
    pub fn stream_index(&self) -> Option<usize> {
        self.on.stream_index()
    }

    /// Records the generation this version is activated as (before it is stored as active).
    pub fn set_generation(&self, generation: u64) {
        self.generation.store(generation, Ordering::Release);
    }

    /// Ends the requests still on this version at their next token.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Counts a finished request.
    pub fn record(&self, ok: bool) {
        let c = if ok {
            &self.stats.requests_ok
        } else {
            &self.stats.requests_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (finished, failed) requests so far.
    pub fn outcomes(&self) -> (u64, u64) {
        self.stats.outcomes()
    }

    /// Requests holding this version right now.
    pub fn in_flight(&self) -> u64 {
        self.stats.in_flight()
    }

    /// The counters, to read after the version is gone.
    pub fn stats(&self) -> &std::sync::Arc<VersionStats> {
        &self.stats
    }

    /// sha256 of its largest file (the weights): what operators compare with a registry.
    pub fn weights_sha256(&self) -> &str {
        self.files
            .iter()
            .max_by_key(|f| f.bytes)
            .map(|f| f.sha256.as_str())
            .unwrap_or("")
    }

    pub(crate) fn enter(&self) {
        self.stats.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn exit(&self) {
        self.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Context length in tokens (prompt + completion for LLMs, input for embedders).
    pub fn context_length(&self) -> usize {
        match &self.model {
            LoadedModel::Llm(m) => m.context_length,
            LoadedModel::Embedding(m) => m.max_tokens,
        }
    }
}

impl std::fmt::Debug for ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelVersion")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("generation", &self.generation())
            .field("device", &self.device())
            .finish_non_exhaustive()
    }
}

/// Bytes a version of these verified files will hold once loaded onto the CPU (`on_cpu`)
/// or another device, from the file headers (the admit phase's estimate): the weights, and
/// for a language model a KV cache budget of `kv_tokens` tokens.
pub fn estimate_bytes(
    kind: ModelKind,
    files: &[FileDigest],
    on_cpu: bool,
    kv_tokens: usize,
) -> Result<u64, String> {
    match kind {
        ModelKind::Llm => {
            let f = files.first().ok_or("no file")?;
            llm::resident_bytes_of(&f.path, on_cpu, kv_tokens)
        }
        // Safetensors hold the weights as they are loaded (f32 here).
        ModelKind::Embedding => Ok(files
            .iter()
            .filter(|f| f.name.ends_with(".safetensors"))
            .map(|f| f.bytes)
            .sum()),
    }
}

/// Verifies and loads one version of `spec` onto `device`. Blocking: call it from a
/// blocking thread. The returned version has no requests yet.
pub fn load_version(
    spec: &ModelSpec,
    files: Vec<(String, PathBuf)>,
    device: &crate::device::Device,
    generation: u64,
) -> Result<ModelVersion, ModelError> {
    // Other models may be serving (a model added to the manifest loads while they do);
    // `load_verified` inside runs in this same background.
    crate::turns::in_background(device.candle(), || {
        let digests = verify::verify_files(&spec.name, &files, &spec.sha256)?;
        load_verified(spec, digests, device, generation)
    })
}

/// Loads files already verified against their digests.
pub fn load_verified(
    spec: &ModelSpec,
    digests: Vec<FileDigest>,
    device: &crate::device::Device,
    generation: u64,
) -> Result<ModelVersion, ModelError> {
    // Loading is background work at the CPU: other versions may be serving.
    crate::turns::in_background(device.candle(), || {
        load_files(spec, digests, device, generation)
    })
}

fn load_files(
    spec: &ModelSpec,
    digests: Vec<FileDigest>,
    device: &crate::device::Device,
    generation: u64,
) -> Result<ModelVersion, ModelError> {
    let version = verify::version_id(&digests);
    let ctx = spec.defaults.context_length;
    // Each version loads, is checked and serves on a stream of the device's pool (see
    // `Device::for_new_version`); the version holds it until it drops.
    let device = &device.for_new_version();
    let (model, weight_bytes) = match spec.kind {
        ModelKind::Llm => {
            let llm = Llm::load(&spec.name, &digests[0].path, device.candle(), ctx)?;
            let bytes = llm.weight_bytes;
            (LoadedModel::Llm(llm), bytes)
        }
        ModelKind::Embedding => {
            let dir = digests[0]
                .path
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default();
            let emb = Embedder::load(&spec.name, &dir, device.candle(), ctx)?;
            let bytes = emb.weight_bytes;
            (LoadedModel::Embedding(emb), bytes)
        }
    };
    Ok(ModelVersion {
        name: spec.name.clone(),
        version,
        generation: AtomicU64::new(generation),
        source: spec.source.clone(),
        files: digests,
        loaded_at: SystemTime::now(),
        weight_bytes,
        defaults: spec.defaults.clone(),
        model,
        cancelled: AtomicBool::new(false),
        stats: Default::default(),
        on: device.clone(),
        dropped: DropSignal::default(),
    })
}

/// Resolves, verifies and loads one version of `spec` (verification and loading run on a
/// blocking thread).
pub async fn load(
    spec: &ModelSpec,
    resolver: &Resolver,
    device: &crate::device::Device,
    generation: u64,
) -> Result<std::sync::Arc<ModelVersion>, ModelError> {
    let started = std::time::Instant::now();
    let files = resolver
        .resolve(&spec.name, spec.kind, &spec.source)
        .await?;
    let (spec2, device2) = (spec.clone(), device.clone());
    let version =
        tokio::task::spawn_blocking(move || load_version(&spec2, files, &device2, generation))
            .await
            .map_err(|e| ModelError::Inference {
                model: spec.name.clone(),
                reason: format!("loader thread: {e}"),
            })??;
    tracing::info!(
        model = %version.name,
        version = %version.version,
        device = %version.device(),
        weight_bytes = version.weight_bytes,
        secs = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(std::sync::Arc::new(version))
}
