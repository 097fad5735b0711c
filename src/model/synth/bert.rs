//! The tiny BERT: a 2-layer random-weight sentence embedder with a WordPiece tokenizer.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

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
