//! A sequence's own keys and values, and what one batched forward step takes from it.
//!
//! The weights of a version are shared and read-only; everything that grows as a sequence
//! decodes lives here, owned by the sequence. Each layer's keys and values sit in a buffer
//! allocated once for the tokens the sequence reserved (its prompt plus its most new
//! tokens), written in place as it grows, so a decode step copies one row per layer rather
//! than the whole cache.
use candle_core::{Result, Tensor};

use super::attention::LayerKv;

/// Tokens of a prompt fed per forward pass: bounds the attention matrix of a long prompt,
/// lets a cancelled request stop between chunks and lets a batch step take part of a
/// prompt beside decoding sequences. A prompt is always cut at the same places (multiples of
/// this from its start), alone or in a batch, so its logits do not depend on the batch.
pub const PREFILL_CHUNK: usize = 128;

/// The sequence axis of the `(1, kv_heads, tokens, head_dim)` cache tensors.
const SEQ_DIM: usize = 2;

/// Keys and values of one sequence, for every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Layers,
    pos: usize,
    capacity: usize,
}

#[derive(Debug, Clone)]
enum Layers {
    /// Plain vectors the CPU attention ([`super::attention`]) reads and appends to.
    Cpu(Vec<LayerKv>),
    /// Device tensors for candle's attention.
    Device(Vec<candle_nn::kv_cache::KvCache>),
}

impl KvCache {
    /// An empty cache for `n_layers` layers with room for `capacity` tokens of `kv_width`
    /// values per layer (it grows if a sequence goes past it), for weights on the CPU
    /// (`on_cpu`) or another device.
    pub fn new(n_layers: usize, capacity: usize, kv_width: usize, on_cpu: bool) -> Self {
        Self::with_windows(&vec![None; n_layers], capacity, kv_width, on_cpu)
    }

    /// As [`KvCache::new`], with layer `i` attending within a sliding window of
    /// `windows[i]` positions (when set): on the CPU such a layer keeps only what its window
    /// can still see. Device caches keep every position.
    pub fn with_windows(
        windows: &[Option<usize>],
        capacity: usize,
        kv_width: usize,
        on_cpu: bool,
    ) -> Self {
        let n_layers = windows.len();
        let capacity = capacity.max(1);
        let layers = if on_cpu {
            Layers::Cpu(
                windows
                    .iter()
                    .map(|&w| {
                        // A sliding-window layer holds at most two windows and a step.
                        let reserve = w.map_or(capacity, |w| capacity.min(2 * w + PREFILL_CHUNK));
                        LayerKv::with_capacity(reserve, kv_width, w)
                    })
                    .collect(),
            )
        } else {
            Layers::Device(
                (0..n_layers)
                    .map(|_| candle_nn::kv_cache::KvCache::new(SEQ_DIM, capacity))
                    .collect(),
            )
        };
        Self {
            layers,
            pos: 0,
            capacity,
        }
    }

    /// Tokens fed so far (the position of the next one).
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Tokens the cache was sized for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends layer `layer`'s new keys and values (`(1, kv_heads, n, head_dim)`,
    /// contiguous) and returns all of them so far.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        match &mut self.layers {
            Layers::Device(l) => l[layer].append(k, v),
            Layers::Cpu(_) => candle_core::bail!("a CPU cache takes its keys through attention"),
        }
    }

    /// Layer `layer`'s CPU keys and values, when this is a CPU cache.
    pub(crate) fn cpu_layer(&mut self, layer: usize) -> Option<&mut LayerKv> {
        match &mut self.layers {
            Layers::Cpu(l) => l.get_mut(layer),
            Layers::Device(_) => None,
        }
    }

    /// Moves the position past `n` tokens whose keys and values every layer now holds.
    pub(crate) fn advance(&mut self, n: usize) {
        self.pos += n;
    }
}

/// One sequence's part of a forward step: the tokens it feeds now (a decode token or a
/// prefill chunk) at the position its cache is at, and whether it needs the next-token
/// logits (the last chunk of a prompt, or a decode step).
pub struct StepItem<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: bool,
}
