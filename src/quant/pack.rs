//! Repacking GGUF blocks into groups of `R` interleaved rows, and running one group.
//!
//! GGUF stores a weight matrix row by row, each row a run of 32-value blocks:
//! - Q4_0: `d: f16, qs: [u8; 16]` — value `j` is `d · (q_j − 8)`,
//! - Q4_1: `d: f16, m: f16, qs: [u8; 16]` — value `j` is `d · q_j + m`,
//! - Q5_0: `d: f16, qh: u32, qs: [u8; 16]` — as Q4_0 with `q_j` 5 bits (value `d·(q_j − 16)`),
//!   the fifth being bit `j` of `qh`,
//! - Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]` — as Q4_1 with 5-bit `q_j`, likewise,
//! - Q8_0: `d: f16, qs: [i8; 32]` — value `j` is `d · q_j`,
//!
//! where for the 4-bit formats byte `i` holds `q_i` in its low nibble and `q_{i+16}` in its
//! high nibble. A packed group-block holds block `b` of rows `g·R .. g·R+R`:
//! - Q4_x: `qs: [u8; 16·R]` as 4 chunks of `4·R` bytes; chunk `c` holds bytes `4c..4c+4` of
//!   each row in turn, so its low nibbles are values `4c..4c+4` and its high nibbles values
//!   `16+4c..16+4c+4` of the `R` rows; then `d: [f16; R]` and, for Q4_1, `m: [f16; R]`.
//! - Q5_0 and Q5_1: Q4_0's or Q4_1's bytes, then `hb: [u8; 4·R]`: byte `c·R + r` holds the
//!   fifth bits of row `r`'s values `4c..4c+4` (bits 0–3) and `16+4c..16+4c+4` (bits 4–7),
//!   the values of chunk `c`'s low and high nibbles.
//! - Q8_0: `qs: [i8; 32·R]` as 8 chunks of `4·R` bytes, chunk `j` holding values
//!   `4j..4j+4` of each row in turn; then `d: [f16; R]` and `sum: [i16; R]` (Σ q of the
//!   row's block).
//!
//! So sub-block `j` (values `4j..4j+4`) of all `R` rows is one `4·R`-byte vector, matched by
//! one 4-byte broadcast of the activations. Rows past `n` are zero (scale 0).
use half::f16;

use super::act::Acts;
use super::{Format, Isa, Tile, BLOCK, MAX_R, TILE_T, WIDE_T};

/// A weight matrix (`n` rows of `k` values) repacked for one instruction set's kernels.
pub struct PackedMatrix {
    format: Format,
    isa: Isa,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("format", &self.format)
            .field("isa", &self.isa)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

fn rd_f16(b: &[u8], off: usize) -> f16 {
    f16::from_le_bytes([b[off], b[off + 1]])
}

impl PackedMatrix {
    /// Repacks `raw`, the GGUF bytes of an `n × k` matrix in `format`, for `isa`'s kernels.
    pub fn pack(format: Format, raw: &[u8], n: usize, k: usize, isa: Isa) -> Result<Self, String> {
        if !isa.is_supported() {
            return Err(format!("{isa:?} is not supported by this CPU"));
        }
        let data = if format.is_k() {
            super::kquant::pack(format, raw, n, k, isa)?
        } else {
            pack_blocks(format, raw, n, k, isa.rows())?
        };
        Ok(Self {
            format,
            isa,
            n,
            k,
            data,
        })
    }

    /// The bytes of group `g` (its rows' packed blocks, or for K-quants its tiles or its
    /// GGUF rows).
    fn group_data(&self, g: usize) -> &[u8] {
        let r = self.isa.rows();
        #[cfg(target_arch = "x86_64")]
        if super::kquant::is_tiled(self.format, self.isa) {
            let gb = self.k / super::kquant::QK_K * super::kquant::tiled::tile_bytes(self.format);
            return &self.data[g * gb..(g + 1) * gb];
        }
        if self.format.is_k() {
            let rb = self.k / self.format.values_per_block() * self.format.block_bytes();
            let end = ((g + 1) * r).min(self.n);
            return &self.data[g * r * rb..end * rb];
        }
        let gb = self.k / BLOCK * self.format.packed_block_bytes(r);
        &self.data[g * gb..(g + 1) * gb]
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether this K-quant matrix is packed in 16-row tiles (Q4_K and Q6_K on AVX-512),
    /// whose kernels sum in another order than the row kernels.
    pub fn is_tiled(&self) -> bool {
        super::kquant::is_tiled(self.format, self.isa)
    }

    /// Output rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Row groups (`⌈n / R⌉`).
    pub fn groups(&self) -> usize {
        self.n.div_ceil(self.isa.rows())
    }

    /// Writes row `row` (`k` values) into `out`, dequantized: the same values as
    /// [`dequantize`] gives for that row of the GGUF bytes. An embedding table kept packed
    /// (rather than as an f32 copy 3.8 to 7 times its size) is looked up with it.
    pub fn row_into(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.n, "row {row} of {}", self.n);
        assert_eq!(out.len(), self.k, "row length");
        let r = self.isa.rows();
        #[cfg(target_arch = "x86_64")]
        if super::kquant::is_tiled(self.format, self.isa) {
            let gdata = self.group_data(row / r);
            return super::kquant::tiled::row_into_format(self.format, gdata, row % r, out);
        }
        if self.format.is_k() {
            let bb = self.format.block_bytes();
            let rb = self.k / super::kquant::QK_K * bb;
            let src = &self.data[row * rb..(row + 1) * rb];
            for (blk, dst) in src
                .chunks_exact(bb)
                .zip(out.chunks_exact_mut(super::kquant::QK_K))
            {
                super::kquant::dequantize_block(self.format, blk, dst);
            }
            return;
        }
        let pb = self.format.packed_block_bytes(r);
        let (gi, ri) = (row / r, row % r);
        let group = self.group_data(gi);
        for (src, dst) in group.chunks_exact(pb).zip(out.chunks_exact_mut(BLOCK)) {
            unpack_block(self.format, src, dst, r, ri);
        }
    }

    /// Bytes the packed weights take.
    pub fn storage_bytes(&self) -> usize {
        self.data.len()
    }

    /// `x` (`m × k`, row-major) times this matrix transposed: `m × n`, row-major. Quantizes
    /// `x` and runs every row group, split across the pool when worth it.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let acts = Acts::quantize(self.format.act_kind(self.isa), x, m, self.k, self.isa);
        self.matmul_quantized(&acts)
    }

    /// As [`PackedMatrix::matmul`] with activations already quantized for this matrix
    /// (`Acts::quantize(self.format().act_kind(self.isa()), ..)`).
    pub fn matmul_quantized(&self, acts: &Acts) -> Vec<f32> {
        super::matmul_many(&[self], &[acts]).remove(0)
    }

    /// The activation encoding this matrix's kernels read.
    pub fn act_kind(&self) -> super::act::ActKind {
        self.format.act_kind(self.isa)
    }

    /// Computes rows `g·R .. g·R+R` (those below `n`) for every token of `acts`, writing
    /// `out[t · n + row]`.
    ///
    /// # Safety
    /// `out` must point to `out_len == acts.m() · n` writable f32, and no other thread may
    /// access the elements of this group's rows while this runs.
    pub(crate) unsafe fn run_group(&self, g: usize, acts: &Acts, out: *mut f32, out_len: usize) {
        let r = self.isa.rows();
        let gdata = self.group_data(g);
        assert_eq!(acts.k(), self.k, "activations have the wrong width");
        assert_eq!(
            acts.kind(),
            self.act_kind(),
            "activations have the wrong encoding"
        );
        let m = acts.m();
        assert_eq!(out_len, m * self.n, "output has the wrong size");
        let row0 = g * r;
        let rows = r.min(self.n - row0);
        let mut tile: Tile = [[0f32; MAX_R]; WIDE_T];
        let step = match self.isa {
            _ if self.format.is_k() => super::kquant::tokens_per_call(self.format, self.isa),
            Isa::Avx512 => WIDE_T,
            _ => TILE_T,
        };
        let mut t0 = 0;
        while t0 < m {
            let nt = step.min(m - t0);
            if self.format.is_k() {
                let nsb = self.k / super::kquant::QK_K;
                super::kquant::kernel(
                    self.format,
                    self.isa,
                    gdata,
                    rows,
                    nsb,
                    acts,
                    t0,
                    nt,
                    &mut tile,
                );
            } else {
                self.kernel(gdata, acts, t0, nt, &mut tile);
            }
            for (t, vals) in tile.iter().enumerate().take(nt) {
                let at = (t0 + t) * self.n + row0;
                debug_assert!(at + rows <= out_len);
                // SAFETY: `at + rows <= (t0 + t + 1) · n <= m · n = out_len` since
                // `row0 + rows <= n`, so the copy stays in the buffer; the caller guarantees
                // nobody else touches these elements (they belong to this group's rows).
                unsafe {
                    if rows == MAX_R {
                        // A whole group: a fixed-size copy the compiler inlines, where a
                        // variable-length one calls memmove for 64 bytes.
                        out.add(at).cast::<[f32; MAX_R]>().write_unaligned(*vals);
                    } else {
                        std::ptr::copy_nonoverlapping(vals.as_ptr(), out.add(at), rows);
                    }
                }
            }
            t0 += nt;
        }
    }

    /// One micro-tile: this group against tokens `t0 .. t0 + nt` (`nt <= TILE_T`, or
    /// `WIDE_T` for AVX-512).
    fn kernel(&self, gdata: &[u8], acts: &Acts, t0: usize, nt: usize, tile: &mut Tile) {
        let nb = self.k / BLOCK;
        match self.isa {
            Isa::Scalar => super::scalar::kernel(self.format, gdata, nb, acts, t0, nt, tile),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `pack` refused to build a matrix for an instruction set the CPU lacks,
            // and `gdata` is one group of `nb` blocks packed for `Isa::Avx2` (8 rows).
            Isa::Avx2 => unsafe { super::avx2::kernel(self.format, gdata, nb, acts, t0, nt, tile) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for `Isa::Avx512` (16 rows).
            Isa::Avx512 => unsafe {
                super::avx512::kernel(self.format, gdata, nb, acts, t0, nt, tile)
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("pack refuses unsupported instruction sets"),
        }
    }
}

/// The GGUF bytes `raw` of an `n × k` matrix in a 32-value format, repacked in groups of
/// `r` interleaved rows.
fn pack_blocks(
    format: Format,
    raw: &[u8],
    n: usize,
    k: usize,
    r: usize,
) -> Result<Vec<u8>, String> {
    if k == 0 || !k.is_multiple_of(BLOCK) {
        return Err(format!("k = {k} is not a positive multiple of {BLOCK}"));
    }
    let nb = k / BLOCK;
    let bb = format.block_bytes();
    if raw.len() != n * nb * bb {
        return Err(format!(
            "{format:?} {n}×{k} needs {} bytes, got {}",
            n * nb * bb,
            raw.len()
        ));
    }
    let pb = format.packed_block_bytes(r);
    let mut data = vec![0u8; n.div_ceil(r) * nb * pb];
    for (gi, gdata) in data.chunks_exact_mut(nb * pb).enumerate() {
        // A background load may hand the CPU to serving between groups.
        crate::turns::pace();
        for (b, dst) in gdata.chunks_exact_mut(pb).enumerate() {
            for ri in 0..r.min(n - gi * r) {
                let at = ((gi * r + ri) * nb + b) * bb;
                pack_block(format, &raw[at..at + bb], dst, r, ri);
            }
        }
    }
    Ok(data)
}

/// Writes `src`, one GGUF block of a 32-value format, as row `ri` of the packed block `dst`
/// of `r` rows (the layout in the module header).
fn pack_block(format: Format, src: &[u8], dst: &mut [u8], r: usize, ri: usize) {
    let (qs, d) = (&src[block_qs_at(format)..], &src[0..2]);
    if format == Format::Q8_0 {
        for j in 0..8 {
            dst[j * 4 * r + ri * 4..][..4].copy_from_slice(&qs[4 * j..4 * j + 4]);
        }
        dst[32 * r + 2 * ri..][..2].copy_from_slice(d);
        let sum: i16 = qs[..32].iter().map(|&q| q as i8 as i16).sum();
        dst[34 * r + 2 * ri..][..2].copy_from_slice(&sum.to_le_bytes());
        return;
    }
    for c in 0..4 {
        dst[c * 4 * r + ri * 4..][..4].copy_from_slice(&qs[4 * c..4 * c + 4]);
    }
    dst[16 * r + 2 * ri..][..2].copy_from_slice(d);
    if matches!(format, Format::Q4_1 | Format::Q5_1) {
        dst[18 * r + 2 * ri..][..2].copy_from_slice(&src[2..4]);
    }
    if let Some(qh) = block_qh(format, src) {
        let hb = format.high_bits_at(r);
        for c in 0..4 {
            let lo = (qh >> (4 * c)) & 0xF;
            let hi = (qh >> (16 + 4 * c)) & 0xF;
            dst[hb + c * r + ri] = (lo | (hi << 4)) as u8;
        }
    }
}

/// Row `ri` of the packed block `src` of `r` rows, dequantized into `dst` (32 values).
fn unpack_block(format: Format, src: &[u8], dst: &mut [f32], r: usize, ri: usize) {
    if format == Format::Q8_0 {
        let d = rd_f16(src, 32 * r + 2 * ri).to_f32();
        for j in 0..8 {
            for (i, &q) in src[j * 4 * r + ri * 4..][..4].iter().enumerate() {
                dst[4 * j + i] = d * q as i8 as f32;
            }
        }
        return;
    }
    let d = rd_f16(src, 16 * r + 2 * ri).to_f32();
    let m = match format {
        Format::Q4_0 => -8.0 * d,
        Format::Q5_0 => -16.0 * d,
        _ => rd_f16(src, 18 * r + 2 * ri).to_f32(),
    };
    let five = matches!(format, Format::Q5_0 | Format::Q5_1);
    for c in 0..4 {
        let hb = if five {
            src[format.high_bits_at(r) + c * r + ri]
        } else {
            0
        };
        for (i, &q) in src[c * 4 * r + ri * 4..][..4].iter().enumerate() {
            let lo = (q & 15) | (((hb >> i) & 1) << 4);
            let hi = (q >> 4) | (((hb >> (4 + i)) & 1) << 4);
            dst[4 * c + i] = d * lo as f32 + m;
            dst[16 + 4 * c + i] = d * hi as f32 + m;
        }
    }
}

/// Where a GGUF block's quants start.
fn block_qs_at(format: Format) -> usize {
    match format {
        Format::Q4_0 | Format::Q8_0 => 2,
        Format::Q4_1 => 4,
        Format::Q5_0 => 6,
        _ => 8,
    }
}

/// A Q5_0 or Q5_1 GGUF block's fifth bits (bit `j` for value `j`).
fn block_qh(format: Format, src: &[u8]) -> Option<u32> {
    let at = match format {
        Format::Q5_0 => 2,
        Format::Q5_1 => 4,
        _ => return None,
    };
    Some(u32::from_le_bytes([
        src[at],
        src[at + 1],
        src[at + 2],
        src[at + 3],
    ]))
}

/// Dequantizes the GGUF bytes of an `n × k` matrix (row-major f32), for tests and checks.
pub fn dequantize(format: Format, raw: &[u8], n: usize, k: usize) -> Vec<f32> {
    let bb = format.block_bytes();
    let mut out = Vec::with_capacity(n * k);
    if format.is_k() {
        let qk = super::kquant::QK_K;
        out.resize(n * k, 0.0);
        for (src, dst) in raw.chunks_exact(bb).zip(out.chunks_exact_mut(qk)) {
            super::kquant::dequantize_block(format, src, dst);
        }
        return out;
    }
    for src in raw.chunks_exact(bb).take(n * k / BLOCK) {
        let d = rd_f16(src, 0).to_f32();
        let qs = &src[block_qs_at(format)..];
        if format == Format::Q8_0 {
            out.extend(qs[..32].iter().map(|&q| d * q as i8 as f32));
            continue;
        }
        let m = match format {
            Format::Q4_0 => -8.0 * d,
            Format::Q5_0 => -16.0 * d,
            _ => rd_f16(src, 2).to_f32(),
        };
        let qh = block_qh(format, src).unwrap_or(0);
        out.extend((0..32).map(|j| {
            let nib = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
            d * (nib | ((((qh >> j) & 1) as u8) << 4)) as f32 + m
        }));
    }
    out
}
