//! The quantized llama forward pass of candle-transformers 0.11.1
//! (`models::quantized_llama`), with its projections and output head on [`QLinear`], which
//! runs this crate's SIMD kernels on the CPU (and candle's `QMatMul` elsewhere).
//!
//! Attention, RoPE, masking and the KV cache are candle's, with three changes:
//! - projections sharing an input (query/key/value, gate/up) are applied with
//!   [`QLinear::forward_many`], which quantizes that input once and runs them in one
//!   parallel region;
//! - queries, keys and values are rounded to f16 precision after RoPE, as llama.cpp's f16 KV
//!   cache and f16 K·Q product do. The kernels' activation quantization is llama.cpp's
//!   (closer to exact than candle's), and without this rounding greedy decoding of the
//!   fixture prompts parts from llama.cpp's on near-ties (logit margins under 0.1) where
//!   exact arithmetic would part from it too; with it, margins there grow to 0.15–0.3;
//! - grouped-query attention multiplies each key/value head with its group of query heads
//!   directly instead of repeating K and V (same products, no copy of the cache per step).
//!
//! The GGML (pre-GGUF) loader is left out: swapd only reads GGUF.
use crate::model::norm::RmsNorm;
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use candle_transformers::utils::build_causal_mask;

use std::sync::Arc;

use super::{masked_fill, precomput_freqs_cis, round_f16, split_rows, TokEmbedding};
use crate::model::attention::{self, Heads, Rope};
use crate::model::kv::{KvCache, StepItem};
use crate::model::moe::{Mlp, MlpOrMoe};
use crate::quant::QLinear;

pub use candle_transformers::models::quantized_llama::MAX_SEQ_LEN;
pub use sequential::Sequential;

mod device;
mod sequential;

fn linear(t: QTensor) -> Result<QLinear> {
    QLinear::from_qtensor(t)
}

#[derive(Debug, Clone)]
struct LayerWeights {
    attention_wq: QLinear,
    attention_wk: QLinear,
    attention_wv: QLinear,
    attention_wo: QLinear,
    attention_norm: RmsNorm,
    mlp_or_moe: MlpOrMoe,
    ffn_norm: RmsNorm,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Query, key and value biases (qwen2).
    bias: Option<[Tensor; 3]>,
    /// Per-head RMS norms of queries and keys, before RoPE (qwen3).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    /// RoPE convention: true = NEOX (pairs i with i+d/2), false = NORM (pairs 2i, 2i+1).
    rope_is_neox: bool,
    cos: Tensor,
    sin: Tensor,
    neg_inf: Tensor,
    /// The RoPE tables as plain vectors, for the CPU attention (shared by every layer).
    rope_cpu: Option<Arc<Rope>>,
}

impl LayerWeights {
    /// Adds the projection biases and normalizes query and key heads, when the
    /// architecture has them.
    fn adjust_qkv(&self, q: Tensor, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = match &self.bias {
            Some([bq, bk, bv]) => (
                q.broadcast_add(bq)?,
                k.broadcast_add(bk)?,
                v.broadcast_add(bv)?,
            ),
            None => (q, k, v),
        };
        let Some((nq, nk)) = &self.qk_norm else {
            return Ok((q, k, v));
        };
        let heads = |norm: &RmsNorm, x: &Tensor| -> Result<Tensor> {
            let dims = x.dims().to_vec();
            let rows = x.elem_count() / self.head_dim;
            norm.forward(&x.reshape((rows, self.head_dim))?)?
                .reshape(dims)
        };
        Ok((heads(nq, &q)?, heads(nk, &k)?, v))
    }
}

/// A llama-architecture GGUF model, ready to run.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    tok_embeddings: TokEmbedding,
    layers: Vec<LayerWeights>,
    norm: RmsNorm,
    output: QLinear,
}

impl ModelWeights {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".into());
        let params =
            crate::model::llama_meta::check_family(&ct, &arch).map_err(candle_core::Error::msg)?;
        let md_get = |s: &str| match ct.metadata.get(&format!("{arch}.{s}")) {
            None => candle_core::bail!("cannot find {arch}.{s} in metadata"),
            Some(v) => Ok(v),
        };
        let n_expert = md_get("expert_count").and_then(|v| v.to_u32()).unwrap_or(0) as usize;
        let n_expert_used = md_get("expert_used_count")
            .and_then(|v| v.to_u32())
            .unwrap_or(0) as usize;
        let head_count = params.head_count;
        let head_count_kv = params.head_count_kv;
        let block_count = params.block_count;
        let head_dim = params.head_dim;
        let rope_dim = head_dim;
        let rms_norm_eps = md_get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let rope_freq_base = md_get("rope.freq_base")
            .and_then(|m| m.to_f32())
            .unwrap_or(10000f32);

        // RoPE convention from the architecture, as llama.cpp's llama_model_rope_type().
        let rope_is_neox = matches!(
            arch.as_str(),
            "qwen"
                | "qwen2"
                | "qwen2moe"
                | "qwen3"
                | "qwen3moe"
                | "falcon"
                | "grok"
                | "dbrx"
                | "phi2"
                | "phi3"
                | "phimoe"
                | "stablelm"
                | "starcoder2"
                | "bert"
                | "nomic-bert"
                | "jina-bert-v2"
                | "olmo2"
                | "olmoe"
                | "codeshell"
                | "plamo"
        );

        // Each tensor is read (and the last one packed) in a slice of its own when this is
        // a background load (see `crate::turns::pace`).
        let mut tensor = |name: &str| super::read::tensor(&ct, reader, name, device);
        // llama 3's per-pair RoPE frequency factors, when the file has them.
        let factors = match ct.tensor_infos.contains_key("rope_freqs.weight") {
            true => {
                let f = tensor("rope_freqs.weight")?
                    .dequantize(&Device::Cpu)?
                    .to_vec1::<f32>()?;
                if let Some(x) = f.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                    candle_core::bail!(
                        "rope_freqs.weight holds {x}: factors must be finite and > 0"
                    );
                }
                Some(f)
            }
            false => None,
        };
        let (cos, sin) = precomput_freqs_cis(
            rope_dim,
            rope_freq_base,
            params.freq_scale,
            factors.as_deref(),
            device,
        )?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?;
        let rope_cpu = match device {
            Device::Cpu => Some(Arc::new(Rope {
                cos: cos.flatten_all()?.to_vec1::<f32>()?,
                sin: sin.flatten_all()?.to_vec1::<f32>()?,
                neox: rope_is_neox,
            })),
            _ => None,
        };

        let tok_embeddings_q = tensor("token_embd.weight")?;
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, rms_norm_eps)?;
        let (tok_embeddings, output) =
            super::embedding_and_head(tok_embeddings_q, tensor("output.weight").ok(), device)?;
        let mut layers = Vec::with_capacity(block_count);
        for layer_idx in 0..block_count {
            let prefix = format!("blk.{layer_idx}");
            let (q_rows, kv_rows) = (head_count * head_dim, head_count_kv * head_dim);
            let [attention_wq, attention_wk, attention_wv]: [QTensor; 3] = if params.fused {
                // phi3: one matrix, the query rows, then the key rows, then the value rows.
                let qkv = tensor(&format!("{prefix}.attn_qkv.weight"))?;
                split_rows(&qkv, &[q_rows, kv_rows, kv_rows], device)?
                    .try_into()
                    .expect("three parts")
            } else {
                [
                    tensor(&format!("{prefix}.attn_q.weight"))?,
                    tensor(&format!("{prefix}.attn_k.weight"))?,
                    tensor(&format!("{prefix}.attn_v.weight"))?,
                ]
            };
            let attention_wo = tensor(&format!("{prefix}.attn_output.weight"))?;
            let mlp_or_moe = if params.fused {
                // phi3: `ffn_up` holds the gate's rows, then the up projection's (llama.cpp's
                // fused SwiGLU takes SiLU of the first half times the second).
                let gate_up = tensor(&format!("{prefix}.ffn_up.weight"))?;
                let ff = gate_up.shape().dims2()?.0 / 2;
                let [gate, up]: [QTensor; 2] = split_rows(&gate_up, &[ff, ff], device)?
                    .try_into()
                    .expect("two parts");
                MlpOrMoe::Mlp(Mlp {
                    feed_forward_w1: linear(gate)?,
                    feed_forward_w2: linear(tensor(&format!("{prefix}.ffn_down.weight"))?)?,
                    feed_forward_w3: linear(up)?,
                })
            } else if n_expert <= 1 {
                let feed_forward_w1 = tensor(&format!("{prefix}.ffn_gate.weight"))?;
                let feed_forward_w2 = tensor(&format!("{prefix}.ffn_down.weight"))?;
                let feed_forward_w3 = tensor(&format!("{prefix}.ffn_up.weight"))?;
                MlpOrMoe::Mlp(Mlp {
                    feed_forward_w1: linear(feed_forward_w1)?,
                    feed_forward_w2: linear(feed_forward_w2)?,
                    feed_forward_w3: linear(feed_forward_w3)?,
                })
            } else {
                let feed_forward_gate_inp = tensor(&format!("{prefix}.ffn_gate_inp.weight"))?;
                let mut experts = Vec::with_capacity(n_expert);
                for i in 0..n_expert {
                    let feed_forward_w1 = tensor(&format!("{prefix}.ffn_gate.{i}.weight"))?;
                    let feed_forward_w2 = tensor(&format!("{prefix}.ffn_down.{i}.weight"))?;
                    let feed_forward_w3 = tensor(&format!("{prefix}.ffn_up.{i}.weight"))?;
                    experts.push(Mlp {
                        feed_forward_w1: linear(feed_forward_w1)?,
                        feed_forward_w2: linear(feed_forward_w2)?,
                        feed_forward_w3: linear(feed_forward_w3)?,
                    })
                }
                MlpOrMoe::MoE {
                    n_expert_used,
                    feed_forward_gate_inp: linear(feed_forward_gate_inp)?,
                    experts,
                }
            };
            // qwen2's query/key/value biases and qwen3's per-head query/key norms.
            let has = |n: &str| ct.tensor_infos.contains_key(&format!("{prefix}.{n}"));
            let bias = if has("attn_q.bias") {
                let mut b = |n: &str| -> Result<Tensor> {
                    tensor(&format!("{prefix}.{n}.bias"))?.dequantize(device)
                };
                Some([b("attn_q")?, b("attn_k")?, b("attn_v")?])
            } else {
                None
            };
            let qk_norm = if has("attn_q_norm.weight") {
                Some((
                    RmsNorm::from_qtensor(
                        tensor(&format!("{prefix}.attn_q_norm.weight"))?,
                        rms_norm_eps,
                    )?,
                    RmsNorm::from_qtensor(
                        tensor(&format!("{prefix}.attn_k_norm.weight"))?,
                        rms_norm_eps,
                    )?,
                ))
            } else {
                None
            };
            let attention_norm = tensor(&format!("{prefix}.attn_norm.weight"))?;
            let ffn_norm = tensor(&format!("{prefix}.ffn_norm.weight"))?;
            crate::turns::pace();
            layers.push(LayerWeights {
                attention_wq: linear(attention_wq)?,
                attention_wk: linear(attention_wk)?,
                attention_wv: linear(attention_wv)?,
                attention_wo: linear(attention_wo)?,
                attention_norm: RmsNorm::from_qtensor(attention_norm, rms_norm_eps)?,
                mlp_or_moe,
                ffn_norm: RmsNorm::from_qtensor(ffn_norm, rms_norm_eps)?,
                n_head: head_count,
                n_kv_head: head_count_kv,
                head_dim,
                bias,
                qk_norm,
                rope_is_neox,
                cos: cos.clone(),
                sin: sin.clone(),
                neg_inf: neg_inf.clone(),
                rope_cpu: rope_cpu.clone(),
            })
        }
        Ok(Self {
            tok_embeddings,
            layers,
            norm,
            output,
        })
    }

    /// Layers (each holds a slice of every sequence's KV cache).
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// An empty KV cache for one sequence, with room for `tokens` tokens.
    pub fn new_cache(&self, tokens: usize) -> KvCache {
        let width = self.layers.first().map_or(0, |l| l.n_kv_head * l.head_dim);
        KvCache::new(
            self.n_layers(),
            tokens,
            width,
            self.output_device().is_cpu(),
        )
    }

    /// Bytes of keys and values one token takes in a sequence's cache (every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        let value = super::kv_value_bytes(self.output_device().is_cpu());
        self.layers
            .iter()
            .map(|l| 2 * l.n_kv_head * l.head_dim * value)
            .sum()
    }

    /// One forward step over a batch of sequences: each item's tokens join its own cache
    /// (at its own position), and each item that asks for them gets the logits of its next
    /// token (`[vocab]`, f32), in order; the others get `None`.
    ///
    /// Projections, norms and the MLP run over the rows of every item at once (each weight
    /// block loaded once for all of them); attention runs per item over its own cache. Every
    /// operation computes a row from that row alone, so an item's logits are bit-identical
    /// whatever else is in the batch.
    pub fn step(&self, items: &mut [StepItem<'_>]) -> Result<Vec<Option<Tensor>>> {
        let device = self.output_device();
        let lens: Vec<usize> = items.iter().map(|i| i.ids.len()).collect();
        if lens.contains(&0) {
            candle_core::bail!("a step item has no tokens");
        }
        let ids: Vec<u32> = items.iter().flat_map(|i| i.ids.iter().copied()).collect();
        let masks = items
            .iter()
            .map(|i| match i.ids.len() {
                1 => Ok(None),
                n => build_causal_mask(n, i.cache.pos(), &device).map(Some),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut x = self
            .tok_embeddings
            .forward(&Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attention_norm.forward(&x)?;
            let [q, k, v]: [Tensor; 3] = QLinear::forward_many(
                &[
                    &layer.attention_wq,
                    &layer.attention_wk,
                    &layer.attention_wv,
                ],
                &h,
            )?
            .try_into()
            .expect("three projections");
            let (q, k, v) = layer.adjust_qkv(q, k, v)?;
            let y = match &layer.rope_cpu {
                Some(rope) => {
                    let h = Heads {
                        n_head: layer.n_head,
                        n_kv_head: layer.n_kv_head,
                        head_dim: layer.head_dim,
                    };
                    let span = attention::Span::causal(h.head_dim);
                    super::attend_items(h, span, rope, &q, &k, &v, items, &lens, li)?
                }
                None => {
                    let mut ys = Vec::with_capacity(items.len());
                    let mut off = 0;
                    for ((item, &n), mask) in items.iter_mut().zip(&lens).zip(&masks) {
                        let rows = |t: &Tensor| t.narrow(1, off, n);
                        ys.push(layer.attend(
                            &rows(&q)?,
                            &rows(&k)?,
                            &rows(&v)?,
                            item.cache,
                            li,
                            mask.as_ref(),
                        )?);
                        off += n;
                    }
                    if ys.len() == 1 {
                        ys.pop().expect("one item")
                    } else {
                        Tensor::cat(&ys, 1)?
                    }
                }
            };
            let x1 = (layer.attention_wo.forward(&y)? + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            x = (layer.mlp_or_moe.forward(&h)? + &x1)?;
        }
        for (item, &n) in items.iter_mut().zip(&lens) {
            item.cache.advance(n);
        }
        super::head_logits(&x, items, &lens, &self.norm, &self.output)
    }

    /// The device the weights are on.
    fn output_device(&self) -> Device {
        self.layers
            .first()
            .map(|l| l.cos.device().clone())
            .unwrap_or(Device::Cpu)
    }
}
