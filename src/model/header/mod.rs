//! Bounds checks on model file headers before candle reads them.
//!
//! candle's GGUF reader trusts parts of the header: `general.alignment = 0` divides by zero,
//! a dimension product can overflow, and every count, length and array is allocated before
//! anything says whether it is sane. [`check_gguf_header`] walks the whole GGUF header
//! itself first, with every value bounded by what the file can hold, and says in words what
//! is wrong; [`read_gguf`] runs it and then candle's reader (with a panic caught as a last
//! resort), and is how swapd reads every GGUF header. `super::safetensors` does the same
//! for a safetensors file.
use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;

/// Bytes of a GGUF v2/v3 header before its first key: magic, version, two u64 counts.
pub const GGUF_MIN_HEADER: u64 = 24;

/// The alignment candle uses when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;

/// candle's own caps (GGUF_MAX_STRING_LENGTH, GGUF_MAX_ARRAY_ELEMENTS, GGML_MAX_DIMS).
const MAX_STRING_LEN: u64 = 1 << 30;
const MAX_ARRAY_LEN: u64 = 1 << 30;
const MAX_DIMS: u32 = 4;

/// Longest metadata key or tensor name (llama.cpp's names are under 64 bytes).
const MAX_NAME_LEN: u64 = 1 << 16;

/// Arrays nested deeper than this are refused (GGUF files in practice never nest; candle
/// allows 64).
const MAX_NESTING: usize = 8;

/// Most heap the parsed header may take (candle's `Content`): real headers (a 256k-token
/// vocabulary included) take tens of MB.
pub const MAX_HEADER_HEAP: u64 = 1 << 30;

/// ... and at most this many bytes of heap per byte of file: a model's header is a small
/// part of its file (the weights are the rest), so a file that would expand more than this
/// is not a model, whatever its size.
pub const HEADER_HEAP_PER_FILE_BYTE: u64 = 16;

#[cfg(test)]
mod tests;
mod walk;

use walk::{map_entry_heap, value_type_name, Walk, VALUE_BYTES};

/// What [`check_gguf_header`] learnt about a GGUF header that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufHeader {
    /// 1, 2 or 3.
    pub version: u32,
    pub tensor_count: u64,
    pub metadata_count: u64,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    /// Where tensor data starts (absolute), as candle computes it.
    pub tensor_data_offset: u64,
    /// Bytes of the file (from where the header starts).
    pub file_len: u64,
    /// Upper bound on the heap candle's `Content::read` takes for this header.
    pub heap_estimate: u64,
    /// Bytes every tensor takes as stored, summed.
    pub tensor_bytes: u64,
}

/// A GGUF tensor type candle knows, from its number in the file.
pub fn ggml_dtype(code: u32) -> Option<GgmlDType> {
    use GgmlDType as G;
    Some(match code {
        0 => G::F32,
        1 => G::F16,
        2 => G::Q4_0,
        3 => G::Q4_1,
        6 => G::Q5_0,
        7 => G::Q5_1,
        8 => G::Q8_0,
        9 => G::Q8_1,
        10 => G::Q2K,
        11 => G::Q3K,
        12 => G::Q4K,
        13 => G::Q5K,
        14 => G::Q6K,
        15 => G::Q8K,
        30 => G::BF16,
        _ => return None,
    })
}

/// `n`, with `(2^k)` after it when it is a large power of two.
pub(super) fn show(n: u64) -> String {
    if n >= 1 << 16 && n.is_power_of_two() {
        format!("{n} (2^{})", n.trailing_zeros())
    } else {
        n.to_string()
    }
}

/// Walks the GGUF header at the reader's position with every count, length and size bounded
/// by the file, and puts the reader back where it was. Errors say what is wrong and where.
pub fn check_gguf_header<R: Read + Seek>(reader: &mut R) -> Result<GgufHeader, String> {
    let start = reader.stream_position().map_err(|e| e.to_string())?;
    let end = reader.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    let result = walk_gguf(reader, start, end);
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    result
}

fn walk_gguf<R: Read>(reader: &mut R, start: u64, end: u64) -> Result<GgufHeader, String> {
    let file_len = end.saturating_sub(start);
    let too_short = |what: &str| {
        format!(
            "file is {file_len} bytes: too short to be a GGUF file ({what} is at least {GGUF_MIN_HEADER} bytes)"
        )
    };
    if file_len < 8 {
        return Err(too_short("the header"));
    }
    let mut w = Walk {
        r: reader,
        pos: start,
        end,
        prefix: 8,
        heap: 0,
        heap_cap: MAX_HEADER_HEAP.min(file_len.saturating_mul(HEADER_HEAP_PER_FILE_BYTE)),
    };
    let magic = w.bytes::<4>(&|| "magic".into())?;
    match &magic {
        b"GGUF" => {}
        b"FUGG" => {
            return Err("a big-endian GGUF file: only little-endian GGUF is supported".into())
        }
        m => {
            return Err(format!(
                "not a GGUF file: it starts with bytes {:02x} {:02x} {:02x} {:02x} ({:?}), not \"GGUF\"",
                m[0],
                m[1],
                m[2],
                m[3],
                String::from_utf8_lossy(m)
            ))
        }
    }
    let version = w.u32(&|| "version".into())?;
    match version {
        1 => w.prefix = 4,
        2 | 3 => {}
        v => {
            return Err(format!(
                "GGUF version {v} is not supported (only 1, 2 and 3)"
            ))
        }
    }
    let header_len = 8 + 2 * w.prefix;
    if file_len < header_len {
        return Err(format!(
            "file is {file_len} bytes: too short to be a GGUF v{version} file (the header is at least {header_len} bytes)"
        ));
    }
    let tensor_count = w.len(&|| "tensor count".into())?;
    let metadata_count = w.len(&|| "metadata count".into())?;
    let min_kv = w.prefix + 4 + 1;
    let min_tensor = w.prefix + 4 + 4 + 8;
    for (what, n, min) in [
        ("tensor count", tensor_count, min_tensor),
        ("metadata count", metadata_count, min_kv),
    ] {
        if n.saturating_mul(min) > w.left() {
            return Err(format!(
                "{what} {} exceeds what a {file_len}-byte file can hold (each takes at least {min} bytes; truncated or corrupt?)",
                show(n)
            ));
        }
    }
    if (metadata_count * min_kv).saturating_add(tensor_count * min_tensor) > w.left() {
        return Err(format!(
            "{} tensors and {} metadata entries need at least {} bytes but the file has {file_len} (truncated or corrupt?)",
            show(tensor_count),
            show(metadata_count),
            metadata_count * min_kv + tensor_count * min_tensor + header_len
        ));
    }
    w.charge(
        metadata_count
            .saturating_mul(map_entry_heap(24 + VALUE_BYTES))
            .saturating_add(tensor_count.saturating_mul(map_entry_heap(24 + 40))),
    )?;

    let mut keys = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..metadata_count {
        let key = w.name(&|| format!("metadata key #{i}"))?;
        let what = || format!("metadata `{key}`");
        let t = w.u32(&|| format!("{}: value type", what()))?;
        if t > 12 {
            return Err(format!("{}: unknown value type {t}", what()));
        }
        if key == "general.alignment" {
            // candle honours only these types; any other it ignores (using 32), which would
            // read every tensor from the wrong place.
            let v: i64 = match t {
                0 => w.bytes::<1>(&what)?[0] as i64,
                1 => w.bytes::<1>(&what)?[0] as i8 as i64,
                2 => u16::from_le_bytes(w.bytes::<2>(&what)?) as i64,
                3 => i16::from_le_bytes(w.bytes::<2>(&what)?) as i64,
                4 => w.u32(&what)? as i64,
                5 => w.u32(&what)? as i32 as i64,
                _ => {
                    return Err(format!(
                        "general.alignment has type {}: it must be an unsigned integer (u32)",
                        value_type_name(t)
                    ))
                }
            };
            if v <= 0 || !(v as u64).is_power_of_two() {
                return Err(format!(
                    "general.alignment is {v}: must be a power of two (e.g. 32)"
                ));
            }
            alignment = v as u64;
        } else {
            w.value(t, 0, &what)?;
        }
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    drop(keys);

    struct Info {
        name: String,
        bytes: u64,
        offset: u64,
    }
    let mut names = HashSet::new();
    let mut infos = Vec::new();
    for i in 0..tensor_count {
        let name = w.name(&|| format!("tensor name #{i}"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = w.u32(&|| format!("{}: dimension count", what()))?;
        if n_dims > MAX_DIMS {
            return Err(format!(
                "{} has {n_dims} dimensions, at most {MAX_DIMS} are allowed",
                what()
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(if w.prefix == 4 {
                w.u32(&|| format!("{}: dimension {d}", what()))? as u64
            } else {
                w.u64(&|| format!("{}: dimension {d}", what()))?
            });
        }
        // Each tensor info holds a `Shape` of its dimensions.
        w.charge(16 * n_dims as u64)?;
        let code = w.u32(&|| format!("{}: type", what()))?;
        let dtype =
            ggml_dtype(code).ok_or_else(|| format!("{} has unknown tensor type {code}", what()))?;
        let offset = w.u64(&|| format!("{}: offset", what()))?;
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= usize::MAX as u64)
            .ok_or_else(|| {
                format!(
                    "{} has dimensions {dims:?}, whose product overflows",
                    what()
                )
            })?;
        let block = dtype.block_size() as u64;
        // The file lists the innermost dimension first; candle requires it (its last) to be
        // a whole number of blocks.
        if block > 1 && (dims.is_empty() || dims[0] % block != 0) {
            return Err(format!(
                "{} is {dtype:?} with dimensions {dims:?}: its first dimension must be a multiple of the block size {block}",
                what()
            ));
        }
        let bytes = match (elems / block).checked_mul(dtype.type_size() as u64) {
            Some(b) if b <= file_len => b,
            b => {
                return Err(format!(
                    "{} takes {} bytes ({dims:?} {dtype:?}) but the file has {file_len}",
                    what(),
                    b.map_or("more than 2^64".to_string(), show)
                ))
            }
        };
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        infos.push(Info {
            name,
            bytes,
            offset,
        });
    }
    drop(names);

    let tensor_data_offset = w.pos.div_ceil(alignment).saturating_mul(alignment);
    let mut tensor_bytes = 0u64;
    for t in &infos {
        let end = tensor_data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.bytes));
        match end {
            Some(e) if e <= file_len => {}
            _ => {
                return Err(format!(
                    "tensor `{}` ({} bytes at offset {} past the data start {tensor_data_offset}) ends past the end of the {file_len}-byte file (truncated?)",
                    t.name, t.bytes, t.offset
                ))
            }
        }
        tensor_bytes += t.bytes;
    }
    Ok(GgufHeader {
        version,
        tensor_count,
        metadata_count,
        alignment,
        tensor_data_offset,
        file_len,
        heap_estimate: w.heap,
        tensor_bytes,
    })
}

/// Reads a GGUF header the safe way: [`check_gguf_header`], then candle's reader, whose
/// panics (there should be none left) become errors. The reader is left where candle's
/// leaves it.
pub fn read_gguf<R: Read + Seek>(reader: &mut R) -> Result<(Content, GgufHeader), String> {
    let header = check_gguf_header(reader)?;
    // candle's reader cannot pause: a background load runs it beside serving.
    let ct = crate::turns::unpaced(|| catch_unwind(AssertUnwindSafe(|| Content::read(reader))))
        .map_err(|p| {
            format!(
                "the GGUF reader panicked: {}",
                crate::panic::message(p.as_ref())
            )
        })?
        .map_err(|e| e.to_string())?;
    Ok((ct, header))
}
