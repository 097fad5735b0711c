//! File verification: existence, sha256 against the manifest, and the version id derived
//! from the digests.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{FileDigest, ModelError};

/// sha256 of a file as lower-case hex, streamed so large files need no extra memory.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        // A background verify hands the CPU to serving between slices.
        crate::turns::pace();
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// Checks each `(name, path)` exists and matches the pinned digest for `name`.
pub fn verify_files(
    model: &str,
    files: &[(String, PathBuf)],
    pinned: &BTreeMap<String, String>,
) -> Result<Vec<FileDigest>, ModelError> {
    files
        .iter()
        .map(|(name, path)| {
            let expected = pinned.get(name).ok_or_else(|| ModelError::Unpinned {
                model: model.to_string(),
                file: name.clone(),
            })?;
            if !path.is_file() {
                return Err(ModelError::Missing {
                    model: model.to_string(),
                    path: path.clone(),
                });
            }
            let (actual, bytes) = sha256_file(path).map_err(|e| ModelError::Io {
                model: model.to_string(),
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(ModelError::Checksum {
                    model: model.to_string(),
                    path: path.clone(),
                    expected: expected.to_ascii_lowercase(),
                    actual,
                });
            }
            Ok(FileDigest {
                name: name.clone(),
                path: path.clone(),
                sha256: actual,
                bytes,
            })
        })
        .collect()
}

/// A version id that changes whenever any file's content changes: the first 16 hex digits of
/// a sha256 over the sorted `name:sha256` lines.
pub fn version_id(files: &[FileDigest]) -> String {
    let mut lines: Vec<String> = files
        .iter()
        .map(|f| format!("{}:{}\n", f.name, f.sha256))
        .collect();
    lines.sort();
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l.as_bytes());
    }
    hex::encode(h.finalize())[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_id_depends_on_content_not_order() {
        let f = |n: &str, s: &str| FileDigest {
            name: n.into(),
            path: PathBuf::new(),
            sha256: s.into(),
            bytes: 0,
        };
        let a = version_id(&[f("a", "11"), f("b", "22")]);
        assert_eq!(a, version_id(&[f("b", "22"), f("a", "11")]));
        assert_ne!(a, version_id(&[f("a", "11"), f("b", "23")]));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn mismatch_and_missing_and_unpinned_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.bin");
        std::fs::write(&p, b"hello").unwrap();
        let mut pins = BTreeMap::new();
        pins.insert("w.bin".to_string(), "00".repeat(32));
        let err = verify_files("m", &[("w.bin".into(), p.clone())], &pins).unwrap_err();
        assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
        let err = verify_files("m", &[("x.bin".into(), p.clone())], &pins).unwrap_err();
        assert!(matches!(err, ModelError::Unpinned { .. }), "{err}");
        pins.insert("gone".into(), "00".repeat(32));
        let err =
            verify_files("m", &[("gone".into(), dir.path().join("gone"))], &pins).unwrap_err();
        assert!(matches!(err, ModelError::Missing { .. }), "{err}");
        let good = sha256_file(&p).unwrap().0;
        pins.insert("w.bin".into(), good.to_uppercase());
        let ok = verify_files("m", &[("w.bin".into(), p)], &pins).unwrap();
        assert_eq!(ok[0].bytes, 5);
    }
}
