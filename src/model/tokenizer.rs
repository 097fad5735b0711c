//! The tokenizer of a GGUF model, built from its metadata so that ids equal llama.cpp's, plus
//! the raw bytes of every token for incremental, always-valid UTF-8 decoding. Byte-level BPE
//! vocabularies (`tokenizer.ggml.model = gpt2`) run on the `tokenizers` crate with the
//! pre-tokenizer `tokenizer.ggml.pre` names; SentencePiece ones (`llama`) on [`super::spm`].
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::Tokenizer;

use super::spm::{self, SpmVocab};

/// GGUF token types (llama.cpp's `llama_token_type`) that never appear in generated text:
/// unknown (2), control (3) and unused (5). User-defined tokens (4) are text.
const HIDDEN_TOKEN_TYPES: [i64; 3] = [2, 3, 5];

/// Token texts llama.cpp also treats as end of generation when the vocabulary has them.
const END_OF_GENERATION_TEXTS: [&str; 5] = [
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
];

/// llama.cpp's pre-tokenizer regex for a `tokenizer.ggml.pre` name (llama-vocab.cpp), for
/// the names whose regex differs from GPT-2's.
fn split_pattern(pre: &str) -> Option<&'static str> {
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "qwen2" => Some(QWEN2),
        p if is_llama3(p) => Some(LLAMA3),
        _ => None,
    }
}

/// The `tokenizer.ggml.pre` names a byte-level BPE vocabulary may carry. llama.cpp refuses
/// a name it does not know; so does swapd, rather than split text some other way.
/// `default` (and a missing key) is GPT-2's byte-level split with a prefix space.
pub const SUPPORTED_PRE: [&str; 7] = [
    "default",
    "gpt-2",
    "smollm",
    "qwen2",
    "llama3",
    "llama-v3",
    "llama-bpe",
];

/// Whether `pre` names llama 3's pre-tokenizer, for which llama.cpp takes a word that is itself
/// a token as that token without merging (`ignore_merges`) and adds a BOS unless the file
/// says otherwise.
fn is_llama3(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-v3" | "llama-bpe")
}

/// The vocabulary models a GGUF may name in `tokenizer.ggml.model`.
pub const SUPPORTED_MODELS: [&str; 2] = ["gpt2", "llama"];

enum Model {
    Bpe(Box<Tokenizer>),
    Spm(Box<SpmVocab>),
}

/// A tokenizer read from GGUF metadata.
pub struct GgufTokenizer {
    model: Model,
    /// The BOS id when the GGUF asks for one before every prompt (`add_bos_token`).
    add_bos: Option<u32>,
    /// Raw bytes each token stands for; empty for tokens hidden from output.
    token_bytes: Vec<Vec<u8>>,
    /// Ids that end generation (eos, eot and the usual chat terminators).
    pub end_of_generation: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The `tokenizer.ggml.pre` name the pre-tokenizer was chosen by.
    pub pre: String,
}

fn meta_u32(ct: &Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::I32(x) => Some(*x as i64),
        Value::U32(x) => Some(*x as i64),
        Value::I8(x) => Some(*x as i64),
        Value::U8(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::U16(x) => Some(*x as i64),
        Value::I64(x) => Some(*x),
        Value::U64(x) => Some(*x as i64),
        _ => None,
    }
}

/// GPT-2's reversible map from bytes to printable characters: entry `b` is byte `b`'s char.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec!['\0'; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        out[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    out
}

/// The inverse of [`byte_chars`]: char → byte.
fn byte_decoder() -> std::collections::HashMap<char, u8> {
    byte_chars()
        .into_iter()
        .enumerate()
        .map(|(b, c)| (c, b as u8))
        .collect()
}

impl GgufTokenizer {
    /// Builds the tokenizer from `ct`'s metadata. Errors name the missing or bad key.
    pub fn from_gguf(ct: &Content) -> Result<Self, String> {
        let kind = ct
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "gpt2".to_string());
        if !SUPPORTED_MODELS.contains(&kind.as_str()) {
            return Err(format!(
                "tokenizer.ggml.model `{kind}` is not supported (supported: {})",
                SUPPORTED_MODELS.join(", ")
            ));
        }
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".to_string());
        let tokens = ct
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or("missing GGUF metadata key `tokenizer.ggml.tokens`")?;
        let types: Vec<i64> = ct
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| int_of(t).unwrap_or(1)).collect())
            .unwrap_or_default();
        let mut texts = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            texts.push(
                t.to_string()
                    .map_err(|_| format!("token {i} is not a string"))?
                    .clone(),
            );
        }
        crate::turns::pace();
        let hidden = |i: usize| {
            types
                .get(i)
                .is_some_and(|ty| HIDDEN_TOKEN_TYPES.contains(ty))
        };
        let mut token_bytes = Vec::with_capacity(tokens.len());
        let model = if kind == "llama" {
            let scores: Vec<f32> = match ct.metadata.get("tokenizer.ggml.scores") {
                Some(v) => v
                    .to_vec()
                    .map_err(|_| "tokenizer.ggml.scores is not an array")?
                    .iter()
                    .map(|s| {
                        s.to_f32()
                            .map_err(|_| "tokenizer.ggml.scores holds a non-f32")
                    })
                    .collect::<Result<_, _>>()?,
                None => return Err("missing GGUF metadata key `tokenizer.ggml.scores`".into()),
            };
            let unk = meta_u32(ct, "tokenizer.ggml.unknown_token_id");
            let space = ct
                .metadata
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(true);
            let mut vocab = SpmVocab::new(texts.clone(), scores, &types, unk, space)?;
            let name = ct
                .metadata
                .get("general.name")
                .and_then(|v| v.to_string().ok())
                .map(|n| n.to_ascii_lowercase())
                .unwrap_or_default();
            if name.contains("phi-3") || name.contains("phi3") {
                vocab.strip_like_phi3();
            }
            for i in 0..texts.len() {
                let ty = types.get(i).copied().unwrap_or(spm::TYPE_NORMAL);
                let bytes = if hidden(i) {
                    Vec::new()
                } else {
                    vocab.piece(i as u32, ty).unwrap_or_default()
                };
                token_bytes.push(bytes);
            }
            Model::Spm(Box::new(vocab))
        } else {
            if !SUPPORTED_PRE.contains(&pre.as_str()) {
                return Err(format!(
                    "tokenizer.ggml.pre `{pre}` is not supported (supported: {})",
                    SUPPORTED_PRE.join(", ")
                ));
            }
            // Building the BPE model cannot pause: a background load runs it beside serving.
            let mut inner =
                crate::turns::unpaced(|| Tokenizer::from_gguf(ct)).map_err(|e| e.to_string())?;
            if is_llama3(&pre) {
                if let tokenizers::ModelWrapper::BPE(bpe) = inner.get_model() {
                    let mut bpe = bpe.clone();
                    bpe.ignore_merges = true;
                    inner.with_model(bpe);
                }
            }
            crate::turns::pace();
            if let Some(pattern) = split_pattern(&pre) {
                // llama.cpp's regex for this pre-tokenizer, then byte-level BPE with no
                // prefix space (candle would fall back to GPT-2's regex).
                let split = Split::new(
                    SplitPattern::Regex(pattern.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| format!("tokenizer.ggml.pre `{pre}`: {e}"))?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])));
                inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
            }
            if pre == "gpt-2" {
                // GPT-2's regex, as llama.cpp applies it: no prefix space.
                inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
                inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
            }
            if pre == "smollm" {
                // candle falls back to GPT-2's pre-tokenizer for names it does not know, which
                // adds a prefix space ("The" → "ĠThe") and groups digits. SmolLM's own
                // tokenizer.json splits every digit, then applies byte-level BPE with no prefix
                // space; with that pipeline the ids equal llama.cpp's.
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
                inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
            }
            let decoder = byte_decoder();
            for (i, text) in texts.iter().enumerate() {
                if i % 8192 == 0 {
                    // A background load may hand the CPU to serving here.
                    crate::turns::pace();
                }
                let bytes = if hidden(i) {
                    Vec::new()
                } else if text.chars().all(|c| decoder.contains_key(&c)) {
                    text.chars().map(|c| decoder[&c]).collect()
                } else {
                    // Added tokens are stored as plain text, not byte-level characters.
                    text.as_bytes().to_vec()
                };
                token_bytes.push(bytes);
            }
            Model::Bpe(Box::new(inner))
        };
        let bos = meta_u32(ct, "tokenizer.ggml.bos_token_id");
        let eos = meta_u32(ct, "tokenizer.ggml.eos_token_id");
        // llama.cpp's default when the key is absent: SentencePiece vocabularies and llama 3's
        // add BOS.
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(kind == "llama" || is_llama3(&pre));
        let add_bos = match (add_bos, bos) {
            (true, Some(b)) if (b as usize) < texts.len() => Some(b),
            (true, _) => return Err("tokenizer.ggml.add_bos_token is set but tokenizer.ggml.bos_token_id is missing or outside the vocabulary".into()),
            (false, _) => None,
        };
        let mut end_of_generation: Vec<u32> = [eos, meta_u32(ct, "tokenizer.ggml.eot_token_id")]
            .into_iter()
            .flatten()
            .collect();
        for (i, t) in texts.iter().enumerate() {
            if END_OF_GENERATION_TEXTS.contains(&t.as_str())
                && !end_of_generation.contains(&(i as u32))
            {
                end_of_generation.push(i as u32);
            }
        }
        let name = |id: Option<u32>| id.and_then(|i| texts.get(i as usize).cloned());
        Ok(Self {
            bos_token: name(bos),
            eos_token: name(eos),
            model,
            add_bos,
            token_bytes,
            end_of_generation,
            pre,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) are
    /// recognized, as llama.cpp does with `special = true`; a BOS is put first when the GGUF
    /// asks for one and the text does not already start with it (a chat template that
    /// writes `<bos>` itself does not get two).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = match &self.model {
            Model::Bpe(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string())?,
            Model::Spm(v) => v.encode(text),
        };
        if let Some(b) = self.add_bos {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// Whether [`GgufTokenizer::encode`] puts a space before the text (a SentencePiece
    /// vocabulary with `add_space_prefix`, as llama 2's and Phi-3's): decoding the ids
    /// gives that space back.
    pub fn adds_space_prefix(&self) -> bool {
        matches!(&self.model, Model::Spm(v) if v.adds_space_prefix())
    }

    /// The raw bytes token `id` contributes to the output (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Vocabulary size as the GGUF lists it.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Decodes ids to text through the byte table (lossy only for incomplete UTF-8).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_decoder_covers_all_bytes() {
        let d = byte_decoder();
        assert_eq!(d.len(), 256);
        assert_eq!(d[&'Ġ'], b' ');
        assert_eq!(d[&'Ċ'], b'\n');
        assert_eq!(d[&'A'], b'A');
    }
}
