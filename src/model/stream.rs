//! Turning a stream of token bytes into text deltas that are always valid UTF-8, and cutting
//! the text at stop strings without ever emitting part of one.

/// Accumulates bytes and releases the longest valid UTF-8 prefix.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds `bytes`; returns the text that is complete so far. Bytes of a character split
    /// across tokens wait for the rest. Invalid sequences (never completable) become U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Text for bytes still held at the end of generation (an incomplete character).
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// Holds back text that could be the start of a stop string.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub struct StopCheck {
    /// Text safe to emit now.
    pub emit: String,
    /// The stop string that matched; generation ends.
    pub matched: Option<String>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return StopCheck {
                emit: std::mem::take(&mut self.held),
                matched: None,
            };
        }
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, _)| *i);
        if let Some((i, s)) = first {
            let emit = self.held[..i].to_string();
            let matched = Some(s.clone());
            self.held.clear();
            return StopCheck { emit, matched };
        }
        // Keep the longest tail that is a prefix of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let emit = self.held[..keep].to_string();
        self.held.drain(..keep);
        StopCheck {
            emit,
            matched: None,
        }
    }

    /// Text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_wait_for_their_last_byte() {
        let mut s = Utf8Stream::default();
        let e = "é中😀".as_bytes();
        let mut out = String::new();
        for b in e {
            let t = s.push(&[*b]);
            assert!(std::str::from_utf8(t.as_bytes()).is_ok());
            out.push_str(&t);
        }
        assert_eq!(out, "é中😀");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_and_tail_is_flushed() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
        assert_eq!(s.push(&[0xE4, 0xB8]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn stop_string_across_deltas_is_never_emitted() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into(), "END".into()]);
        let mut out = String::new();
        let mut matched = None;
        for piece in ["Hello", " there\n", "\nUs", "er: more"] {
            let c = m.push(piece);
            out.push_str(&c.emit);
            if c.matched.is_some() {
                matched = c.matched;
                break;
            }
        }
        assert_eq!(out, "Hello there");
        assert_eq!(matched.as_deref(), Some("\n\nUser:"));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the EN").emit, "the ");
        assert_eq!(m.push("TRY").emit, "ENTRY");
        assert_eq!(m.push("E").emit, "");
        assert_eq!(m.finish(), "E");
    }
}
