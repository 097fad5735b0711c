//! The llama attention of one sequence through candle's tensor operations, for weights on a
//! CUDA or Metal device (the CPU runs [`crate::model::attention`] instead).
use candle_core::{Result, Tensor};

use super::{masked_fill, round_f16, LayerWeights};
use crate::model::kv::KvCache;

impl LayerWeights {
    fn apply_rotary_emb(&self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_b_sz, _n_head, seq_len, _n_embd) = x.dims4()?;
        let cos = self.cos.narrow(0, index_pos, seq_len)?;
        let sin = self.sin.narrow(0, index_pos, seq_len)?;
        let x = x.contiguous()?;
        if self.rope_is_neox {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
        }
    }

    /// Attention of one sequence's `seq_len` new rows (their query, key and value
    /// projections, `(1, seq_len, ·)`) over its cache at `layer`, which they join.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut KvCache,
        layer: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let index_pos = cache.pos();
        let (b_sz, seq_len, _) = q.dims3()?;
        let q = q
            .reshape((b_sz, seq_len, self.n_head, self.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b_sz, seq_len, self.n_kv_head, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b_sz, seq_len, self.n_kv_head, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;

        let q = self.apply_rotary_emb(&q, index_pos)?;
        let k = self.apply_rotary_emb(&k, index_pos)?;
        // llama.cpp keeps K and V in an f16 cache and takes K·Q in f16: rounding all three
        // through f16 makes greedy decoding follow llama.cpp's on near-ties.
        let q = round_f16(&q)?;
        let k = round_f16(&k)?;
        let v = round_f16(&v)?;
        let (k, v) = cache.append(layer, &k, &v)?;

        let y = if q.device().is_metal() && seq_len == 1 {
            // SDPA does MQA itself.
            candle_nn::ops::sdpa(
                &q,
                &k,
                &v,
                None,
                false,
                1. / (self.head_dim as f32).sqrt(),
                1.,
            )?
        } else {
            // MQA/GQA: each key/value head serves its `n_rep` query heads (candle repeats K
            // and V `n_rep` times for this, copying the whole cache every step). The query
            // heads of one key/value head are adjacent, so viewing q as `n_kv_head` heads
            // of `n_rep · seq_len` rows gives the same products with no copies.
            let n_rep = self.n_head / self.n_kv_head;
            let kv_len = k.dim(2)?;
            let q = q.reshape((b_sz, self.n_kv_head, n_rep * seq_len, self.head_dim))?;
            let att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
            let att = att.reshape((b_sz, self.n_head, seq_len, kv_len))?;
            let att = match mask {
                None => att,
                Some(mask) => {
                    let mask = mask.broadcast_as(att.shape())?;
                    masked_fill(&att, &mask, &self.neg_inf)?
                }
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let att = att.reshape((b_sz, self.n_kv_head, n_rep * seq_len, kv_len))?;
            att.matmul(&v)?
                .reshape((b_sz, self.n_head, seq_len, self.head_dim))?
        };

        y.transpose(1, 2)?
            .reshape((b_sz, seq_len, self.n_head * self.head_dim))
    }
}
