//! The tiny models' vocabularies, as GGUF tokenizer metadata: a byte-level BPE one (SmolLM2's
//! specials and pre-tokenizer, qwen2's, or llama 3's with `llama-bpe`) and a SentencePiece
//! one with byte fallback (phi3's), each with its family's chat template.
use candle_core::quantized::gguf_file::Value as V;

use super::Variant;

/// SmolLM2's chat template, so chat rendering is exercised with tiny models too.
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Meta-Llama-3-8B-Instruct's chat template.
pub const LLAMA3_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Phi-3-mini-4k-instruct's chat template.
pub const PHI3_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

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

/// Tokens of llama 3's vocabulary that no merge reaches: llama 3 (`ignore_merges`) takes a
/// word that is a token as that token, so these tell its tokenizer from a plain BPE.
const LLAMA3_WHOLE_WORDS: [&str; 3] = ["Ġhello", "123", "ĠHello"];

/// SentencePiece pieces past the single characters, in descending score (merge) order.
const SPM_PIECES: [&str; 16] = [
    "▁t", "he", "▁the", "in", "er", "an", "on", "▁a", "ll", "▁w", "or", "th", "▁h", "▁he", "llo",
    "▁hello",
];

/// The vocabulary's size and its `tokenizer.*` metadata, in the order it is written.
pub(super) fn tokenizer_metadata(variant: Variant) -> (usize, Vec<(String, V)>) {
    match variant {
        Variant::Phi3 => spm(),
        _ => bpe(variant),
    }
}

fn strings(v: &[String]) -> V {
    V::Array(v.iter().map(|t| V::String(t.clone())).collect())
}

fn bpe(variant: Variant) -> (usize, Vec<(String, V)>) {
    let llama3 = variant == Variant::Llama3;
    let specials: &[&str] = if llama3 {
        &[
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ]
    } else {
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    };
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    tokens.extend(
        crate::model::tokenizer::byte_chars()
            .into_iter()
            .map(String::from),
    );
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    if llama3 {
        tokens.extend(LLAMA3_WHOLE_WORDS.map(String::from));
    }
    let n = specials.len();
    let types: Vec<V> = (0..tokens.len())
        .map(|i| V::I32(if i < n { 3 } else { 1 }))
        .collect();
    let pre = match variant {
        Variant::Llama => "smollm",
        Variant::Llama3 => "llama-bpe",
        _ => "qwen2",
    };
    let (bos, eos, pad, add_bos, template) = if llama3 {
        (0, 3, 3, true, LLAMA3_CHAT_TEMPLATE)
    } else {
        (1, 2, 0, false, SMOLLM2_CHAT_TEMPLATE)
    };
    let merges = MERGES
        .iter()
        .map(|(a, b)| V::String(format!("{a} {b}")))
        .collect();
    let md = vec![
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String(pre.into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", V::Array(types)),
        ("tokenizer.ggml.merges", V::Array(merges)),
        ("tokenizer.ggml.bos_token_id", V::U32(bos)),
        ("tokenizer.ggml.eos_token_id", V::U32(eos)),
        ("tokenizer.ggml.padding_token_id", V::U32(pad)),
        ("tokenizer.ggml.add_bos_token", V::Bool(add_bos)),
        ("tokenizer.chat_template", V::String(template.into())),
    ];
    (tokens.len(), own(md))
}

/// Phi-3's kind of vocabulary: `<unk>`, `<s>`, `</s>`, 256 byte tokens, scored pieces, then
/// the chat specials (control tokens).
fn spm() -> (usize, Vec<(String, V)>) {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let singles = std::iter::once("▁".to_string()).chain(('a'..='z').map(String::from));
    for (i, c) in singles.enumerate() {
        tokens.push(c);
        types.push(1);
        scores.push(-100.0 - i as f32);
    }
    for (i, p) in SPM_PIECES.iter().enumerate() {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(-1.0 - i as f32);
    }
    let eos = tokens.len() as u32;
    for s in [
        "<|endoftext|>",
        "<|assistant|>",
        "<|end|>",
        "<|user|>",
        "<|system|>",
    ] {
        tokens.push(s.into());
        types.push(3);
        scores.push(0.0);
    }
    let md = vec![
        ("tokenizer.ggml.model", V::String("llama".into())),
        ("tokenizer.ggml.pre", V::String("default".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.scores",
            V::Array(scores.into_iter().map(V::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(eos)),
        ("tokenizer.ggml.unknown_token_id", V::U32(0)),
        ("tokenizer.ggml.padding_token_id", V::U32(eos)),
        ("tokenizer.ggml.add_bos_token", V::Bool(true)),
        ("tokenizer.ggml.add_eos_token", V::Bool(false)),
        (
            "tokenizer.chat_template",
            V::String(PHI3_CHAT_TEMPLATE.into()),
        ),
    ];
    (tokens.len(), own(md))
}

fn own(md: Vec<(&str, V)>) -> Vec<(String, V)> {
    md.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}
