//! The compute device: `auto`, `cpu` or `cuda[:N]`, with a CPU fallback for `auto` that says
//! why in one log line.
pub mod pool;

use std::str::FromStr;
use std::sync::Arc;

use crate::memory::{DeviceMemory, HostMemory};

/// Streams a CUDA device opens at startup for model versions to load and run on (see
/// [`pool`]): enough for the active, standby and loading versions of a few models, each on
/// its own; beyond that versions share, so VRAM for candle's per-stream buffers stays bounded.
pub const VERSION_STREAMS: usize = 8;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// CUDA device 0 when this build has CUDA and the device opens, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{other}`: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

/// An opened device.
#[derive(Debug, Clone)]
pub struct Device {
    inner: candle_core::Device,
    label: String,
    memory: Arc<dyn DeviceMemory>,
    /// The streams versions load on (a GPU only).
    streams: Option<Arc<pool::Pool<candle_core::Device>>>,
    /// On a version's device: its use of a pooled stream, given back when the last clone
    /// (the version's) drops.
    lease: Option<Arc<pool::Lease>>,
}

impl Device {
    pub fn cpu() -> Self {
        Self {
            inner: candle_core::Device::Cpu,
            label: "cpu".into(),
            memory: Arc::new(HostMemory),
            streams: None,
            lease: None,
        }
    }

    /// Where this device's memory is measured and trimmed (admission, reclaim, metrics).
    pub fn memory(&self) -> &dyn DeviceMemory {
        self.memory.as_ref()
    }

    /// The device a new model version loads and runs on. On a GPU it is the same device
    /// and memory pool with a stream of the pool made at startup, the least used one, so the
    /// copies and the pre-flight of a version being loaded do not queue behind (or in front
    /// of) the serving version's kernels; the stream goes back to the pool when the version
    /// (the last holder of the returned device) drops. On the CPU it is the CPU.
    pub fn for_new_version(&self) -> Device {
        match &self.streams {
            None => self.clone(),
            Some(streams) => {
                let (inner, lease) = streams.acquire();
                if lease.users() > 1 {
                    tracing::info!(
                        device = %self.label,
                        stream = lease.index(),
                        users = lease.users(),
                        "every version stream is in use: this version shares one"
                    );
                }
                Device {
                    inner,
                    label: self.label.clone(),
                    memory: self.memory.clone(),
                    streams: None,
                    lease: Some(Arc::new(lease)),
                }
            }
        }
    }

    /// On a version's device: which pooled stream it runs on.
    pub fn stream_index(&self) -> Option<usize> {
        self.lease.as_ref().map(|l| l.index())
    }

    /// The candle device tensors are created on.
    pub fn candle(&self) -> &candle_core::Device {
        &self.inner
    }

    /// `cpu` or `cuda:N`.
    pub fn label(&self) -> String {
        self.label.clone()
    }
}

/// Why the requested device could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("--device cuda:{0} requested, but this swapd was built without the `cuda` feature; rebuild with `cargo build --release --features cuda` or use --device cpu")]
    NotBuilt(usize),
    #[error("--device cuda:{index} requested, but it cannot be opened: {reason}")]
    Unavailable { index: usize, reason: String },
}

/// Opens the device; for `auto` the second value says why the CPU was chosen.
pub fn open(req: DeviceRequest) -> Result<(Device, Option<String>), DeviceError> {
    choose(req, cfg!(feature = "cuda"), open_cuda)
}

/// The decision, apart from the hardware, so the fallback logic is tested on any machine.
pub fn choose(
    req: DeviceRequest,
    cuda_built: bool,
    open_cuda: impl FnOnce(usize) -> Result<Device, String>,
) -> Result<(Device, Option<String>), DeviceError> {
    match req {
        DeviceRequest::Cpu => Ok((Device::cpu(), None)),
        DeviceRequest::Cuda(i) if !cuda_built => Err(DeviceError::NotBuilt(i)),
        DeviceRequest::Cuda(i) => open_cuda(i)
            .map(|d| (d, None))
            .map_err(|reason| DeviceError::Unavailable { index: i, reason }),
        DeviceRequest::Auto if !cuda_built => Ok((
            Device::cpu(),
            Some("this build has no `cuda` feature".to_string()),
        )),
        DeviceRequest::Auto => match open_cuda(0) {
            Ok(d) => Ok((d, None)),
            Err(reason) => Ok((Device::cpu(), Some(format!("CUDA device 0: {reason}")))),
        },
    }
}

/// Opens CUDA device `index` with an explicit stream of its own (never candle's per-thread
/// default streams, which would leave work launched from different threads unordered), and
/// the [`VERSION_STREAMS`] streams versions use. cudarc reports a missing device or a failing
/// driver as an error; a panic escaping from it (its dynamic-loading mode panics on a missing
/// symbol, and candle may change modes) is caught too, so either way `auto` falls back with a
/// reason.
#[cfg(feature = "cuda")]
fn open_cuda(index: usize) -> Result<Device, String> {
    let opened = std::panic::catch_unwind(|| {
        // candle appends a backtrace on later lines when RUST_BACKTRACE is set: the reason
        // goes in one log line, so its first line only.
        let first_line =
            |e: candle_core::Error| e.to_string().lines().next().unwrap_or_default().to_string();
        let inner = candle_core::Device::new_cuda_with_stream(index).map_err(first_line)?;
        let memory = match &inner {
            candle_core::Device::Cuda(d) => crate::memory::cuda::CudaMemory::new(d),
            _ => return Err("candle returned a non-CUDA device".to_string()),
        };
        let tracking = event_tracking(std::env::var("SWAPD_CUDA_EVENT_TRACKING").ok())?;
        let streams = (0..VERSION_STREAMS)
            .map(|_| candle_core::Device::new_cuda_with_stream(index))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("opening the version streams: {}", first_line(e)))?;
        if !tracking {
            #[allow(unsafe_code)]
            for s in &streams {
                if let candle_core::Device::Cuda(d) = s {
                    // SAFETY: called before any slice exists on this stream's context (the
                    // flag applies to slices created after it), and a version's tensors
                    // (weights, KV caches, activations) are created and used on that
                    // version's stream only, never read from another stream; so the events
                    // cudarc records for cross-stream ordering have nothing to order.
                    unsafe { d.disable_event_tracking() };
                }
            }
        }
        tracing::info!(
            device = index,
            version_streams = VERSION_STREAMS,
            event_tracking = tracking,
            "CUDA device opened"
        );
        Ok(Device {
            inner,
            label: format!("cuda:{index}"),
            memory: Arc::new(memory),
            streams: Some(Arc::new(pool::Pool::new(streams))),
            lease: None,
        })
    });
    opened.unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(format!("the CUDA driver panicked: {msg}"))
    })
}

/// `SWAPD_CUDA_EVENT_TRACKING`: `on` (the default, cudarc's) records an event on every
/// argument of every kernel so slices used from several streams are ordered; `off` skips that
/// on the version streams, whose tensors never cross streams. A knob for measuring the cost
/// on a GPU (scripts/gpu-device.sh runs both), not a tuning default.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn event_tracking(value: Option<String>) -> Result<bool, String> {
    match value.as_deref().map(str::trim) {
        None | Some("") | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(format!(
            "SWAPD_CUDA_EVENT_TRACKING={other:?}: expected on or off"
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_index: usize) -> Result<Device, String> {
    Err("this build has no `cuda` feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        assert!("gpu".parse::<DeviceRequest>().is_err());
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
    }

    #[test]
    fn auto_falls_back_with_a_reason_and_cuda_fails_clearly() {
        let no_gpu = |_| Err("no CUDA-capable device is detected".to_string());
        let (d, why) = choose(DeviceRequest::Auto, true, no_gpu).unwrap();
        assert_eq!(d.label(), "cpu");
        assert!(why.unwrap().contains("no CUDA-capable device"));
        let (_, why) = choose(DeviceRequest::Auto, false, no_gpu).unwrap();
        assert!(why.unwrap().contains("no `cuda` feature"));
        assert_eq!(
            choose(DeviceRequest::Cuda(1), false, no_gpu).unwrap_err(),
            DeviceError::NotBuilt(1)
        );
        let e = choose(DeviceRequest::Cuda(0), true, no_gpu).unwrap_err();
        assert!(e.to_string().contains("cannot be opened"));
        let gpu = |i| {
            Ok(Device {
                inner: candle_core::Device::Cpu,
                label: format!("cuda:{i}"),
                memory: Arc::new(HostMemory),
                streams: None,
                lease: None,
            })
        };
        let (d, why) = choose(DeviceRequest::Auto, true, gpu).unwrap();
        assert_eq!((d.label().as_str(), why), ("cuda:0", None));
        assert_eq!(
            choose(DeviceRequest::Cpu, true, gpu).unwrap().0.label(),
            "cpu"
        );
    }

    #[test]
    fn event_tracking_is_on_unless_turned_off_and_other_values_are_refused() {
        assert_eq!(event_tracking(None), Ok(true));
        assert_eq!(event_tracking(Some("on".into())), Ok(true));
        assert_eq!(event_tracking(Some(" off ".into())), Ok(false));
        let e = event_tracking(Some("no".into())).unwrap_err();
        assert!(e.contains("expected on or off"), "{e}");
    }

    #[test]
    fn versions_take_pooled_streams_and_give_them_back_when_they_drop() {
        let gpu = Device {
            inner: candle_core::Device::Cpu,
            label: "cuda:0".into(),
            memory: Arc::new(HostMemory),
            streams: Some(Arc::new(pool::Pool::new(vec![candle_core::Device::Cpu; 2]))),
            lease: None,
        };
        let streams = gpu.streams.clone().unwrap();
        let a = gpu.for_new_version();
        let b = gpu.for_new_version();
        assert_eq!((a.stream_index(), b.stream_index()), (Some(0), Some(1)));
        // A third version shares the least used stream rather than making another.
        let c = gpu.for_new_version();
        assert_eq!(c.stream_index(), Some(0));
        assert_eq!(streams.users(), vec![2, 1]);
        // Clones (the version's tensors' holders) keep the lease; the last one gives it back.
        let a2 = a.clone();
        drop(a);
        assert_eq!(streams.users(), vec![2, 1]);
        drop((a2, c));
        assert_eq!(streams.users(), vec![0, 1]);
        assert_eq!(gpu.for_new_version().stream_index(), Some(0));
        // The CPU has no streams: a version's device is the CPU itself.
        assert_eq!(Device::cpu().for_new_version().stream_index(), None);
    }
}
