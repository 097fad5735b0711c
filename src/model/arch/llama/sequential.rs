//! [`Sequential`]: one llama model and one cache, as candle's `quantized_llama` is driven.
use candle_core::quantized::gguf_file;
use candle_core::{Device, Result, Tensor};

use super::ModelWeights;
use crate::model::kv::{KvCache, StepItem};

/// A model with one cache, fed one sequence in order: `forward(ids, pos)` as candle's
/// `quantized_llama` has it, for tests and benchmarks that compare the two.
#[derive(Clone)]
pub struct Sequential {
    pub weights: ModelWeights,
    cache: KvCache,
}

impl Sequential {
    pub fn new(weights: ModelWeights) -> Self {
        let cache = weights.new_cache(512);
        Self { weights, cache }
    }

    /// Loads a llama-architecture GGUF (see [`ModelWeights::from_gguf`]).
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self::new(ModelWeights::from_gguf(ct, reader, device)?))
    }

    /// Logits (`(1, vocab)`) for the token after `x` (`(1, seq_len)` ids at positions from
    /// `index_pos`); position 0 starts a new sequence.
    pub fn forward(&mut self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        if index_pos == 0 {
            self.cache = self.weights.new_cache(512);
        }
        if index_pos != self.cache.pos() {
            candle_core::bail!(
                "position {index_pos}, but the cache is at {}",
                self.cache.pos()
            );
        }
        let ids = x.squeeze(0)?.to_vec1::<u32>()?;
        let mut items = [StepItem {
            ids: &ids,
            cache: &mut self.cache,
            logits: true,
        }];
        let logits = self
            .weights
            .step(&mut items)?
            .remove(0)
            .expect("logits asked");
        logits.unsqueeze(0)
    }
}
