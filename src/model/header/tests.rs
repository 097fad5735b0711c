//! Tests of the GGUF header walk: every bound refused in words, and sane files accepted.
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
            format!(
                "file is {n} bytes: too short to be a GGUF file (the header is at least 24 bytes)"
            )
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
