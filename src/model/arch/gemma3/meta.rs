//! Gemma 3's metadata (`gemma3.*`) and tensor shapes, checked before any tensor loads.
use candle_core::quantized::gguf_file::{Content, Value};

use crate::model::arch::ArchParams;

/// The hyper-parameters [`check`] found usable.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Params {
    pub(super) dim: usize,
    pub(super) blocks: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) ff: usize,
    pub(super) eps: f64,
    pub(super) freq_base: f32,
    pub(super) freq_scale: f32,
    pub(super) window: usize,
    pub(super) context: Option<usize>,
    pub(super) attn_scale: f64,
}

pub(super) fn params(ct: &Content) -> std::result::Result<Params, String> {
    let get = |k: &str| ct.metadata.get(&format!("gemma3.{k}"));
    let opt_u32 = |k: &str| -> std::result::Result<Option<usize>, String> {
        match get(k) {
            None => Ok(None),
            Some(Value::U32(v)) => Ok(Some(*v as usize)),
            Some(v) => Err(format!("gemma3.{k} is {v:?}: expected a u32")),
        }
    };
    let u32_ = |k: &str| -> std::result::Result<usize, String> {
        opt_u32(k)?.ok_or_else(|| format!("metadata key `gemma3.{k}` is missing"))
    };
    let opt_f32 = |k: &str| -> std::result::Result<Option<f32>, String> {
        match get(k) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v)),
            Some(v) => Err(format!("gemma3.{k} is {v:?}: expected an f32")),
        }
    };
    let dim = u32_("embedding_length")?;
    let blocks = u32_("block_count")?;
    let heads = u32_("attention.head_count")?;
    let kv_heads = u32_("attention.head_count_kv")?;
    let ff = u32_("feed_forward_length")?;
    let window = u32_("attention.sliding_window")?;
    let eps = opt_f32("attention.layer_norm_rms_epsilon")?
        .ok_or("metadata key `gemma3.attention.layer_norm_rms_epsilon` is missing")?;
    let freq_base = opt_f32("rope.freq_base")?.unwrap_or(1_000_000.0);
    let positive = |name: &str, v: usize| {
        if v == 0 {
            Err(format!("gemma3.{name} is 0"))
        } else {
            Ok(v)
        }
    };
    for (n, v) in [
        ("embedding_length", dim),
        ("block_count", blocks),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv_heads),
        ("feed_forward_length", ff),
        ("attention.sliding_window", window),
    ] {
        positive(n, v)?;
    }
    let head_dim = opt_u32("attention.key_length")?.unwrap_or(dim / heads.max(1));
    let value_dim = opt_u32("attention.value_length")?.unwrap_or(head_dim);
    if value_dim != head_dim {
        return Err(format!(
            "gemma3.attention.value_length {value_dim} differs from key_length {head_dim}"
        ));
    }
    if head_dim == 0 || head_dim % 2 != 0 || head_dim > crate::model::llama_meta::MAX_HEAD_DIM {
        return Err(format!(
            "the head size {head_dim} must be even, positive and at most {}",
            crate::model::llama_meta::MAX_HEAD_DIM
        ));
    }
    if heads % kv_heads != 0 {
        return Err(format!(
            "gemma3.attention.head_count {heads} is not a multiple of head_count_kv {kv_heads}"
        ));
    }
    if !(freq_base.is_finite() && freq_base > 0.0) {
        return Err(format!("gemma3.rope.freq_base is {freq_base}: must be > 0"));
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(format!(
            "gemma3.attention.layer_norm_rms_epsilon is {eps}: must be > 0"
        ));
    }
    let freq_scale = crate::model::llama_meta::rope_freq_scale(ct, "gemma3")?;
    let context = opt_u32("context_length")?;
    if let Some(c) = context {
        if c < 2 {
            return Err(format!(
                "gemma3.context_length is {c}: at least 2 is needed"
            ));
        }
    }
    // llama.cpp: 1/√(n_embd / n_head) for the 27B model (62 layers), 1/√key_length otherwise.
    let attn_scale = if blocks == 62 {
        1.0 / ((dim / heads) as f64).sqrt()
    } else {
        1.0 / (head_dim as f64).sqrt()
    };
    Ok(Params {
        dim,
        blocks,
        heads,
        kv_heads,
        head_dim,
        ff,
        eps: eps as f64,
        freq_base,
        freq_scale,
        window,
        context,
        attn_scale,
    })
}

/// Checks the metadata and every tensor's shape the loader relies on.
pub fn check(ct: &Content) -> std::result::Result<ArchParams, String> {
    let p = params(ct)?;
    let shape = |name: &str| ct.tensor_infos.get(name).map(|i| i.shape.dims().to_vec());
    let expect = |name: &str, want: &[usize]| -> std::result::Result<(), String> {
        match shape(name) {
            None => Err(format!("tensor `{name}` is missing")),
            Some(s) if s != want => Err(format!(
                "tensor `{name}` has shape {s:?}, expected {want:?} (gemma3: embedding {}, heads {}/{} of {}, feed-forward {})",
                p.dim, p.heads, p.kv_heads, p.head_dim, p.ff
            )),
            Some(_) => Ok(()),
        }
    };
    let vocab = match shape("token_embd.weight") {
        Some(s) if s.len() == 2 && s[1] == p.dim && s[0] > 0 => s[0],
        Some(s) => {
            return Err(format!(
                "tensor `token_embd.weight` has shape {s:?}, expected [vocabulary, {}]",
                p.dim
            ))
        }
        None => return Err("tensor `token_embd.weight` is missing".into()),
    };
    if let Some(Value::Array(t)) = ct.metadata.get("tokenizer.ggml.tokens") {
        if t.len() != vocab {
            return Err(format!(
                "tensor `token_embd.weight` has {vocab} rows but tokenizer.ggml.tokens has {} tokens",
                t.len()
            ));
        }
    }
    if ct.tensor_infos.contains_key("output.weight") {
        expect("output.weight", &[vocab, p.dim])?;
    }
    expect("output_norm.weight", &[p.dim])?;
    if p.blocks > ct.tensor_infos.len() / 13 {
        return Err(format!(
            "gemma3.block_count {} needs at least {} tensors but the file has {}",
            p.blocks,
            p.blocks.saturating_mul(13),
            ct.tensor_infos.len()
        ));
    }
    let (qw, kw) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
    for l in 0..p.blocks {
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        expect(&t("attn_q"), &[qw, p.dim])?;
        expect(&t("attn_k"), &[kw, p.dim])?;
        expect(&t("attn_v"), &[kw, p.dim])?;
        expect(&t("attn_output"), &[p.dim, qw])?;
        expect(&t("attn_q_norm"), &[p.head_dim])?;
        expect(&t("attn_k_norm"), &[p.head_dim])?;
        for n in [
            "attn_norm",
            "post_attention_norm",
            "ffn_norm",
            "post_ffw_norm",
        ] {
            expect(&t(n), &[p.dim])?;
        }
        expect(&t("ffn_gate"), &[p.ff, p.dim])?;
        expect(&t("ffn_up"), &[p.ff, p.dim])?;
        expect(&t("ffn_down"), &[p.dim, p.ff])?;
    }
    Ok(ArchParams {
        arch: "gemma3".into(),
        block_count: p.blocks,
        kv_width: kw,
        context_length: p.context,
    })
}
