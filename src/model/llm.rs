//! A causal language model from a GGUF file, run by its architecture's file in
//! [`super::arch`] (llama, qwen2, qwen3, gemma3), whose matmuls use the SIMD kernels of [`crate::quant`].
//! The weights are loaded once per version and shared read-only; every sequence keeps its
//! own [`KvCache`], and [`Llm::step`] runs one forward pass over a batch of sequences.
//! [`Session`] is the batch of one, for pre-flight checks and tools.
use std::path::Path;
use std::sync::Arc;

use super::arch::{Weights as ModelWeights, MAX_SEQ_LEN};
use super::kv::{KvCache, StepItem};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::chat::{ChatMessage, ChatTemplate};
use super::header;
use super::tokenizer::GgufTokenizer;
use super::ModelError;

pub use super::kv::PREFILL_CHUNK;

/// Bytes a GGUF tensor takes as stored (quantized blocks).
pub fn stored_bytes(info: &candle_core::quantized::gguf_file::TensorInfo) -> u64 {
    let elems = info
        .shape
        .dims()
        .iter()
        .fold(1u64, |a, &d| a.saturating_mul(d as u64));
    (elems / info.ggml_dtype.block_size() as u64).saturating_mul(info.ggml_dtype.type_size() as u64)
}

/// Bytes the tensors of `ct` take once loaded onto the CPU (`on_cpu`) or another device.
/// Every tensor must lie inside the file: a truncated download fails here, with a clear
/// reason, instead of deep inside the loader.
fn tensor_bytes(ct: &Content, file_len: u64, on_cpu: bool) -> Result<u64, String> {
    let mut total = 0u64;
    for (tname, info) in &ct.tensor_infos {
        let bytes = stored_bytes(info);
        let end = ct
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(bytes);
        if end > file_len {
            return Err(format!(
                "tensor `{tname}` ends at byte {end} but the file has {file_len} bytes (truncated?)"
            ));
        }
        // Packed on the CPU, a matrix may take more than it does in the file (Q8_0 blocks
        // gain their sums).
        let packed = crate::quant::packs(info.ggml_dtype, info.shape.dims(), on_cpu);
        let loaded = if packed {
            crate::quant::packed_bytes(info.ggml_dtype, info.shape.dims()).unwrap_or(bytes)
        } else {
            bytes
        };
        total = total.saturating_add(loaded);
        if tname == "token_embd.weight" && !packed {
            // Unless the table stays packed, the loader adds a dequantized f32 copy of it
            // for lookups.
            let elems = info
                .shape
                .dims()
                .iter()
                .fold(1u64, |a, &d| a.saturating_mul(d as u64));
            total = total.saturating_add(elems.saturating_mul(4));
        }
    }
    Ok(total)
}

/// Bytes the GGUF at `path` will hold once loaded onto the CPU (`on_cpu`) or another
/// device, from its header alone. The header is bounds-checked first
/// ([`super::header::read_gguf`]): a broken file is an error here, never a panic or a huge
/// allocation.
pub fn weight_bytes_of(path: &Path, on_cpu: bool) -> Result<u64, String> {
    let (ct, len) = header_of(path)?;
    tensor_bytes(&ct, len, on_cpu)
}

/// The bounds-checked header of the GGUF at `path`, and the file's length.
fn header_of(path: &Path) -> Result<(Content, u64), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let (ct, _) = header::read_gguf(&mut std::io::BufReader::new(file))?;
    Ok((ct, len))
}

/// Bytes a version of the GGUF at `path` may hold: its weights and a KV cache budget of
/// `kv_tokens` tokens (what a reload's memory admission counts), from one read of its
/// header. A token's keys and values take f16 on the CPU and f32 on a device, every layer
/// (what [`Llm::kv_bytes_per_token`] will say once it is loaded).
pub fn resident_bytes_of(path: &Path, on_cpu: bool, kv_tokens: usize) -> Result<u64, String> {
    let (ct, len) = header_of(path)?;
    let kv = super::arch::check(&ct)?
        .kv_bytes_per_token(on_cpu)
        .saturating_mul(kv_tokens as u64);
    Ok(tensor_bytes(&ct, len, on_cpu)?.saturating_add(kv))
}

pub use super::llama_meta::{check_llama, LlamaParams, MAX_HEAD_DIM};

/// A loaded GGUF language model: shared weights, tokenizer, chat template.
pub struct Llm {
    weights: Arc<ModelWeights>,
    pub tokenizer: GgufTokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Longest prompt + completion, in tokens.
    pub context_length: usize,
    pub weight_bytes: u64,
    /// `general.architecture` (`llama`, `gemma3`, `qwen2`, `qwen3`, `phi3`).
    pub arch: String,
    name: String,
    device: Device,
}

fn format_err(model: &str, path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Format {
        model: model.to_string(),
        path: path.to_path_buf(),
        format: "GGUF",
        reason: reason.to_string(),
    }
}

impl Llm {
    /// Reads and loads `path`. `context_length` is capped by the file's own limit and by the
    /// RoPE table candle precomputes. A file that would not serve is a
    /// [`ModelError::Format`] naming the problem (see [`check_llama`]); so is a panic while
    /// loading, as a last resort.
    pub fn load(
        name: &str,
        path: &Path,
        device: &Device,
        context_length: usize,
    ) -> Result<Self, ModelError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::load_unguarded(name, path, device, context_length)
        }))
        .unwrap_or_else(|p| {
            Err(format_err(
                name,
                path,
                format!("the loader panicked: {}", crate::panic::message(p.as_ref())),
            ))
        })
    }

    fn load_unguarded(
        name: &str,
        path: &Path,
        device: &Device,
        context_length: usize,
    ) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::Io {
            model: name.to_string(),
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        // Buffered: the metadata is ~100k small reads (the vocabulary's strings), which
        // unbuffered cost a syscall each (80 ms for SmolLM2's).
        let mut file = std::io::BufReader::with_capacity(1 << 16, file);
        let (ct, _) = header::read_gguf(&mut file).map_err(|e| format_err(name, path, e))?;
        // `pace` marks where a background load may hand the CPU to serving (see
        // `crate::turns::in_background`).
        crate::turns::pace();
        super::arch::arch_of(&ct).map_err(|reason| ModelError::Unsupported {
            model: name.to_string(),
            path: path.to_path_buf(),
            reason,
        })?;
        let params = super::arch::check(&ct).map_err(|reason| format_err(name, path, reason))?;
        let weight_bytes = tensor_bytes(&ct, file_len, device.is_cpu())
            .map_err(|reason| format_err(name, path, reason))?;
        // Float tensors (the norms) are checked for NaN and infinity: a NaN there can vanish
        // in the quantized matmuls (which quantize activations and drop NaN), so a finite-logits
        // probe alone would not catch it.
        for (tname, info) in &ct.tensor_infos {
            if !matches!(
                info.ggml_dtype,
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
            ) {
                continue;
            }
            crate::turns::pace();
            let t = ct
                .tensor(&mut file, tname, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| format_err(name, path, e))?;
            let count = t.iter().filter(|x| !x.is_finite()).count();
            if count > 0 {
                return Err(ModelError::NonFinite {
                    model: name.to_string(),
                    tensor: tname.clone(),
                    count,
                });
            }
        }
        crate::turns::pace();
        let tokenizer = GgufTokenizer::from_gguf(&ct).map_err(|reason| ModelError::Tokenizer {
            model: name.to_string(),
            reason,
        })?;
        let template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .or_else(|| (params.arch == "gemma3").then(|| super::chat::GEMMA_TEMPLATE.to_string()));
        let chat_template = match template {
            Some(src) => Some(
                ChatTemplate::new(
                    src,
                    tokenizer.bos_token.clone().unwrap_or_default(),
                    tokenizer.eos_token.clone().unwrap_or_default(),
                )
                .map_err(|reason| ModelError::ChatTemplate {
                    model: name.to_string(),
                    reason,
                })?,
            ),
            None => None,
        };
        let file_ctx = params.context_length.unwrap_or(MAX_SEQ_LEN);
        let context_length = context_length.min(file_ctx).min(MAX_SEQ_LEN);
        crate::turns::pace();
        // Reading and uploading happen tensor by tensor: a failure is sorted by its cause,
        // so an out-of-memory or a driver error does not send the operator to the file.
        let weights = ModelWeights::from_gguf(ct, &mut file, device)
            .map_err(|e| super::LoadFault::error(e, name, path, device, "GGUF"))?;
        Ok(Self {
            weights: Arc::new(weights),
            tokenizer,
            chat_template,
            context_length,
            weight_bytes,
            arch: params.arch,
            name: name.to_string(),
            device: device.clone(),
        })
    }

    /// Renders a conversation with the model's chat template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, String> {
        match &self.chat_template {
            Some(t) => t.render(messages),
            None => Err(format!("model `{}` has no chat template", self.name)),
        }
    }

    /// Logits for the token after `ids` (a fresh session).
    pub fn next_logits(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let logits = self.session().feed(ids, &mut || true)?;
        let logits = logits.ok_or_else(|| self.err("empty input"))?;
        logits.to_vec1::<f32>().map_err(|e| self.err(e))
    }

    /// Greedy generation of up to `n` tokens after `prompt`: the text and the ids.
    pub fn greedy_text(&self, prompt: &str, n: usize) -> Result<(String, Vec<u32>), String> {
        let ids = self.tokenizer.encode(prompt)?;
        let mut session = self.session();
        let mut logits = session
            .feed(&ids, &mut || true)
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(l) = logits {
            let t = l
                .argmax(0)
                .and_then(|t| t.to_scalar::<u32>())
                .map_err(|e| e.to_string())?;
            out.push(t);
            if out.len() >= n || self.tokenizer.end_of_generation.contains(&t) {
                break;
            }
            logits = session
                .feed(&[t], &mut || true)
                .map_err(|e| e.to_string())?;
        }
        Ok((self.tokenizer.decode(&out), out))
    }

    fn err(&self, reason: impl ToString) -> ModelError {
        ModelError::Inference {
            model: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// A fresh decoding session with its own KV cache.
    pub fn session(&self) -> Session {
        Session {
            weights: self.weights.clone(),
            cache: self.new_cache(PREFILL_CHUNK),
            device: self.device.clone(),
            model: self.name.clone(),
        }
    }

    /// An empty KV cache sized for `tokens` tokens.
    pub fn new_cache(&self, tokens: usize) -> KvCache {
        self.weights.new_cache(tokens)
    }

    /// Bytes one token takes in a sequence's KV cache.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.weights.kv_bytes_per_token()
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One forward pass over a batch of sequences (see [`ModelWeights::step`]), at the
    /// CPU's turn when on the CPU.
    pub fn step(&self, items: &mut [StepItem<'_>]) -> Result<Vec<Option<Tensor>>, ModelError> {
        let _turn = crate::turns::turn_on(&self.device);
        self.weights.step(items).map_err(|e| self.err(e))
    }
}

/// One sequence decoded on its own: shared weights, its own KV cache.
pub struct Session {
    weights: Arc<ModelWeights>,
    cache: KvCache,
    device: Device,
    model: String,
}

impl Session {
    /// Feeds `ids` after what was fed before and returns the logits for the next token.
    /// `keep_going` is asked between prefill chunks; when it says no, `Ok(None)` is returned.
    pub fn feed(
        &mut self,
        ids: &[u32],
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Tensor>, ModelError> {
        let mut logits = None;
        let chunks = ids.len().div_ceil(PREFILL_CHUNK);
        for (i, chunk) in ids.chunks(PREFILL_CHUNK).enumerate() {
            if i > 0 && !keep_going() {
                return Ok(None);
            }
            let _turn = crate::turns::turn_on(&self.device);
            let mut items = [StepItem {
                ids: chunk,
                cache: &mut self.cache,
                logits: i + 1 == chunks,
            }];
            let out = self
                .weights
                .step(&mut items)
                .map_err(|e| ModelError::Inference {
                    model: self.model.clone(),
                    reason: e.to_string(),
                })?;
            logits = out.into_iter().next().flatten();
        }
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth::{write_tiny_llama_gguf, TinyLlm};
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::QTensor;
    use std::path::PathBuf;

    type Meta = Vec<(String, Value)>;
    type Tensors = Vec<(String, QTensor)>;

    /// The tiny llama GGUF rewritten after `edit` changed its metadata and tensors.
    fn tiny_with(dir: &Path, name: &str, edit: impl FnOnce(&mut Meta, &mut Tensors)) -> PathBuf {
        let src = dir.join("tiny.gguf");
        if !src.exists() {
            write_tiny_llama_gguf(&src, &TinyLlm::default()).unwrap();
        }
        let mut f = std::io::BufReader::new(std::fs::File::open(&src).unwrap());
        let ct = Content::read(&mut f).unwrap();
        let mut meta: Meta = ct.metadata.clone().into_iter().collect();
        meta.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tensors: Tensors = ct
            .tensor_infos
            .keys()
            .map(|n| (n.clone(), ct.tensor(&mut f, n, &Device::Cpu).unwrap()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        edit(&mut meta, &mut tensors);
        let dst = dir.join(name);
        let md: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut out = std::io::BufWriter::new(std::fs::File::create(&dst).unwrap());
        gguf_file::write(&mut out, &md, &ts).unwrap();
        std::io::Write::flush(&mut out).unwrap();
        dst
    }

    fn set(meta: &mut Meta, key: &str, v: Value) {
        meta.retain(|(k, _)| k != key);
        meta.push((key.to_string(), v));
    }

    fn load_err(path: &Path) -> String {
        match Llm::load("m", path, &Device::Cpu, 512) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => {
                assert_eq!(e.check_name(), "format", "{e}");
                assert!(matches!(e, ModelError::Format { .. }), "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn alignment_zero_is_a_format_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny_with(dir.path(), "a0.gguf", |m, _| {
            set(m, "general.alignment", Value::U32(0))
        });
        let e = weight_bytes_of(&p, true).unwrap_err();
        assert!(
            e.contains("general.alignment is 0: must be a power of two"),
            "{e}"
        );
        let e = load_err(&p);
        assert!(e.contains("general.alignment is 0"), "{e}");
    }

    #[test]
    fn empty_and_short_files_say_how_short() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.gguf");
        std::fs::write(&p, b"").unwrap();
        let want = "file is 0 bytes: too short to be a GGUF file (the header is at least 24 bytes)";
        assert_eq!(weight_bytes_of(&p, true).unwrap_err(), want);
        assert!(load_err(&p).contains(want));
        std::fs::write(&p, b"GGUF\x03\0\0\0\x01").unwrap();
        assert!(weight_bytes_of(&p, true)
            .unwrap_err()
            .contains("file is 9 bytes: too short to be a GGUF v3 file"));
    }

    #[test]
    fn huge_counts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny_with(dir.path(), "t.gguf", |_, _| {});
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let e = weight_bytes_of(&p, true).unwrap_err();
        assert!(
            e.contains("tensor count 1099511627776 (2^40) exceeds what a"),
            "{e}"
        );
    }

    #[test]
    fn the_tiny_model_and_the_real_one_pass_the_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny_with(dir.path(), "t.gguf", |_, _| {});
        let mut f = std::io::BufReader::new(std::fs::File::open(&p).unwrap());
        let (ct, h) = header::read_gguf(&mut f).unwrap();
        assert_eq!(h.tensor_data_offset, ct.tensor_data_offset);
        let params = check_llama(&ct).unwrap();
        assert_eq!((params.head_dim, params.context_length), (16, Some(512)));
        let real = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        if real.exists() {
            let mut f = std::io::BufReader::new(std::fs::File::open(&real).unwrap());
            let (ct, h) = header::read_gguf(&mut f).unwrap();
            assert_eq!(h.tensor_data_offset, ct.tensor_data_offset);
            assert_eq!(h.tensor_count as usize, ct.tensor_infos.len());
            let params = check_llama(&ct).unwrap();
            assert_eq!(params.vocab, Some(49152));
        }
    }

    /// An architecture or tokenizer swapd does not run is refused by name, with the list it
    /// does run; "not a valid GGUF" stays for invalid files.
    #[test]
    fn unsupported_architectures_and_tokenizers_name_themselves_and_the_supported_list() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny_with(dir.path(), "arch.gguf", |m, _| {
            set(m, "general.architecture", Value::String("mamba".into()))
        });
        let err = Llm::load("m", &p, &Device::Cpu, 512).err().unwrap();
        assert!(matches!(err, ModelError::Unsupported { .. }), "{err}");
        let err = err.to_string();
        assert!(
            err.contains(
                "architecture `mamba` is not supported (supported: llama, gemma3, qwen2, qwen3, phi3)"
            ),
            "{err}"
        );
        assert!(!err.contains("not a valid GGUF"), "{err}");
        let p = tiny_with(dir.path(), "tok.gguf", |m, _| {
            set(m, "tokenizer.ggml.model", Value::String("rwkv".into()))
        });
        let err = Llm::load("m", &p, &Device::Cpu, 512).err().unwrap();
        assert_eq!(err.check_name(), "tokenizer", "{err}");
        let err = err.to_string();
        assert!(
            err.contains("tokenizer.ggml.model `rwkv` is not supported (supported: gpt2, llama)"),
            "{err}"
        );
    }

    /// Metadata that loads but cannot serve fails `format` at load, naming the problem.
    #[test]
    fn unusable_metadata_fails_format_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let u = Value::U32;
        type Mutate = Box<dyn FnOnce(&mut Meta, &mut Tensors)>;
        let cases: Vec<(&str, Mutate, &str)> = vec![
            (
                "ctx0",
                Box::new(move |m, _| set(m, "llama.context_length", u(0))),
                "llama.context_length is 0",
            ),
            (
                "embd0",
                Box::new(move |m, _| set(m, "llama.embedding_length", u(0))),
                "llama.embedding_length is 0",
            ),
            (
                "blocks0",
                Box::new(move |m, _| set(m, "llama.block_count", u(0))),
                "llama.block_count is 0",
            ),
            (
                "heads3",
                Box::new(move |m, _| set(m, "llama.attention.head_count", u(3))),
                "llama.embedding_length 64 is not a multiple of llama.attention.head_count 3",
            ),
            (
                "kv0",
                Box::new(move |m, _| set(m, "llama.attention.head_count_kv", u(0))),
                "llama.attention.head_count_kv is 0",
            ),
            (
                "kv3",
                Box::new(move |m, _| set(m, "llama.attention.head_count_kv", u(3))),
                "llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 3",
            ),
            (
                "rope-nan",
                Box::new(|m, _| set(m, "llama.rope.freq_base", Value::F32(f32::NAN))),
                "llama.rope.freq_base is NaN",
            ),
            (
                "rope-inf",
                Box::new(|m, _| set(m, "llama.rope.freq_base", Value::F32(f32::INFINITY))),
                "llama.rope.freq_base is inf",
            ),
            (
                "rope-dim",
                Box::new(move |m, _| set(m, "llama.rope.dimension_count", u(1 << 31))),
                "llama.rope.dimension_count 2147483648 differs from the head size 16",
            ),
            (
                "eps0",
                Box::new(|m, _| set(m, "llama.attention.layer_norm_rms_epsilon", Value::F32(0.0))),
                "llama.attention.layer_norm_rms_epsilon is 0",
            ),
            (
                "eps-nan",
                Box::new(|m, _| {
                    set(
                        m,
                        "llama.attention.layer_norm_rms_epsilon",
                        Value::F32(f32::NAN),
                    )
                }),
                "llama.attention.layer_norm_rms_epsilon is NaN",
            ),
            (
                "vocab",
                Box::new(|m, _| {
                    let mut tokens = m
                        .iter()
                        .find(|(k, _)| k == "tokenizer.ggml.tokens")
                        .unwrap()
                        .1
                        .to_vec()
                        .unwrap()
                        .clone();
                    tokens.push(Value::String("extra".into()));
                    set(m, "tokenizer.ggml.tokens", Value::Array(tokens));
                }),
                "has 271 rows but tokenizer.ggml.tokens has 272 tokens",
            ),
            (
                "head",
                Box::new(|_, t| {
                    let out = t.iter_mut().find(|(n, _)| n == "output.weight").unwrap();
                    let w = candle_core::Tensor::zeros(
                        (270, 64),
                        candle_core::DType::F32,
                        &Device::Cpu,
                    )
                    .unwrap();
                    out.1 = QTensor::quantize(&w, GgmlDType::F32).unwrap();
                }),
                "tensor `output.weight` has shape [270, 64], expected [271, 64]",
            ),
            (
                "kv-shape",
                Box::new(move |m, _| set(m, "llama.attention.head_count_kv", u(4))),
                "tensor `blk.0.attn_k.weight` has shape [32, 64], expected [64, 64]",
            ),
            (
                "missing",
                Box::new(|_, t| t.retain(|(n, _)| n != "blk.1.ffn_up.weight")),
                "tensor `blk.1.ffn_up.weight` is missing",
            ),
            (
                "ctx-type",
                Box::new(|m, _| set(m, "llama.context_length", Value::U64(512))),
                "llama.context_length is U64(512): expected a u32",
            ),
        ];
        for (name, edit, want) in cases {
            let p = tiny_with(dir.path(), &format!("{name}.gguf"), edit);
            let e = load_err(&p);
            assert!(e.contains(want), "{name}: {e}");
        }
    }
}
