//! Bounds checks on a safetensors header before the loader reads it: the length prefix, the
//! JSON, and every tensor's dtype, shape and byte range against the file.
use std::collections::HashSet;
use std::io::Read;

use super::header::show;
/// safetensors' own limit on the JSON header.
pub const SAFETENSORS_MAX_HEADER: u64 = 100_000_000;

/// What [`check_safetensors_header`] learnt about a safetensors file that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsHeader {
    /// Bytes of the JSON header.
    pub header_len: u64,
    pub tensor_count: usize,
    /// Bytes of tensor data (the file after the header).
    pub data_bytes: u64,
}

/// One tensor entry of a safetensors header.
#[derive(serde::Deserialize)]
struct StEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The header: tensors by name (in file order) and `__metadata__`, which is skipped.
struct StHeader(Vec<(String, StEntry)>);

impl<'de> serde::Deserialize<'de> for StHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<StHeader, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    if k == "__metadata__" {
                        m.next_value::<std::collections::HashMap<String, String>>()?;
                    } else {
                        let e = m.next_value::<StEntry>()?;
                        out.push((k, e));
                    }
                }
                Ok(StHeader(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Bits per element of a safetensors dtype candle can load.
fn st_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "U8" | "F8_E4M3" | "F8_E8M0" => 8,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "U16" | "I16" | "F16" | "BF16" => 16,
        "U32" | "I32" | "F32" => 32,
        "I64" | "F64" => 64,
        _ => return None,
    })
}

/// Checks the header of the safetensors file `reader` (`file_len` bytes): its length against
/// the file, its JSON, and every tensor's type, shape and offsets against the data; reads
/// only the header.
pub fn check_safetensors_header<R: Read>(
    reader: &mut R,
    file_len: u64,
) -> Result<SafetensorsHeader, String> {
    if file_len < 8 {
        return Err(format!(
            "file is {file_len} bytes: too short to be a safetensors file (it starts with an 8-byte header length)"
        ));
    }
    let mut n = [0u8; 8];
    reader.read_exact(&mut n).map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(n);
    if n > file_len - 8 {
        return Err(format!(
            "header length {} exceeds the {} bytes the {file_len}-byte file has after it",
            show(n),
            file_len - 8
        ));
    }
    if n > SAFETENSORS_MAX_HEADER {
        return Err(format!(
            "header length {} exceeds safetensors' limit of {SAFETENSORS_MAX_HEADER} bytes",
            show(n)
        ));
    }
    let mut text = vec![0u8; n as usize];
    reader
        .read_exact(&mut text)
        .map_err(|e| format!("header: {e}"))?;
    let text = std::str::from_utf8(&text).map_err(|e| format!("header is not UTF-8: {e}"))?;
    let StHeader(mut entries) =
        serde_json::from_str(text).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let data_bytes = file_len - 8 - n;
    // JSON allows a key twice; safetensors keeps the last (found by tests/fuzz.rs).
    let mut names = HashSet::new();
    if let Some((name, _)) = entries.iter().find(|(k, _)| !names.insert(k.as_str())) {
        return Err(format!("tensor `{name}` appears twice in the header"));
    }
    drop(names);
    entries.sort_by_key(|(_, e)| e.data_offsets);
    let mut at = 0u64;
    for (name, e) in &entries {
        let bits = st_bits(&e.dtype).ok_or_else(|| {
            format!(
                "tensor `{name}` has type `{}`, which is not supported",
                e.dtype
            )
        })?;
        let (s, t) = e.data_offsets;
        let elems = e
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                format!(
                    "tensor `{name}` has shape {:?}, whose product overflows",
                    e.shape
                )
            })?;
        let nbits = elems.checked_mul(bits).ok_or_else(|| {
            format!(
                "tensor `{name}` has shape {:?}, whose size overflows",
                e.shape
            )
        })?;
        if nbits % 8 != 0 {
            return Err(format!(
                "tensor `{name}` ({} {:?}) is not a whole number of bytes",
                e.dtype, e.shape
            ));
        }
        if s != at || t < s {
            return Err(format!(
                "tensor `{name}` has data offsets [{s}, {t}]: expected it to start at {at} (tensors must be contiguous, in order)"
            ));
        }
        if t - s != nbits / 8 {
            return Err(format!(
                "tensor `{name}` ({} {:?}) takes {} bytes but its data offsets [{s}, {t}] hold {}",
                e.dtype,
                e.shape,
                nbits / 8,
                t - s
            ));
        }
        if t > data_bytes {
            return Err(format!(
                "tensor `{name}` ends at data byte {t} but the file has {data_bytes} bytes of data (truncated?)"
            ));
        }
        at = t;
    }
    if at != data_bytes {
        return Err(format!(
            "the tensors cover {at} bytes of data but the file has {data_bytes} after the header"
        ));
    }
    Ok(SafetensorsHeader {
        header_len: n,
        tensor_count: entries.len(),
        data_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn st(header: &str, data: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; data]);
        b
    }

    fn check_st(bytes: &[u8]) -> Result<SafetensorsHeader, String> {
        check_safetensors_header(&mut Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn safetensors_headers_are_bounded() {
        let good = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        assert_eq!(check_st(&st(good, 16)).unwrap().tensor_count, 1);
        let e = check_st(b"").unwrap_err();
        assert!(
            e.starts_with("file is 0 bytes: too short to be a safetensors file"),
            "{e}"
        );
        let mut huge = st(good, 16);
        huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = check_st(&huge).unwrap_err();
        assert!(
            e.contains("header length 1099511627776 (2^40) exceeds"),
            "{e}"
        );
        let e = check_st(&st("{\"a\":", 0)).unwrap_err();
        assert!(e.starts_with("header is not valid JSON"), "{e}");
        let e = check_st(&st(good, 8)).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let bad = good.replace("[2,2]", "[4294967296,4294967296,16]");
        assert!(check_st(&st(&bad, 16)).unwrap_err().contains("overflows"));
        let bad = good.replace("F32", "C64");
        assert!(check_st(&st(&bad, 16))
            .unwrap_err()
            .contains("not supported"));
        // Found by tests/fuzz.rs (a bit flip made two names equal): safetensors keeps the
        // last entry and then finds a gap.
        let twice = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
        let e = check_st(&st(twice, 16)).unwrap_err();
        assert!(e.contains("tensor `a` appears twice"), "{e}");
    }
}
