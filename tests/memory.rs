//! Freed large buffers really leave the process. Alone in its own test binary, since RSS is
//! per process and another test allocating meanwhile would blur it.

#[test]
fn freed_large_buffers_leave_the_rss() {
    use swapd::memory::*;
    configure_allocator();
    let before = rss_bytes();
    let mut bufs: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 1 << 20]).collect();
    bufs.iter_mut().for_each(|b| b[0] = 2);
    let held = rss_bytes();
    assert!(held > before + (48 << 20), "{before} → {held}");
    drop(bufs);
    trim();
    let after = rss_bytes();
    assert!(
        after < before + (8 << 20),
        "64 MiB freed but RSS {before} → {after}"
    );
    assert!(available_bytes().unwrap() > 0);
}
