//! Other versions of an existing GGUF: its F32 tensors rewritten, everything else copied.
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

/// Writes a copy of the GGUF at `src` to `dst` with every F32 tensor (the norms) multiplied
/// element-wise by `1 + U(-amount, amount)`: a second real version of a model, the same
/// architecture and tokenizer, whose outputs differ. Quantized tensors are copied as they are.
pub fn perturb_gguf(src: &Path, dst: &Path, seed: u64, amount: f32) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    rewrite_f32_tensors(src, dst, |_, v| {
        v.iter()
            .map(|x| x * (1.0 + rng.random_range(-amount..amount)))
            .collect()
    })
}

/// Writes a copy of the GGUF at `src` to `dst` with a NaN in its final norm: a broken version
/// whose weights, not its file, are bad.
pub fn poison_gguf_nan(src: &Path, dst: &Path) -> anyhow::Result<()> {
    rewrite_f32_tensors(src, dst, |name, mut v| {
        if name == "output_norm.weight" {
            v[0] = f32::NAN;
        }
        v
    })
}

/// Copies a GGUF, passing each F32 tensor's values through `f` (in name order).
fn rewrite_f32_tensors(
    src: &Path,
    dst: &Path,
    mut f: impl FnMut(&str, Vec<f32>) -> Vec<f32>,
) -> anyhow::Result<()> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(src)?);
    let ct = gguf_file::Content::read(&mut reader)?;
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = ct.tensor(&mut reader, name, &Device::Cpu)?;
        let t = if t.dtype() == GgmlDType::F32 {
            let v = t.dequantize(&Device::Cpu)?;
            let values = f(name, v.flatten_all()?.to_vec1::<f32>()?);
            QTensor::quantize(
                &Tensor::from_vec(values, v.shape(), &Device::Cpu)?,
                GgmlDType::F32,
            )?
        } else {
            t
        };
        tensors.push((name.clone(), t));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    metadata.sort_by_key(|(k, _)| *k);
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(dst)?);
    gguf_file::write(&mut file, &metadata, &ts)?;
    std::io::Write::flush(&mut file)?;
    Ok(())
}
