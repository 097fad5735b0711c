//! Quantized matrix multiplication for the GGUF block formats the served models use (Q4_1,
//! Q5_1, Q4_0, Q8_0, Q5_0 and the K-quants Q4_K, Q5_K and Q6_K) on the CPU, with explicit
//! SIMD kernels.
//!
//! Q5_0 (`d·(q − 16)`, 5-bit `q`) runs Q4_0's kernel plus Q5_1's plane of fifth bits, in
//! its own 22 bytes a block. The K-quants run the kernels of [`kquant`].
//!
//! candle's own CPU path for Q4_1 runs a scalar dot product per (token, weight row). Here a
//! weight matrix is repacked once at load time into groups of `R` interleaved rows (8 for the
//! scalar and AVX2 kernels, 16 for AVX-512): for each 32-value block, the bytes of sub-block
//! `j` (4 consecutive values) of all `R` rows sit side by side, so one broadcast of 4
//! activation bytes and one `maddubs`/`dpbusd` produce partial dot products for `R` rows at
//! once, and the per-block scales of the `R` rows form one vector. The repacked matrix has
//! the same size as the GGUF tensor (Q8_0 grows by 2 bytes a row-block: the sum of its
//! quants, which the AVX-512 kernel needs to treat activations as unsigned).
//!
//! Activations are quantized once per input row — to Q8_1 (scale and scaled sum) for Q4_1,
//! as llama.cpp does, and to Q8_0 (plus the integer sum) for Q4_0, Q5_0 and Q8_0 — and reused for
//! every weight row and, via [`QLinear::forward_many`], for every matrix sharing an input.
//! Kernels compute `R` rows × up to 4 tokens at a time, so during prefill every weight block
//! is loaded once per 4 tokens rather than once per token.
//!
//! Work is split by row groups across candle's own CPU thread pool (the bounded barrier pool
//! its quantized matmuls use; concurrent callers queue on it), and small products run on
//! the calling thread alone.
//!
//! The instruction set is picked once at run time ([`Isa::best`]); every kernel also exists
//! in portable scalar form, and tests call each path explicitly.
#![allow(unsafe_code)]

/// `f::<T, P…>(args)` with `T` the token count `nt` (1, 2, 3, else 4): the kernels take it as
/// a const generic so that their per-token accumulators stay in registers.
macro_rules! by_tokens {
    ($nt:expr, $($f:ident)::+ $(::<$($p:tt),*>)? ($($a:expr),* $(,)?)) => {
        match $nt {
            1 => $($f)::+::<1 $($(, $p)*)?>($($a),*),
            2 => $($f)::+::<2 $($(, $p)*)?>($($a),*),
            3 => $($f)::+::<3 $($(, $p)*)?>($($a),*),
            _ => $($f)::+::<4 $($(, $p)*)?>($($a),*),
        }
    };
}

/// [`by_tokens!`] for the AVX-512 kernels of the 32-value formats, whose tile is up to
/// [`WIDE_T`] tokens (1 to 8).
#[cfg(target_arch = "x86_64")]
macro_rules! by_tokens_wide {
    ($nt:expr, $($f:ident)::+ $(::<$($p:tt),*>)? ($($a:expr),* $(,)?)) => {
        match $nt {
            1 => $($f)::+::<1 $($(, $p)*)?>($($a),*),
            2 => $($f)::+::<2 $($(, $p)*)?>($($a),*),
            3 => $($f)::+::<3 $($(, $p)*)?>($($a),*),
            4 => $($f)::+::<4 $($(, $p)*)?>($($a),*),
            5 => $($f)::+::<5 $($(, $p)*)?>($($a),*),
            6 => $($f)::+::<6 $($(, $p)*)?>($($a),*),
            7 => $($f)::+::<7 $($(, $p)*)?>($($a),*),
            _ => $($f)::+::<8 $($(, $p)*)?>($($a),*),
        }
    };
}

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod kquant;
mod linear;
mod pack;
mod scalar;

use std::sync::OnceLock;

pub use act::{ActKind, Acts};
pub use linear::QLinear;
pub use pack::{dequantize, PackedMatrix};

/// Values per quantization block in every supported format.
pub const BLOCK: usize = 32;

/// Whether a `dims` matrix of `dtype` on the CPU (`on_cpu`) runs on this module's kernels
/// (and is kept packed): a 2-D matrix in a supported format whose rows are whole blocks.
pub fn packs(dtype: candle_core::quantized::GgmlDType, dims: &[usize], on_cpu: bool) -> bool {
    on_cpu
        && match (Format::from_ggml(dtype), dims) {
            (Some(f), &[_, k]) => k > 0 && k.is_multiple_of(f.values_per_block()),
            _ => false,
        }
}

/// Bytes a `dims` matrix of `dtype` takes once packed (`None` when it does not pack): the
/// GGUF size, plus Q8_0's per-block sums.
pub fn packed_bytes(dtype: candle_core::quantized::GgmlDType, dims: &[usize]) -> Option<u64> {
    let f = Format::from_ggml(dtype)?;
    let &[n, k] = dims else { return None };
    let blocks = (n as u64) * (k / f.values_per_block()) as u64;
    Some(match f {
        Format::Q8_0 => blocks * 36,
        _ => blocks * f.block_bytes() as u64,
    })
}

/// Tokens one kernel call handles at most (the micro-tile is `R` rows × `TILE_T` tokens),
/// except the AVX-512 kernels of the 32-value formats, which take [`WIDE_T`].
pub const TILE_T: usize = 4;

/// Tokens one AVX-512 kernel call of a 32-value format handles at most: its 32 vector
/// registers hold 8 unpacked weight vectors and 8 accumulators, so a batch of 8 sequences
/// unpacks each weight block once (with AVX2's 16 registers, 4 is the most that fits).
pub const WIDE_T: usize = 8;

/// Largest `R` of any kernel.
pub(crate) const MAX_R: usize = 16;

/// One kernel call's results: up to `WIDE_T` tokens × up to `MAX_R` rows.
pub(crate) type Tile = [[f32; MAX_R]; WIDE_T];

/// A GGUF block format with a native kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Q4_0,
    Q4_1,
    /// `d·(q − 16)` with 5-bit `q`: Q4_0's packed nibbles plus a plane of high bits.
    Q5_0,
    /// `d·q + m` with 5-bit `q`: Q4_1's packed nibbles plus a plane of high bits.
    Q5_1,
    Q8_0,
    /// 256-value super-blocks, 4.5 bits a value ([`kquant`]).
    Q4K,
    /// 256-value super-blocks, 5.5 bits a value ([`kquant`]).
    Q5K,
    /// 256-value super-blocks, 6.5625 bits a value ([`kquant`]).
    Q6K,
}

impl Format {
    /// The format of a GGUF dtype, when it has a native kernel.
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        match dtype {
            G::Q4_0 => Some(Self::Q4_0),
            G::Q4_1 => Some(Self::Q4_1),
            G::Q5_0 => Some(Self::Q5_0),
            G::Q5_1 => Some(Self::Q5_1),
            G::Q8_0 => Some(Self::Q8_0),
            G::Q4K => Some(Self::Q4K),
            G::Q5K => Some(Self::Q5K),
            G::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    /// Whether this is a K-quant (256-value super-blocks, kernels in [`kquant`]).
    pub fn is_k(self) -> bool {
        matches!(self, Self::Q4K | Self::Q5K | Self::Q6K)
    }

    /// Values per GGUF block.
    pub fn values_per_block(self) -> usize {
        if self.is_k() {
            kquant::QK_K
        } else {
            BLOCK
        }
    }

    /// The matching candle dtype.
    pub fn ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            Self::Q4_0 => G::Q4_0,
            Self::Q4_1 => G::Q4_1,
            Self::Q5_0 => G::Q5_0,
            Self::Q5_1 => G::Q5_1,
            Self::Q8_0 => G::Q8_0,
            Self::Q4K => G::Q4K,
            Self::Q5K => G::Q5K,
            Self::Q6K => G::Q6K,
        }
    }

    /// Bytes of one GGUF block (one row: 32 values, or 256 for the K-quants).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of one repacked block of `r` interleaved rows (K-quants: `r` GGUF blocks).
    pub(crate) fn packed_block_bytes(self, r: usize) -> usize {
        match self {
            Self::Q8_0 => r * 36,
            f => r * f.block_bytes(),
        }
    }

    /// Where the plane of fifth bits starts in a packed block of `r` rows of Q5_0 or Q5_1:
    /// after the nibbles, the scales and (Q5_1) the mins.
    pub(crate) fn high_bits_at(self, r: usize) -> usize {
        match self {
            Self::Q5_1 => 20 * r,
            _ => 18 * r,
        }
    }

    /// How activations are quantized for this weight format and instruction set.
    pub(crate) fn act_kind(self, isa: Isa) -> act::ActKind {
        match (self, isa) {
            (Self::Q4K | Self::Q5K | Self::Q6K, _) => act::ActKind::Q8K,
            (Self::Q4_1 | Self::Q5_1, _) => act::ActKind::Q8_1,
            // The VNNI kernel multiplies unsigned activations with signed weights.
            (Self::Q8_0, Isa::Avx512) => act::ActKind::Q8_0Unsigned,
            _ => act::ActKind::Q8_0,
        }
    }
}

/// An instruction set a kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, for any target.
    Scalar,
    /// AVX2 with FMA and F16C (x86-64-v3).
    Avx2,
    /// AVX-512 F/BW/VL with VNNI, plus FMA and F16C.
    Avx512,
}

impl Isa {
    /// Rows interleaved in one packed group.
    pub fn rows(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Scalar | Isa::Avx2 => 8,
        }
    }

    /// Whether this CPU runs the kernels for `self`.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every instruction set this CPU supports, scalar first.
    pub fn supported() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.is_supported())
            .collect()
    }

    /// The fastest supported instruction set, detected once. `SWAPD_QUANT_ISA` (`scalar`,
    /// `avx2`, `avx512`) caps it, for benchmarks and for ruling a kernel out.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = match std::env::var("SWAPD_QUANT_ISA").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            let order = [Isa::Avx512, Isa::Avx2, Isa::Scalar];
            order
                .into_iter()
                .skip_while(|i| *i != cap)
                .find(|i| i.is_supported())
                .unwrap_or(Isa::Scalar)
        })
    }
}

/// Multiply-accumulates below which a product runs on the calling thread: waking the pool
/// costs a few microseconds, about what one core needs for this many.
const PARALLEL_MIN_MACS: usize = 64 * 1024;

/// The bounds every SIMD kernel's `unsafe` reads rely on: `g` holds `nb` packed blocks of
/// `rows` rows, `1..=max_t` tokens from `t0` exist in `acts`, and the activations are `nb`
/// blocks wide.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_group(
    format: Format,
    rows: usize,
    g: &[u8],
    nb: usize,
    acts: &Acts,
    t0: usize,
    nt: usize,
    max_t: usize,
) {
    assert!(
        g.len() >= nb * format.packed_block_bytes(rows),
        "group too short"
    );
    assert!(
        (1..=max_t).contains(&nt) && t0 + nt <= acts.m(),
        "tokens out of range"
    );
    assert_eq!(acts.k(), nb * BLOCK, "activations have the wrong width");
}

/// `out_i[t · n_i + row] = Σ_k w_i[row, k] · x[t, k]` for every matrix `w_i` in `mats` (all
/// with the same `k`), with `acts` the quantized `x`: one `[m, n_i]` row-major block per
/// matrix. The matrices are split into row groups across the pool.
///
/// The outputs are not zeroed first: every group writes all its rows for every token, and
/// the groups cover every row, so each element is written exactly once (a memset of every
/// output was a serial few percent of a batched decode step).
pub(crate) fn matmul_many(mats: &[&PackedMatrix], acts: &[&Acts]) -> Vec<Vec<f32>> {
    let m = acts[0].m();
    // (matrix, first group) for every work item.
    let mut items: Vec<(usize, usize)> = Vec::new();
    let mut macs = 0usize;
    for (i, w) in mats.iter().enumerate() {
        for g in 0..w.groups() {
            items.push((i, g));
        }
        macs += w.n() * w.k() * m;
    }
    let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| Vec::with_capacity(m * w.n())).collect();
    let ptrs: Vec<OutPtr> = outs
        .iter_mut()
        .zip(mats)
        .map(|(o, w)| OutPtr(o.as_mut_ptr(), m * w.n()))
        .collect();
    let run = |range: std::ops::Range<usize>| {
        for &(i, g) in &items[range] {
            let w = mats[i];
            let acts = acts
                .iter()
                .find(|a| a.kind() == w.format().act_kind(w.isa()))
                .expect("activations quantized for every format");
            // SAFETY: each (matrix, group) item is handed to exactly one worker, and
            // `run_group` writes only the columns of group `g`, so no two workers write the
            // same element; the buffer (capacity `m · n`) outlives the pool call, which
            // blocks until all finish.
            unsafe { w.run_group(g, acts, ptrs[i].0, ptrs[i].1) };
        }
    };
    if macs < PARALLEL_MIN_MACS || items.len() < 2 {
        run(0..items.len());
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items.len(), run);
    }
    for (o, w) in outs.iter_mut().zip(mats) {
        // SAFETY: the groups `0..w.groups()` cover rows `0..n`, and `run_group` wrote every
        // token's value of each of its rows (a panic in a kernel unwinds past this line, so
        // a partly written buffer is dropped at length 0, never read).
        unsafe { o.set_len(m * w.n()) };
    }
    outs
}

/// A raw output pointer handed to pool workers.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32, usize);
// SAFETY: workers write disjoint elements through it (see `matmul_many`), and the buffer
// outlives the parallel region.
unsafe impl Send for OutPtr {}
// SAFETY: as above; shared references only copy the pointer.
unsafe impl Sync for OutPtr {}
