//! The llama metadata a GGUF must carry to be served, checked before any tensor loads:
//! a version whose context is 0 or whose head counts do not divide would pass every
//! pre-flight check and then refuse every request.
use candle_core::quantized::gguf_file::Content;

/// Largest attention head the loader accepts: real llama-architecture models use 64–256;
/// the RoPE tables candle precomputes take `MAX_SEQ_LEN` × this × 8 bytes.
pub const MAX_HEAD_DIM: usize = 512;

/// The llama hyper-parameters [`check_llama`] found usable.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    pub embedding_length: usize,
    pub block_count: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub head_dim: usize,
    /// From `tokenizer.ggml.tokens` (`None` when absent: the tokenizer check reports it).
    pub vocab: Option<usize>,
    /// `llama.context_length`, when the file has one.
    pub context_length: Option<usize>,
    /// RoPE's position scale (`1 / rope.scaling.factor` for linear scaling, else 1).
    pub freq_scale: f32,
    /// phi3's layout: one fused query/key/value matrix (`attn_qkv`) and one fused
    /// gate/up matrix (`ffn_up`, the gate's rows first), no `ffn_gate`.
    pub fused: bool,
}

/// RoPE's position scale from `{p}.rope.scaling.type` (and `.factor`): 1 with no scaling,
/// `1 / factor` for linear scaling. YaRN and LongRoPE are refused by name.
pub fn rope_freq_scale(ct: &Content, p: &str) -> Result<f32, String> {
    use candle_core::quantized::gguf_file::Value;
    let scaling = match ct.metadata.get(&format!("{p}.rope.scaling.type")) {
        None => None,
        Some(Value::String(t)) => Some(t.as_str()),
        Some(v) => return Err(format!("{p}.rope.scaling.type is {v:?}: expected a string")),
    };
    match scaling {
        None | Some("none") => Ok(1.0),
        Some("linear") => match ct.metadata.get(&format!("{p}.rope.scaling.factor")) {
            Some(Value::F32(f)) if f.is_finite() && *f >= 1.0 => Ok(1.0 / f),
            other => Err(format!(
                "{p}.rope.scaling.factor is {other:?}: linear scaling needs a factor >= 1"
            )),
        },
        Some(t) => Err(format!(
            "{p}.rope.scaling.type `{t}` is not supported (supported: none, linear)"
        )),
    }
}

/// Checks the metadata and tensor shapes the llama loader ([`super::qllama`]) relies on, so
/// that a file which would load but could not serve (context 0, heads that do not divide,
/// a vocabulary that does not match the embedding table, ...) fails here with the reason.
pub fn check_llama(ct: &Content) -> Result<LlamaParams, String> {
    check_family(ct, "llama")
}

/// [`check_llama`] for the llama family's variants, which read the same keys under their
/// own prefix (`qwen2.*`, `qwen3.*`) and may name their head size (`attention.key_length`).
pub fn check_family(ct: &Content, p: &str) -> Result<LlamaParams, String> {
    use candle_core::quantized::gguf_file::Value;
    let get = |k: &str| ct.metadata.get(&format!("{p}.{k}"));
    // qllama reads these with `to_u32`/`to_f32`: any other type is an error there (or,
    // for the optional keys, silently the default), so it is one here.
    let opt_u32 = |k: &str| -> Result<Option<usize>, String> {
        match get(k) {
            None => Ok(None),
            Some(Value::U32(v)) => Ok(Some(*v as usize)),
            Some(v) => Err(format!("{p}.{k} is {v:?}: expected a u32")),
        }
    };
    let u32_ = |k: &str| -> Result<usize, String> {
        opt_u32(k)?.ok_or_else(|| format!("metadata key `{p}.{k}` is missing"))
    };
    let opt_f32 = |k: &str| -> Result<Option<f32>, String> {
        match get(k) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v)),
            Some(v) => Err(format!("{p}.{k} is {v:?}: expected an f32")),
        }
    };
    let dim = u32_("embedding_length")?;
    let blocks = u32_("block_count")?;
    let heads = u32_("attention.head_count")?;
    let kv_heads = u32_("attention.head_count_kv")?;
    // llama.cpp's qwen converters may leave out the RoPE size (then the head size) and
    // name the head size (`attention.key_length`) where it is not embedding / heads.
    let rope_dim_meta = if p == "llama" {
        Some(u32_("rope.dimension_count")?)
    } else {
        opt_u32("rope.dimension_count")?
    };
    let key_length = opt_u32("attention.key_length")?;
    let eps = opt_f32("attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| format!("metadata key `{p}.attention.layer_norm_rms_epsilon` is missing"))?;
    let freq_base = opt_f32("rope.freq_base")?.unwrap_or(10000.0);
    let context = opt_u32("context_length")?;
    let ff_meta = opt_u32("feed_forward_length")?;
    let n_expert = opt_u32("expert_count")?.unwrap_or(0);
    let n_expert_used = opt_u32("expert_used_count")?.unwrap_or(0);
    if dim == 0 {
        return Err(format!("{p}.embedding_length is 0"));
    }
    if blocks == 0 {
        return Err(format!("{p}.block_count is 0: the model has no layers"));
    }
    if heads == 0 {
        return Err(format!("{p}.attention.head_count is 0"));
    }
    if kv_heads == 0 {
        return Err(format!("{p}.attention.head_count_kv is 0"));
    }
    if key_length.is_none() && dim % heads != 0 {
        return Err(format!(
            "{p}.embedding_length {dim} is not a multiple of {p}.attention.head_count {heads}"
        ));
    }
    if heads % kv_heads != 0 {
        return Err(format!(
            "{p}.attention.head_count {heads} is not a multiple of {p}.attention.head_count_kv {kv_heads}"
        ));
    }
    let head_dim = key_length.unwrap_or(dim / heads);
    let rope_dim = rope_dim_meta.unwrap_or(head_dim);
    if head_dim == 0 || head_dim % 2 != 0 || head_dim > MAX_HEAD_DIM {
        return Err(format!(
            "the head size {head_dim} ({p}.embedding_length {dim} / {p}.attention.head_count {heads}) must be even and at most {MAX_HEAD_DIM}"
        ));
    }
    if rope_dim != head_dim {
        return Err(format!(
            "{p}.rope.dimension_count {rope_dim} differs from the head size {head_dim} ({p}.embedding_length {dim} / {p}.attention.head_count {heads}): partial RoPE is not supported"
        ));
    }
    if !(freq_base.is_finite() && freq_base > 0.0) {
        return Err(format!(
            "{p}.rope.freq_base is {freq_base}: must be a finite number > 0"
        ));
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(format!(
            "{p}.attention.layer_norm_rms_epsilon is {eps}: must be a finite number > 0"
        ));
    }
    if let Some(c) = context {
        if c < 2 {
            return Err(format!(
                "{p}.context_length is {c}: the model could not take a prompt and generate (at least 2)"
            ));
        }
    }
    let freq_scale = rope_freq_scale(ct, p)?;
    let fused = p == "phi3";
    if fused && ct.tensor_infos.contains_key("rope_factors_long.weight") {
        return Err(
            "phi3 with LongRoPE (`rope_factors_long.weight`, the 128k-context models) is not supported"
                .into(),
        );
    }
    let vocab = match ct.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(t)) => Some(t.len()),
        _ => None,
    };
    if vocab == Some(0) {
        return Err("tokenizer.ggml.tokens is empty".into());
    }
    if let (Some(v), Some(n)) = (vocab, opt_u32("vocab_size")?) {
        if v != n {
            return Err(format!(
                "{p}.vocab_size {n} differs from the {v} tokens of tokenizer.ggml.tokens"
            ));
        }
    }
    let shape = |name: &str| ct.tensor_infos.get(name).map(|i| i.shape.dims().to_vec());
    let expect = |name: &str, want: &[usize], why: &dyn Fn() -> String| -> Result<(), String> {
        match shape(name) {
            None => Err(format!("tensor `{name}` is missing")),
            Some(s) if s != want => Err(format!(
                "tensor `{name}` has shape {s:?}, expected {want:?} ({})",
                why()
            )),
            Some(_) => Ok(()),
        }
    };
    let vocab_rows = match shape("token_embd.weight") {
        None => return Err("tensor `token_embd.weight` is missing".into()),
        Some(s) if s.len() == 2 && s[1] == dim => s[0],
        Some(s) => {
            return Err(format!(
                "tensor `token_embd.weight` has shape {s:?}, expected [vocabulary, {dim}] ({p}.embedding_length {dim})"
            ))
        }
    };
    if let Some(v) = vocab {
        if vocab_rows != v {
            return Err(format!(
                "tensor `token_embd.weight` has {vocab_rows} rows but tokenizer.ggml.tokens has {v} tokens"
            ));
        }
    }
    if ct.tensor_infos.contains_key("output.weight") {
        expect("output.weight", &[vocab_rows, dim], &|| {
            format!("the output head must match token_embd.weight's {vocab_rows} tokens × {dim}")
        })?;
    }
    let dims = || format!("{p}.embedding_length {dim}");
    expect("output_norm.weight", &[dim], &dims)?;
    if n_expert > 1 && !(1..=n_expert).contains(&n_expert_used) {
        return Err(format!(
            "{p}.expert_used_count {n_expert_used} must be between 1 and {p}.expert_count {n_expert}"
        ));
    }
    // Every block needs at least 9 tensors (6 fused): a block count past that is refused
    // before the loader reserves room for that many layers.
    let per_block = if fused { 6 } else { 9 };
    if blocks > ct.tensor_infos.len() / per_block {
        return Err(format!(
            "{p}.block_count {blocks} needs at least {} tensors but the file has {}",
            blocks.saturating_mul(per_block),
            ct.tensor_infos.len()
        ));
    }
    let kv_dim = head_dim * kv_heads;
    let heads_why =
        || format!("{p}.embedding_length {dim}, head_count {heads}, head_count_kv {kv_heads}");
    // llama 3's RoPE frequency factors (one per rotated pair), when the file has them.
    if let Some(s) = shape("rope_freqs.weight") {
        if s != [head_dim / 2] {
            return Err(format!(
                "tensor `rope_freqs.weight` has shape {s:?}, expected [{}] (half the head size {head_dim})",
                head_dim / 2
            ));
        }
    }
    for l in 0..blocks {
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        if fused {
            expect(
                &t("attn_qkv"),
                &[heads * head_dim + 2 * kv_dim, dim],
                &heads_why,
            )?;
        } else {
            expect(&t("attn_q"), &[heads * head_dim, dim], &heads_why)?;
            expect(&t("attn_k"), &[kv_dim, dim], &heads_why)?;
            expect(&t("attn_v"), &[kv_dim, dim], &heads_why)?;
        }
        expect(&t("attn_output"), &[dim, heads * head_dim], &heads_why)?;
        expect(&t("attn_norm"), &[dim], &dims)?;
        expect(&t("ffn_norm"), &[dim], &dims)?;
        let ffn = |gate: &str, up: &str, down: &str| -> Result<(), String> {
            let ff = match shape(gate) {
                None => return Err(format!("tensor `{gate}` is missing")),
                Some(s) if s.len() == 2 && s[1] == dim && s[0] > 0 => s[0],
                Some(s) => {
                    return Err(format!(
                    "tensor `{gate}` has shape {s:?}, expected [feed_forward_length, {dim}] ({})",
                    dims()
                ))
                }
            };
            if let Some(m) = ff_meta {
                if m != ff {
                    return Err(format!(
                        "tensor `{gate}` has {ff} rows but {p}.feed_forward_length is {m}"
                    ));
                }
            }
            let why = || format!("feed-forward length {ff} from `{gate}`, {}", dims());
            expect(up, &[ff, dim], &why)?;
            expect(down, &[dim, ff], &why)
        };
        if fused {
            // One matrix of 2 × feed_forward_length rows: the gate's, then the up's.
            let up = t("ffn_up");
            let ff = match shape(&up) {
                Some(s) if s.len() == 2 && s[1] == dim && s[0] > 0 && s[0] % 2 == 0 => s[0] / 2,
                Some(s) => {
                    return Err(format!(
                    "tensor `{up}` has shape {s:?}, expected [2 × feed_forward_length, {dim}] ({})",
                    dims()
                ))
                }
                None => return Err(format!("tensor `{up}` is missing")),
            };
            if let Some(m) = ff_meta.filter(|&m| m != ff) {
                return Err(format!(
                    "tensor `{up}` has {} rows but {p}.feed_forward_length is {m} (the gate and up halves)",
                    2 * ff
                ));
            }
            expect(&t("ffn_down"), &[dim, ff], &|| {
                format!("feed-forward length {ff} from `{up}`, {}", dims())
            })?;
        } else if n_expert <= 1 {
            ffn(&t("ffn_gate"), &t("ffn_up"), &t("ffn_down"))?;
        } else {
            expect(&t("ffn_gate_inp"), &[n_expert, dim], &|| {
                format!("{p}.expert_count {n_expert}, {}", dims())
            })?;
            for i in 0..n_expert {
                let e = |n: &str| format!("blk.{l}.{n}.{i}.weight");
                ffn(&e("ffn_gate"), &e("ffn_up"), &e("ffn_down"))?;
            }
        }
    }
    Ok(LlamaParams {
        embedding_length: dim,
        block_count: blocks,
        head_count: heads,
        head_count_kv: kv_heads,
        head_dim,
        vocab,
        context_length: context,
        freq_scale,
        fused,
    })
}
