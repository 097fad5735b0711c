//! What every K-quant kernel shares: Q4_K's scale decoding, Q5_K's high bits, and the float
//! steps of a super-block.

/// Q4_K's eight (scale, min) pairs, as llama.cpp's `get_scale_min_k4` gives them one by one:
/// computed four at a time in 32-bit words, as its `vec_dot_q4_K` does (`utmp`).
#[inline(always)]
pub(crate) fn q4k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let sc_lo = u0 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mn_lo = u1 & KMASK1;
    let mn_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let join = |a: u32, b: u32| (a as u64 | ((b as u64) << 32)).to_le_bytes();
    (join(sc_lo, sc_hi), join(mn_lo, mn_hi))
}

/// The float work of one super-block, shared by every kernel: `acc + (dw·da)·isum −
/// (dmin·da)·msum`, in that order.
#[inline(always)]
pub(crate) fn finish(acc: f32, dw: f32, dmin: f32, da: f32, isum: i32, msum: i32) -> f32 {
    let acc = acc + (dw * da) * isum as f32;
    acc - (dmin * da) * msum as f32
}

/// Q5_K's fifth bits of 64-value chunk `j`, as 16 or 0 per byte, for the values of the low
/// nibbles (bit `2j` of each `qh` byte) and of the high nibbles (bit `2j + 1`); a 0/1 per byte
/// shifted by 4 stays inside its byte.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn q5k_high_bits(
    qh: std::arch::x86_64::__m256i,
    j: usize,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    let one = _mm256_set1_epi8(1);
    let b = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32));
    let lo = _mm256_slli_epi16::<4>(_mm256_and_si256(b, one));
    let hi = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(b), one));
    (lo, hi)
}

#[cfg(test)]
mod tests {
    /// `get_scale_min_k4`, one pair at a time, as ggml writes it.
    fn reference(j: usize, q: &[u8]) -> (u8, u8) {
        if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        }
    }

    #[test]
    fn word_wise_scales_equal_get_scale_min_k4() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut s = [0u8; 12];
            for b in &mut s {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let (sc, mn) = super::q4k_scales(&s);
            for j in 0..8 {
                assert_eq!((sc[j], mn[j]), reference(j, &s), "{s:?} pair {j}");
            }
        }
    }
}
