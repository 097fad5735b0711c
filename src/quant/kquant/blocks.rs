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

/// Eight f32 lanes that a row's product with one token accumulates across super-blocks, as
/// llama.cpp's `vec_dot_q*_K` do: per super-block, lane `l` adds its exact integer sums
/// scaled by the super-block's floats (one `fma` each), and only the row's end reduces the
/// lanes ([`reduce8`]). Lane `l` of a super-block holds (every kernel computes exactly these
/// integers):
/// - `isum`: Σ over the 64-value chunks (Q4_K/Q5_K) or 32-value groups (Q6_K) of
///   `scale · q · a` over the chunk's values `4l .. 4l + 4` and, for Q4_K/Q5_K, `32 + 4l ..
///   32 + 4l + 4`;
/// - `msum`, Q4_K/Q5_K: `min[j] · (s[2j] + s[2j+1])` with `j = MIN_LANE[l]` (the order AVX2's
///   `hadd` leaves), `s` the 16-value sums of the activations; Q6_K: `sc[l]·s[l] +
///   sc[8+l]·s[8+l]`, which enters as `isum − 32·msum`.
pub(crate) type Lanes = [f32; 8];

/// The min each lane of a Q4_K/Q5_K `msum` carries.
pub(crate) const MIN_LANE: [usize; 8] = [0, 1, 4, 5, 2, 3, 6, 7];

/// `acc[l] += (dw·da)·isum[l]`, then `acc[l] += −(dmin·da)·msum[l]`, each one rounding
/// (`fma`): the float work of one Q4_K/Q5_K super-block, the same in every kernel.
#[inline(always)]
pub(crate) fn step45(
    acc: &mut Lanes,
    dw: f32,
    dmin: f32,
    da: f32,
    isum: &[i32; 8],
    msum: &[i32; 8],
) {
    let (a, b) = (dw * da, -(dmin * da));
    for l in 0..8 {
        acc[l] = a.mul_add(isum[l] as f32, acc[l]);
        acc[l] = b.mul_add(msum[l] as f32, acc[l]);
    }
}

/// `acc[l] += (dw·da)·(isum[l] − 32·msum[l])` (one `fma`): one Q6_K super-block.
#[inline(always)]
pub(crate) fn step6(acc: &mut Lanes, dw: f32, da: f32, isum: &[i32; 8], msum: &[i32; 8]) {
    let a = dw * da;
    for l in 0..8 {
        acc[l] = a.mul_add((isum[l] - 32 * msum[l]) as f32, acc[l]);
    }
}

/// The lanes' sum, in the order of the SIMD reduction: halves, then pairs.
#[inline(always)]
pub(crate) fn reduce8(a: &Lanes) -> f32 {
    let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// One Q4_K (or, with `Q5`, Q5_K) super-block as the AVX2 and AVX-512 kernels read it: its
/// decoded scales and mins, its f16 scales, and its quants a 64-value chunk at a time.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Q45Block<const Q5: bool> {
    blk: *const u8,
    pub(crate) sc: [u8; 8],
    pub(crate) mn: [u8; 8],
    /// Q5_K's 32 bytes of fifth bits (zero for Q4_K).
    qh: std::arch::x86_64::__m256i,
}

#[cfg(target_arch = "x86_64")]
impl<const Q5: bool> Q45Block<Q5> {
    /// Bytes of one super-block.
    pub(crate) const BYTES: usize = if Q5 { 176 } else { 144 };
    /// Where the 128 bytes of nibbles start.
    const QS_AT: usize = if Q5 { 48 } else { 16 };

    /// # Safety
    /// `blk` points at a whole super-block (`BYTES` readable bytes); the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn read(blk: *const u8) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees the super-block: 12 bytes of scales at 4, and for
        // Q5_K 32 bytes of high bits at 16.
        unsafe {
            let (sc, mn) = q4k_scales(std::slice::from_raw_parts(blk.add(4), 12));
            let qh = if Q5 {
                _mm256_loadu_si256(blk.add(16).cast())
            } else {
                _mm256_setzero_si256()
            };
            Self { blk, sc, mn, qh }
        }
    }

    /// The super-block scale `d` and min scale `dmin` (the two f16 that open it).
    #[inline]
    pub(crate) fn scales(&self) -> (f32, f32) {
        // SAFETY: `read`'s caller guaranteed the whole super-block.
        let h = |o: usize| unsafe {
            half::f16::from_bits(self.blk.add(o).cast::<u16>().read_unaligned())
        };
        (h(0).to_f32(), h(2).to_f32())
    }

    /// Chunk `j`'s quants as unsigned bytes: values `64j .. 64j + 32` (the low nibbles, sub-block
    /// `2j`) and `64j + 32 .. 64j + 64` (the high nibbles, sub-block `2j + 1`), each with its
    /// Q5_K fifth bit (bit `2j`, or `2j + 1`, of the `qh` byte) added as 16.
    ///
    /// # Safety
    /// `j < 4`; the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn chunk(
        &self,
        j: usize,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        use std::arch::x86_64::*;
        let mask = _mm256_set1_epi8(0xF);
        // SAFETY: bytes QS_AT + 32j .. +32 (j < 4) of the super-block.
        let q = unsafe { _mm256_loadu_si256(self.blk.add(Self::QS_AT + 32 * j).cast()) };
        let lo = _mm256_and_si256(q, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask);
        if !Q5 {
            return (lo, hi);
        }
        // A 0/1 per byte shifted by 4 stays inside its byte.
        let one = _mm256_set1_epi8(1);
        let b = _mm256_srl_epi16(self.qh, _mm_cvtsi32_si128(2 * j as i32));
        let l5 = _mm256_slli_epi16::<4>(_mm256_and_si256(b, one));
        let h5 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(b), one));
        (_mm256_or_si256(lo, l5), _mm256_or_si256(hi, h5))
    }
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
