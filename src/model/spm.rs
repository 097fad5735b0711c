//! SentencePiece vocabularies from GGUF metadata (`tokenizer.ggml.model = llama`: Gemma, the
//! llama 1/2 family), tokenized as llama.cpp's `llm_tokenizer_spm` does, so that ids equal
//! llama.cpp's:
//! 1. special-token partition: every control, user-defined or unknown token written in the
//!    text becomes that token, longest token text first (llama.cpp's
//!    `tokenizer_st_partition` with `parse_special`); whitespace after a token marked
//!    `rstrip` is dropped (llama.cpp marks phi3's chat specials so, as Phi-3's own
//!    tokenizer does);
//! 2. each remaining fragment gets a space prefix if the vocabulary asks for one and the
//!    fragment starts the text or follows a special token, and its spaces become `▁`;
//! 3. the fragment is cut into UTF-8 characters, and adjacent pieces whose concatenation is a
//!    token merge, highest score first (leftmost on a tie), until no pair is a token;
//! 4. a piece that is not a token is spelled in byte tokens (`<0xXX>`).
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GGUF token types (llama.cpp's `llama_token_type`).
pub(crate) const TYPE_NORMAL: i64 = 1;
pub(crate) const TYPE_UNKNOWN: i64 = 2;
pub(crate) const TYPE_CONTROL: i64 = 3;
pub(crate) const TYPE_USER_DEFINED: i64 = 4;
pub(crate) const TYPE_BYTE: i64 = 6;

/// SentencePiece's visible space.
const SPACE: &str = "\u{2581}";

/// A SentencePiece vocabulary.
pub struct SpmVocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    ids: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    special: Vec<u32>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
    /// Tokens whose following whitespace the partition drops (llama.cpp's `RSTRIP`).
    rstrip: Vec<bool>,
}

/// C's `isspace`, which llama.cpp's partition strips with.
fn c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// A merge candidate: pieces `left` and `right` (adjacent), whose concatenation is a token
/// with `score`, `size` bytes long when it was found.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// The heap's greatest is the highest score, then the leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// A piece of a fragment: bytes `start .. start + len`, linked to its neighbours.
#[derive(Clone, Copy)]
struct Piece {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SpmVocab {
    /// A vocabulary from the GGUF token texts, scores and types (`types` may be empty:
    /// every token is then normal).
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: &[i64],
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self, String> {
        if scores.len() != tokens.len() {
            return Err(format!(
                "tokenizer.ggml.scores has {} entries for {} tokens",
                scores.len(),
                tokens.len()
            ));
        }
        let ty = |i: usize| types.get(i).copied().unwrap_or(TYPE_NORMAL);
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let mut special: Vec<u32> = (0..tokens.len())
            .filter(|&i| {
                matches!(ty(i), TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN)
                    && !tokens[i].is_empty()
            })
            .map(|i| i as u32)
            .collect();
        special.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        let rstrip = vec![false; tokens.len()];
        Ok(Self {
            tokens,
            scores,
            ids,
            special,
            byte_ids,
            unk,
            add_space_prefix,
            rstrip,
        })
    }

    /// Whether a fragment at the start of the text, or after a special token, gets a space.
    pub fn adds_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Marks token `text` (when the vocabulary has it) to drop the whitespace after it.
    pub fn set_rstrip(&mut self, text: &str, on: bool) {
        if let Some(&id) = self.ids.get(text) {
            self.rstrip[id as usize] = on;
        }
    }

    /// llama.cpp's rule for models named Phi-3 (`general.name` containing `phi-3` or
    /// `phi3`): every special token, and `</s>`, drops the whitespace after it, except
    /// `<unk>`, `<s>` and `<|endoftext|>`.
    pub fn strip_like_phi3(&mut self) {
        for &id in &self.special {
            self.rstrip[id as usize] = true;
        }
        self.set_rstrip("</s>", true);
        for t in ["<unk>", "<s>", "<|endoftext|>"] {
            self.set_rstrip(t, false);
        }
    }

    /// The ids of `text` (no BOS: the caller adds it).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        enum Frag<'a> {
            Raw(&'a str),
            Tok(u32),
        }
        let mut frags = vec![Frag::Raw(text)];
        for &id in &self.special {
            let pat = self.tokens[id as usize].as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Frag::Raw(r) if r.contains(pat)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Frag::Raw(raw) = f else {
                    next.push(f);
                    continue;
                };
                let mut at = 0;
                for (i, _) in raw.match_indices(pat) {
                    if i < at {
                        continue;
                    }
                    if i > at {
                        next.push(Frag::Raw(&raw[at..i]));
                    }
                    next.push(Frag::Tok(id));
                    at = i + pat.len();
                    if self.rstrip[id as usize] {
                        while raw.as_bytes().get(at).is_some_and(|&b| c_space(b)) {
                            at += 1;
                        }
                    }
                }
                if at < raw.len() {
                    next.push(Frag::Raw(&raw[at..]));
                }
            }
            frags = next;
        }
        let mut out = Vec::new();
        let mut prev_special = true;
        for f in frags {
            match f {
                Frag::Tok(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Frag::Raw(raw) => {
                    let mut s = String::with_capacity(raw.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(raw);
                    self.encode_fragment(&s.replace(' ', SPACE), &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    fn lookup(&self, s: &[u8]) -> Option<u32> {
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| self.ids.get(s).copied())
    }

    /// Steps 3 and 4 for one escaped fragment.
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let mut pieces: Vec<Piece> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            pieces.push(Piece {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        let Some(last) = pieces.last_mut() else {
            return;
        };
        last.next = None;
        let mut heap = BinaryHeap::new();
        let add = |heap: &mut BinaryHeap<Bigram>, pieces: &[Piece], l: usize, r: usize| {
            let (a, b) = (pieces[l], pieces[r]);
            let span = &bytes[a.start..b.start + b.len];
            if let Some(id) = self.lookup(span) {
                heap.push(Bigram {
                    left: l,
                    right: r,
                    score: self.scores[id as usize],
                    size: span.len(),
                });
            }
        };
        for i in 1..pieces.len() {
            add(&mut heap, &pieces, i - 1, i);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (pieces[bg.left], pieces[bg.right]);
            // Stale: one side merged since this pair was found.
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            pieces[bg.left].len += r.len;
            pieces[bg.right].len = 0;
            pieces[bg.left].next = r.next;
            if let Some(n) = r.next {
                pieces[n].prev = Some(bg.left);
            }
            if let Some(p) = pieces[bg.left].prev {
                add(&mut heap, &pieces, p, bg.left);
            }
            if let Some(n) = pieces[bg.left].next {
                add(&mut heap, &pieces, bg.left, n);
            }
        }
        let mut at = Some(0);
        while let Some(i) = at {
            let p = pieces[i];
            let span = &bytes[p.start..p.start + p.len];
            match self.lookup(span) {
                Some(id) => out.push(id),
                None => {
                    for &b in span {
                        if let Some(id) = self.byte_ids[b as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            at = p.next;
        }
    }

    /// The bytes token `id` stands for in text: `▁` as a space, byte tokens as their byte;
    /// `None` for an id outside the vocabulary.
    pub fn piece(&self, id: u32, ty: i64) -> Option<Vec<u8>> {
        let t = self.tokens.get(id as usize)?;
        Some(match ty {
            TYPE_BYTE => {
                let hex = t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => vec![b],
                    None => t.as_bytes().to_vec(),
                }
            }
            TYPE_USER_DEFINED => t.as_bytes().to_vec(),
            _ => t.replace(SPACE, " ").into_bytes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(add_space_prefix: bool) -> SpmVocab {
        let mut tokens: Vec<String> = ["<unk>", "<bos>", "<start_of_turn>", "\n", "  "]
            .map(String::from)
            .to_vec();
        let mut types = vec![
            TYPE_UNKNOWN,
            TYPE_CONTROL,
            TYPE_CONTROL,
            TYPE_USER_DEFINED,
            4,
        ];
        let mut scores = vec![0.0; 5];
        for b in 0..256 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TYPE_BYTE);
            scores.push(0.0);
        }
        for (t, s) in [
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("he", -3.0),
            ("ll", -1.5),
            ("llo", -4.0),
            ("hello", -5.0),
            ("▁hello", -6.0),
        ] {
            tokens.push(t.into());
            types.push(TYPE_NORMAL);
            scores.push(s);
        }
        SpmVocab::new(tokens, scores, &types, Some(0), add_space_prefix).unwrap()
    }

    fn id(v: &SpmVocab, t: &str) -> u32 {
        v.ids[t]
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let v = vocab(false);
        // "ll" (−1.5) merges first, then "he" (−3), "llo" (−4), "hello" (−5), "▁hello".
        assert_eq!(v.encode(" hello"), [id(&v, "▁hello")]);
        assert_eq!(v.encode("hello"), [id(&v, "hello")]);
        // 'é' is not a token: its two UTF-8 bytes.
        assert_eq!(
            v.encode("hé"),
            [id(&v, "h"), id(&v, "<0xC3>"), id(&v, "<0xA9>")]
        );
    }

    #[test]
    fn special_and_user_defined_tokens_split_the_text_first() {
        let v = vocab(true);
        let got = v.encode("<start_of_turn>hello\nhe  l");
        let want = [
            id(&v, "<start_of_turn>"),
            // A space prefix after a special token.
            id(&v, "▁hello"),
            id(&v, "\n"),
            id(&v, "▁"),
            id(&v, "he"),
            id(&v, "  "),
            id(&v, "▁"),
            id(&v, "l"),
        ];
        assert_eq!(got, want);
        assert_eq!(v.piece(id(&v, "▁hello"), TYPE_NORMAL).unwrap(), b" hello");
        assert_eq!(v.piece(id(&v, "<0xC3>"), TYPE_BYTE).unwrap(), [0xC3]);
    }
}
