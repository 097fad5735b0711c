//! Server configuration: a TOML file, `SWAPD_*` environment variables and flags (flags and
//! environment win over the file), validated as a whole before anything binds or loads.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::DeviceRequest;
use crate::manifest::Manifest;

mod args;
mod check;

pub use args::{LogFormat, ServeArgs};

/// A configuration problem: which file, which key, why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}{sep}{why}", sep = if key.is_empty() { "" } else { ": " })]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub why: String,
}

impl ConfigError {
    pub fn at(file: &Path, key: impl Into<String>, why: impl ToString) -> Self {
        Self {
            file: file.display().to_string(),
            key: key.into(),
            why: why.to_string(),
        }
    }

    fn flag(key: &str, why: impl ToString) -> Self {
        Self {
            file: "command line/environment".into(),
            key: key.into(),
            why: why.to_string(),
        }
    }
}

impl From<crate::manifest::ManifestError> for ConfigError {
    fn from(e: crate::manifest::ManifestError) -> Self {
        Self {
            file: e.file,
            key: e.key,
            why: e.why,
        }
    }
}

/// A value that must never reach a log line or a `{:?}`: its `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Why `t` cannot be the admin token, if it cannot. Empty means no token. A token travels in
/// an `authorization: Bearer …` header, which cannot carry whitespace or control characters
/// intact (clients strip leading and trailing spaces, so a token of one space would be
/// matched by an empty bearer); the value itself is never part of the message.
pub fn check_admin_token(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Ok(());
    }
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "a token of {} characters that contains whitespace or control characters: use visible characters only (at least 16 recommended)",
            t.chars().count()
        ));
    }
    if !t.is_ascii() {
        return Err("a token with non-ASCII characters: an HTTP header cannot carry them".into());
    }
    Ok(())
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// How long requests in flight get to finish at shutdown unless configured.
pub const DEFAULT_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// A tracing filter from a level or directives (`info,swapd=debug`). Each directive is
/// trimmed, and a filter that makes tracing-subscriber's parser panic (found by fuzzing:
/// `"\ta\u{e000}="`) is an error, not a crash at startup.
pub fn log_filter(s: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let directives: Vec<&str> = s.split(',').map(str::trim).collect();
    let joined = directives.join(",");
    std::panic::catch_unwind(|| tracing_subscriber::EnvFilter::try_new(&joined))
        .map_err(|p| format!("not a filter ({})", crate::panic::message(p.as_ref())))?
        .map_err(|e| e.to_string())
}

/// The longest duration a config key takes: past it a number of seconds is a mistake, and
/// durations near the type's limit overflow when added to an instant.
const MAX_SECS: u64 = 365 * 24 * 3600;

/// Limits that protect the server from overload and oversized input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub max_request_bytes: usize,
    pub max_embed_batch: usize,
    /// Sequences of one version in one batch step.
    pub max_batch: usize,
    /// Tokens one batch step feeds (decode tokens and prompt chunks).
    pub step_tokens: usize,
    /// KV cache tokens the sequences of one version may reserve together.
    pub kv_cache_tokens: usize,
    /// How long an Embed call waits for others to the same version to share its forward
    /// pass (microseconds; 0: each runs alone).
    pub embed_queue_delay_us: u64,
    /// How long background work (a reload's verify and load) holds the CPU at once.
    pub background_slice: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            max_queue: 64,
            max_request_bytes: 1 << 20,
            max_embed_batch: 64,
            max_batch: 16,
            step_tokens: 256,
            kv_cache_tokens: 16384,
            embed_queue_delay_us: 2000,
            background_slice: crate::turns::SLICE,
        }
    }
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The control service's own address, if apart from `listen`.
    pub control_listen: Option<SocketAddr>,
    /// Canonical models root.
    pub models_root: PathBuf,
    pub manifest_path: PathBuf,
    /// The manifest, narrowed to the models to serve.
    pub manifest: Manifest,
    pub device: DeviceRequest,
    pub limits: Limits,
    pub hf_cache: Option<PathBuf>,
    pub hf_offline: bool,
    pub log_format: LogFormat,
    /// A tracing filter (RUST_LOG, when set, wins).
    pub log_level: String,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How long requests in flight get to finish once shutdown begins.
    pub shutdown_grace: std::time::Duration,
    /// Token control calls must carry; never logged.
    pub admin_token: Option<Secret>,
    pub control_auth: bool,
    /// Committed versions and the audit log; `None` keeps nothing across restarts.
    pub state_dir: Option<PathBuf>,
    /// The `models` subset, re-applied when the manifest is re-read.
    pub only_models: Option<Vec<String>>,
    /// Manifest poll interval; `None` reloads on SIGHUP only.
    pub manifest_poll: Option<std::time::Duration>,
    pub cooldown: crate::registry::reload::Cooldown,
    pub memory_budget: Option<u64>,
    pub memory_policy: crate::registry::reload::MemoryPolicy,
    pub auto_rollback: Option<crate::registry::reload::AutoRollback>,
}

impl Config {
    /// A configuration with every default, serving `manifest` from `models_root` (which must
    /// exist) on the CPU: what tests and embedders start from.
    pub fn with_manifest(models_root: &Path, manifest: Manifest) -> std::io::Result<Self> {
        let models_root = models_root.canonicalize()?;
        Ok(Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            control_listen: None,
            manifest_path: models_root.join("models.toml"),
            models_root,
            manifest,
            device: DeviceRequest::Cpu,
            limits: Limits::default(),
            hf_cache: None,
            hf_offline: true,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            metrics_listen: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            admin_token: None,
            control_auth: true,
            state_dir: None,
            only_models: None,
            manifest_poll: None,
            cooldown: Default::default(),
            memory_budget: None,
            memory_policy: Default::default(),
            auto_rollback: None,
        })
    }

    /// Merges file, environment and flags and validates the result; the first problem found
    /// is the error.
    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        Self::check(args).map_err(|mut errors| errors.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::args::FileConfig;
    use super::*;

    /// The README's example config must parse: every key it documents exists.
    #[test]
    fn the_readme_example_config_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n# swapd.toml")
            .expect("example config in README");
        let body = &readme[start + "```toml\n".len()..];
        let body = &body[..body.find("```").unwrap()];
        let parsed: FileConfig = toml::from_str(body).unwrap();
        assert_eq!(parsed.listen.as_deref(), Some("127.0.0.1:50051"));
        assert_eq!(
            parsed.memory_policy,
            Some(crate::registry::reload::MemoryPolicy::Refuse)
        );
        assert_eq!(
            parsed.max_concurrent,
            Some(Limits::default().max_concurrent)
        );
        assert_eq!(parsed.reload_failure_limit, Some(3));
        assert_eq!(parsed.shutdown_grace_secs, Some(30.0));
        // Every key the file may hold is documented there (set, or commented out).
        let keys = serde_json::to_value(FileConfig::default()).unwrap();
        for key in keys.as_object().unwrap().keys() {
            assert!(
                body.lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = "))),
                "`{key}` is missing from the README's example config"
            );
        }
    }

    /// `background_slice_ms` takes 1 to 1000 and names itself when it is out of range.
    #[test]
    fn the_background_slice_is_bounded() {
        let errors = |ms: u64| {
            let args = ServeArgs {
                background_slice_ms: Some(ms),
                ..Default::default()
            };
            match Config::check(&args) {
                Ok(c) => (Vec::new(), Some(c.limits.background_slice)),
                Err(e) => (e.iter().map(|e| e.to_string()).collect::<Vec<_>>(), None),
            }
        };
        for bad in [0, 1001, u64::MAX] {
            let (e, _) = errors(bad);
            assert!(
                e.iter()
                    .any(|e| e.contains("background_slice_ms") && e.contains("1 to 1000")),
                "{bad}: {e:?}"
            );
        }
        let (e, slice) = errors(5);
        assert!(
            !e.iter().any(|e| e.contains("background_slice_ms")),
            "{e:?}"
        );
        if let Some(slice) = slice {
            assert_eq!(slice, std::time::Duration::from_millis(5));
        }
        assert_eq!(Limits::default().background_slice, crate::turns::SLICE);
    }
}
