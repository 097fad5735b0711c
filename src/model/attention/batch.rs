//! Attention of one batch step's sequences on the CPU, across candle's barrier pool as the
//! projections are. Each sequence's new keys and values first join its cache (a copy and
//! RoPE of a few rows, on the calling thread); then every (sequence, KV head, block of rows)
//! is one work item, for the query heads that share that KV head. Items only read the caches, and each fills its own part of the
//! output, so a sequence's attention has the bits it has alone, whatever shares the step.
//!
//! Before this, a step ran every sequence's attention on the calling thread while the pool's
//! worker spun: with 8 sequences on 2 cores, 29% of the step's wall time.
use std::sync::OnceLock;

use super::{append, attend_group, Heads, LayerKv, Rope, Span};

/// Rows of one sequence in one work item (a prefill chunk splits into several).
const ROWS_PER_ITEM: usize = 16;

/// Multiply-accumulates below which the whole batch runs on the calling thread: waking the
/// pool costs a few microseconds, about what one core needs for this many.
const PARALLEL_MIN_MACS: usize = 64 * 1024;

/// One sequence in a step: `rows` new rows at position `pos`, and its cache at this layer.
pub(crate) struct SeqStep<'a> {
    pub pos: usize,
    pub rows: usize,
    pub cache: &'a mut LayerKv,
}

/// Attention of every sequence's new rows: `q` (`rows × n_head·d`), `k` and `v`
/// (`rows × n_kv_head·d`, before RoPE) hold the sequences' rows in order; `out` (as `q`)
/// receives each row's attention over its own sequence, whose cache its keys and values join.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_batch(
    h: Heads,
    span: Span,
    rope: &Rope,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seqs: &mut [SeqStep<'_>],
    out: &mut [f32],
) {
    let d = h.head_dim;
    let (qw, kw) = (h.n_head * d, h.n_kv_head * d);
    // The query heads of one KV head, side by side in a row of `q`.
    let gw = h.n_head / h.n_kv_head * d;
    let total: usize = seqs.iter().map(|s| s.rows).sum();
    assert_eq!(q.len(), total * qw, "queries");
    assert_eq!(k.len(), total * kw, "keys");
    assert_eq!(v.len(), total * kw, "values");
    assert_eq!(out.len(), total * qw, "output");

    // (sequence, first row of the sequence in the step, KV head, rows) of every work item.
    let mut items = Vec::new();
    let mut macs = 0usize;
    let mut off = 0;
    for (si, s) in seqs.iter_mut().enumerate() {
        let (kr, vr) = (
            &k[off * kw..(off + s.rows) * kw],
            &v[off * kw..(off + s.rows) * kw],
        );
        append(h, rope, kr, vr, s.rows, s.pos, s.cache);
        for g in 0..h.n_kv_head {
            for r0 in (0..s.rows).step_by(ROWS_PER_ITEM) {
                items.push((si, off, g, r0..s.rows.min(r0 + ROWS_PER_ITEM)));
            }
        }
        macs += h.n_head * s.rows * (s.pos + s.rows) * d * 2;
        off += s.rows;
    }
    let seqs: Vec<(usize, usize, &LayerKv)> =
        seqs.iter().map(|s| (s.pos, s.rows, &*s.cache)).collect();
    let parts: Vec<OnceLock<Vec<f32>>> = items.iter().map(|_| OnceLock::new()).collect();
    let run = |range: std::ops::Range<usize>| {
        for (it, part) in items[range.clone()].iter().zip(&parts[range]) {
            let (si, off, g, rows) = it;
            let (pos, n, cache) = seqs[*si];
            let mut o = vec![0f32; rows.len() * gw];
            let q = &q[off * qw..(off + n) * qw];
            attend_group(h, span, rope, q, rows.clone(), pos, *g, cache, &mut o);
            part.set(o).expect("each item runs once");
        }
    };
    if macs < PARALLEL_MIN_MACS || items.len() < 2 {
        run(0..items.len());
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items.len(), run);
    }
    for ((_, off, g, rows), part) in items.iter().zip(parts) {
        let part = part.into_inner().expect("every item ran");
        for (i, o) in rows.clone().zip(part.chunks_exact(gw)) {
            let at = (off + i) * qw + g * gw;
            out[at..at + gw].copy_from_slice(o);
        }
    }
}
