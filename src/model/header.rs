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

use candle_core::quantized::gguf_file::{Content, Value};
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

/// Heap of one candle `Value` (`Value::Array`'s `Vec` or `Value::String`'s `String`, plus
/// its tag).
const VALUE_BYTES: u64 = std::mem::size_of::<Value>() as u64;

/// Heap per entry of a `HashMap<String, V>` with `V` of `entry` bytes (key included), growth
/// included: hashbrown keeps up to 8/7 × the next power of two buckets, each with a control
/// byte, and holds the old and the new table while it grows.
fn map_entry_heap(entry: u64) -> u64 {
    4 * (entry + 1)
}

/// Heap a string of `len` file bytes takes in candle: the raw bytes, then a lossy UTF-8 copy
/// (up to 3 bytes per invalid byte).
fn string_heap(len: u64) -> u64 {
    4 * len
}

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

fn value_type_name(t: u32) -> &'static str {
    match t {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => "unknown",
    }
}

/// Bytes one value of a scalar type takes in the file; `None` for strings and arrays.
fn scalar_size(t: u32) -> Option<u64> {
    match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A forward-only reader over the header that knows where it is and how much is left.
struct Walk<'a, R> {
    r: &'a mut R,
    /// Absolute position.
    pos: u64,
    /// Absolute end of the file.
    end: u64,
    /// Bytes of a length prefix: 4 in GGUF v1, 8 after.
    prefix: u64,
    /// Heap candle's reader will take for what was walked so far, and its limit.
    heap: u64,
    heap_cap: u64,
}

impl<R: Read> Walk<'_, R> {
    /// Adds `bytes` to the heap estimate; past the limit, the file is refused at once
    /// (before the walk itself holds that much).
    fn charge(&mut self, bytes: u64) -> Result<(), String> {
        self.heap = self.heap.saturating_add(bytes);
        if self.heap > self.heap_cap {
            return Err(format!(
                "the header would take more than {} bytes of memory once parsed (the limit is {HEADER_HEAP_PER_FILE_BYTE} bytes per byte of the file, at most {}): not a model file",
                self.heap_cap,
                show(MAX_HEADER_HEAP)
            ));
        }
        Ok(())
    }

    fn left(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], String> {
        if self.left() < N as u64 {
            return Err(format!(
                "{} at byte {}: the file ends there (truncated?)",
                what(),
                self.pos
            ));
        }
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("{} at byte {}: {e}", what(), self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn len(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        if self.prefix == 4 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    /// Skips `n` bytes known to be in the file.
    fn skip(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<(), String> {
        let copied = std::io::copy(&mut (&mut *self.r).take(n), &mut std::io::sink())
            .map_err(|e| format!("{} at byte {}: {e}", what(), self.pos))?;
        if copied != n {
            return Err(format!(
                "{} at byte {}: the file ends there (truncated?)",
                what(),
                self.pos
            ));
        }
        self.pos += n;
        Ok(())
    }

    /// A length-prefixed string's length, checked against `max` and the bytes left.
    fn string_len(&mut self, what: &dyn Fn() -> String, max: u64) -> Result<u64, String> {
        let start = self.pos;
        let len = self.len(what)?;
        if len > max {
            return Err(format!(
                "{} at byte {start} is {} bytes long (the limit is {})",
                what(),
                show(len),
                show(max)
            ));
        }
        if len > self.left() {
            return Err(format!(
                "{} at byte {start} is {} bytes long but only {} bytes are left in the file (truncated?)",
                what(),
                show(len),
                self.left()
            ));
        }
        self.charge(string_heap(len))?;
        Ok(len)
    }

    /// A key or a name, as candle will see it (trailing NULs dropped, lossy UTF-8).
    fn name(&mut self, what: &dyn Fn() -> String) -> Result<String, String> {
        let len = self.string_len(what, MAX_NAME_LEN)?;
        let mut v = vec![0u8; len as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| format!("{} at byte {}: {e}", what(), self.pos))?;
        self.pos += len;
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// Walks (and skips) one value of type `t`.
    fn value(&mut self, t: u32, depth: usize, what: &dyn Fn() -> String) -> Result<(), String> {
        if let Some(size) = scalar_size(t) {
            if t == 7 {
                let [b] = self.bytes::<1>(what)?;
                if b > 1 {
                    return Err(format!("{}: bool byte is {b}, must be 0 or 1", what()));
                }
                return Ok(());
            }
            return self.skip(size, what).map_err(|_| {
                format!(
                    "{} ({}) at byte {}: the file ends there (truncated?)",
                    what(),
                    value_type_name(t),
                    self.pos
                )
            });
        }
        match t {
            8 => {
                let len = self.string_len(what, MAX_STRING_LEN)?;
                self.skip(len, what)
            }
            9 => {
                if depth >= MAX_NESTING {
                    return Err(format!(
                        "{}: arrays nested more than {MAX_NESTING} deep",
                        what()
                    ));
                }
                let et = self.u32(&|| format!("{}: array element type", what()))?;
                if et > 12 {
                    return Err(format!("{}: array of unknown value type {et}", what()));
                }
                let start = self.pos;
                let n = self.len(&|| format!("{}: array length", what()))?;
                if n > MAX_ARRAY_LEN {
                    return Err(format!(
                        "{}: array length {} exceeds the limit of {}",
                        what(),
                        show(n),
                        show(MAX_ARRAY_LEN)
                    ));
                }
                let min = match (scalar_size(et), et) {
                    (Some(s), _) => s,
                    (None, 8) => self.prefix,
                    _ => 4 + self.prefix,
                };
                if n.saturating_mul(min) > self.left() {
                    return Err(format!(
                        "{}: array at byte {start} of {} {} values needs at least {} bytes but only {} are left in the file (truncated?)",
                        what(),
                        show(n),
                        value_type_name(et),
                        n.saturating_mul(min),
                        self.left()
                    ));
                }
                // candle pushes every element into a `Vec<Value>` (capacity up to twice the
                // length; old and new buffer both live while it grows).
                self.charge(n.saturating_mul(3 * VALUE_BYTES))?;
                match scalar_size(et) {
                    Some(_) if et != 7 => self.skip(n * min, what),
                    _ => {
                        for i in 0..n {
                            if i % 4096 == 4095 {
                                // A background load may hand the CPU to serving here.
                                crate::turns::pace();
                            }
                            self.value(et, depth + 1, &|| format!("{}[{i}]", what()))?;
                        }
                        Ok(())
                    }
                }
            }
            _ => Err(format!("{}: unknown value type {t}", what())),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn check(bytes: &[u8]) -> Result<GgufHeader, String> {
        check_gguf_header(&mut Cursor::new(bytes))
    }

    /// A v3 header with `kvs` (key, type, raw value bytes) and `tensors` (name, dims, type,
    /// offset), then `data` bytes of padding.
    fn gguf(
        kvs: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], u32, u64)],
        data: usize,
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (k, t, v) in kvs {
            s(&mut b, k);
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        for (name, dims, t, off) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        b.extend(vec![0u8; data]);
        b
    }

    #[test]
    fn alignment_zero_is_an_error_not_a_panic() {
        let bytes = gguf(
            &[("general.alignment", 4, 0u32.to_le_bytes().to_vec())],
            &[],
            64,
        );
        let e = check(&bytes).unwrap_err();
        assert!(
            e.contains("general.alignment is 0: must be a power of two"),
            "{e}"
        );
        // Through the whole path too (candle alone divides by zero here).
        let e = read_gguf(&mut Cursor::new(&bytes)).unwrap_err();
        assert!(e.contains("general.alignment is 0"), "{e}");
        for bad in [3u32, 48] {
            let bytes = gguf(
                &[("general.alignment", 4, bad.to_le_bytes().to_vec())],
                &[],
                64,
            );
            assert!(check(&bytes).unwrap_err().contains("power of two"));
        }
        let bytes = gguf(
            &[("general.alignment", 10, 64u64.to_le_bytes().to_vec())],
            &[],
            64,
        );
        assert!(check(&bytes).unwrap_err().contains("has type u64"));
        let bytes = gguf(
            &[("general.alignment", 4, 64u32.to_le_bytes().to_vec())],
            &[],
            64,
        );
        let h = check(&bytes).unwrap();
        assert_eq!((h.alignment, h.tensor_data_offset), (64, 64));
        let (ct, _) = read_gguf(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(ct.tensor_data_offset, h.tensor_data_offset);
    }

    #[test]
    fn empty_and_short_files_say_so() {
        for n in [0usize, 3, 7] {
            let e = check(&b"GGUF\x03\0\0\0"[..n]).unwrap_err();
            assert_eq!(
                e,
                format!("file is {n} bytes: too short to be a GGUF file (the header is at least 24 bytes)")
            );
        }
        let e = check(b"GGUF\x03\0\0\0\0\0\0\0").unwrap_err();
        assert!(
            e.contains("file is 12 bytes: too short to be a GGUF v3 file"),
            "{e}"
        );
        let e = check(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0").unwrap_err();
        assert!(e.contains("not a GGUF file"), "{e}");
    }

    #[test]
    fn huge_counts_and_lengths_are_errors_without_huge_allocations() {
        let mut bytes = gguf(&[], &[], 0);
        bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = check(&bytes).unwrap_err();
        assert!(
            e.contains("tensor count 1099511627776 (2^40) exceeds what a 24-byte file can hold"),
            "{e}"
        );
        let mut bytes = gguf(&[("a", 4, vec![0; 4])], &[], 0);
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check(&bytes).unwrap_err().contains("metadata count"));
        // A key length past the end of the file.
        let mut bytes = gguf(&[("a", 4, vec![0; 4])], &[], 0);
        bytes[24..32].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let e = check(&bytes).unwrap_err();
        assert!(
            e.contains("metadata key #0") && e.contains("bytes long"),
            "{e}"
        );
        // A string value as long as the whole address space.
        let mut v = u64::MAX.to_le_bytes().to_vec();
        v.extend(b"abc");
        let e = check(&gguf(&[("s", 8, v)], &[], 0)).unwrap_err();
        assert!(
            e.contains("metadata `s`") && e.contains("bytes long"),
            "{e}"
        );
        // An array longer than the file.
        let mut v = 4u32.to_le_bytes().to_vec();
        v.extend((1u64 << 30).to_le_bytes());
        let e = check(&gguf(&[("arr", 9, v)], &[], 16)).unwrap_err();
        assert!(
            e.contains("metadata `arr`: array") && e.contains("needs at least"),
            "{e}"
        );
        // An array of u8s that would take 96 bytes of memory per byte of file.
        let mut v = 0u32.to_le_bytes().to_vec();
        v.extend(10_000u64.to_le_bytes());
        v.extend(vec![0u8; 10_000]);
        let e = check(&gguf(&[("bytes", 9, v)], &[], 0)).unwrap_err();
        assert!(e.contains("would take more than"), "{e}");
    }

    #[test]
    fn tensor_infos_are_bounded() {
        let one = |dims: &[u64], t: u32, off: u64, data: usize| {
            check(&gguf(&[], &[("t", dims, t, off)], data))
        };
        assert!(one(&[32], 8, 0, 34 + 64).is_ok());
        let e = one(&[1 << 32, 1 << 32, 2], 0, 0, 64).unwrap_err();
        assert!(e.contains("product overflows"), "{e}");
        let e = one(&[1, 2, 3, 4, 5], 0, 0, 64).unwrap_err();
        assert!(e.contains("5 dimensions"), "{e}");
        let e = one(&[33], 8, 0, 64).unwrap_err();
        assert!(e.contains("multiple of the block size 32"), "{e}");
        let e = one(&[32], 99, 0, 64).unwrap_err();
        assert!(e.contains("unknown tensor type 99"), "{e}");
        let e = one(&[32], 8, u64::MAX - 8, 64).unwrap_err();
        assert!(e.contains("ends past the end"), "{e}");
        let e = one(&[1 << 40], 0, 0, 64).unwrap_err();
        assert!(e.contains("takes 4398046511104 (2^42) bytes"), "{e}");
        // Found by tests/fuzz.rs: the byte count itself overflowed.
        let e = one(&[1 << 62, 2], 0, 0, 64).unwrap_err();
        assert!(e.contains("takes more than 2^64 bytes"), "{e}");
        let twice = gguf(&[], &[("t", &[4], 0, 0), ("t", &[4], 0, 32)], 64);
        assert!(check(&twice).unwrap_err().contains("appears twice"));
    }
}
