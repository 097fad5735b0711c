//! A sentence-embedding model from a Hugging Face directory (config.json, model.safetensors,
//! tokenizer.json) through candle-transformers' BERT, pooled and normalized the way
//! sentence-transformers does it.
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::ModelError;

/// A loaded embedding model.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    /// Length of every output vector.
    pub dimension: usize,
    /// Inputs are truncated to this many tokens (special tokens included).
    pub max_tokens: usize,
    pub vocab_size: usize,
    pub weight_bytes: u64,
    name: String,
    device: Device,
}

/// One embedded text.
#[derive(Debug, Clone)]
pub struct EmbeddingOut {
    /// Unit-length vector.
    pub values: Vec<f32>,
    pub tokens: usize,
    pub truncated: bool,
}

impl Embedder {
    /// Loads `dir`. `max_tokens` caps the input length (also capped by the position table).
    pub fn load(
        name: &str,
        dir: &Path,
        device: &Device,
        max_tokens: usize,
    ) -> Result<Self, ModelError> {
        let fmt = |file: &str, format: &'static str, reason: String| ModelError::Format {
            model: name.to_string(),
            path: dir.join(file),
            format,
            reason,
        };
        let config_text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| fmt("config.json", "JSON", e.to_string()))?;
        let config: Config = serde_json::from_str(&config_text)
            .map_err(|e| fmt("config.json", "BERT config", e.to_string()))?;
        super::compute::pace();
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), device)
            .map_err(|e| fmt("model.safetensors", "safetensors", e.to_string()))?;
        let weight_bytes = tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        super::compute::pace();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = BertModel::load(vb, &config)
            .map_err(|e| fmt("model.safetensors", "BERT weights", e.to_string()))?;
        super::compute::pace();
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            ModelError::Tokenizer {
                model: name.to_string(),
                reason: format!("{}: {e}", dir.join("tokenizer.json").display()),
            }
        })?;
        let max_tokens = max_tokens.min(config.max_position_embeddings);
        // The shipped tokenizer.json pads every input to 128 tokens: pad only to the longest
        // input of the batch instead (the padding is masked out, so results are unchanged).
        let mut padding = tokenizer.get_padding().cloned().unwrap_or(PaddingParams {
            pad_id: config.pad_token_id as u32,
            ..PaddingParams::default()
        });
        padding.strategy = PaddingStrategy::BatchLongest;
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| ModelError::Tokenizer {
                model: name.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            model,
            tokenizer,
            dimension: config.hidden_size,
            max_tokens,
            vocab_size: config.vocab_size,
            weight_bytes,
            name: name.to_string(),
            device: device.clone(),
        })
    }

    fn err(&self, reason: impl ToString) -> ModelError {
        ModelError::Inference {
            model: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// Embeds `texts` as one batch: mean pooling over real tokens, then L2 normalization.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<EmbeddingOut>, ModelError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| self.err(e))?;
        let rows = encodings.len();
        let cols = encodings.first().map(|e| e.len()).unwrap_or(0);
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings
                .iter()
                .flat_map(|e| f(e).iter().copied())
                .collect()
        };
        let ids = flat(&|e| e.get_ids());
        let types = flat(&|e| e.get_type_ids());
        let mask = flat(&|e| e.get_attention_mask());
        let tensor = |v: Vec<u32>| Tensor::from_vec(v, (rows, cols), &self.device);
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let _turn = super::compute::turn_on(&self.device);
            let mask_t = tensor(mask.clone())?;
            let hidden = self.model.forward(
                &tensor(ids.clone())?,
                &tensor(types.clone())?,
                Some(&mask_t),
            )?;
            let m = mask_t.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&m)?.sum(1)?;
            let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        };
        let vectors = run().map_err(|e| self.err(e))?;
        Ok(vectors
            .into_iter()
            .zip(&encodings)
            .map(|(values, enc)| EmbeddingOut {
                values,
                tokens: enc.get_attention_mask().iter().filter(|&&m| m == 1).count(),
                truncated: !enc.get_overflowing().is_empty(),
            })
            .collect())
    }
}
