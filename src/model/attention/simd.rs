//! The two inner loops of CPU attention, written so that every build computes the same bits:
//! the AVX form (x86-64-v3, as `.cargo/config.toml` builds) does the very operations of the
//! portable one, in the same order, eight lanes at a time (multiplies and adds stay separate,
//! never fused), so a sequence's attention does not depend on the build's vector width. Keys
//! and values are f16 (the cache's storage); widening an f16 to f32 is exact.
#![allow(unsafe_code)]
use half::f16;

/// `Σ a_i b_i` in eight interleaved partial sums (lane `l` takes `i ≡ l mod 8`), reduced as
/// `((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))`, then the tail added in order: what
/// [`dots`] computes for every pair (the tests' reference).
#[cfg(test)]
fn dot(a: &[f32], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    let body = a.len() / 8 * 8;
    let [[acc]] = lanes_dot_n([&a[..body]], [&b[..body]]);
    reduce(acc, &a[body..], &b[body..])
}

/// [`dot`]'s end: the eight partial sums reduced in its order, then the tail added in order.
fn reduce(acc: [f32; 8], a: &[f32], b: &[f16]) -> f32 {
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a.iter().zip(b) {
        s += x * y.to_f32();
    }
    s
}

/// The x86 builds that widen f16 in hardware (F16C comes with x86-64-v3's AVX2).
macro_rules! with_f16c {
    ($($item:item)*) => {$(
        #[cfg(all(target_arch = "x86_64", target_feature = "avx", target_feature = "f16c"))]
        $item
    )*};
}
macro_rules! without_f16c {
    ($($item:item)*) => {$(
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx", target_feature = "f16c")))]
        $item
    )*};
}

/// `out[g · n + j] = dot(q_g, b[j·stride ..][..d])` for the `G = qs.len() / d` queries
/// `q_g = qs[g·d ..][..d]` (the query heads that share one KV head) and the `n = out.len() / G`
/// keys: the bits of [`dot`] for every pair. Each key is loaded and widened once for all the
/// queries (up to four at a time), and several keys go at once, so that independent chains
/// of adds hide each other's latency (one chain alone waits on every add).
pub(super) fn dots(qs: &[f32], d: usize, b: &[f16], stride: usize, out: &mut [f32]) {
    assert!(d > 0 && qs.len().is_multiple_of(d), "queries of {d} values");
    let gs = qs.len() / d;
    assert!(
        gs > 0 && out.len().is_multiple_of(gs),
        "one score row per query"
    );
    let n = out.len() / gs;
    if let Some(last) = n.checked_sub(1) {
        assert!(last * stride + d <= b.len(), "rows past the keys");
    }
    let mut g0 = 0;
    while g0 < gs {
        let q = |g: usize| &qs[(g0 + g) * d..][..d];
        let rows = &mut out[g0 * n..];
        g0 += match gs - g0 {
            1 => keys::<1, 8>([q(0)], b, stride, n, rows),
            2 => keys::<2, 4>([q(0), q(1)], b, stride, n, rows),
            3 => keys::<3, 2>([q(0), q(1), q(2)], b, stride, n, rows),
            _ => keys::<4, 2>([q(0), q(1), q(2), q(3)], b, stride, n, rows),
        };
    }
}

/// [`dots`] of `G` queries: `N` keys at a time, then one. Returns `G`.
fn keys<const G: usize, const N: usize>(
    qs: [&[f32]; G],
    b: &[f16],
    stride: usize,
    n: usize,
    out: &mut [f32],
) -> usize {
    let mut j = 0;
    while j + N <= n {
        keys_at::<G, N>(qs, b, stride, j, n, out);
        j += N;
    }
    while j < n {
        keys_at::<G, 1>(qs, b, stride, j, n, out);
        j += 1;
    }
    G
}

/// Keys `j..j + N` against `G` queries; query `g`'s scores are `out[g · n ..][..n]`.
fn keys_at<const G: usize, const N: usize>(
    qs: [&[f32]; G],
    b: &[f16],
    stride: usize,
    j: usize,
    n: usize,
    out: &mut [f32],
) {
    let d = qs[0].len();
    let body = d / 8 * 8;
    let rows: [&[f16]; N] = std::array::from_fn(|i| &b[(j + i) * stride..][..d]);
    let accs = lanes_dot_n(qs.map(|q| &q[..body]), rows.map(|r| &r[..body]));
    for (g, (q, accs)) in qs.iter().zip(accs).enumerate() {
        for (i, (acc, row)) in accs.into_iter().zip(rows).enumerate() {
            out[g * n + j + i] = reduce(acc, &q[body..], &row[body..]);
        }
    }
}

with_f16c! {
    /// Eight f16 at `p`, widened to f32 (exactly).
    ///
    /// # Safety
    /// `p` must point at 8 readable f16.
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// The eight partial sums of [`dot`] (lane `l` takes `i ≡ l mod 8`) over whole chunks of
    /// eight, for `G` queries × `N` rows at once; each pair's lanes are exactly what they are
    /// alone.
    fn lanes_dot_n<const G: usize, const N: usize>(
        a: [&[f32]; G],
        b: [&[f16]; N],
    ) -> [[[f32; 8]; N]; G] {
        use std::arch::x86_64::*;
        let len = a[0].len();
        assert!(len.is_multiple_of(8), "whole chunks of eight");
        assert!(a.iter().all(|q| q.len() == len) && b.iter().all(|r| r.len() == len));
        // SAFETY: AVX and F16C are enabled at compile time; every load reads 8 values at
        // `i < len` with `len` a multiple of 8, inside each query and row (asserted above).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); N]; G];
            for i in (0..len).step_by(8) {
                let ys: [__m256; N] = std::array::from_fn(|r| load8(b[r].as_ptr().add(i)));
                for (acc, q) in acc.iter_mut().zip(&a) {
                    let x = _mm256_loadu_ps(q.as_ptr().add(i));
                    for (acc, y) in acc.iter_mut().zip(&ys) {
                        *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, *y));
                    }
                }
            }
            acc.map(|r| r.map(|v| std::mem::transmute::<__m256, [f32; 8]>(v)))
        }
    }
}

without_f16c! {
    fn lanes_dot_n<const G: usize, const N: usize>(
        a: [&[f32]; G],
        b: [&[f16]; N],
    ) -> [[[f32; 8]; N]; G] {
        a.map(|q| {
            b.map(|row| {
                let mut acc = [0f32; 8];
                for (x, y) in q.chunks_exact(8).zip(row.chunks_exact(8)) {
                    for l in 0..8 {
                        acc[l] += x[l] * y[l].to_f32();
                    }
                }
                acc
            })
        })
    }
}

/// `out[g · d + c] = Σ_j p[g · n + j] · v[j · stride + c]` for the `G = out.len() / d`
/// weight rows of `n = p.len() / G` (the query heads that share one KV head), each column
/// summed from 0 in order of `j`. Each value row is loaded and widened once for up to four
/// heads.
pub(super) fn weighted_rows(p: &[f32], v: &[f16], stride: usize, d: usize, out: &mut [f32]) {
    assert!(
        d > 0 && out.len().is_multiple_of(d),
        "outputs of {d} values"
    );
    let gs = out.len() / d;
    assert!(
        gs > 0 && p.len().is_multiple_of(gs),
        "one weight row per output"
    );
    let n = p.len() / gs;
    let Some(last) = n.checked_sub(1) else {
        out.fill(0.0);
        return;
    };
    assert!(last * stride + d <= v.len(), "rows past the values");
    let mut g0 = 0;
    while g0 < gs {
        let ps = |g: usize| &p[(g0 + g) * n..][..n];
        let outs = &mut out[g0 * d..];
        g0 += match gs - g0 {
            1 => heads::<1, 4>([ps(0)], v, stride, d, outs),
            2 => heads::<2, 4>([ps(0), ps(1)], v, stride, d, outs),
            3 => heads::<3, 2>([ps(0), ps(1), ps(2)], v, stride, d, outs),
            _ => heads::<4, 2>([ps(0), ps(1), ps(2), ps(3)], v, stride, d, outs),
        };
    }
}

/// [`weighted_rows`] of `G` heads: `8 · W` columns at a time, then 8, then the tail one by
/// one. Returns `G`.
fn heads<const G: usize, const W: usize>(
    p: [&[f32]; G],
    v: &[f16],
    stride: usize,
    d: usize,
    out: &mut [f32],
) -> usize {
    let body = d / 8 * 8;
    let mut c = 0;
    while c + 8 * W <= body {
        columns::<G, W>(p, v, stride, c, d, out);
        c += 8 * W;
    }
    while c < body {
        columns::<G, 1>(p, v, stride, c, d, out);
        c += 8;
    }
    for c in body..d {
        for (g, pg) in p.iter().enumerate() {
            let mut s = 0f32;
            for (j, &pj) in pg.iter().enumerate() {
                s += pj * v[j * stride + c].to_f32();
            }
            out[g * d + c] = s;
        }
    }
    G
}

with_f16c! {
    /// Columns `c .. c + 8·W` of [`weighted_rows`] for `G` heads, kept in registers across
    /// the rows; head `g`'s output is `out[g · d ..]`.
    fn columns<const G: usize, const W: usize>(
        p: [&[f32]; G],
        v: &[f16],
        stride: usize,
        c: usize,
        d: usize,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let n = p[0].len();
        assert!(p.iter().all(|r| r.len() == n), "weight rows of one length");
        if let Some(last) = n.checked_sub(1) {
            assert!(last * stride + c + 8 * W <= v.len(), "rows past the values");
        }
        assert!(c + 8 * W <= d && (G - 1) * d + c + 8 * W <= out.len(), "columns past the output");
        // SAFETY: AVX and F16C are enabled at compile time; row `j < n` reads
        // `v[j·stride + c ..][..8·W]`, inside `v` by the assert above; the stores write
        // `out[g·d + c ..][..8·W]`, inside `out` by the assert above.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); W]; G];
            for j in 0..n {
                let row = v.as_ptr().add(j * stride + c);
                let xs: [__m256; W] = std::array::from_fn(|l| load8(row.add(8 * l)));
                for (acc, pg) in acc.iter_mut().zip(&p) {
                    let pv = _mm256_set1_ps(*pg.get_unchecked(j));
                    for (acc, x) in acc.iter_mut().zip(&xs) {
                        *acc = _mm256_add_ps(*acc, _mm256_mul_ps(pv, *x));
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                for (l, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add(g * d + c + 8 * l), *acc);
                }
            }
        }
    }
}

without_f16c! {
    fn columns<const G: usize, const W: usize>(
        p: [&[f32]; G],
        v: &[f16],
        stride: usize,
        c: usize,
        d: usize,
        out: &mut [f32],
    ) {
        for (g, pg) in p.iter().enumerate() {
            let o = &mut out[g * d + c..][..8 * W];
            o.fill(0.0);
            for (j, &pj) in pg.iter().enumerate() {
                for (o, x) in o.iter_mut().zip(&v[j * stride + c..]) {
                    *o += pj * x.to_f32();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(i: usize) -> f32 {
        ((i * 7919 % 1009) as f32 / 333.0) - 1.5
    }

    /// The vector forms give the bits of the plain loops they stand for, on lengths around
    /// the vector widths.
    #[test]
    fn vector_forms_equal_the_plain_loops_bit_for_bit() {
        for len in [1, 7, 8, 9, 31, 32, 33, 64, 71, 256] {
            let a: Vec<f32> = (0..len).map(val).collect();
            let b: Vec<f16> = (0..len).map(|i| f16::from_f32(val(i * 3 + 5))).collect();
            let mut acc = [0f32; 8];
            let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
            let (ra, rb) = (ca.remainder(), cb.remainder());
            for (x, y) in ca.zip(cb) {
                for l in 0..8 {
                    acc[l] += x[l] * y[l].to_f32();
                }
            }
            let mut want =
                ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (x, y) in ra.iter().zip(rb) {
                want += x * y.to_f32();
            }
            assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "dot, length {len}");
            for n in [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 17] {
                for gs in [1, 2, 3, 4, 5, 6, 9] {
                    let qs: Vec<f32> = (0..gs * len).map(|i| val(i * 11 + 2)).collect();
                    let stride = len + 5;
                    let keys: Vec<f16> = (0..n * stride)
                        .map(|i| f16::from_f32(val(i * 5 + 1)))
                        .collect();
                    let mut got = vec![f32::NAN; gs * n];
                    dots(&qs, len, &keys, stride, &mut got);
                    for (i, g) in got.iter().enumerate() {
                        let (q, j) = (i / n, i % n);
                        let want = dot(&qs[q * len..][..len], &keys[j * stride..][..len]);
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "dots, length {len}, {gs} heads, query {q}, row {j}"
                        );
                    }

                    let stride = len + 3;
                    let p: Vec<f32> = (0..gs * n).map(|j| val(j + 11).abs() / 4.0).collect();
                    let v: Vec<f16> = (0..n * stride).map(|i| f16::from_f32(val(i + 2))).collect();
                    let mut want = vec![0f32; gs * len];
                    for g in 0..gs {
                        for j in 0..n {
                            for c in 0..len {
                                want[g * len + c] += p[g * n + j] * v[j * stride + c].to_f32();
                            }
                        }
                    }
                    let mut got = vec![f32::NAN; gs * len];
                    weighted_rows(&p, &v, stride, len, &mut got);
                    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "rows {n}, width {len}, {gs} heads");
                }
            }
        }
    }
}
