//! Process memory: measure it, and make freed model weights really go back to the OS.
//!
//! glibc's malloc raises its mmap threshold after large frees (up to 32 MiB), after which
//! weight-sized buffers come from the heap and stay there when freed. Fixing the threshold
//! keeps large buffers mmapped (returned on free), and `malloc_trim` hands back what the
//! heap still holds. With the `cuda` feature, the same questions (free, used, trim) are asked
//! of the GPU through cudarc ([`DeviceMemory`]). This and `quant` are the crate's uses of
//! `unsafe`.
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

/// The `/proc/meminfo` fields named by `keys` (e.g. `"MemTotal:"`), in bytes, from one read
/// of the file; `None` if any is missing.
fn meminfo<const N: usize>(keys: [&str; N]) -> Option<[u64; N]> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let mut out = [0; N];
    for (o, key) in out.iter_mut().zip(keys) {
        *o = field(key)?;
    }
    Some(out)
}

/// Memory the OS can still give this process (MemAvailable), if known.
pub fn available_bytes() -> Option<u64> {
    meminfo(["MemAvailable:"]).map(|[a]| a)
}

/// Total memory of the machine (MemTotal), if known.
pub fn total_bytes() -> Option<u64> {
    meminfo(["MemTotal:"]).map(|[t]| t)
}

/// The memory model weights live in, seen from the reload: what is free (admission), what
/// this process uses (the reclaimed figure) and how freed memory goes back. The CPU reads
/// the host (`/proc`, malloc); a CUDA device asks the driver through cudarc.
pub trait DeviceMemory: Send + Sync + std::fmt::Debug {
    /// Free and total bytes of the device, if it can tell.
    fn free_total(&self) -> Option<(u64, u64)>;
    /// Bytes this process holds on the device: RSS on the CPU; on a GPU, total − free (the
    /// driver counts per device, so other processes on the same GPU show up here too).
    fn used_bytes(&self) -> u64;
    /// Makes memory freed by dropped tensors really go back to the device: malloc_trim on
    /// the CPU; on a GPU, synchronize so pending frees complete, then trim the memory pool.
    fn trim(&self);
}

/// Host memory: MemAvailable / MemTotal, process RSS, malloc_trim.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostMemory;

impl DeviceMemory for HostMemory {
    fn free_total(&self) -> Option<(u64, u64)> {
        meminfo(["MemAvailable:", "MemTotal:"]).map(|[free, total]| (free, total))
    }
    fn used_bytes(&self) -> u64 {
        rss_bytes()
    }
    fn trim(&self) {
        trim();
    }
}

/// After a version was dropped: trims, then returns the bytes that came back (`used_before`,
/// measured before the drop, minus what is used now) and the device's free/total after it.
pub fn reclaimed(mem: &dyn DeviceMemory, used_before: u64) -> (i64, Option<(u64, u64)>) {
    mem.trim();
    let released = used_before as i64 - mem.used_bytes() as i64;
    (released, mem.free_total())
}

/// The CUDA side: cudarc's driver calls on the context candle opened. Kept to the three
/// calls the trait needs; everything else is shared with the CPU path.
#[cfg(feature = "cuda")]
pub mod cuda {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{result, CudaContext};

    #[derive(Debug)]
    pub struct CudaMemory {
        ctx: Arc<CudaContext>,
    }

    impl CudaMemory {
        pub fn new(device: &candle_core::CudaDevice) -> Self {
            Self {
                ctx: device.cuda_stream().context().clone(),
            }
        }
    }

    impl super::DeviceMemory for CudaMemory {
        fn free_total(&self) -> Option<(u64, u64)> {
            let (free, total) = self.ctx.mem_get_info().ok()?;
            Some((free as u64, total as u64))
        }
        fn used_bytes(&self) -> u64 {
            self.free_total().map(|(f, t)| t - f).unwrap_or(0)
        }
        fn trim(&self) {
            // Host buffers of the load (file reads, staging) go back as on the CPU.
            super::trim();
            // Frees are stream-ordered (cuMemFreeAsync into the device's default pool when
            // the context has async allocation): wait for every stream, then return all
            // the pool holds beyond live allocations.
            if let Err(e) = self.ctx.synchronize() {
                tracing::warn!(error = %e, "CUDA synchronize before the memory-pool trim failed");
                return;
            }
            if !self.ctx.has_async_alloc() {
                return;
            }
            // SAFETY: cu_device() is the device of this live context (bound to this thread
            // by synchronize above); the default pool it returns belongs to the driver and
            // trimming it only releases memory no allocation uses.
            let trimmed = unsafe {
                result::device::get_default_mem_pool(self.ctx.cu_device())
                    .and_then(|pool| result::mem_pool::trim_to(pool, 0))
            };
            if let Err(e) = trimmed {
                tracing::warn!(error = %e, "trimming the CUDA memory pool failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A device whose pool keeps freed bytes until trimmed, as a CUDA pool (or malloc's heap)
    /// does: the reclaimed figure must count them only because `reclaimed` trims first.
    #[derive(Debug)]
    struct Pooled {
        live: AtomicU64,
        pooled: AtomicU64,
        total: u64,
    }

    impl DeviceMemory for Pooled {
        fn free_total(&self) -> Option<(u64, u64)> {
            Some((self.total - self.used_bytes(), self.total))
        }
        fn used_bytes(&self) -> u64 {
            self.live.load(Ordering::SeqCst) + self.pooled.load(Ordering::SeqCst)
        }
        fn trim(&self) {
            self.pooled.store(0, Ordering::SeqCst);
        }
    }

    #[test]
    fn reclaimed_trims_before_it_measures() {
        let dev = Pooled {
            live: AtomicU64::new(700),
            pooled: AtomicU64::new(0),
            total: 1000,
        };
        let before = dev.used_bytes();
        // The old version (300 of the 700) drops: its bytes go to the pool, not the device.
        dev.live.store(400, Ordering::SeqCst);
        dev.pooled.store(300, Ordering::SeqCst);
        assert_eq!(dev.free_total(), Some((300, 1000)));
        assert_eq!(reclaimed(&dev, before), (300, Some((600, 1000))));
    }

    #[test]
    fn host_memory_reads_the_machine() {
        let (free, total) = HostMemory.free_total().unwrap();
        assert!(0 < free && free <= total, "{free} of {total}");
        assert!(HostMemory.used_bytes() > 0);
    }
}
