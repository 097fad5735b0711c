//! The compute device: `auto`, `cpu` or `cuda[:N]`, with a CPU fallback for `auto` that says
//! why in one log line.
use std::str::FromStr;
use std::sync::Arc;

use crate::memory::{DeviceMemory, HostMemory};

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
}

impl Device {
    pub fn cpu() -> Self {
        Self {
            inner: candle_core::Device::Cpu,
            label: "cpu".into(),
            memory: Arc::new(HostMemory),
        }
    }

    /// Where this device's memory is measured and trimmed (admission, reclaim, metrics).
    pub fn memory(&self) -> &dyn DeviceMemory {
        self.memory.as_ref()
    }

    /// The device a new model version loads and runs on. On a GPU it is the same device
    /// and memory pool with a stream of its own, so the copies and the pre-flight of a
    /// version being loaded do not queue behind (or in front of) the serving version's
    /// kernels; on the CPU it is the CPU.
    pub fn for_new_version(&self) -> Result<Device, String> {
        match &self.inner {
            candle_core::Device::Cpu => Ok(self.clone()),
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(d) => {
                let ordinal = d.cuda_stream().context().ordinal();
                let inner = candle_core::Device::new_cuda_with_stream(ordinal)
                    .map_err(|e| e.to_string())?;
                Ok(Device {
                    inner,
                    label: self.label.clone(),
                    memory: self.memory.clone(),
                })
            }
            other => Err(format!("unsupported device {other:?}")),
        }
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

/// Opens CUDA device `index`. cudarc reports a missing device or a failing driver as an
/// error; a panic escaping from it (its dynamic-loading mode panics on a missing symbol, and
/// candle may change modes) is caught too, so either way `auto` falls back with a reason.
#[cfg(feature = "cuda")]
fn open_cuda(index: usize) -> Result<Device, String> {
    let opened = std::panic::catch_unwind(|| {
        // candle appends a backtrace on later lines when RUST_BACKTRACE is set: the reason
        // goes in one log line, so its first line only.
        let inner = candle_core::Device::new_cuda(index)
            .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string())?;
        let memory = match &inner {
            candle_core::Device::Cuda(d) => crate::memory::cuda::CudaMemory::new(d),
            _ => return Err("candle returned a non-CUDA device".to_string()),
        };
        Ok(Device {
            inner,
            label: format!("cuda:{index}"),
            memory: Arc::new(memory),
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
            })
        };
        let (d, why) = choose(DeviceRequest::Auto, true, gpu).unwrap();
        assert_eq!((d.label().as_str(), why), ("cuda:0", None));
        assert_eq!(
            choose(DeviceRequest::Cpu, true, gpu).unwrap().0.label(),
            "cpu"
        );
    }
}
