//! The two inner loops of CPU attention, written so that every build computes the same bits:
//! the AVX form (x86-64-v3, as `.cargo/config.toml` builds) does the very operations of the
//! portable one, in the same order, eight lanes at a time (multiplies and adds stay separate,
//! never fused), so a sequence's attention does not depend on the build's vector width. Keys
//! and values are f16 (the cache's storage); widening an f16 to f32 is exact.
#![allow(unsafe_code)]
use half::f16;

/// `Σ a_i b_i` in eight interleaved partial sums (lane `l` takes `i ≡ l mod 8`), reduced as
/// `((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))`, then the tail added in order.
pub(super) fn dot(a: &[f32], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    let body = a.len() / 8 * 8;
    let [acc] = lanes_dot_n(&a[..body], [&b[..body]]);
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

/// `out[j] = dot(a, b[j·stride ..][..a.len()])` for every `j < out.len()`: the bits of
/// [`dot`], eight rows at a time (then four), so that independent chains of adds hide each
/// other's latency (one chain alone waits on every add; eight keep both adders busy).
pub(super) fn dots(a: &[f32], b: &[f16], stride: usize, out: &mut [f32]) {
    let d = a.len();
    if let Some(last) = out.len().checked_sub(1) {
        assert!(last * stride + d <= b.len(), "rows past the keys");
    }
    let mut j = 0;
    while j + 8 <= out.len() {
        dots_n::<8>(a, b, stride, j, out);
        j += 8;
    }
    if j + 4 <= out.len() {
        dots_n::<4>(a, b, stride, j, out);
        j += 4;
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        *o = dot(a, &b[jj * stride..][..d]);
    }
}

/// [`dots`] of rows `j..j + N`.
fn dots_n<const N: usize>(a: &[f32], b: &[f16], stride: usize, j: usize, out: &mut [f32]) {
    let d = a.len();
    let body = d / 8 * 8;
    let rows: [&[f16]; N] = std::array::from_fn(|i| &b[(j + i) * stride..][..d]);
    let accs = lanes_dot_n(&a[..body], rows.map(|r| &r[..body]));
    for ((o, acc), row) in out[j..j + N].iter_mut().zip(accs).zip(rows) {
        *o = reduce(acc, &a[body..], &row[body..]);
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
    /// eight, for `N` rows at once; each row's lanes are exactly what they are alone.
    fn lanes_dot_n<const N: usize>(a: &[f32], b: [&[f16]; N]) -> [[f32; 8]; N] {
        use std::arch::x86_64::*;
        assert!(a.len().is_multiple_of(8) && b.iter().all(|r| r.len() == a.len()));
        // SAFETY: AVX and F16C are enabled at compile time; every load reads 8 values at
        // `i < len` with `len` a multiple of 8, inside `a` and each row (asserted above).
        unsafe {
            let mut acc = [_mm256_setzero_ps(); N];
            for i in (0..a.len()).step_by(8) {
                let x = _mm256_loadu_ps(a.as_ptr().add(i));
                for (acc, row) in acc.iter_mut().zip(&b) {
                    let y = load8(row.as_ptr().add(i));
                    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, y));
                }
            }
            acc.map(|v| std::mem::transmute::<__m256, [f32; 8]>(v))
        }
    }
}

without_f16c! {
    fn lanes_dot_n<const N: usize>(a: &[f32], b: [&[f16]; N]) -> [[f32; 8]; N] {
        b.map(|row| {
            let mut acc = [0f32; 8];
            for (x, y) in a.chunks_exact(8).zip(row.chunks_exact(8)) {
                for l in 0..8 {
                    acc[l] += x[l] * y[l].to_f32();
                }
            }
            acc
        })
    }
}

/// `out[c] = Σ_j p[j] · v[j · stride + c]` for `c < out.len()`, each column summed from 0 in
/// order of `j`.
pub(super) fn weighted_rows(p: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
    let d = out.len();
    let Some(last) = p.len().checked_sub(1) else {
        out.fill(0.0);
        return;
    };
    assert!(last * stride + d <= v.len(), "rows past the values");
    let body = d / 8 * 8;
    let mut c = 0;
    while c < body {
        let w = match body - c {
            64.. => 64,
            32.. => 32,
            _ => 8,
        };
        columns(p, &v[c..], stride, &mut out[c..c + w]);
        c += w;
    }
    for c in body..d {
        let mut s = 0f32;
        for (j, &pj) in p.iter().enumerate() {
            s += pj * v[j * stride + c].to_f32();
        }
        out[c] = s;
    }
}

with_f16c! {
    /// [`weighted_rows`] for 8, 32 or 64 columns, kept in registers across the rows (64: eight
    /// independent chains of adds, one pass over `p` for a whole 64-wide head).
    fn columns(p: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let w = out.len();
        assert!(matches!(w, 8 | 32 | 64), "8, 32 or 64 columns");
        if let Some(last) = p.len().checked_sub(1) {
            assert!(last * stride + w <= v.len(), "rows past the values");
        }
        // SAFETY: AVX and F16C are enabled at compile time; row `j < p.len()` reads
        // `v[j·stride ..][..w]`, inside `v` by the assert above; the stores write `out[..w]`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            let n = w / 8;
            for (j, &pj) in p.iter().enumerate() {
                let pv = _mm256_set1_ps(pj);
                let row = v.as_ptr().add(j * stride);
                for (l, acc) in acc.iter_mut().enumerate().take(n) {
                    let x = load8(row.add(8 * l));
                    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(pv, x));
                }
            }
            for (l, acc) in acc.iter().enumerate().take(n) {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * l), *acc);
            }
        }
    }
}

without_f16c! {
    fn columns(p: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
        out.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            for (o, x) in out.iter_mut().zip(&v[j * stride..]) {
                *o += pj * x.to_f32();
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
            for n in [0, 1, 3, 4, 5, 8, 9, 12, 13, 17] {
                let stride = len + 5;
                let keys: Vec<f16> = (0..n * stride)
                    .map(|i| f16::from_f32(val(i * 5 + 1)))
                    .collect();
                let mut got = vec![f32::NAN; n];
                dots(&a, &keys, stride, &mut got);
                for (j, g) in got.iter().enumerate() {
                    let want = dot(&a, &keys[j * stride..][..len]);
                    assert_eq!(g.to_bits(), want.to_bits(), "dots, length {len}, row {j}");
                }
            }

            for rows in [0, 1, 5] {
                let stride = len + 3;
                let p: Vec<f32> = (0..rows).map(|j| val(j + 11).abs() / 4.0).collect();
                let v: Vec<f16> = (0..rows * stride)
                    .map(|i| f16::from_f32(val(i + 2)))
                    .collect();
                let mut want = vec![0f32; len];
                for (j, &pj) in p.iter().enumerate() {
                    for (c, o) in want.iter_mut().enumerate() {
                        *o += pj * v[j * stride + c].to_f32();
                    }
                }
                let mut got = vec![f32::NAN; len];
                weighted_rows(&p, &v, stride, &mut got);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "rows {rows}, width {len}");
            }
        }
    }
}
