//! The gated MLPs' activations times the up projection, over plain slices so the compiler
//! vectorizes them: GELU with the tanh approximation (`gelu_pytorch_tanh`, Gemma's) and SiLU
//! (llama's SwiGLU). candle's `gelu` calls libm's `tanhf` per element, which took 11% of
//! Gemma 3's prefill; its `silu` calls libm's `expf` per element on the calling thread, 5%
//! of a batch-8 SmolLM2 decode step while the pool's other worker waited.
//!
//! `gelu: x·(1 + tanh u)/2 = x / (1 + e^{−2u})`, with `e^x` by range reduction to
//! `[−ln2/2, ln2/2]` and a degree-6 polynomial: within a few f32 ulps of the exact value
//! (tested against f64), and without the cancellation the `1 + tanh` form has for negative
//! inputs. `silu: x / (1 + e^{−x})` keeps libm's `expf`, as candle's does (same bits).
use candle_core::{CpuStorage, Device, Result, Storage, Tensor};

/// `e^x` for f32 `x`, vectorizable (no branches, no libm); saturates outside ±87.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    // Cody-Waite: ln 2 split in a part exact in f32 and the rest.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `gelu_tanh(x) = x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // √(2/π)
    let u = K * (x + 0.044_715 * x * x * x);
    // (1 + tanh(u)) / 2 = 1 / (1 + e^{−2u}): no cancellation for negative x.
    x / (1.0 + exp(-2.0 * u))
}

/// `silu(x) = x / (1 + e^{−x})`, with libm's `expf`: the very operations of candle's
/// `silu`, so llama-family outputs keep their bits (the polynomial `exp` is a later change,
/// to be judged against the llama.cpp fixtures).
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `act(gate) · up`, elementwise, of two f32 tensors of one shape on the CPU, read in place
/// (no copies): the gated product a MLP's down projection takes. `act` is [`gelu`] or
/// [`silu`]; generic so that it inlines into the loop, which vectorizes.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, act: impl Fn(f32) -> f32) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!("gate {:?} and up {:?} differ", gate.shape(), up.shape());
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let n = gate.elem_count();
    let mut out = vec![0f32; n];
    {
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(g)), Storage::Cpu(CpuStorage::F32(u))) = (&*gs, &*us)
        else {
            candle_core::bail!("gated: f32 tensors on the CPU expected");
        };
        let (g0, u0) = (gl.start_offset(), ul.start_offset());
        for ((o, &g), &u) in out.iter_mut().zip(&g[g0..g0 + n]).zip(&u[u0..u0 + n]) {
            *o = act(g) * u;
        }
    }
    Tensor::from_vec(out, gate.shape(), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_is_within_a_few_ulps_of_f64() {
        let exact = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        };
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4; // −20 .. 20
            let (got, want) = (gelu(x) as f64, exact(x as f64));
            let err = (got - want).abs() / want.abs().max(1e-3);
            worst = worst.max(err);
        }
        assert!(worst < 2e-6, "worst relative error {worst:e}");
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(100.0), 100.0);
        assert!(gelu(-100.0).abs() < 1e-30);
        assert!(gelu(f32::NAN).is_nan());
    }

    #[test]
    fn silu_is_within_a_few_ulps_of_f64() {
        let exact = |x: f64| x / (1.0 + (-x).exp());
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4; // −20 .. 20
            let (got, want) = (silu(x) as f64, exact(x as f64));
            let err = (got - want).abs() / want.abs().max(1e-3);
            worst = worst.max(err);
        }
        assert!(worst < 2e-6, "worst relative error {worst:e}");
        assert_eq!(silu(0.0), 0.0);
        assert_eq!(silu(100.0), 100.0);
        assert!(silu(-100.0).abs() < 1e-30);
        assert!(silu(f32::NAN).is_nan());
    }

    #[test]
    fn gated_reads_both_tensors_in_place_and_checks_shapes() {
        let g = Tensor::new(&[[1f32, -2.0, 0.5], [3.0, 0.0, -1.0]], &Device::Cpu).unwrap();
        let u = Tensor::new(&[[2f32, 1.0, -4.0], [0.5, 7.0, 1.0]], &Device::Cpu).unwrap();
        // A narrowed view starts past its storage's beginning.
        let (gv, uv) = (g.narrow(0, 1, 1).unwrap(), u.narrow(0, 1, 1).unwrap());
        let got = gated(&gv, &uv, silu).unwrap().to_vec2::<f32>().unwrap();
        let want: Vec<f32> = [(3f32, 0.5f32), (0.0, 7.0), (-1.0, 1.0)]
            .iter()
            .map(|&(g, u)| silu(g) * u)
            .collect();
        assert_eq!(got, vec![want]);
        assert!(gated(&g, &gv, silu).is_err());
    }
}
