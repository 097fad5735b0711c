//! RMS norm with the bits of candle's (`candle_nn::ops::rms_norm`), faster on the CPU.
//!
//! candle normalizes one row at a time, and a row's sum of squares is one chain of
//! dependent adds; above 32 rows it goes to rayon's pool, beside the barrier pool the
//! products use. On a batched step the norms ran on the scheduler's thread while the pool's
//! worker waited. Here up to eight rows are summed side by side (eight independent chains,
//! each in its row's order, so each row's bits are candle's), on the calling thread.
//! Elsewhere (a device, another dtype) candle's norm runs.
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor};

/// Rows whose sums of squares run side by side.
const ROWS: usize = 8;

/// `x / √(mean(x²) + eps) · weight` over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// The weight, dequantized on its device.
    weight: Tensor,
    /// The same, as f32 on the CPU, when the norm runs here.
    cpu: Option<Vec<f32>>,
    eps: f32,
}

impl RmsNorm {
    /// As candle's `quantized_nn::RmsNorm::from_qtensor`.
    pub fn from_qtensor(weight: QTensor, eps: f64) -> Result<Self> {
        let weight = weight.dequantize(&weight.device())?;
        let cpu = match weight.device() {
            Device::Cpu if weight.dtype() == DType::F32 => {
                Some(weight.flatten_all()?.to_vec1::<f32>()?)
            }
            _ => None,
        };
        Ok(Self {
            weight,
            cpu,
            eps: eps as f32,
        })
    }

    /// candle's norm, which runs everywhere.
    fn candle(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(alpha) = &self.cpu else {
            return self.candle(x);
        };
        let n = alpha.len();
        if x.dtype() != DType::F32 || !x.device().is_cpu() || x.dims().last() != Some(&n) {
            return self.candle(x);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(src)) = &*storage else {
            candle_core::bail!("rms norm: f32 storage on the CPU expected");
        };
        let src = &src[layout.start_offset()..][..x.elem_count()];
        let out = normalize(src, alpha, self.eps);
        Tensor::from_vec(out, x.shape(), &Device::Cpu)
    }
}

/// Every row of `src` (rows of `alpha.len()` values) normalized as candle's `rms_row`:
/// `sum2` summed in order from 0, `m = √(sum2 / n + eps)`, then `x / m · alpha`.
fn normalize(src: &[f32], alpha: &[f32], eps: f32) -> Vec<f32> {
    let n = alpha.len();
    let mut out = vec![0f32; src.len()];
    if n == 0 {
        return out;
    }
    for (src, dst) in src.chunks(ROWS * n).zip(out.chunks_mut(ROWS * n)) {
        let rows = src.len() / n;
        let mut sum2 = [0f32; ROWS];
        for i in 0..n {
            for (r, s) in sum2.iter_mut().enumerate().take(rows) {
                let v = src[r * n + i];
                *s += v * v;
            }
        }
        for ((src, dst), sum2) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)).zip(sum2) {
            let m = (sum2 / n as f32 + eps).sqrt();
            for ((d, s), a) in dst.iter_mut().zip(src).zip(alpha) {
                *d = *s / m * *a;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// The bits of candle's norm, on row counts around the side-by-side width and past
    /// candle's rayon threshold, with large and tiny values.
    #[test]
    fn has_the_bits_of_candles_norm() {
        let dim = 72;
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + (i * 13 % 17) as f32 / 9.0).collect();
        let wt = Tensor::from_vec(w, dim, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, GgmlDType::F32).unwrap();
        let ours = RmsNorm::from_qtensor(q, 1e-5).unwrap();
        assert!(ours.cpu.is_some(), "runs here on the CPU");
        for rows in [1, 2, 7, 8, 9, 16, 33, 70] {
            let x: Vec<f32> = (0..rows * dim)
                .map(|i| {
                    let v = ((i * 7919 % 2003) as f32 / 401.0) - 2.5;
                    if i % 11 == 0 {
                        v * 1e4
                    } else if i % 7 == 0 {
                        v * 1e-4
                    } else {
                        v
                    }
                })
                .collect();
            let xt = Tensor::from_vec(x, (1, rows, dim), &Device::Cpu).unwrap();
            let want = ours.candle(&xt).unwrap();
            let got = ours.forward(&xt).unwrap();
            assert_eq!(got.dims(), want.dims());
            let bits = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&got), bits(&want), "{rows} rows");
        }
    }
}
