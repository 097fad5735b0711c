//! Why a model version could not be resolved, verified, loaded or run, and which pre-flight
//! check a load failure fails.
use std::path::PathBuf;

/// Why a model version could not be resolved, verified, loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model `{model}`: {path}: file not found")]
    Missing { model: String, path: PathBuf },
    #[error("model `{model}`: {path}: cannot read: {reason}")]
    Io {
        model: String,
        path: PathBuf,
        reason: String,
    },
    #[error("model `{model}`: {path}: sha256 mismatch: expected {expected}, got {actual}")]
    Checksum {
        model: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("model `{model}`: no sha256 for `{file}` in the manifest; every file must be pinned")]
    Unpinned { model: String, file: String },
    #[error("model `{model}`: {path} resolves outside the models root {root}")]
    OutsideRoot {
        model: String,
        path: PathBuf,
        root: PathBuf,
    },
    #[error("model `{model}`: source `{source_uri}`: {reason}")]
    Source {
        model: String,
        source_uri: String,
        reason: String,
    },
    /// A valid file swapd does not run (an architecture it does not know).
    #[error("model `{model}`: {path}: {reason}")]
    Unsupported {
        model: String,
        path: PathBuf,
        reason: String,
    },
    #[error("model `{model}`: {path}: not a valid {format} file: {reason}")]
    Format {
        model: String,
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error(
        "model `{model}`: tensor `{tensor}` holds {count} non-finite values (NaN or infinity)"
    )]
    NonFinite {
        model: String,
        tensor: String,
        count: usize,
    },
    #[error("model `{model}`: tokenizer: {reason}")]
    Tokenizer { model: String, reason: String },
    #[error("model `{model}`: chat template: {reason}")]
    ChatTemplate { model: String, reason: String },
    #[error("model `{model}`: inference failed: {reason}")]
    Inference { model: String, reason: String },
    /// The file was fine; the device refused (out of memory, a driver or kernel error).
    #[error("model `{model}`: loading onto {device} failed: {reason} (a device error, not a problem with the file)")]
    Device {
        model: String,
        device: String,
        reason: String,
    },
    #[error("model `{model}`: pre-flight check `{check}` failed: {detail}")]
    Preflight {
        model: String,
        check: String,
        detail: String,
    },
}

impl ModelError {
    /// The pre-flight check this error fails, when a load fails.
    pub fn check_name(&self) -> &'static str {
        match self {
            ModelError::NonFinite { .. } => "finite_weights",
            ModelError::Tokenizer { .. } => "tokenizer",
            ModelError::ChatTemplate { .. } => "chat_template",
            ModelError::Device { .. } => "device",
            _ => "format",
        }
    }
}

/// What an error from candle while reading weights onto a device says about its cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFault {
    /// The device (an allocation, a copy, a kernel): not the file.
    Device,
    /// Reading the file (the operating system).
    Io,
    /// What the file holds.
    Format,
}

impl LoadFault {
    /// Sorts a candle error by cause, looking through the context and backtrace candle wraps
    /// errors in.
    pub fn of(e: &candle_core::Error) -> Self {
        use candle_core::Error as E;
        match e {
            E::Cuda(_) | E::Metal(_) | E::NotCompiledWithCudaSupport => Self::Device,
            E::Io(_) => Self::Io,
            E::Context { inner, .. } | E::WithBacktrace { inner, .. } => Self::of(inner),
            E::WithPath { inner, .. } => Self::of(inner),
            _ => Self::Format,
        }
    }

    /// The error for a candle failure while loading `path` onto `device`; `format` names the
    /// file's format for the [`ModelError::Format`] case.
    pub fn error(
        e: candle_core::Error,
        model: &str,
        path: &std::path::Path,
        device: &candle_core::Device,
        format: &'static str,
    ) -> ModelError {
        // candle appends a backtrace on later lines when RUST_BACKTRACE is set.
        let reason = e.to_string().lines().next().unwrap_or_default().to_string();
        match Self::of(&e) {
            Self::Device => ModelError::Device {
                model: model.to_string(),
                device: device_label(device),
                reason,
            },
            Self::Io => ModelError::Io {
                model: model.to_string(),
                path: path.to_path_buf(),
                reason,
            },
            Self::Format => ModelError::Format {
                model: model.to_string(),
                path: path.to_path_buf(),
                format,
                reason,
            },
        }
    }
}

/// `cpu`, `cuda:N` or `metal:N`.
pub fn device_label(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_errors_are_not_reported_as_a_bad_file() {
        let path = std::path::Path::new("/models/m.gguf");
        let cpu = candle_core::Device::Cpu;
        // What candle's CUDA backend returns for a failed allocation, wrapped as candle wraps.
        let oom = candle_core::Error::Cuda(Box::new(std::io::Error::other(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
        )))
        .context("loading blk.3.ffn_up.weight");
        assert_eq!(LoadFault::of(&oom), LoadFault::Device);
        let e = LoadFault::error(oom, "m", path, &cpu, "GGUF");
        assert!(matches!(e, ModelError::Device { .. }), "{e}");
        assert_eq!(e.check_name(), "device");
        assert!(e.to_string().contains("not a problem with the file"), "{e}");
        assert!(!e.to_string().contains("not a valid"), "{e}");
        // A read error is the operating system's, named with the path.
        let eio =
            candle_core::Error::Io(std::io::Error::other("Input/output error")).with_path(path);
        let e = LoadFault::error(eio, "m", path, &cpu, "GGUF");
        assert!(matches!(e, ModelError::Io { .. }), "{e}");
        // What the file holds stays a format error.
        let shape = candle_core::Error::Msg("unexpected shape [3, 4]".into()).bt();
        assert_eq!(LoadFault::of(&shape), LoadFault::Format);
        let e = LoadFault::error(shape, "m", path, &cpu, "GGUF");
        assert_eq!(e.check_name(), "format");
        assert!(e.to_string().contains("not a valid GGUF file"), "{e}");
    }
}
