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
mod tests;
