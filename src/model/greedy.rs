//! Greedy picks without candle's copies: the same token as candle's `LogitsProcessor` with
//! `Sampling::ArgMax` after `apply_repeat_penalty`, read straight from the logits' storage.
//!
//! candle's path copies the vocabulary twice when a penalty applies (out of the tensor and
//! into a new one), allocates both, and finds the maximum with one dependent compare chain.
//! A batched step samples every sequence on the scheduler's thread while the pool's other
//! threads wait, so at 8 sequences of a 49152-token vocabulary that was a few percent of
//! the step. Here the maximum is found over 16 independent lanes, in place: a penalty
//! changes only the context's few logits, which compete with the best of the runs between
//! them.
use candle_core::{DType, Storage, Tensor};

/// Lanes of the maximum search.
const LANES: usize = 16;

/// The greedy token of `logits` (`[vocab]`) after the repetition penalty `penalty` over
/// `context` (1 disables it), exactly as candle picks it.
pub fn pick(logits: &Tensor, penalty: f32, context: &[u32]) -> candle_core::Result<u32> {
    let logits = logits.to_dtype(DType::F32)?;
    let (storage, layout) = logits.storage_and_layout();
    let owned;
    let values: &[f32] = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => &cpu.as_slice::<f32>()?[start..end],
        _ => {
            owned = logits.flatten_all()?.to_vec1::<f32>()?;
            &owned
        }
    };
    if values.is_empty() {
        candle_core::bail!("greedy sampling over empty logits");
    }
    Ok(if penalty == 1.0 || context.is_empty() {
        argmax(values)
    } else {
        penalized_argmax(values, penalty, context)
    })
}

/// candle's `apply_repeat_penalty` to one logit: positive ones divided by `penalty`, the
/// others multiplied.
fn penalize(l: f32, penalty: f32) -> f32 {
    if l >= 0.0 {
        l / penalty
    } else {
        l * penalty
    }
}

/// [`argmax`] of the logits as candle's `apply_repeat_penalty` leaves them (each distinct
/// token of `context` penalized once, ids past the vocabulary ignored), without copying
/// them: the best of each run of unpenalized logits between the penalized ones, and each
/// penalized logit, compete as in [`argmax`].
fn penalized_argmax(v: &[f32], penalty: f32, context: &[u32]) -> u32 {
    if v[0].is_nan() {
        // Penalized or not, it stays NaN and is never replaced.
        return 0;
    }
    let mut seen: Vec<usize> = context
        .iter()
        .map(|&t| t as usize)
        .filter(|&t| t < v.len())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    let mut best: Option<(f32, usize)> = None;
    let mut offer = |c: Option<(f32, usize)>| {
        if let Some((x, i)) = c {
            best = match best {
                Some((b, j)) if !(b < x || (b == x && i < j)) => Some((b, j)),
                _ => Some((x, i)),
            };
        }
    };
    let mut from = 0;
    for &t in &seen {
        offer(best_of(&v[from..t]).map(|(x, i)| (x, from + i)));
        let x = penalize(v[t], penalty);
        offer((!x.is_nan()).then_some((x, t)));
        from = t + 1;
    }
    offer(best_of(&v[from..]).map(|(x, i)| (x, from + i)));
    best.map_or(0, |(_, i)| i as u32)
}

/// The index candle's `argmax` returns: starting from element 0, an element replaces the
/// best so far only when strictly greater. So the first index of the maximum; NaNs never
/// win, and a NaN at 0 is never replaced.
pub fn argmax(v: &[f32]) -> u32 {
    if v[0].is_nan() {
        return 0;
    }
    best_of(v).map_or(0, |(_, i)| i as u32)
}

/// The largest value of `v` that is not NaN and the first index holding it (`None` when
/// every value is NaN).
fn best_of(v: &[f32]) -> Option<(f32, usize)> {
    // Lane j sees indices j, j + 16, ... in order, so it keeps the first index of its own
    // maximum; the first index of the overall maximum is the smallest of those lanes' that
    // reached it.
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [u32::MAX; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let base = (c * LANES) as u32;
        for j in 0..LANES {
            let x = chunk[j];
            let gt = best[j] < x;
            best[j] = if gt { x } else { best[j] };
            at[j] = if gt { base + j as u32 } else { at[j] };
        }
    }
    let base = v.len() - tail.len();
    for (j, &x) in tail.iter().enumerate() {
        if best[j] < x {
            best[j] = x;
            at[j] = (base + j) as u32;
        }
    }
    let max = best
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if a < b { b } else { a });
    if max == f32::NEG_INFINITY {
        // Nothing above minus infinity: the first minus infinity, if any.
        return v
            .iter()
            .position(|&x| x == f32::NEG_INFINITY)
            .map(|i| (f32::NEG_INFINITY, i));
    }
    let i = (0..LANES)
        .filter(|&j| best[j] == max)
        .map(|j| at[j])
        .min()
        .expect("some lane holds the maximum");
    Some((max, i as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_transformers::generation::{LogitsProcessor, Sampling};
    use rand::{Rng, SeedableRng};

    fn candle_pick(v: &[f32], penalty: f32, context: &[u32]) -> u32 {
        let t = Tensor::new(v, &Device::Cpu).unwrap();
        let t = if penalty == 1.0 || context.is_empty() {
            t
        } else {
            candle_transformers::utils::apply_repeat_penalty(&t, penalty, context).unwrap()
        };
        LogitsProcessor::from_sampling(0, Sampling::ArgMax)
            .sample(&t)
            .unwrap()
    }

    /// Random logits of many lengths (lane tails included), with ties, NaNs, infinities and
    /// signed zeros, with and without penalties (repeated and out-of-range context ids):
    /// the same token as candle every time.
    #[test]
    fn picks_the_token_candle_picks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for case in 0..600 {
            let n = [1, 2, 15, 16, 17, 33, 100, 49152][case % 8];
            let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            match case % 7 {
                // Ties at the top, spread over lanes.
                0 => {
                    let top = 9.0;
                    for _ in 0..3 {
                        let i = rng.random_range(0..n);
                        v[i] = top;
                    }
                }
                1 => {
                    for _ in 0..n.div_ceil(4) {
                        let i = rng.random_range(0..n);
                        v[i] = f32::NAN;
                    }
                }
                2 => v.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
                3 => {
                    v.iter_mut().for_each(|x| *x = -x.abs() - 1.0);
                    let i = rng.random_range(0..n);
                    v[i] = -0.0;
                    let j = rng.random_range(0..n);
                    v[j] = 0.0;
                }
                4 => v[0] = f32::NAN,
                5 => {
                    let i = rng.random_range(0..n);
                    v[i] = f32::INFINITY;
                }
                _ => {}
            }
            let mut context: Vec<u32> = (0..rng.random_range(0..12))
                .map(|_| rng.random_range(0..n as u32 + 3))
                .collect();
            if case % 5 == 0 {
                // The unpenalized winner is in the context, twice.
                let top = candle_pick(&v, 1.0, &[]);
                context.extend([top, top]);
            }
            let penalty = [1.0, 1.3, 0.5][case % 3];
            let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
            assert_eq!(
                pick(&t, penalty, &context).unwrap(),
                candle_pick(&v, penalty, &context),
                "case {case}: n {n}, penalty {penalty}, context {context:?}"
            );
        }
    }

    /// A strided (non-contiguous) tensor reads through the copy and picks the same.
    #[test]
    fn a_strided_tensor_picks_the_same() {
        let v: Vec<f32> = (0..64).map(|i| ((i * 29) % 17) as f32).collect();
        let t = Tensor::new(v.as_slice(), &Device::Cpu)
            .unwrap()
            .reshape((8, 8))
            .unwrap()
            .t()
            .unwrap()
            .flatten_all()
            .unwrap();
        let dense = t.to_vec1::<f32>().unwrap();
        let strided = Tensor::new(v.as_slice(), &Device::Cpu)
            .unwrap()
            .reshape((8, 8))
            .unwrap()
            .t()
            .unwrap();
        assert_eq!(pick(&strided, 1.0, &[]).unwrap(), argmax(&dense));
        assert_eq!(pick(&t, 1.0, &[]).unwrap(), candle_pick(&dense, 1.0, &[]));
    }
}
