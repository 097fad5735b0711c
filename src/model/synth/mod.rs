//! Tiny deterministic random-weight models for tests and benchmarks: a llama GGUF with a
//! byte-level BPE tokenizer and the SmolLM2 chat template, and a small BERT directory. The
//! same seed gives the same bytes; different seeds give different outputs.
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// SmolLM2's chat template, so chat rendering is exercised with tiny models too.
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const DIM: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;
const FF: usize = 128;
const MERGES: [(&str, &str); 12] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("i", "n"),
    ("t", "h"),
    ("Ġt", "he"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("Ġ", "a"),
    ("l", "l"),
    ("Ġ", "w"),
    ("o", "r"),
];

/// Options of the tiny LLM.
#[derive(Debug, Clone, Default)]
pub struct TinyLlm {
    pub seed: u64,
    /// Put a NaN into the output projection (caught by the load's finite-weights check).
    pub poison_nan: bool,
    /// Scale the output projection near f32::MAX: finite weights, infinite logits.
    pub overflow: bool,
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

/// Writes a 2-layer llama GGUF (dim 64, 4 heads, 2 KV heads, context 512) to `path`.
pub fn write_tiny_llama_gguf(path: &Path, opts: &TinyLlm) -> anyhow::Result<()> {
    use gguf_file::Value as V;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    tokens.extend(super::tokenizer::byte_chars().into_iter().map(String::from));
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    let vocab = tokens.len();
    let types: Vec<V> = (0..vocab)
        .map(|i| V::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let head_dim = DIM / HEADS;
    let kv_dim = head_dim * KV_HEADS;

    let q8 = |t: Tensor| QTensor::quantize(&t, GgmlDType::Q8_0);
    let f32t = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32);
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    // The output projection stays F32: quantizing to Q8_0 would silently turn a NaN into 0.
    let mut output = random(&mut rng, (vocab, DIM), 1.0)?;
    if opts.overflow {
        output = (output * 3e38)?;
    }
    if opts.poison_nan {
        let mut v = output.flatten_all()?.to_vec1::<f32>()?;
        v[0] = f32::NAN;
        output = Tensor::from_vec(v, (vocab, DIM), &Device::Cpu)?;
    }
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q8(random(&mut rng, (vocab, DIM), 1.0)?)?,
        ),
        ("output.weight".into(), f32t(output)?),
        ("output_norm.weight".into(), f32t(ones(DIM)?)?),
    ];
    let s = |fan_in: usize| 2.0 / (fan_in as f32).sqrt();
    for l in 0..LAYERS {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        for (name, shape, fan_in) in [
            ("attn_q", (DIM, DIM), DIM),
            ("attn_k", (kv_dim, DIM), DIM),
            ("attn_v", (kv_dim, DIM), DIM),
            ("attn_output", (DIM, DIM), DIM),
            ("ffn_gate", (FF, DIM), DIM),
            ("ffn_up", (FF, DIM), DIM),
            ("ffn_down", (DIM, FF), FF),
        ] {
            tensors.push((p(name), q8(random(&mut rng, shape, s(fan_in))?)?));
        }
        tensors.push((p("attn_norm"), f32t(ones(DIM)?)?));
        tensors.push((p("ffn_norm"), f32t(ones(DIM)?)?));
    }

    let metadata: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        (
            "general.name",
            V::String(format!("tiny-llama-{}", opts.seed)),
        ),
        ("llama.context_length", V::U32(512)),
        ("llama.embedding_length", V::U32(DIM as u32)),
        ("llama.feed_forward_length", V::U32(FF as u32)),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.rope.dimension_count", V::U32(head_dim as u32)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(tokens.iter().map(|t| V::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type", V::Array(types)),
        (
            "tokenizer.ggml.merges",
            V::Array(
                MERGES
                    .iter()
                    .map(|(a, b)| V::String(format!("{a} {b}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.padding_token_id", V::U32(0)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
        (
            "tokenizer.chat_template",
            V::String(SMOLLM2_CHAT_TEMPLATE.into()),
        ),
    ];
    let md: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    gguf_file::write(&mut file, &md, &ts)?;
    std::io::Write::flush(&mut file)?;
    Ok(())
}

/// Options of the tiny BERT.
#[derive(Debug, Clone)]
pub struct TinyBert {
    pub seed: u64,
    pub hidden_size: usize,
}

impl Default for TinyBert {
    fn default() -> Self {
        Self {
            seed: 0,
            hidden_size: 32,
        }
    }
}

fn bert_vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .map(String::from)
        .to_vec();
    let alnum = ('a'..='z').chain('0'..='9');
    v.extend(alnum.clone().map(String::from));
    v.extend(".,!?'-:;".chars().map(String::from));
    v.extend(alnum.map(|c| format!("##{c}")));
    v.extend(
        [
            "hello", "world", "the", "a", "is", "test", "swapd", "model", "quick", "brown", "fox",
        ]
        .map(String::from),
    );
    v
}

/// Writes `config.json`, `model.safetensors` and `tokenizer.json` of a 2-layer BERT into
/// `dir`. Like all-MiniLM-L6-v2's, the tokenizer pads and truncates everything to 128.
pub fn write_tiny_bert(dir: &Path, opts: &TinyBert) -> anyhow::Result<()> {
    use candle_transformers::models::bert::{BertModel, Config};
    std::fs::create_dir_all(dir)?;
    let vocab = bert_vocab();
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": vocab.len(), "hidden_size": opts.hidden_size,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": opts.hidden_size * 2,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;

    // Let BertModel::load create every tensor it needs, then refill them from the seed so
    // the file is deterministic.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg: Config = serde_json::from_value(config)?;
    BertModel::load(vb, &cfg)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("varmap lock"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        if name.contains("LayerNorm") {
            continue;
        }
        let var = &data[name];
        let n = var.elem_count();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.2f32..0.2)).collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
    }
    drop(data);
    varmap.save(dir.join("model.safetensors"))?;

    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let vocab_map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .enumerate()
        .map(|(i, t)| special(i, t))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab_map},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok)?)?;
    Ok(())
}

/// Writes a copy of the GGUF at `src` to `dst` with every F32 tensor (the norms) multiplied
/// element-wise by `1 + U(-amount, amount)`: a second real version of a model, the same
/// architecture and tokenizer, whose outputs differ. Quantized tensors are copied as they are.
pub fn perturb_gguf(src: &Path, dst: &Path, seed: u64, amount: f32) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    rewrite_f32_tensors(src, dst, |_, v| {
        v.iter()
            .map(|x| x * (1.0 + rng.random_range(-amount..amount)))
            .collect()
    })
}

/// Writes a copy of the GGUF at `src` to `dst` with a NaN in its final norm: a broken version
/// whose weights, not its file, are bad.
pub fn poison_gguf_nan(src: &Path, dst: &Path) -> anyhow::Result<()> {
    rewrite_f32_tensors(src, dst, |name, mut v| {
        if name == "output_norm.weight" {
            v[0] = f32::NAN;
        }
        v
    })
}

/// Copies a GGUF, passing each F32 tensor's values through `f` (in name order).
fn rewrite_f32_tensors(
    src: &Path,
    dst: &Path,
    mut f: impl FnMut(&str, Vec<f32>) -> Vec<f32>,
) -> anyhow::Result<()> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(src)?);
    let ct = gguf_file::Content::read(&mut reader)?;
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = ct.tensor(&mut reader, name, &Device::Cpu)?;
        let t = if t.dtype() == GgmlDType::F32 {
            let v = t.dequantize(&Device::Cpu)?;
            let values = f(name, v.flatten_all()?.to_vec1::<f32>()?);
            QTensor::quantize(
                &Tensor::from_vec(values, v.shape(), &Device::Cpu)?,
                GgmlDType::F32,
            )?
        } else {
            t
        };
        tensors.push((name.clone(), t));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    metadata.sort_by_key(|(k, _)| *k);
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(dst)?);
    gguf_file::write(&mut file, &metadata, &ts)?;
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
