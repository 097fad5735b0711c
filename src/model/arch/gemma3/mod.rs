//! Gemma 3 (`general.architecture = gemma3`), as llama.cpp's `llm_build_gemma3` computes it:
//! - the embedding is scaled by √`embedding_length` and tied to the output head;
//! - every layer normalizes before and after attention and before and after the MLP, and
//!   normalizes queries and keys per head (`attn_q_norm`, `attn_k_norm`) before RoPE (NEOX);
//! - five layers in six are local: they attend within a sliding window
//!   (`gemma3.attention.sliding_window`) with RoPE base 10000; every sixth is global, with
//!   `gemma3.rope.freq_base` (and linear RoPE scaling when the file asks for it);
//! - scores are scaled by `1/√key_length` (llama.cpp's choice for every size but 27B, which
//!   uses `1/√(embedding_length / head_count)`);
//! - the MLP is `down(gelu_tanh(gate(x)) · up(x))`.
//!
//! The GGUF converter already adds Gemma's `+1` to every norm weight, so the norms are plain
//! RMS norms here. Queries, keys and values are rounded to f16 as llama.cpp's f16 cache holds
//! them (see [`crate::model::attention`]).
use std::sync::Arc;

use crate::model::norm::RmsNorm;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Module, Result, Tensor};

use super::{masked_fill, precomput_freqs_cis, round_f16, TokEmbedding};
use crate::model::attention::{Heads, Rope, Span};
use crate::model::kv::{KvCache, StepItem};
use crate::quant::QLinear;

mod meta;

pub use meta::check;
use meta::params;

/// llama.cpp's fixed Gemma 3 layout: layer `i` is global when `i % 6 == 5`.
const SWA_PATTERN: usize = 6;
/// llama.cpp's fixed RoPE base of the local layers.
const LOCAL_FREQ_BASE: f32 = 10_000.0;

#[derive(Debug, Clone)]
struct Layer {
    q: QLinear,
    k: QLinear,
    v: QLinear,
    o: QLinear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
    local: bool,
}

/// RoPE tables of one base: plain vectors for the CPU attention, tensors elsewhere.
#[derive(Debug, Clone)]
struct RopeTables {
    cpu: Option<Arc<Rope>>,
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    fn new(head_dim: usize, base: f32, scale: f32, device: &Device) -> Result<Self> {
        let (cos, sin) = precomput_freqs_cis(head_dim, base, scale, None, device)?;
        let cpu = match device {
            Device::Cpu => Some(Arc::new(Rope {
                cos: cos.flatten_all()?.to_vec1::<f32>()?,
                sin: sin.flatten_all()?.to_vec1::<f32>()?,
                neox: true,
            })),
            _ => None,
        };
        Ok(Self { cpu, cos, sin })
    }
}

/// A Gemma 3 model, ready to run.
#[derive(Debug, Clone)]
pub struct Gemma3 {
    embed: TokEmbedding,
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QLinear,
    heads: Heads,
    span_local: Span,
    span_global: Span,
    rope_local: RopeTables,
    rope_global: RopeTables,
    device: Device,
}

impl Gemma3 {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let p = params(&ct).map_err(candle_core::Error::msg)?;
        let mut tensor = |name: &str| super::read::tensor(&ct, reader, name, device);
        let norm = |t: candle_core::quantized::QTensor| RmsNorm::from_qtensor(t, p.eps);
        let (embed, output) = super::embedding_and_head(
            tensor("token_embd.weight")?,
            tensor("output.weight").ok(),
            device,
        )?;
        let out_norm = norm(tensor("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(p.blocks);
        for l in 0..p.blocks {
            let mut w = |n: &str| tensor(&format!("blk.{l}.{n}.weight"));
            let lin = |t| QLinear::from_qtensor(t);
            layers.push(Layer {
                q: lin(w("attn_q")?)?,
                k: lin(w("attn_k")?)?,
                v: lin(w("attn_v")?)?,
                o: lin(w("attn_output")?)?,
                q_norm: norm(w("attn_q_norm")?)?,
                k_norm: norm(w("attn_k_norm")?)?,
                attn_norm: norm(w("attn_norm")?)?,
                post_attn_norm: norm(w("post_attention_norm")?)?,
                ffn_norm: norm(w("ffn_norm")?)?,
                post_ffn_norm: norm(w("post_ffw_norm")?)?,
                gate: lin(w("ffn_gate")?)?,
                up: lin(w("ffn_up")?)?,
                down: lin(w("ffn_down")?)?,
                local: l % SWA_PATTERN < SWA_PATTERN - 1,
            });
        }
        Ok(Self {
            embed,
            embed_scale: (p.dim as f64).sqrt(),
            layers,
            norm: out_norm,
            output,
            heads: Heads {
                n_head: p.heads,
                n_kv_head: p.kv_heads,
                head_dim: p.head_dim,
            },
            span_local: Span {
                scale: p.attn_scale,
                window: Some(p.window),
            },
            span_global: Span {
                scale: p.attn_scale,
                window: None,
            },
            rope_local: RopeTables::new(p.head_dim, LOCAL_FREQ_BASE, 1.0, device)?,
            rope_global: RopeTables::new(p.head_dim, p.freq_base, p.freq_scale, device)?,
            device: device.clone(),
        })
    }

    /// An empty KV cache for one sequence, with room for `tokens` tokens.
    pub fn new_cache(&self, tokens: usize) -> KvCache {
        let h = self.heads;
        let windows: Vec<Option<usize>> = self
            .layers
            .iter()
            .map(|l| {
                if l.local {
                    self.span_local.window
                } else {
                    None
                }
            })
            .collect();
        KvCache::with_windows(
            &windows,
            tokens,
            h.n_kv_head * h.head_dim,
            self.device.is_cpu(),
        )
    }

    /// Bytes of keys and values one token takes in a sequence's cache (every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        let value = super::kv_value_bytes(self.device.is_cpu());
        self.layers.len() * 2 * self.heads.n_kv_head * self.heads.head_dim * value
    }

    /// RMS-normalizes each `head_dim` slice of `x` (`(1, rows, heads · head_dim)`).
    fn head_norm(&self, norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
        let (b, rows, w) = x.dims3()?;
        let d = self.heads.head_dim;
        norm.forward(&x.reshape((b * rows * (w / d), d))?)?
            .reshape((b, rows, w))
    }

    /// One forward step over a batch of sequences: see
    /// [`super::llama::ModelWeights::step`], whose contract this keeps (every operation
    /// computes a row from that row alone).
    pub fn step(&self, items: &mut [StepItem<'_>]) -> Result<Vec<Option<Tensor>>> {
        let device = &self.device;
        let lens: Vec<usize> = items.iter().map(|i| i.ids.len()).collect();
        if lens.contains(&0) {
            candle_core::bail!("a step item has no tokens");
        }
        let ids: Vec<u32> = items.iter().flat_map(|i| i.ids.iter().copied()).collect();
        let mut x = self
            .embed
            .forward(&Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?)?;
        x = (x * self.embed_scale)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v]: [Tensor; 3] =
                QLinear::forward_many(&[&layer.q, &layer.k, &layer.v], &h)?
                    .try_into()
                    .expect("three projections");
            let q = self.head_norm(&layer.q_norm, &q)?;
            let k = self.head_norm(&layer.k_norm, &k)?;
            let (span, rope) = if layer.local {
                (self.span_local, &self.rope_local)
            } else {
                (self.span_global, &self.rope_global)
            };
            let y = match &rope.cpu {
                Some(r) => super::attend_items(self.heads, span, r, &q, &k, &v, items, &lens, li)?,
                None => self.attend_device(rope, span, &q, &k, &v, items, &lens, li)?,
            };
            let y = layer.post_attn_norm.forward(&layer.o.forward(&y)?)?;
            let x1 = (y + &x)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let [g, u]: [Tensor; 2] = QLinear::forward_many(&[&layer.gate, &layer.up], &h)?
                .try_into()
                .expect("two projections");
            let act = if g.device().is_cpu() {
                crate::model::activation::gated(&g, &u, crate::model::activation::gelu)?
            } else {
                (g.gelu()? * u)?
            };
            let m = layer.down.forward(&act)?;
            x = (layer.post_ffn_norm.forward(&m)? + x1)?;
        }
        for (item, &n) in items.iter_mut().zip(&lens) {
            item.cache.advance(n);
        }
        super::head_logits(&x, items, &lens, &self.norm, &self.output)
    }

    /// Attention through candle's tensor operations (CUDA, Metal), per item.
    #[allow(clippy::too_many_arguments)]
    fn attend_device(
        &self,
        rope: &RopeTables,
        span: Span,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        items: &mut [StepItem<'_>],
        lens: &[usize],
        layer: usize,
    ) -> Result<Tensor> {
        let h = self.heads;
        let mut ys = Vec::with_capacity(items.len());
        let mut off = 0;
        for (item, &n) in items.iter_mut().zip(lens) {
            let pos = item.cache.pos();
            let heads = |t: &Tensor, nh: usize| -> Result<Tensor> {
                t.narrow(1, off, n)?
                    .reshape((1, n, nh, h.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let rot = |t: Tensor| -> Result<Tensor> {
                let (cos, sin) = (rope.cos.narrow(0, pos, n)?, rope.sin.narrow(0, pos, n)?);
                round_f16(&candle_nn::rotary_emb::rope(&t, &cos, &sin)?)
            };
            let qh = rot(heads(q, h.n_head)?)?;
            let kh = rot(heads(k, h.n_kv_head)?)?;
            let vh = round_f16(&heads(v, h.n_kv_head)?)?;
            let (ks, vs) = item.cache.append(layer, &kh, &vh)?;
            let kv_len = ks.dim(2)?;
            let n_rep = h.n_head / h.n_kv_head;
            let qg = qh.reshape((1, h.n_kv_head, n_rep * n, h.head_dim))?;
            let att = (qg.matmul(&ks.t()?)? * span.scale)?;
            let att = att.reshape((1, h.n_head, n, kv_len))?;
            // Masked: keys after the row, or (local layers) `window` or more behind it.
            let hidden: Vec<u8> = (0..n)
                .flat_map(|i| {
                    (0..kv_len).map(move |j| {
                        let p = pos + i;
                        u8::from(j > p || span.window.is_some_and(|w| p - j >= w))
                    })
                })
                .collect();
            let att = if hidden.contains(&1) {
                let mask = Tensor::from_vec(hidden, (n, kv_len), att.device())?
                    .broadcast_as(att.shape())?;
                let neg = Tensor::new(f32::NEG_INFINITY, att.device())?;
                masked_fill(&att, &mask, &neg)?
            } else {
                att
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?.reshape((
                1,
                h.n_kv_head,
                n_rep * n,
                kv_len,
            ))?;
            let y = att
                .matmul(&vs)?
                .reshape((1, h.n_head, n, h.head_dim))?
                .transpose(1, 2)?
                .reshape((1, n, h.n_head * h.head_dim))?;
            ys.push(y);
            off += n;
        }
        if ys.len() == 1 {
            Ok(ys.pop().expect("one item"))
        } else {
            Tensor::cat(&ys, 1)
        }
    }
}
