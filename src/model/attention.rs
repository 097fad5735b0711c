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

/// One layer's keys and values of one sequence: token-major, `[token][kv_head][head_dim]`,
/// from position `base` on. A sliding-window layer forgets what no later row can see: once
/// a window's worth of positions has fallen out of sight, they are dropped in one move, so
/// it holds at most two windows plus the rows of one step, and each token is moved at most
/// once.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
    base: usize,
    window: Option<usize>,
}

fn round_f16(x: &mut [f32]) {
    for v in x {
        *v = f16::from_f32(*v).to_f32();
    }
}

/// `Σ a_i b_i` in eight interleaved partial sums (vectorizable, and fixed in order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
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
/// token up to its own (within `span`'s window).
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
    let d = h.head_dim;
    let (qw, kw) = (h.n_head * d, h.n_kv_head * d);
    assert_eq!(q.len(), n * qw, "queries");
    assert_eq!(k.len(), n * kw, "keys");
    assert_eq!(v.len(), n * kw, "values");
    assert_eq!(out.len(), n * qw, "output");
    if let Some(w) = cache.window {
        // The first row of this step sees positions from `pos + 1 − w` on.
        let seen_from = (pos + 1).saturating_sub(w);
        if seen_from - cache.base >= w {
            let dead = (seen_from - cache.base) * kw;
            cache.k.drain(..dead);
            cache.v.drain(..dead);
            cache.base = seen_from;
        }
    }
    assert_eq!(
        cache.base + cache.k.len() / kw.max(1),
        pos,
        "the cache is not at position {pos}"
    );
    let base = cache.base;
    let mut q = q.to_vec();
    for (i, row) in q.chunks_exact_mut(qw).enumerate() {
        for head in row.chunks_exact_mut(d) {
            rope.apply(head, pos + i);
        }
    }
    round_f16(&mut q);
    let start = cache.k.len();
    cache.k.extend_from_slice(k);
    cache.v.extend_from_slice(v);
    for (i, row) in cache.k[start..].chunks_exact_mut(kw).enumerate() {
        for head in row.chunks_exact_mut(d) {
            rope.apply(head, pos + i);
        }
    }
    round_f16(&mut cache.k[start..]);
    round_f16(&mut cache.v[start..]);

    let n_rep = h.n_head / h.n_kv_head;
    let scale = span.scale;
    let mut scores = vec![0f32; pos + n];
    for i in 0..n {
        let end = pos + i + 1;
        let first = span.window.map_or(0, |w| end.saturating_sub(w));
        let visible = end - first;
        for head in 0..h.n_head {
            let g = head / n_rep;
            let qh = &q[i * qw + head * d..i * qw + (head + 1) * d];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores[..visible].iter_mut().enumerate() {
                let j = first + j - base;
                let kj = &cache.k[j * kw + g * d..j * kw + (g + 1) * d];
                *s = (dot(qh, kj) as f64 * scale) as f32;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in &mut scores[..visible] {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[i * qw + head * d..i * qw + (head + 1) * d];
            o.fill(0.0);
            for (j, &p) in scores[..visible].iter().enumerate() {
                let j = first + j - base;
                let p = p / sum;
                let vj = &cache.v[j * kw + g * d..j * kw + (g + 1) * d];
                for (o, &x) in o.iter_mut().zip(vj) {
                    *o += p * x;
                }
            }
        }
    }
}

impl LayerKv {
    /// Room for `tokens` tokens of `kv_width` values each, reserved up front; a sliding
    /// window of `window` positions bounds what is kept.
    pub fn with_capacity(tokens: usize, kv_width: usize, window: Option<usize>) -> Self {
        Self {
            k: Vec::with_capacity(tokens * kv_width),
            v: Vec::with_capacity(tokens * kv_width),
            base: 0,
            window,
        }
    }

    /// Tokens held (at most two windows plus one step's rows for a sliding-window layer).
    #[cfg(test)]
    pub fn held(&self, kv_width: usize) -> usize {
        self.k.len() / kv_width
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same attention computed naively in f64 from the rotated, rounded values.
    #[test]
    fn matches_an_f64_reference_with_grouped_heads_and_a_chunk() {
        let h = Heads {
            n_head: 4,
            n_kv_head: 2,
            head_dim: 8,
        };
        let half = 4;
        let positions = 16;
        let rope = Rope {
            cos: (0..positions * half)
                .map(|i| (i as f32 * 0.1).cos())
                .collect(),
            sin: (0..positions * half)
                .map(|i| (i as f32 * 0.1).sin())
                .collect(),
            neox: true,
        };
        let val = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
        let (qw, kw) = (32, 16);
        let mut cache = LayerKv::default();
        let mut all_k = Vec::new();
        let mut all_v = Vec::new();
        let mut pos = 0;
        // Three tokens, then a chunk of two.
        for n in [1, 1, 1, 2] {
            let q: Vec<f32> = (0..n * qw).map(|i| val(i + 7 * pos)).collect();
            let k: Vec<f32> = (0..n * kw).map(|i| val(i * 3 + pos)).collect();
            let v: Vec<f32> = (0..n * kw).map(|i| val(i * 5 + 11 * pos)).collect();
            let mut out = vec![0f32; n * qw];
            attend(
                h,
                Span::causal(8),
                &rope,
                &q,
                &k,
                &v,
                n,
                pos,
                &mut cache,
                &mut out,
            );
            // Reference: rotate and round the same way, then exact attention.
            let mut qr = q.clone();
            for (i, row) in qr.chunks_exact_mut(qw).enumerate() {
                for hd in row.chunks_exact_mut(8) {
                    rope.apply(hd, pos + i);
                }
            }
            round_f16(&mut qr);
            let mut kr = k.clone();
            for (i, row) in kr.chunks_exact_mut(kw).enumerate() {
                for hd in row.chunks_exact_mut(8) {
                    rope.apply(hd, pos + i);
                }
            }
            round_f16(&mut kr);
            let mut vr = v.clone();
            round_f16(&mut vr);
            all_k.extend(kr);
            all_v.extend(vr);
            for i in 0..n {
                for head in 0..4 {
                    let g = head / 2;
                    let qh = &qr[i * qw + head * 8..][..8];
                    let visible = pos + i + 1;
                    let s: Vec<f64> = (0..visible)
                        .map(|j| {
                            let kj = &all_k[j * kw + g * 8..][..8];
                            qh.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                / 8f64.sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..8 {
                        let want: f64 = (0..visible)
                            .map(|j| e[j] / z * all_v[j * kw + g * 8 + c] as f64)
                            .sum();
                        let got = out[i * qw + head * 8 + c] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "row {i} head {head}: {got} vs {want}"
                        );
                    }
                }
            }
            pos += n;
        }
    }

    /// A sliding-window cache that drops what no row can see computes the same bits as one
    /// that keeps everything, holds at most two windows plus a step, and a window of one sees
    /// only the row itself.
    #[test]
    fn sliding_windows_drop_only_what_no_row_sees() {
        let h = Heads {
            n_head: 2,
            n_kv_head: 1,
            head_dim: 4,
        };
        let positions = 64;
        let rope = Rope {
            cos: (0..positions * 2).map(|i| (i as f32 * 0.3).cos()).collect(),
            sin: (0..positions * 2).map(|i| (i as f32 * 0.3).sin()).collect(),
            neox: true,
        };
        let val = |i: usize| ((i * 53 % 97) as f32 / 40.0) - 1.2;
        for w in [1, 3, 5] {
            let span = Span {
                scale: 0.5,
                window: Some(w),
            };
            let mut kept = LayerKv::with_capacity(8, 4, None);
            let mut dropping = LayerKv::with_capacity(8, 4, Some(w));
            let mut pos = 0;
            for n in [1, 1, 4, 1, 1, 1, 7, 1, 1, 2, 1, 1, 1, 1, 1] {
                let q: Vec<f32> = (0..n * 8).map(|i| val(i + 13 * pos)).collect();
                let k: Vec<f32> = (0..n * 4).map(|i| val(i * 7 + 3 * pos)).collect();
                let v: Vec<f32> = (0..n * 4).map(|i| val(i * 11 + 5 * pos + 1)).collect();
                let (mut a, mut b) = (vec![0f32; n * 8], vec![0f32; n * 8]);
                attend(h, span, &rope, &q, &k, &v, n, pos, &mut kept, &mut a);
                attend(h, span, &rope, &q, &k, &v, n, pos, &mut dropping, &mut b);
                assert_eq!(a, b, "window {w}, step at {pos}");
                assert!(dropping.held(4) <= 2 * w + n, "window {w}: holds too much");
                if w == 1 {
                    // Each row sees only itself: its output is its own (rounded) value.
                    for i in 0..n {
                        let vi: Vec<f32> = v[i * 4..i * 4 + 4]
                            .iter()
                            .map(|&x| f16::from_f32(x).to_f32())
                            .collect();
                        assert_eq!(a[i * 8..i * 8 + 4], vi[..]);
                        assert_eq!(a[i * 8 + 4..i * 8 + 8], vi[..]);
                    }
                }
                pos += n;
            }
        }
    }
}
