//! Portable kernels over the 8-row packed layout: the reference the SIMD kernels are tested
//! against, and the path for CPUs without them.
use half::f16;

use super::act::Acts;
use super::Tile;
use super::{Format, BLOCK};

const R: usize = 8;

fn rd_f16(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// Rows `0..8` of the group in `g` (`nb` packed blocks) against tokens `t0 .. t0 + nt`.
pub(crate) fn kernel(
    format: Format,
    g: &[u8],
    nb: usize,
    acts: &Acts,
    t0: usize,
    nt: usize,
    tile: &mut Tile,
) {
    let pb = format.packed_block_bytes(R);
    assert!(g.len() >= nb * pb, "group too short");
    for row in tile.iter_mut().take(nt) {
        row[..R].fill(0.0);
    }
    for b in 0..nb {
        let blk = &g[b * pb..(b + 1) * pb];
        for (t, out) in tile.iter_mut().enumerate().take(nt) {
            let a = &acts.qs_row(t0 + t)[b * BLOCK..(b + 1) * BLOCK];
            let da = acts.d_row(t0 + t)[b];
            let sa = acts.s_row(t0 + t)[b];
            for (r, acc) in out.iter_mut().enumerate().take(R) {
                match format {
                    Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 => {
                        let mut isum = 0i32;
                        for c in 0..4 {
                            let hb = match format {
                                Format::Q5_0 | Format::Q5_1 => {
                                    blk[format.high_bits_at(R) + c * R + r] as i32
                                }
                                _ => 0,
                            };
                            for i in 0..4 {
                                let byte = blk[c * 4 * R + r * 4 + i];
                                let lo = (byte & 15) as i32 | (((hb >> i) & 1) << 4);
                                let hi = (byte >> 4) as i32 | (((hb >> (4 + i)) & 1) << 4);
                                isum += lo * a[4 * c + i] as i8 as i32;
                                isum += hi * a[16 + 4 * c + i] as i8 as i32;
                            }
                        }
                        let dw = rd_f16(blk, 16 * R + 2 * r);
                        match format {
                            Format::Q4_1 | Format::Q5_1 => {
                                let mw = rd_f16(blk, 18 * R + 2 * r);
                                *acc += isum as f32 * (dw * da) + mw * sa;
                            }
                            // Q4_0 values are q − 8: Σ (q − 8)·a = Σ q·a − 8·Σ a (Q5_0: 16).
                            Format::Q4_0 => *acc += (isum as f32 - 8.0 * sa) * (dw * da),
                            _ => *acc += (isum as f32 - 16.0 * sa) * (dw * da),
                        }
                    }
                    Format::Q8_0 => {
                        let mut isum = 0i32;
                        for j in 0..8 {
                            for i in 0..4 {
                                let w = blk[j * 4 * R + r * 4 + i] as i8 as i32;
                                isum += w * a[4 * j + i] as i8 as i32;
                            }
                        }
                        let dw = rd_f16(blk, 32 * R + 2 * r);
                        *acc += isum as f32 * (dw * da);
                    }
                    Format::Q4K | Format::Q5K | Format::Q6K => {
                        unreachable!("K-quants run in kquant")
                    }
                }
            }
        }
    }
}
