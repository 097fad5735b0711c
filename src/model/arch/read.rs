//! Reading one tensor of a GGUF file, as candle's `Content::tensor` does (the same checks and
//! errors), in megabyte reads with a [`crate::turns::pace`] between them: a background load
//! hands the CPU to serving while it reads a large table. SmolLM2's embedding is 30 MB, and
//! read in one piece it held the CPU for about 50 ms while every stream waited.
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{ggml_file, QTensor};
use candle_core::{Device, Result};

/// Tensor `name` of `ct`, read from `reader`.
pub(crate) fn tensor<R: Read + Seek>(
    ct: &Content,
    reader: &mut R,
    name: &str,
    device: &Device,
) -> Result<QTensor> {
    let Some(info) = ct.tensor_infos.get(name) else {
        candle_core::bail!("cannot find tensor info for {name}")
    };
    let elems = info.shape.elem_count();
    let block_size = info.ggml_dtype.block_size();
    if !elems.is_multiple_of(block_size) {
        candle_core::bail!(
            "the number of elements {elems} is not divisible by the block size {block_size}"
        )
    }
    let size = elems / block_size * info.ggml_dtype.type_size();
    let start = ct.tensor_data_offset.saturating_add(info.offset);
    let file_size = reader.seek(SeekFrom::End(0))?;
    let remaining = file_size.saturating_sub(start);
    if size as u64 > remaining {
        candle_core::bail!(
            "tensor needs {size} bytes at offset {start}, only {remaining} remaining in file"
        )
    }
    let mut raw = vec![0u8; size];
    reader.seek(SeekFrom::Start(start))?;
    for part in raw.chunks_mut(1 << 20) {
        crate::turns::pace();
        reader.read_exact(part)?;
    }
    let dims = info.shape.dims().to_vec();
    let build = || ggml_file::qtensor_from_ggml(info.ggml_dtype, &raw, dims, device);
    if size > UNPACED_ABOVE {
        // candle copies the bytes into its blocks in one piece that cannot pause (about
        // 30 ms for SmolLM2's embedding): a background load runs it beside serving.
        crate::turns::unpaced(build)
    } else {
        build()
    }
}

/// Tensors larger than this are built outside a background load's turn.
const UNPACED_ABOVE: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// The same tensors, bit for bit, as candle's reader, and its error for a missing one.
    #[test]
    fn reads_what_candles_reader_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::model::synth::write_tiny_llama_gguf(&path, &Default::default()).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = Content::read(&mut f).unwrap();
        let dev = Device::Cpu;
        for name in ct.tensor_infos.keys() {
            let ours = tensor(&ct, &mut f, name, &dev).unwrap();
            let theirs = ct.tensor(&mut f, name, &dev).unwrap();
            assert_eq!(ours.dtype(), theirs.dtype(), "{name}");
            assert_eq!(ours.shape(), theirs.shape(), "{name}");
            assert_eq!(ours.data().unwrap(), theirs.data().unwrap(), "{name}");
        }
        // The first line: candle appends a backtrace when RUST_BACKTRACE is set.
        let first = |e: candle_core::Error| e.to_string().lines().next().unwrap().to_string();
        let ours = first(tensor(&ct, &mut f, "nope", &dev).unwrap_err());
        assert_eq!(ours, first(ct.tensor(&mut f, "nope", &dev).unwrap_err()));
    }
}
