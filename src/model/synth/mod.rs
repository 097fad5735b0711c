//! Tiny deterministic random-weight models for tests and benchmarks: a llama GGUF with a
//! byte-level BPE tokenizer and the SmolLM2 chat template, and a small BERT directory. The
//! same seed gives the same bytes; different seeds give different outputs.
mod bert;
mod rewrite;
mod vocab;

use std::path::Path;

pub use bert::{write_tiny_bert, TinyBert};
pub use rewrite::{perturb_gguf, poison_gguf_nan};
pub use vocab::{LLAMA3_CHAT_TEMPLATE, PHI3_CHAT_TEMPLATE, SMOLLM2_CHAT_TEMPLATE};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// Options of the tiny LLM.
#[derive(Debug, Clone, Default)]
pub struct TinyLlm {
    pub seed: u64,
    /// Put a NaN into the output projection (caught by the load's finite-weights check).
    pub poison_nan: bool,
    /// Scale the output projection near f32::MAX: finite weights, infinite logits.
    pub overflow: bool,
    pub shape: LlmShape,
    /// Which member of the llama family: its metadata prefix and extra tensors.
    pub variant: Variant,
}

/// The llama-layout architectures the tiny LLM can be written in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Variant {
    #[default]
    Llama,
    /// `qwen2.*` keys, query/key/value biases, NEOX RoPE.
    Qwen2,
    /// `qwen3.*` keys, per-head query/key norms, a head size that is not dim / heads
    /// (`attention.key_length`, as Qwen3's), NEOX RoPE.
    Qwen3,
    /// `phi3.*` keys, one fused query/key/value matrix and one fused gate/up matrix, NEOX
    /// RoPE, a SentencePiece vocabulary with byte fallback and Phi-3's chat template.
    Phi3,
    /// `llama.*` keys with llama 3's RoPE frequency factors (`rope_freqs.weight`), base
    /// 500000, the `llama-bpe` pre-tokenizer and Llama 3's specials and chat template.
    Llama3,
}

impl Variant {
    /// Every variant, by [`Variant::name`].
    pub const ALL: [Variant; 5] = [
        Variant::Llama,
        Variant::Qwen2,
        Variant::Qwen3,
        Variant::Phi3,
        Variant::Llama3,
    ];

    /// `general.architecture` of the file.
    pub fn arch(self) -> &'static str {
        match self {
            Variant::Llama | Variant::Llama3 => "llama",
            Variant::Qwen2 => "qwen2",
            Variant::Qwen3 => "qwen3",
            Variant::Phi3 => "phi3",
        }
    }

    /// The variant's own name (`llama3` is a llama-architecture file).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Llama3 => "llama3",
            v => v.arch(),
        }
    }

    /// The variant called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// llama 3's RoPE frequency factors (`rope_freqs.weight`) for `head_dim` and `base`, as
/// llama.cpp's converter computes them from `rope_scaling` (here factor 8, low/high
/// frequency factors 1 and 4, and an original context of 64, so that a tiny head has
/// pairs in all three bands).
fn llama3_rope_factors(head_dim: usize, base: f32) -> Vec<f32> {
    let (factor, low, high, original) = (8f32, 1f32, 4f32, 64f32);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf(2.0 * i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < original / high {
                1.0
            } else if wavelen > original / low {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// The llama's sizes. The default is tiny (2 layers of 64); [`LlmShape::smollm2`] is
/// SmolLM2-135M's (30 layers of 576), for measuring speed without shipping its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmShape {
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub layers: usize,
    pub ff: usize,
    /// The projections' and the embedding's format (the output head stays F32).
    pub quant: GgmlDType,
}

impl Default for LlmShape {
    fn default() -> Self {
        Self {
            dim: 64,
            heads: 4,
            kv_heads: 2,
            layers: 2,
            ff: 128,
            quant: GgmlDType::Q8_0,
        }
    }
}

impl LlmShape {
    pub fn smollm2() -> Self {
        Self {
            dim: 576,
            heads: 9,
            kv_heads: 3,
            layers: 30,
            ff: 1536,
            quant: GgmlDType::Q8_0,
        }
    }
}

fn random(
    rng: &mut rand::rngs::StdRng,
    shape: (usize, usize),
    scale: f32,
) -> anyhow::Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Writes a llama GGUF of `opts.shape` (by default 2 layers, dim 64, 4 heads, 2 KV heads),
/// context 512, to `path`.
pub fn write_tiny_llama_gguf(path: &Path, opts: &TinyLlm) -> anyhow::Result<()> {
    use gguf_file::Value as V;
    let LlmShape {
        dim,
        heads,
        kv_heads,
        layers,
        ff,
        quant,
    } = opts.shape;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let (vocab, tokenizer) = vocab::tokenizer_metadata(opts.variant);
    let variant = opts.variant;
    let head_dim = match variant {
        Variant::Qwen3 => 2 * dim / heads,
        _ => dim / heads,
    };
    let kv_dim = head_dim * kv_heads;
    let q_dim = head_dim * heads;

    let q8 = |t: Tensor| QTensor::quantize(&t, quant);
    let f32t = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32);
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    // The output projection stays F32: quantizing to Q8_0 would silently turn a NaN into 0.
    let mut output = random(&mut rng, (vocab, dim), 1.0)?;
    if opts.overflow {
        output = (output * 3e38)?;
    }
    if opts.poison_nan {
        let mut v = output.flatten_all()?.to_vec1::<f32>()?;
        v[0] = f32::NAN;
        output = Tensor::from_vec(v, (vocab, dim), &Device::Cpu)?;
    }
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q8(random(&mut rng, (vocab, dim), 1.0)?)?,
        ),
        ("output.weight".into(), f32t(output)?),
        ("output_norm.weight".into(), f32t(ones(dim)?)?),
    ];
    let freq_base = if variant == Variant::Llama3 {
        500000.0
    } else {
        10000.0
    };
    if variant == Variant::Llama3 {
        let f = llama3_rope_factors(head_dim, freq_base);
        let n = f.len();
        let t = Tensor::from_vec(f, n, &Device::Cpu)?;
        tensors.push(("rope_freqs.weight".into(), f32t(t)?));
    }
    let s = |fan_in: usize| 2.0 / (fan_in as f32).sqrt();
    for l in 0..layers {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        let mut weights = Vec::new();
        for (name, shape, fan_in) in [
            ("attn_q", (q_dim, dim), dim),
            ("attn_k", (kv_dim, dim), dim),
            ("attn_v", (kv_dim, dim), dim),
            ("attn_output", (dim, q_dim), q_dim),
            ("ffn_gate", (ff, dim), dim),
            ("ffn_up", (ff, dim), dim),
            ("ffn_down", (dim, ff), ff),
        ] {
            weights.push((name, random(&mut rng, shape, s(fan_in))?));
        }
        if variant == Variant::Phi3 {
            // phi3 fuses q/k/v into `attn_qkv` and gate/up (gate first) into `ffn_up`.
            let w = |i: usize| &weights[i].1;
            let qkv = Tensor::cat(&[w(0), w(1), w(2)], 0)?;
            let gate_up = Tensor::cat(&[w(4), w(5)], 0)?;
            weights = vec![
                ("attn_qkv", qkv),
                ("attn_output", weights[3].1.clone()),
                ("ffn_up", gate_up),
                ("ffn_down", weights[6].1.clone()),
            ];
        }
        for (name, w) in weights {
            tensors.push((p(name), q8(w)?));
        }
        tensors.push((p("attn_norm"), f32t(ones(dim)?)?));
        tensors.push((p("ffn_norm"), f32t(ones(dim)?)?));
        let vec = |rng: &mut rand::rngs::StdRng, n: usize, c: f32, r: f32| {
            random(rng, (1, n), r).and_then(|t| Ok(((t + c as f64)?).reshape(n)?))
        };
        match variant {
            Variant::Qwen2 => {
                for (n, len) in [("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)] {
                    let b = vec(&mut rng, len, 0.0, 0.5)?;
                    tensors.push((format!("blk.{l}.{n}.bias"), f32t(b)?));
                }
            }
            Variant::Qwen3 => {
                for n in ["attn_q_norm", "attn_k_norm"] {
                    tensors.push((p(n), f32t(vec(&mut rng, head_dim, 1.0, 0.3)?)?));
                }
            }
            Variant::Llama | Variant::Phi3 | Variant::Llama3 => {}
        }
    }

    let a = variant.arch();
    let key = |k: &str| format!("{a}.{k}");
    let mut metadata: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(a.into())),
        (
            "general.name".into(),
            V::String(format!("tiny-{a}-{}", opts.seed)),
        ),
        (key("context_length"), V::U32(512)),
        (key("embedding_length"), V::U32(dim as u32)),
        (key("feed_forward_length"), V::U32(ff as u32)),
        (key("block_count"), V::U32(layers as u32)),
        (key("attention.head_count"), V::U32(heads as u32)),
        (key("attention.head_count_kv"), V::U32(kv_heads as u32)),
        (key("rope.dimension_count"), V::U32(head_dim as u32)),
        (key("rope.freq_base"), V::F32(freq_base)),
        (key("attention.layer_norm_rms_epsilon"), V::F32(1e-5)),
    ];
    if variant == Variant::Qwen3 {
        metadata.push((key("attention.key_length"), V::U32(head_dim as u32)));
        metadata.push((key("attention.value_length"), V::U32(head_dim as u32)));
    }
    if variant == Variant::Phi3 {
        // Phi-3-mini's window; llama.cpp reads and then disables it (so does swapd).
        metadata.push((key("attention.sliding_window"), V::U32(2047)));
    }
    metadata.extend(tokenizer);
    let md: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    gguf_file::write(&mut file, &md, &ts)?;
    std::io::Write::flush(&mut file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Embedder, Llm};

    #[test]
    fn tiny_llm_loads_tokenizes_and_differs_by_seed() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        let seed = |seed| TinyLlm {
            seed,
            ..Default::default()
        };
        write_tiny_llama_gguf(&path("a"), &seed(1)).unwrap();
        write_tiny_llama_gguf(&path("b"), &seed(2)).unwrap();
        let la = Llm::load("a", &path("a"), &Device::Cpu, 512).unwrap();
        let lb = Llm::load("b", &path("b"), &Device::Cpu, 512).unwrap();
        let text = "Hello the world 123";
        let ids = la.tokenizer.encode(text).unwrap();
        assert_eq!(la.tokenizer.decode(&ids), text);
        assert_eq!(la.tokenizer.encode("<|im_start|>").unwrap(), [1]);
        assert_ne!(
            la.greedy_text("hello", 10).unwrap().1,
            lb.greedy_text("hello", 10).unwrap().1
        );
        // Deterministic: the same seed writes the same bytes.
        write_tiny_llama_gguf(&path("b"), &seed(1)).unwrap();
        assert_eq!(
            std::fs::read(path("a")).unwrap(),
            std::fs::read(path("b")).unwrap()
        );
    }

    #[test]
    fn poisoned_models_fail_the_way_they_should() {
        let dir = tempfile::tempdir().unwrap();
        let (nan, inf) = (dir.path().join("nan"), dir.path().join("inf"));
        let poison_nan = TinyLlm {
            poison_nan: true,
            ..Default::default()
        };
        write_tiny_llama_gguf(&nan, &poison_nan).unwrap();
        let e = Llm::load("n", &nan, &Device::Cpu, 512).err().unwrap();
        assert!(
            matches!(e, crate::model::ModelError::NonFinite { .. }),
            "{e}"
        );
        let overflow = TinyLlm {
            overflow: true,
            ..Default::default()
        };
        write_tiny_llama_gguf(&inf, &overflow).unwrap();
        let llm = Llm::load("i", &inf, &Device::Cpu, 512).unwrap();
        let logits = llm.next_logits(&[5, 6, 7]).unwrap();
        assert!(logits.iter().any(|x| !x.is_finite()));
    }

    #[test]
    fn tiny_bert_loads_and_embeds() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_bert(dir.path(), &TinyBert::default()).unwrap();
        let e = Embedder::load("b", dir.path(), &Device::Cpu, 64).unwrap();
        let out = e
            .embed(&["hello world".into(), "the quick brown fox is a test".into()])
            .unwrap();
        assert_eq!(out[0].values.len(), 32);
        assert_eq!(out[0].tokens, 4);
        let norm: f32 = out[1].values.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}
