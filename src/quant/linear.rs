//! [`QLinear`]: a quantized linear layer (`y = x · Wᵀ`) over candle tensors that runs the
//! kernels of this module on the CPU, and candle's `QMatMul` everywhere else.
use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor};

use super::act::{ActKind, Acts};
use super::{Format, Isa, PackedMatrix};

/// A weight matrix `n × k` applied to the last dimension of its input.
#[derive(Clone, Debug)]
pub struct QLinear {
    inner: Inner,
}

#[derive(Clone, Debug)]
enum Inner {
    /// Repacked for this module's kernels (CPU, the formats of [`Format`]).
    Packed(Arc<PackedMatrix>),
    /// Anything else: CUDA/Metal tensors, other formats, float weights.
    Candle(QMatMul),
}

thread_local! {
    /// Quantized-activation buffers, one per encoding, reused across calls on this thread.
    static ACTS: RefCell<Vec<Acts>> = const { RefCell::new(Vec::new()) };
}

impl QLinear {
    /// Takes `qtensor` (`n × k`), repacked for the best instruction set of this CPU when it
    /// is on the CPU in a format with a kernel here; otherwise wrapped in candle's `QMatMul`.
    pub fn from_qtensor(qtensor: QTensor) -> Result<Self> {
        Self::from_qtensor_with_isa(qtensor, Isa::best())
    }

    /// As [`QLinear::from_qtensor`] with the instruction set chosen by the caller (which
    /// must be supported by this CPU).
    pub fn from_qtensor_with_isa(qtensor: QTensor, isa: Isa) -> Result<Self> {
        if !super::packs(
            qtensor.dtype(),
            qtensor.shape().dims(),
            qtensor.device().is_cpu(),
        ) {
            return Ok(Self {
                inner: Inner::Candle(QMatMul::from_qtensor(qtensor)?),
            });
        }
        let format = Format::from_ggml(qtensor.dtype()).expect("packs() checked the format");
        let (n, k) = qtensor.shape().dims2()?;
        let raw = qtensor.data()?;
        let packed =
            PackedMatrix::pack(format, &raw, n, k, isa).map_err(candle_core::Error::msg)?;
        Ok(Self {
            inner: Inner::Packed(Arc::new(packed)),
        })
    }

    /// Whether this layer runs this module's kernels (rather than candle's).
    pub fn is_native(&self) -> bool {
        matches!(self.inner, Inner::Packed(_))
    }

    /// The packed matrix, when native.
    pub fn packed(&self) -> Option<&PackedMatrix> {
        match &self.inner {
            Inner::Packed(p) => Some(p),
            Inner::Candle(_) => None,
        }
    }

    /// Applies every layer in `layers` to the same input, quantizing it once and running all
    /// their rows in one parallel region (e.g. the query, key and value projections).
    pub fn forward_many(layers: &[&QLinear], xs: &Tensor) -> Result<Vec<Tensor>> {
        let packed: Option<Vec<&PackedMatrix>> = layers.iter().map(|l| l.packed()).collect();
        let packed = match packed {
            Some(p) if xs.device().is_cpu() && !p.is_empty() => p,
            _ if !xs.device().is_cpu() && layers.iter().any(|l| l.is_native()) => {
                candle_core::bail!("qlinear: CPU weights applied to a {:?} input", xs.device())
            }
            // Mixed layers: each on its own (a single native layer takes the branch above).
            _ => return layers.iter().map(|l| l.forward(xs)).collect(),
        };
        let in_dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?.contiguous()?;
        let dims = x.dims();
        let Some((&k, batch)) = dims.split_last() else {
            candle_core::bail!("qlinear: input is a scalar");
        };
        if let Some(w) = packed.iter().find(|w| w.k() != k) {
            candle_core::bail!("qlinear: input {dims:?} does not match weight {w:?}");
        }
        let m: usize = batch.iter().product();
        let outs = {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("qlinear: input is not on the CPU");
            };
            let start = layout.start_offset();
            let slice = &cpu.as_slice::<f32>()?[start..start + m * k];
            ACTS.with(|cell| {
                let mut bufs = cell.borrow_mut();
                let mut kinds: Vec<(ActKind, Isa)> = Vec::new();
                for w in &packed {
                    if !kinds.contains(&(w.act_kind(), w.isa())) {
                        kinds.push((w.act_kind(), w.isa()));
                    }
                }
                for &(kind, isa) in &kinds {
                    let i = match bufs.iter().position(|a| a.kind() == kind) {
                        Some(i) => i,
                        None => {
                            bufs.push(Acts::new(kind));
                            bufs.len() - 1
                        }
                    };
                    bufs[i].quantize_into(slice, m, k, isa);
                }
                let acts: Vec<&Acts> = bufs
                    .iter()
                    .filter(|a| kinds.iter().any(|(k, _)| *k == a.kind()))
                    .collect();
                super::matmul_many(&packed, &acts)
            })
        };
        packed
            .iter()
            .zip(outs)
            .map(|(w, out)| {
                let mut shape = batch.to_vec();
                shape.push(w.n());
                Tensor::from_vec(out, shape, &Device::Cpu)?.to_dtype(in_dtype)
            })
            .collect()
    }
}

impl Module for QLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.inner {
            Inner::Candle(q @ QMatMul::QTensor(_)) => q.forward(xs),
            Inner::Candle(q) if xs.device().is_cpu() => row_by_row(q, xs),
            Inner::Candle(q) => q.forward(xs),
            Inner::Packed(_) => Ok(Self::forward_many(&[self], xs)?.remove(0)),
        }
    }
}

/// Float weights on the CPU, applied one input row at a time. candle's dense matmul may
/// compute a row differently depending on how many rows come with it (one row takes a
/// matrix-vector path), and a sequence's logits must not depend on its batch. Quantized
/// weights need no such care: this module's kernels and candle's quantized products compute
/// each row on its own. Only small tensors are float in the GGUFs served here (norms, and the
/// test models' output heads).
fn row_by_row(q: &QMatMul, xs: &Tensor) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let Some((&k, batch)) = dims.split_last() else {
        candle_core::bail!("qlinear: input is a scalar");
    };
    let m: usize = batch.iter().product();
    if m <= 1 {
        return q.forward(xs);
    }
    let x = xs.reshape((m, k))?;
    let rows = (0..m)
        .map(|i| q.forward(&x.narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    let out = Tensor::cat(&rows, 0)?;
    let mut shape = batch.to_vec();
    shape.push(out.dim(1)?);
    out.reshape(shape)
}
