//! Choosing the next token from logits: greedy, or seeded sampling with temperature, top-k,
//! top-p and a repetition penalty.
use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::SeedableRng;

/// The smallest temperature above 0 that sampling takes. Below it, logits divided by the
/// temperature overflow f32 and the distribution is no longer one (candle's draw then fails
/// with "Weights sequence is empty"); a caller who wants near-greedy output asks for 0.
pub const MIN_TEMPERATURE: f32 = 1e-2;
/// The largest temperature: past it every token is practically equally likely.
pub const MAX_TEMPERATURE: f32 = 100.0;
/// The repetition penalty's range: a penalty of `p` divides (or multiplies) logits by `p`,
/// so outside it logits overflow or vanish as they do for extreme temperatures.
pub const REPETITION_PENALTY_RANGE: (f32, f32) = (1e-2, 100.0);

/// Why `t` is not a temperature sampling can use (0 is greedy), if it is not.
pub fn check_temperature(t: f32) -> Result<(), String> {
    if t == 0.0 || (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&t) {
        Ok(())
    } else {
        Err(format!(
            "temperature {t}: must be 0 (greedy: always the most likely token) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}"
        ))
    }
}

/// Why `p` is not a repetition penalty sampling can use (1 disables it), if it is not.
pub fn check_repetition_penalty(p: f32) -> Result<(), String> {
    let (lo, hi) = REPETITION_PENALTY_RANGE;
    if (lo..=hi).contains(&p) {
        Ok(())
    } else {
        Err(format!(
            "repetition_penalty {p}: must be between {lo} and {hi} (1 disables it)"
        ))
    }
}

/// Validated sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// In (0, 1]; 1 disables nucleus sampling.
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables the penalty.
    pub repetition_penalty: f32,
    pub repetition_last_n: usize,
    pub seed: u64,
}

/// A seeded sampler; the same seed and logits give the same tokens.
pub struct Sampler {
    processor: LogitsProcessor,
    /// Top-p alone (the usual setting) is sampled here instead of by `processor`: candle
    /// sorts the whole vocabulary for it (1.5 ms per token at 49152 tokens), where finding the
    /// nucleus needs only its few candidates. Same tokens as candle for the same seed.
    nucleus: Option<Nucleus>,
    /// Temperature 0: picked by [`super::greedy`], the same token as `processor` without
    /// its copies of the vocabulary.
    greedy: bool,
    penalty: f32,
    last_n: usize,
}

struct Nucleus {
    rng: rand::rngs::StdRng,
    p: f32,
    temperature: f64,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let sampling = if p.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            let temperature = p.temperature;
            match (p.top_k > 0, p.top_p < 1.0) {
                (true, true) => Sampling::TopKThenTopP {
                    k: p.top_k,
                    p: p.top_p,
                    temperature,
                },
                (true, false) => Sampling::TopK {
                    k: p.top_k,
                    temperature,
                },
                (false, true) => Sampling::TopP {
                    p: p.top_p,
                    temperature,
                },
                (false, false) => Sampling::All { temperature },
            }
        };
        let nucleus = match sampling {
            Sampling::TopP {
                p: top_p,
                temperature,
            } if top_p > 0.0 && top_p < 1.0 => {
                Some(Nucleus {
                    // As LogitsProcessor seeds its own.
                    rng: rand::rngs::StdRng::seed_from_u64(p.seed),
                    p: top_p as f32,
                    temperature,
                })
            }
            _ => None,
        };
        Self {
            greedy: matches!(sampling, Sampling::ArgMax),
            processor: LogitsProcessor::from_sampling(p.seed, sampling),
            nucleus,
            penalty: p.repetition_penalty,
            last_n: p.repetition_last_n,
        }
    }

    /// Picks the next token; `history` is every token so far (prompt and completion).
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> candle_core::Result<u32> {
        if self.greedy {
            let start = history.len().saturating_sub(self.last_n);
            let context = if self.last_n == 0 {
                &[][..]
            } else {
                &history[start..]
            };
            return super::greedy::pick(logits, self.penalty, context);
        }
        let penalized;
        let logits = if self.penalty == 1.0 || self.last_n == 0 {
            logits
        } else {
            let start = history.len().saturating_sub(self.last_n);
            penalized = candle_transformers::utils::apply_repeat_penalty(
                logits,
                self.penalty,
                &history[start..],
            )?;
            &penalized
        };
        match &mut self.nucleus {
            None => self.processor.sample(logits),
            Some(n) => {
                // The same float operations as LogitsProcessor, so the same probabilities.
                let logits = logits.to_dtype(DType::F32)?;
                let prs = candle_nn::ops::softmax_last_dim(&(&logits / n.temperature)?)?
                    .to_vec1::<f32>()?;
                let kept = nucleus(&prs, n.p);
                // Drawing over the kept tokens in id order walks the same cumulative sums as
                // candle's draw over the whole vocabulary with the rest zeroed (adding zero is
                // exact), so the same random number picks the same token.
                let pick = WeightedIndex::new(kept.iter().map(|&i| prs[i]))
                    .map_err(candle_core::Error::wrap)?;
                Ok(kept[pick.sample(&mut n.rng)] as u32)
            }
        }
    }
}

/// The nucleus, in id order, exactly as candle's top-p finds it: in order of
/// falling probability (ties: lower id first), tokens are kept until their sum reaches `p`.
/// Only candidates are sorted: the tokens within a factor of 1000 of the most likely one, then
/// a million, ... Every token left out is less likely than every candidate, so the
/// candidates, sorted, are the start of candle's full order; if their sum reaches `p`, the
/// nucleus is the same.
fn nucleus(prs: &[f32], p: f32) -> Vec<usize> {
    let order = |&i: &usize, &j: &usize| prs[j].total_cmp(&prs[i]).then(i.cmp(&j));
    let max = prs.iter().fold(0f32, |a, &b| a.max(b));
    let mut floor = max * 1e-3;
    loop {
        let mut top: Vec<usize> = (0..prs.len()).filter(|&i| prs[i] >= floor).collect();
        top.sort_unstable_by(order);
        let mut sum = 0f32;
        let reached = top.iter().position(|&i| {
            let done = sum >= p;
            sum += prs[i];
            done
        });
        match reached {
            Some(m) => {
                top.truncate(m);
                top.sort_unstable();
                return top;
            }
            // Every token was a candidate and they sum to less than p (rounding): keep all.
            None if floor == 0.0 => {
                top.sort_unstable();
                return top;
            }
            None => {
                floor = if floor > max * 1e-12 {
                    floor * 1e-3
                } else {
                    0.0
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params(temperature: f64, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p: 0.9,
            top_k: 0,
            repetition_penalty: 1.0,
            repetition_last_n: 64,
            seed,
        }
    }

    fn logits() -> Tensor {
        let v: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(&params(0.0, 1));
        let v = logits().to_vec1::<f32>().unwrap();
        let best = v
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a });
        assert_eq!(s.sample(&logits(), &[]).unwrap() as usize, best.0);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let run = |seed| {
            let mut s = Sampler::new(&params(1.5, seed));
            (0..32)
                .map(|_| s.sample(&logits(), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    /// The nucleus path picks exactly the tokens candle's LogitsProcessor picks for the same
    /// seed, on peaked and flat distributions, with ties, and where p needs many candidates.
    #[test]
    fn top_p_matches_candles_sampler_token_for_token() {
        use rand::Rng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for case in 0..40 {
            let n = [50, 1000, 49152][case % 3];
            let spread = [0.1f32, 2.0, 8.0][case % 3] * (1 + case % 2) as f32;
            let mut v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * spread).collect();
            if case % 4 == 0 {
                // Ties: the same logit on many tokens.
                for x in v.iter_mut().step_by(3) {
                    *x = spread / 2.0;
                }
            }
            let logits = Tensor::new(v, &Device::Cpu).unwrap();
            let (top_p, temperature) = ([0.5, 0.9, 0.99][case % 3], [0.2, 0.7, 1.5][case % 3]);
            let seed = case as u64;
            let mut ours = Sampler::new(&SamplingParams {
                temperature,
                top_p,
                top_k: 0,
                repetition_penalty: 1.0,
                repetition_last_n: 0,
                seed,
            });
            assert!(ours.nucleus.is_some());
            let mut candle = LogitsProcessor::from_sampling(
                seed,
                Sampling::TopP {
                    p: top_p,
                    temperature,
                },
            );
            for draw in 0..20 {
                assert_eq!(
                    ours.sample(&logits, &[]).unwrap(),
                    candle.sample(&logits).unwrap(),
                    "case {case} (n {n}, p {top_p}, t {temperature}), draw {draw}"
                );
            }
        }
    }

    #[test]
    fn repetition_penalty_discourages_the_repeated_token() {
        let mut p = params(0.0, 1);
        let mut s = Sampler::new(&p);
        let first = s.sample(&logits(), &[]).unwrap();
        p.repetition_penalty = 100.0;
        let mut s = Sampler::new(&p);
        assert_ne!(s.sample(&logits(), &[first]).unwrap(), first);
    }
}
