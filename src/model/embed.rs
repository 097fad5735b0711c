//! A sentence-embedding model from a Hugging Face directory (config.json, model.safetensors,
//! tokenizer.json) through candle-transformers' BERT, pooled and normalized the way
//! sentence-transformers does it.
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::ModelError;

/// Reads the safetensors file at `path` into host memory as candle does, after checking its
/// header ([`super::safetensors::check_safetensors_header`]): a broken file is an error naming
/// what is wrong, never a panic. Moving the tensors to a device is a separate step with
/// errors of its own (see [`Embedder::load`]).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    super::safetensors::check_safetensors_header(&mut std::io::BufReader::new(&mut file), len)?;
    catch_unwind(AssertUnwindSafe(|| {
        candle_core::safetensors::load(path, &Device::Cpu)
    }))
    .map_err(|p| {
        format!(
            "the safetensors reader panicked: {}",
            crate::panic::message(p.as_ref())
        )
    })?
    .map_err(|e| e.to_string())
}

/// The BERT settings candle divides by or sizes tables from must make sense (candle's
/// loader divides `hidden_size` by `num_attention_heads` unchecked).
pub fn check_bert_config(c: &Config) -> Result<(), String> {
    let positive = [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
        ("intermediate_size", c.intermediate_size),
        ("max_position_embeddings", c.max_position_embeddings),
        ("type_vocab_size", c.type_vocab_size),
    ];
    for (k, v) in positive {
        if v == 0 {
            return Err(format!("{k} is 0"));
        }
    }
    if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size, c.num_attention_heads
        ));
    }
    if !(c.layer_norm_eps.is_finite() && c.layer_norm_eps > 0.0) {
        return Err(format!(
            "layer_norm_eps is {}: must be a finite number > 0",
            c.layer_norm_eps
        ));
    }
    if c.pad_token_id >= c.vocab_size {
        return Err(format!(
            "pad_token_id {} is outside the vocabulary of {}",
            c.pad_token_id, c.vocab_size
        ));
    }
    Ok(())
}

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
        check_bert_config(&config).map_err(|e| fmt("config.json", "BERT config", e))?;
        crate::turns::pace();
        let st_path = dir.join("model.safetensors");
        let mut tensors =
            read_safetensors(&st_path).map_err(|e| fmt("model.safetensors", "safetensors", e))?;
        if !device.is_cpu() {
            crate::turns::pace();
            for t in tensors.values_mut() {
                *t = t.to_device(device).map_err(|e| ModelError::Device {
                    model: name.to_string(),
                    device: super::device_label(device),
                    reason: e.to_string().lines().next().unwrap_or_default().to_string(),
                })?;
            }
        }
        let weight_bytes = tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        crate::turns::pace();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = catch_unwind(AssertUnwindSafe(|| BertModel::load(vb, &config)))
            .unwrap_or_else(|p| {
                Err(candle_core::Error::msg(format!(
                    "the BERT loader panicked: {}",
                    crate::panic::message(p.as_ref())
                )))
            })
            .map_err(|e| super::LoadFault::error(e, name, &st_path, device, "BERT weights"))?;
        crate::turns::pace();
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
            let _turn = crate::turns::turn_on(&self.device);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth::{write_tiny_bert, TinyBert};

    fn load_err(dir: &Path) -> String {
        match Embedder::load("e", dir, &Device::Cpu, 64) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(e) => {
                assert!(matches!(e, ModelError::Format { .. }), "{e}");
                assert_eq!(e.check_name(), "format");
                e.to_string()
            }
        }
    }

    fn with_config(dir: &Path, key: &str, v: serde_json::Value) {
        let p = dir.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        c[key] = v;
        std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
    }

    /// candle's BERT loader divides by `num_attention_heads`: 0 panicked there.
    #[test]
    fn unusable_configs_are_format_errors_not_panics() {
        for (key, v, want) in [
            (
                "num_attention_heads",
                serde_json::json!(0),
                "num_attention_heads is 0",
            ),
            (
                "num_attention_heads",
                serde_json::json!(3),
                "hidden_size 32 is not a multiple of num_attention_heads 3",
            ),
            ("hidden_size", serde_json::json!(0), "hidden_size is 0"),
            (
                "layer_norm_eps",
                serde_json::json!(-1.0),
                "layer_norm_eps is -1",
            ),
            (
                "pad_token_id",
                serde_json::json!(100000),
                "pad_token_id 100000 is outside",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write_tiny_bert(dir.path(), &TinyBert::default()).unwrap();
            with_config(dir.path(), key, v);
            let e = load_err(dir.path());
            assert!(e.contains(want), "{key}: {e}");
        }
    }

    #[test]
    fn broken_safetensors_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_bert(dir.path(), &TinyBert::default()).unwrap();
        let st = dir.path().join("model.safetensors");
        let good = std::fs::read(&st).unwrap();
        std::fs::write(&st, b"").unwrap();
        let e = load_err(dir.path());
        assert!(
            e.contains("file is 0 bytes: too short to be a safetensors file"),
            "{e}"
        );
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&st, &huge).unwrap();
        let e = load_err(dir.path());
        assert!(
            e.contains("header length 1099511627776 (2^40) exceeds"),
            "{e}"
        );
        std::fs::write(&st, &good[..good.len() - 100]).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&st, &good).unwrap();
        assert!(Embedder::load("e", dir.path(), &Device::Cpu, 64).is_ok());
    }

    #[test]
    fn the_real_model_passes_the_checks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2");
        if !dir.join("model.safetensors").exists() {
            return;
        }
        let config: Config =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        check_bert_config(&config).unwrap();
        let p = dir.join("model.safetensors");
        let len = std::fs::metadata(&p).unwrap().len();
        let h = crate::model::safetensors::check_safetensors_header(
            &mut std::fs::File::open(&p).unwrap(),
            len,
        )
        .unwrap();
        assert!(h.tensor_count > 50, "{h:?}");
    }
}
