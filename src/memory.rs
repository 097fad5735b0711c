//! Process memory: measure it, and make freed model weights really go back to the OS.
//!
//! glibc's malloc raises its mmap threshold after large frees (up to 32 MiB), after which
//! weight-sized buffers come from the heap and stay there when freed. Fixing the threshold
//! keeps large buffers mmapped (returned on free), and `malloc_trim` hands back what the
//! heap still holds. This is the crate's one use of `unsafe`.
#![allow(unsafe_code)]

/// Allocations at least this large are mmapped and go back to the OS when freed.
const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Pins malloc's mmap threshold (disabling its dynamic growth). Call once at startup.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is safe to call at any time and its
    // failure (returning 0) leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns free heap memory to the OS.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory held by the allocator; it touches no
    // live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size of this process in bytes (0 where /proc is not available).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Memory the OS can still give this process (MemAvailable), if known.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}
