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

/// Products below which [`gated`] runs on the calling thread (a batch of one's MLP, 1536
/// wide for SmolLM2, stays there; a batch of 8 or a prompt chunk goes to the pool).
const GATED_PARALLEL_MIN: usize = 4096;

/// Products one work item of a parallel [`gated`] computes.
const GATED_PART: usize = 512;

/// `act(gate) · up`, elementwise, of two f32 tensors of one shape on the CPU, read in place
/// (no copies): the gated product a MLP's down projection takes. `act` is [`gelu`] or
/// [`silu`]; generic so that it inlines into the loop, which vectorizes. Large products run
/// across candle's barrier pool, as the projections around them do (each element is computed
/// alone, so the bits do not depend on how it is split); on the calling thread alone, a batch
/// step's SiLU kept the pool's worker waiting.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, act: impl Fn(f32) -> f32 + Sync) -> Result<Tensor> {
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
        let (g, u) = (&g[gl.start_offset()..][..n], &u[ul.start_offset()..][..n]);
        let apply = |out: &mut [f32], start: usize| {
            for ((o, &g), &u) in out.iter_mut().zip(&g[start..]).zip(&u[start..]) {
                *o = act(g) * u;
            }
        };
        if n < GATED_PARALLEL_MIN {
            apply(&mut out, 0);
        } else {
            let parts: Vec<std::sync::Mutex<&mut [f32]>> = out
                .chunks_mut(GATED_PART)
                .map(std::sync::Mutex::new)
                .collect();
            candle_core::utils::barrier_pool().execute_chunked(parts.len(), |range| {
                for i in range {
                    let mut part = parts[i].lock().expect("each part runs once");
                    apply(&mut part, i * GATED_PART);
                }
            });
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

    #[test]
    fn a_large_gated_product_across_the_pool_has_the_bits_of_the_plain_loop() {
        // Past the parallel threshold, a length that is no multiple of a part, and a view
        // that starts inside its storage.
        let n = GATED_PARALLEL_MIN * 3 + GATED_PART / 2 + 7;
        let val = |i: usize, k: f32| (i as f32 * k).sin() * 6.0;
        let g: Vec<f32> = (0..n + 5).map(|i| val(i, 0.37)).collect();
        let u: Vec<f32> = (0..n + 5).map(|i| val(i, 0.11)).collect();
        let (gt, ut) = (
            Tensor::new(g.as_slice(), &Device::Cpu).unwrap(),
            Tensor::new(u.as_slice(), &Device::Cpu).unwrap(),
        );
        let (gv, uv) = (gt.narrow(0, 5, n).unwrap(), ut.narrow(0, 5, n).unwrap());
        for (name, act) in [("silu", silu as fn(f32) -> f32), ("gelu", gelu)] {
            let got = gated(&gv, &uv, act).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), n);
            for (i, o) in got.iter().enumerate() {
                let want = act(g[i + 5]) * u[i + 5];
                assert_eq!(o.to_bits(), want.to_bits(), "{name}, element {i}");
            }
        }
    }
}
