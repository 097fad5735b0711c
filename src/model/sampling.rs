//! Choosing the next token from logits: greedy, or seeded sampling with temperature, top-k,
//! top-p and a repetition penalty.
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

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
    penalty: f32,
    last_n: usize,
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
        Self {
            processor: LogitsProcessor::from_sampling(p.seed, sampling),
            penalty: p.repetition_penalty,
            last_n: p.repetition_last_n,
        }
    }

    /// Picks the next token; `history` is every token so far (prompt and completion).
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> candle_core::Result<u32> {
        if self.penalty == 1.0 || self.last_n == 0 {
            return self.processor.sample(logits);
        }
        let start = history.len().saturating_sub(self.last_n);
        let penalized = candle_transformers::utils::apply_repeat_penalty(
            logits,
            self.penalty,
            &history[start..],
        )?;
        self.processor.sample(&penalized)
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
