//! The two inner loops of CPU attention, written so that every build computes the same bits:
//! the AVX form (x86-64-v3, as `.cargo/config.toml` builds) does the very operations of the
//! portable one, in the same order, eight lanes at a time (multiplies and adds stay separate,
//! never fused), so a sequence's attention does not depend on the build's vector width.
#![allow(unsafe_code)]

/// `Σ a_i b_i` in eight interleaved partial sums (lane `l` takes `i ≡ l mod 8`), reduced as
/// `((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))`, then the tail added in order.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    let body = a.len() / 8 * 8;
    let acc = lanes_dot(&a[..body], &b[..body]);
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a[body..].iter().zip(&b[body..]) {
        s += x * y;
    }
    s
}

/// The eight partial sums of [`dot`] over whole chunks of eight.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
fn lanes_dot(a: &[f32], b: &[f32]) -> [f32; 8] {
    use std::arch::x86_64::*;
    debug_assert!(a.len() == b.len() && a.len().is_multiple_of(8));
    // SAFETY: AVX is enabled at compile time (the cfg above); every load reads 8 f32 at
    // `i < len` with `len` a multiple of 8, inside both slices.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for i in (0..a.len()).step_by(8) {
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            let y = _mm256_loadu_ps(b.as_ptr().add(i));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
        }
        std::mem::transmute::<__m256, [f32; 8]>(acc)
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
fn lanes_dot(a: &[f32], b: &[f32]) -> [f32; 8] {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc
}

/// `out[c] = Σ_j p[j] · v[j · stride + c]` for `c < out.len()`, each column summed from 0 in
/// order of `j`.
pub(super) fn weighted_rows(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len();
    let Some(last) = p.len().checked_sub(1) else {
        out.fill(0.0);
        return;
    };
    assert!(last * stride + d <= v.len(), "rows past the values");
    let body = d / 8 * 8;
    let mut c = 0;
    while c < body {
        let w = if body - c >= 32 { 32 } else { 8 };
        columns(p, &v[c..], stride, &mut out[c..c + w]);
        c += w;
    }
    for c in body..d {
        let mut s = 0f32;
        for (j, &pj) in p.iter().enumerate() {
            s += pj * v[j * stride + c];
        }
        out[c] = s;
    }
}

/// [`weighted_rows`] for 8 or 32 columns, kept in registers across the rows.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
fn columns(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let w = out.len();
    assert!(w == 8 || w == 32, "8 or 32 columns");
    if let Some(last) = p.len().checked_sub(1) {
        assert!(last * stride + w <= v.len(), "rows past the values");
    }
    // SAFETY: AVX is enabled at compile time; row `j < p.len()` reads `v[j·stride ..][..w]`,
    // inside `v` by the assert above, and the stores write `out[..w]`.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let n = w / 8;
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm256_set1_ps(pj);
            let row = v.as_ptr().add(j * stride);
            for (l, acc) in acc.iter_mut().enumerate().take(n) {
                let x = _mm256_loadu_ps(row.add(8 * l));
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(pv, x));
            }
        }
        for (l, acc) in acc.iter().enumerate().take(n) {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * l), *acc);
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
fn columns(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        for (o, &x) in out.iter_mut().zip(&v[j * stride..]) {
            *o += pj * x;
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
            let b: Vec<f32> = (0..len).map(|i| val(i * 3 + 5)).collect();
            let mut acc = [0f32; 8];
            let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
            let (ra, rb) = (ca.remainder(), cb.remainder());
            for (x, y) in ca.zip(cb) {
                for l in 0..8 {
                    acc[l] += x[l] * y[l];
                }
            }
            let mut want =
                ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (x, y) in ra.iter().zip(rb) {
                want += x * y;
            }
            assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "dot, length {len}");

            for rows in [0, 1, 5] {
                let stride = len + 3;
                let p: Vec<f32> = (0..rows).map(|j| val(j + 11).abs() / 4.0).collect();
                let v: Vec<f32> = (0..rows * stride).map(|i| val(i + 2)).collect();
                let mut want = vec![0f32; len];
                for (j, &pj) in p.iter().enumerate() {
                    for (c, o) in want.iter_mut().enumerate() {
                        *o += pj * v[j * stride + c];
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
