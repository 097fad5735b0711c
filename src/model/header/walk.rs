//! The bounded walk over a GGUF header's values: a forward-only reader that knows where it
//! is, how much of the file is left, and how much heap candle's reader will take for what it
//! has walked.
use std::io::Read;

use candle_core::quantized::gguf_file::Value;

use super::{
    show, HEADER_HEAP_PER_FILE_BYTE, MAX_ARRAY_LEN, MAX_HEADER_HEAP, MAX_NAME_LEN, MAX_NESTING,
    MAX_STRING_LEN,
};

/// Heap of one candle `Value` (`Value::Array`'s `Vec` or `Value::String`'s `String`, plus
/// its tag).
pub(super) const VALUE_BYTES: u64 = std::mem::size_of::<Value>() as u64;

/// Heap per entry of a `HashMap<String, V>` with `V` of `entry` bytes (key included), growth
/// included: hashbrown keeps up to 8/7 × the next power of two buckets, each with a control
/// byte, and holds the old and the new table while it grows.
pub(super) fn map_entry_heap(entry: u64) -> u64 {
    4 * (entry + 1)
}

/// Heap a string of `len` file bytes takes in candle: the raw bytes, then a lossy UTF-8 copy
/// (up to 3 bytes per invalid byte).
pub(super) fn string_heap(len: u64) -> u64 {
    4 * len
}

pub(super) fn value_type_name(t: u32) -> &'static str {
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
pub(super) fn scalar_size(t: u32) -> Option<u64> {
    match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A forward-only reader over the header that knows where it is and how much is left.
pub(super) struct Walk<'a, R> {
    pub(super) r: &'a mut R,
    /// Absolute position.
    pub(super) pos: u64,
    /// Absolute end of the file.
    pub(super) end: u64,
    /// Bytes of a length prefix: 4 in GGUF v1, 8 after.
    pub(super) prefix: u64,
    /// Heap candle's reader will take for what was walked so far, and its limit.
    pub(super) heap: u64,
    pub(super) heap_cap: u64,
}

impl<R: Read> Walk<'_, R> {
    /// Adds `bytes` to the heap estimate; past the limit, the file is refused at once
    /// (before the walk itself holds that much).
    pub(super) fn charge(&mut self, bytes: u64) -> Result<(), String> {
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

    pub(super) fn left(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    pub(super) fn bytes<const N: usize>(
        &mut self,
        what: &dyn Fn() -> String,
    ) -> Result<[u8; N], String> {
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

    pub(super) fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    pub(super) fn len(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        if self.prefix == 4 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    /// Skips `n` bytes known to be in the file.
    pub(super) fn skip(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<(), String> {
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
    pub(super) fn string_len(
        &mut self,
        what: &dyn Fn() -> String,
        max: u64,
    ) -> Result<u64, String> {
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
    pub(super) fn name(&mut self, what: &dyn Fn() -> String) -> Result<String, String> {
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
    pub(super) fn value(
        &mut self,
        t: u32,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<(), String> {
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
