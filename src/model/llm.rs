//! A causal language model from a GGUF file, run through swapd's copy of candle-transformers'
//! quantized llama ([`super::qllama`]), whose matmuls use the SIMD kernels of [`crate::quant`].
//! The weights are loaded once per version; every request decodes in its own [`Session`],
//! which clones the model cheaply (weights are shared through `Arc`, the KV cache is not).
use std::path::Path;

use super::qllama::{ModelWeights, MAX_SEQ_LEN};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::chat::{ChatMessage, ChatTemplate};
use super::tokenizer::GgufTokenizer;
use super::ModelError;

/// Tokens fed per forward pass during prefill: bounds the attention matrix of a long prompt
/// and lets a cancelled request stop between chunks.
const PREFILL_CHUNK: usize = 256;

/// Bytes a GGUF tensor takes as stored (quantized blocks).
pub fn stored_bytes(info: &candle_core::quantized::gguf_file::TensorInfo) -> u64 {
    (info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
}

/// Bytes the tensors of `ct` take once loaded onto the CPU (`on_cpu`) or another device.
/// Every tensor must lie inside the file: a truncated download fails here, with a clear
/// reason, instead of deep inside the loader.
fn tensor_bytes(ct: &Content, file_len: u64, on_cpu: bool) -> Result<u64, String> {
    let mut total = 0u64;
    for (tname, info) in &ct.tensor_infos {
        let elems = info.shape.elem_count();
        let bytes = stored_bytes(info);
        let end = ct.tensor_data_offset + info.offset + bytes;
        if end > file_len {
            return Err(format!(
                "tensor `{tname}` ends at byte {end} but the file has {file_len} bytes (truncated?)"
            ));
        }
        total += bytes;
        if tname == "token_embd.weight"
            && !crate::quant::packs(info.ggml_dtype, info.shape.dims(), on_cpu)
        {
            // Unless the table stays packed, the loader adds a dequantized f32 copy of it
            // for lookups.
            total += (elems * 4) as u64;
        }
    }
    Ok(total)
}

/// Bytes the GGUF at `path` will hold once loaded onto the CPU (`on_cpu`) or another
/// device, from its header alone.
pub fn weight_bytes_of(path: &Path, on_cpu: bool) -> Result<u64, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let ct = Content::read(&mut std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    tensor_bytes(&ct, len, on_cpu)
}

/// A loaded GGUF language model: shared weights, tokenizer, chat template.
pub struct Llm {
    weights: ModelWeights,
    pub tokenizer: GgufTokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Longest prompt + completion, in tokens.
    pub context_length: usize,
    pub weight_bytes: u64,
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
    /// RoPE table candle precomputes.
    pub fn load(
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
        let ct = Content::read(&mut file).map_err(|e| format_err(name, path, e))?;
        // `pace` marks where a background load may hand the CPU to serving (see
        // `compute::in_background`).
        super::compute::pace();
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(format_err(
                name,
                path,
                format!("architecture `{arch}` is not supported (only `llama`)"),
            ));
        }
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
            super::compute::pace();
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
        super::compute::pace();
        let tokenizer = GgufTokenizer::from_gguf(&ct).map_err(|reason| ModelError::Tokenizer {
            model: name.to_string(),
            reason,
        })?;
        let chat_template = match ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        {
            Some(src) => Some(
                ChatTemplate::new(
                    src.clone(),
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
        let file_ctx = ct
            .metadata
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize)
            .unwrap_or(MAX_SEQ_LEN);
        let context_length = context_length.min(file_ctx).min(MAX_SEQ_LEN);
        super::compute::pace();
        let weights = ModelWeights::from_gguf(ct, &mut file, device)
            .map_err(|e| format_err(name, path, e))?;
        Ok(Self {
            weights,
            tokenizer,
            chat_template,
            context_length,
            weight_bytes,
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
            pos: 0,
            device: self.device.clone(),
            model: self.name.clone(),
        }
    }
}

/// Per-request decoding state: a clone of the model (shared weights) and its position.
pub struct Session {
    weights: ModelWeights,
    pos: usize,
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
        for chunk in ids.chunks(PREFILL_CHUNK) {
            if logits.is_some() && !keep_going() {
                return Ok(None);
            }
            let out = self.forward(chunk).map_err(|e| ModelError::Inference {
                model: self.model.clone(),
                reason: e.to_string(),
            })?;
            logits = Some(out);
        }
        Ok(logits)
    }

    fn forward(&mut self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let _turn = super::compute::turn_on(&self.device);
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let logits = self.weights.forward(&input, self.pos)?;
        self.pos += ids.len();
        logits.squeeze(0)?.to_dtype(candle_core::DType::F32)
    }
}
