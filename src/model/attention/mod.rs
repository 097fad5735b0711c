//! Attention of one sequence on the CPU, in plain Rust over its own KV cache: RoPE, the f16
//! rounding of queries, keys and values (as llama.cpp's f16 cache and K·Q do), causal
//! softmax attention with grouped-query heads.
//!
//! On the CPU a batch step runs attention once per sequence per layer. Through candle that
//! was some twenty small tensor operations each (allocations, dispatch, and thread-pool
//! round trips for 1×64 matrix products): with 8 sequences, more time than the weights'
//! products. Here it is one pass over slices on the calling thread, and its arithmetic for a
//! sequence depends on nothing but that sequence.
use half::f16;

mod batch;
mod simd;

pub(crate) use batch::{attend_batch, SeqStep};

/// The head layout of a layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// RoPE tables: `cos[p · half + i]`, `sin[..]` for position `p` and pair `i`.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// NEOX pairs `i` with `i + d/2`; otherwise `2i` with `2i + 1`.
    pub neox: bool,
}

impl Rope {
    /// Rotates one head (`x.len()` = head dim) at position `p`, as candle's `rope` /
    /// `rope_i` do (the same f32 operations in the same order).
    fn apply(&self, x: &mut [f32], p: usize) {
        let half = x.len() / 2;
        let (cos, sin) = (
            &self.cos[p * half..(p + 1) * half],
            &self.sin[p * half..(p + 1) * half],
        );
        for i in 0..half {
            let (a, b) = if self.neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x1, x2, c, s) = (x[a], x[b], cos[i], sin[i]);
            x[a] = x1 * c - x2 * s;
            x[b] = x1 * s + x2 * c;
        }
    }

    /// Positions the tables cover.
    pub fn positions(&self, head_dim: usize) -> usize {
        self.cos.len() / (head_dim / 2).max(1)
    }
}

/// One layer's keys and values of one sequence, as f16, from position `base` on: one vector
/// per KV head, each `[token][head_dim]`, so a head's attention reads one contiguous run of
/// keys and one of values (the query heads that share it read it together). They are
/// rounded to f16 anyway, as in llama.cpp's cache, so storing f16 changes no bit and halves
/// the bytes every step reads. A sliding-window layer forgets what no later row can see:
/// once a window's worth of positions has fallen out of sight, they are dropped in one move,
/// so it holds at most two windows plus the rows of one step, and each token is moved at
/// most once.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerKv {
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    base: usize,
    window: Option<usize>,
    /// Values (tokens × KV width) to reserve, across the heads, when the first rows come.
    reserve: usize,
}

fn round_f16(x: &mut [f32]) {
    for v in x {
        *v = f16::from_f32(*v).to_f32();
    }
}

/// How scores are scaled and how far back a row sees.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    /// Factor on `q·k` (`1/√d` for most models; Gemma 3 names its own).
    pub scale: f64,
    /// A sliding window: a row at position `p` sees positions `p − window + 1 ..= p`
    /// (llama.cpp's standard SWA). `None`: every earlier position.
    pub window: Option<usize>,
}

impl Span {
    /// Full causal attention scaled by `1/√head_dim`.
    pub fn causal(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f64).sqrt(),
            window: None,
        }
    }
}

/// Attention of `n` new rows of one sequence whose cache holds `pos` tokens: `q` is
/// `n × n_head·d`, `k` and `v` are `n × n_kv_head·d` (projections, before RoPE). The keys and
/// values join `cache`; `out` (`n × n_head·d`) receives each row's attention over every
/// token up to its own (within `span`'s window). [`attend_batch`] does the same for several
/// sequences at once, across the pool; this batch of one is the tests'.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    h: Heads,
    span: Span,
    rope: &Rope,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    pos: usize,
    cache: &mut LayerKv,
    out: &mut [f32],
) {
    let mut seq = [SeqStep {
        pos,
        rows: n,
        cache,
    }];
    attend_batch(h, span, rope, q, k, v, &mut seq, out);
}

/// Puts `n` new rows of keys and values (`n × n_kv_head·d` each, before RoPE) of a sequence
/// at position `pos` into its layer cache: rotated and rounded to f16 precision, after
/// dropping what a sliding window no longer shows the first of them.
pub(crate) fn append(
    h: Heads,
    rope: &Rope,
    k: &[f32],
    v: &[f32],
    n: usize,
    pos: usize,
    cache: &mut LayerKv,
) {
    let d = h.head_dim;
    let kw = h.n_kv_head * d;
    assert_eq!(k.len(), n * kw, "keys");
    assert_eq!(v.len(), n * kw, "values");
    if cache.k.len() != h.n_kv_head {
        assert!(cache.tokens(d) == 0, "the cache's head count changed");
        let each = cache.reserve / h.n_kv_head.max(1);
        cache.k = (0..h.n_kv_head).map(|_| Vec::with_capacity(each)).collect();
        cache.v = (0..h.n_kv_head).map(|_| Vec::with_capacity(each)).collect();
    }
    if let Some(w) = cache.window {
        // The first row of this step sees positions from `pos + 1 − w` on.
        let seen_from = (pos + 1).saturating_sub(w);
        if seen_from - cache.base >= w {
            let dead = (seen_from - cache.base) * d;
            for head in cache.k.iter_mut().chain(cache.v.iter_mut()) {
                head.drain(..dead);
            }
            cache.base = seen_from;
        }
    }
    assert_eq!(
        cache.base + cache.tokens(d),
        pos,
        "the cache is not at position {pos}"
    );
    let mut head = vec![0f32; d];
    for (i, (krow, vrow)) in k.chunks_exact(kw).zip(v.chunks_exact(kw)).enumerate() {
        let heads = krow.chunks_exact(d).zip(vrow.chunks_exact(d));
        for ((src, vals), (keys, values)) in heads.zip(cache.k.iter_mut().zip(&mut cache.v)) {
            head.copy_from_slice(src);
            rope.apply(&mut head, pos + i);
            keys.extend(head.iter().map(|&x| f16::from_f32(x)));
            values.extend(vals.iter().map(|&x| f16::from_f32(x)));
        }
    }
}

/// The attention of the query heads that share KV head `g` (heads `g·G .. g·G + G`,
/// `G = n_head / n_kv_head`) for `rows` of a step whose `n` rows (`q`: `n × n_head·d`, before
/// RoPE) [`append`] put into `cache` at position `pos`: row `i`'s heads go to
/// `out[(i − rows.start) · G·d ..][..G·d]`, in head order. Reads the cache only, so KV heads
/// and rows can run on different threads; the arithmetic of a row and head depends on nothing
/// else (each score and each output column is summed as it would be for that head alone).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_group(
    h: Heads,
    span: Span,
    rope: &Rope,
    q: &[f32],
    rows: std::ops::Range<usize>,
    pos: usize,
    g: usize,
    cache: &LayerKv,
    out: &mut [f32],
) {
    let d = h.head_dim;
    let qw = h.n_head * d;
    let gs = h.n_head / h.n_kv_head;
    assert!(out.len() >= rows.len() * gs * d, "output");
    assert!(
        rows.end * qw <= q.len() && cache.base + cache.tokens(d) >= pos + rows.end,
        "rows past the step"
    );
    let (keys, values) = (&cache.k[g], &cache.v[g]);
    let base = cache.base;
    let mut qh = vec![0f32; gs * d];
    let mut scores = Vec::with_capacity(gs * (pos + rows.end));
    for (r, i) in rows.enumerate() {
        qh.copy_from_slice(&q[i * qw + g * gs * d..][..gs * d]);
        for head in qh.chunks_exact_mut(d) {
            rope.apply(head, pos + i);
        }
        round_f16(&mut qh);
        let end = pos + i + 1;
        let first = span.window.map_or(0, |w| end.saturating_sub(w));
        assert!(first >= base, "a row needs a position the window dropped");
        let seen = end - first;
        scores.clear();
        scores.resize(gs * seen, 0.0);
        simd::dots(&qh, d, &keys[(first - base) * d..], d, &mut scores);
        for scores in scores.chunks_exact_mut(seen) {
            let mut max = f32::NEG_INFINITY;
            for s in scores.iter_mut() {
                *s = (*s as f64 * span.scale) as f32;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for s in scores.iter_mut() {
                *s /= sum;
            }
        }
        let at = (first - base) * d;
        simd::weighted_rows(
            &scores,
            &values[at..],
            d,
            d,
            &mut out[r * gs * d..(r + 1) * gs * d],
        );
    }
}

impl LayerKv {
    /// Room for `tokens` tokens of `kv_width` values each, reserved when the first rows come
    /// (split across the KV heads); a sliding window of `window` positions bounds what is
    /// kept.
    pub fn with_capacity(tokens: usize, kv_width: usize, window: Option<usize>) -> Self {
        Self {
            reserve: tokens * kv_width,
            window,
            ..Self::default()
        }
    }

    /// Tokens held, for heads of `d` values.
    fn tokens(&self, d: usize) -> usize {
        self.k.first().map_or(0, |head| head.len() / d)
    }

    /// Tokens held (at most two windows plus one step's rows for a sliding-window layer).
    #[cfg(test)]
    pub fn held(&self, kv_width: usize) -> usize {
        self.k.iter().map(Vec::len).sum::<usize>() / kv_width
    }
}

#[cfg(test)]
mod tests;
