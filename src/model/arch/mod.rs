//! The architectures swapd runs, one file each behind one model-step API ([`Weights`]), and
//! the pieces they share: the token embedding (packed on the CPU), the f16 rounding of
//! attention inputs, RoPE tables and masks. The CPU attention itself is
//! [`crate::model::attention`].
//!
//! An architecture reads its own `{arch}.*` metadata keys and checks them, and its tensors'
//! shapes, before any tensor loads ([`check`]): a file that would load but could not serve
//! fails with the reason.
pub mod gemma3;
pub mod llama;
mod read;

use crate::model::norm::RmsNorm;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, DType, Device, IndexOp, Layout, Module, Result, Shape, Tensor};
use candle_nn::Embedding;

use super::attention::{self, Heads, Rope, Span};
use super::kv::{KvCache, StepItem};
use crate::quant::QLinear;

/// Positions the RoPE tables cover (candle's quantized llama precomputes as many).
pub const MAX_SEQ_LEN: usize = candle_transformers::models::quantized_llama::MAX_SEQ_LEN;

/// `general.architecture` values swapd loads.
pub const SUPPORTED: [&str; 5] = ["llama", "gemma3", "qwen2", "qwen3", "phi3"];

/// A GGUF's architecture, from `general.architecture`; an unsupported one names itself and
/// the supported list.
pub fn arch_of(ct: &Content) -> std::result::Result<String, String> {
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or("metadata key `general.architecture` is missing")?;
    if !SUPPORTED.contains(&arch.as_str()) {
        return Err(format!(
            "architecture `{arch}` is not supported (supported: {})",
            SUPPORTED.join(", ")
        ));
    }
    Ok(arch)
}

/// What every architecture's check finds: enough to size a KV cache and a context.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchParams {
    pub arch: String,
    pub block_count: usize,
    /// Key (and value) values per token per layer: KV heads × head size.
    pub kv_width: usize,
    /// `{arch}.context_length`, when the file has one.
    pub context_length: Option<usize>,
}

impl ArchParams {
    /// Bytes one token takes in a sequence's KV cache: keys and values, every layer.
    pub fn kv_bytes_per_token(&self, on_cpu: bool) -> u64 {
        (self.block_count * 2 * self.kv_width * kv_value_bytes(on_cpu)) as u64
    }
}

/// Bytes of one cached key or value: f16 on the CPU (the attention loops widen it), f32 in a
/// device cache (rounded to f16 values, stored as f32 for candle's matmul).
pub fn kv_value_bytes(on_cpu: bool) -> usize {
    if on_cpu {
        2
    } else {
        4
    }
}

/// Checks `ct`'s architecture, metadata and tensor shapes (see each architecture's check).
pub fn check(ct: &Content) -> std::result::Result<ArchParams, String> {
    let arch = arch_of(ct)?;
    match arch.as_str() {
        "gemma3" => gemma3::check(ct),
        _ => {
            let p = crate::model::llama_meta::check_family(ct, &arch)?;
            check_variant(ct, &arch, &p)?;
            Ok(ArchParams {
                arch,
                block_count: p.block_count,
                kv_width: p.head_count_kv * p.head_dim,
                context_length: p.context_length,
            })
        }
    }
}

/// The tensors qwen2 (query/key/value biases) and qwen3 (per-head query/key norms) add to
/// the llama layout, with their shapes.
fn check_variant(
    ct: &Content,
    arch: &str,
    p: &crate::model::llama_meta::LlamaParams,
) -> std::result::Result<(), String> {
    let (q, kv, d) = (
        p.head_count * p.head_dim,
        p.head_count_kv * p.head_dim,
        p.head_dim,
    );
    let wanted: Vec<(&str, usize)> = match arch {
        "qwen2" => vec![("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)],
        "qwen3" => vec![("attn_q_norm.weight", d), ("attn_k_norm.weight", d)],
        _ => return Ok(()),
    };
    for l in 0..p.block_count {
        for (n, len) in &wanted {
            let name = format!("blk.{l}.{n}");
            match ct.tensor_infos.get(&name).map(|i| i.shape.dims().to_vec()) {
                None => return Err(format!("tensor `{name}` is missing ({arch})")),
                Some(s) if s != [*len] => {
                    return Err(format!(
                        "tensor `{name}` has shape {s:?}, expected [{len}] ({arch})"
                    ))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// A loaded model of any supported architecture.
#[derive(Debug, Clone)]
pub enum Weights {
    Llama(llama::ModelWeights),
    Gemma3(gemma3::Gemma3),
}

impl Weights {
    /// Loads the tensors of `ct` (already checked by [`check`]) onto `device`.
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let arch = arch_of(&ct).map_err(candle_core::Error::msg)?;
        Ok(match arch.as_str() {
            "gemma3" => Self::Gemma3(gemma3::Gemma3::from_gguf(ct, reader, device)?),
            // qwen2, qwen3 and phi3 are the llama layout with biases, q/k norms or fused
            // projections, and NEOX RoPE.
            _ => Self::Llama(llama::ModelWeights::from_gguf(ct, reader, device)?),
        })
    }

    /// One forward step over a batch of sequences (see [`llama::ModelWeights::step`]).
    pub fn step(&self, items: &mut [StepItem<'_>]) -> Result<Vec<Option<Tensor>>> {
        match self {
            Self::Llama(w) => w.step(items),
            Self::Gemma3(w) => w.step(items),
        }
    }

    /// An empty KV cache for one sequence, with room for `tokens` tokens.
    pub fn new_cache(&self, tokens: usize) -> KvCache {
        match self {
            Self::Llama(w) => w.new_cache(tokens),
            Self::Gemma3(w) => w.new_cache(tokens),
        }
    }

    /// Bytes of keys and values one token takes in a sequence's cache.
    pub fn kv_bytes_per_token(&self) -> usize {
        match self {
            Self::Llama(w) => w.kv_bytes_per_token(),
            Self::Gemma3(w) => w.kv_bytes_per_token(),
        }
    }
}

/// Rounds f32 values to the nearest f16 (kept as f32).
struct RoundF16;

impl candle_core::CustomOp1 for RoundF16 {
    fn name(&self) -> &'static str {
        "round-f16"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("round-f16: expected f32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("round-f16: input is not contiguous")
        };
        let out = v[start..end]
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `x` rounded to f16 precision, as llama.cpp's f16 KV cache and K·Q product hold it.
pub(crate) fn round_f16(x: &Tensor) -> Result<Tensor> {
    match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32) => x.contiguous()?.apply_op1_no_bwd(&RoundF16),
        (_, DType::F32) => x.to_dtype(DType::F16)?.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

pub(crate) fn masked_fill(on_false: &Tensor, mask: &Tensor, on_true: &Tensor) -> Result<Tensor> {
    let shape = mask.shape();
    mask.where_cond(&on_true.broadcast_as(shape.dims())?, on_false)
}

/// The token embedding table. On the CPU, in a format the kernels pack, it stays packed
/// and each lookup dequantizes its rows: the same values as candle's dense f32 copy, which
/// for SmolLM2 (Q8_0, tied to the output head) would add 113 MB per version. Elsewhere it
/// is candle's dense `Embedding`.
#[derive(Debug, Clone)]
pub(crate) enum TokEmbedding {
    Dense(Embedding),
    Packed(QLinear),
}

impl TokEmbedding {
    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let table = match self {
            Self::Dense(e) => return e.forward(ids),
            Self::Packed(table) => table.packed().expect("a packed table"),
        };
        let hidden = table.k();
        let mut shape = ids.dims().to_vec();
        shape.push(hidden);
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let mut out = vec![0f32; ids.len() * hidden];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
            if id as usize >= table.n() {
                candle_core::bail!("token id {id} is outside the vocabulary ({})", table.n());
            }
            table.row_into(id as usize, row);
        }
        Tensor::from_vec(out, shape, &Device::Cpu)
    }
}

/// The embedding table and the output head. Tied embeddings (SmolLM2, Gemma) serve as the
/// head when the file has none; a packed table is then the head's own matrix.
pub(crate) fn embedding_and_head(
    table: QTensor,
    output: Option<QTensor>,
    device: &Device,
) -> Result<(TokEmbedding, QLinear)> {
    let packed = crate::quant::packs(table.dtype(), table.shape().dims(), device.is_cpu());
    let dense = |q: &QTensor| -> Result<TokEmbedding> {
        crate::turns::pace();
        let hidden = q.shape().dims2()?.1;
        let table = q.dequantize(device)?;
        Ok(TokEmbedding::Dense(Embedding::new(table, hidden)))
    };
    Ok(match output {
        Some(output) if packed => (
            TokEmbedding::Packed(QLinear::from_qtensor(table)?),
            QLinear::from_qtensor(output)?,
        ),
        Some(output) => (dense(&table)?, QLinear::from_qtensor(output)?),
        None if packed => {
            let output = QLinear::from_qtensor(table)?;
            (TokEmbedding::Packed(output.clone()), output)
        }
        None => (dense(&table)?, QLinear::from_qtensor(table)?),
    })
}

/// Splits a matrix's rows into consecutive parts of `rows[i]` rows (a fused projection
/// into its parts, phi3's `attn_qkv` and gate/up `ffn_up`). Each row is whole blocks, so the
/// parts hold exactly the fused matrix's bytes.
pub(crate) fn split_rows(t: &QTensor, rows: &[usize], device: &Device) -> Result<Vec<QTensor>> {
    let (n, k) = t.shape().dims2()?;
    let dtype = t.dtype();
    if rows.iter().sum::<usize>() != n || !k.is_multiple_of(dtype.block_size()) {
        candle_core::bail!("cannot split a {n} × {k} {dtype:?} matrix into {rows:?} rows");
    }
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    let data = t.data()?;
    let mut off = 0;
    let mut parts = Vec::with_capacity(rows.len());
    for &r in rows {
        let bytes = &data[off * row_bytes..(off + r) * row_bytes];
        parts.push(candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            bytes,
            vec![r, k],
            device,
        )?);
        off += r;
    }
    Ok(parts)
}

/// RoPE tables for `MAX_SEQ_LEN` positions: `(cos, sin)`, each `[positions, head_dim / 2]`,
/// with angle `p · freq_scale / freq_base^(2i / head_dim) / factors[i]` (llama 3's
/// per-pair frequency factors, `rope_freqs.weight`, as ggml's `rope_ext` divides by them).
pub(crate) fn precomput_freqs_cis(
    head_dim: usize,
    freq_base: f32,
    freq_scale: f32,
    factors: Option<&[f32]>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let theta: Vec<_> = (0..head_dim)
        .step_by(2)
        .map(|i| {
            let f = factors.map_or(1.0, |f| f[i / 2]);
            freq_scale / freq_base.powf(i as f32 / head_dim as f32) / f
        })
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx_theta = Tensor::arange(0, MAX_SEQ_LEN as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((MAX_SEQ_LEN, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((idx_theta.cos()?, idx_theta.sin()?))
}

/// Attention on the CPU of every item's new rows (`q`, `k`, `v`: `(1, rows, ·)`, the items'
/// rows in order), each over its own cache at `layer`, which they join.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_items(
    h: Heads,
    span: Span,
    rope: &Rope,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    items: &mut [StepItem<'_>],
    lens: &[usize],
    layer: usize,
) -> Result<Tensor> {
    let qw = h.n_head * h.head_dim;
    if items
        .iter()
        .any(|i| i.cache.pos() + i.ids.len() > rope.positions(h.head_dim))
    {
        candle_core::bail!(
            "a sequence is past the {} positions RoPE covers",
            rope.positions(h.head_dim)
        );
    }
    let (q, k, v) = (f32_rows(q)?, f32_rows(k)?, f32_rows(v)?);
    let (q, k, v) = (q.values()?, k.values()?, v.values()?);
    let total: usize = lens.iter().sum();
    let mut out = vec![0f32; total * qw];
    let mut seqs = Vec::with_capacity(items.len());
    for (item, &rows) in items.iter_mut().zip(lens) {
        let pos = item.cache.pos();
        let Some(cache) = item.cache.cpu_layer(layer) else {
            candle_core::bail!("a CPU model was given a device KV cache");
        };
        seqs.push(attention::SeqStep { pos, rows, cache });
    }
    attention::attend_batch(h, span, rope, &q, &k, &v, &mut seqs, &mut out);
    Tensor::from_vec(out, (1, total, qw), &Device::Cpu)
}

/// A tensor as contiguous f32 on the CPU (itself when it already is: the projections'
/// outputs), whose values [`F32Rows::values`] reads in place rather than copying them out.
struct F32Rows(Tensor);

fn f32_rows(t: &Tensor) -> Result<F32Rows> {
    Ok(F32Rows(t.to_dtype(DType::F32)?.contiguous()?))
}

impl F32Rows {
    fn values(
        &self,
    ) -> Result<F32Values<impl std::ops::Deref<Target = candle_core::Storage> + '_>> {
        let (storage, layout) = self.0.storage_and_layout();
        if !matches!(&*storage, candle_core::Storage::Cpu(CpuStorage::F32(_))) {
            candle_core::bail!("attention: f32 values on the CPU expected");
        }
        Ok(F32Values {
            storage,
            start: layout.start_offset(),
            len: self.0.elem_count(),
        })
    }
}

/// The values of an [`F32Rows`], borrowed from its storage.
struct F32Values<G> {
    /// The storage's read guard.
    storage: G,
    start: usize,
    len: usize,
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> std::ops::Deref for F32Values<G> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..][..self.len],
            _ => unreachable!("checked when borrowed"),
        }
    }
}

/// The next-token logits (`[vocab]`, f32) of every item that asks for them: the last of its
/// rows of `x` (`(1, rows, dim)`), through the final norm and the output head.
pub(crate) fn head_logits(
    x: &Tensor,
    items: &[StepItem<'_>],
    lens: &[usize],
    norm: &RmsNorm,
    output: &QLinear,
) -> Result<Vec<Option<Tensor>>> {
    let mut last = Vec::new();
    let mut end = 0;
    for (item, &n) in items.iter().zip(lens) {
        end += n;
        if item.logits {
            last.push(end as u32 - 1);
        }
    }
    let mut out = vec![None; items.len()];
    if last.is_empty() {
        return Ok(out);
    }
    let rows = x
        .squeeze(0)?
        .index_select(&Tensor::new(last.as_slice(), x.device())?, 0)?;
    let logits = output
        .forward(&norm.forward(&rows)?)?
        .to_dtype(DType::F32)?;
    let mut r = 0;
    for (slot, item) in out.iter_mut().zip(items) {
        if item.logits {
            *slot = Some(logits.i(r)?);
            r += 1;
        }
    }
    Ok(out)
}
