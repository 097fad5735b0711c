//! Server configuration: a TOML file, `SWAPD_*` environment variables and flags (flags and
//! environment win over the file), validated as a whole before anything binds or loads.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::DeviceRequest;
use crate::manifest::Manifest;

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

/// Log line format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `swapd serve` options. Each also reads `SWAPD_<NAME>` from the environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file; its keys are these options' long names with `_` for `-`.
    #[arg(long, env = "SWAPD_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "SWAPD_LISTEN")]
    pub listen: Option<String>,
    /// Serve the control service (reload, rollback, status) on this address only, apart from
    /// inference [default: on the main address].
    #[arg(long, env = "SWAPD_CONTROL_LISTEN")]
    pub control_listen: Option<String>,
    /// Directory holding the models; local sources must resolve inside it [default: models].
    #[arg(long, env = "SWAPD_MODELS_ROOT")]
    pub models_root: Option<PathBuf>,
    /// Model manifest [default: <models-root>/models.toml].
    #[arg(long, env = "SWAPD_MANIFEST")]
    pub manifest: Option<PathBuf>,
    /// Serve only these manifest models (comma-separated) [default: all].
    #[arg(long, env = "SWAPD_MODELS", value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// auto | cpu | cuda | cuda:N [default: auto].
    #[arg(long, env = "SWAPD_DEVICE")]
    pub device: Option<String>,
    /// Requests running inference at once, all models together [default: 16].
    #[arg(long, env = "SWAPD_MAX_CONCURRENT")]
    pub max_concurrent: Option<usize>,
    /// Sequences of one version decoded together in one batch step [default: 16].
    #[arg(long, env = "SWAPD_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Tokens one batch step feeds, decode tokens and prompt chunks together; a step takes
    /// at least one prompt chunk (128 tokens) when a prompt waits [default: 256].
    #[arg(long, env = "SWAPD_STEP_TOKENS")]
    pub step_tokens: Option<usize>,
    /// KV cache tokens the sequences of one version may reserve together (each reserves its
    /// prompt plus max_tokens); counted in a reload's memory admission [default: 16384].
    #[arg(long, env = "SWAPD_KV_CACHE_TOKENS")]
    pub kv_cache_tokens: Option<usize>,
    /// How long an Embed call waits for others to the same version to share its forward pass,
    /// in microseconds; 0 runs each alone [default: 2000].
    #[arg(long, env = "SWAPD_EMBED_QUEUE_DELAY_US")]
    pub embed_queue_delay_us: Option<u64>,
    /// How long a reload's verify and load hold the CPU at once while requests are served, in
    /// milliseconds: shorter keeps inter-token latency during a reload nearer steady, longer
    /// loads faster [default: 2].
    #[arg(long, env = "SWAPD_BACKGROUND_SLICE_MS")]
    pub background_slice_ms: Option<u64>,
    /// Requests waiting for a slot before new ones get RESOURCE_EXHAUSTED [default: 64].
    #[arg(long, env = "SWAPD_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Largest accepted request message in bytes [default: 1048576].
    #[arg(long, env = "SWAPD_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Most texts in one Embed call [default: 64].
    #[arg(long, env = "SWAPD_MAX_EMBED_BATCH")]
    pub max_embed_batch: Option<usize>,
    /// Hugging Face cache for hf:// sources [default: HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub].
    #[arg(long, env = "SWAPD_HF_CACHE")]
    pub hf_cache: Option<PathBuf>,
    /// Resolve hf:// sources from the cache only [default: true when HF_HUB_OFFLINE=1].
    #[arg(long, env = "SWAPD_HF_OFFLINE")]
    pub hf_offline: Option<bool>,
    /// text | json [default: text].
    #[arg(long, env = "SWAPD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log level or tracing filter (`info`, `debug`, `info,swapd=debug`); RUST_LOG, when
    /// set, wins [default: info].
    #[arg(long, env = "SWAPD_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics [default: off].
    #[arg(long, env = "SWAPD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// On SIGTERM/SIGINT, how long requests in flight get to finish before they are ended
    /// (seconds); a second signal exits at once [default: 30].
    #[arg(long, env = "SWAPD_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<f64>,
    /// Bearer token that control calls (Reload, Rollback, Status) must carry.
    #[arg(long, env = "SWAPD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Require the admin token on control calls [default: true]; false turns the check off.
    #[arg(long, env = "SWAPD_CONTROL_AUTH")]
    pub control_auth: Option<bool>,
    /// Where the last committed versions and the audit log are kept [default: <models-root>/.swapd].
    #[arg(long, env = "SWAPD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Re-read the manifest this often (seconds) and reload changed entries; 0 = only on SIGHUP [default: 0].
    #[arg(long, env = "SWAPD_MANIFEST_POLL_SECS")]
    pub manifest_poll_secs: Option<u64>,
    /// Consecutive failed reloads of one source before it cools down [default: 3].
    #[arg(long, env = "SWAPD_RELOAD_FAILURE_LIMIT")]
    pub reload_failure_limit: Option<u32>,
    /// How long a failing source is refused, unless forced (seconds) [default: 300].
    #[arg(long, env = "SWAPD_RELOAD_COOLDOWN_SECS")]
    pub reload_cooldown_secs: Option<u64>,
    /// Most bytes of model weights resident at once, all versions included [default: no limit
    /// beyond MemAvailable].
    #[arg(long, env = "SWAPD_MEMORY_BUDGET_BYTES")]
    pub memory_budget_bytes: Option<u64>,
    /// refuse | resource-preserving: what a reload does when two versions do not fit [default: refuse].
    #[arg(long, env = "SWAPD_MEMORY_POLICY")]
    pub memory_policy: Option<crate::registry::reload::MemoryPolicy>,
    /// Watch a version swapped in with keep_previous for this long and roll back on an error
    /// spike (seconds); 0 = off [default: 0].
    #[arg(long, env = "SWAPD_AUTO_ROLLBACK_WINDOW_SECS")]
    pub auto_rollback_window_secs: Option<f64>,
    /// Error rate that triggers the automatic rollback [default: 0.5].
    #[arg(long, env = "SWAPD_AUTO_ROLLBACK_ERROR_RATE")]
    pub auto_rollback_error_rate: Option<f64>,
    /// Requests needed before the error rate is judged [default: 5].
    #[arg(long, env = "SWAPD_AUTO_ROLLBACK_MIN_REQUESTS")]
    pub auto_rollback_min_requests: Option<u64>,
}

/// The keys a config file may hold (same names as the flags).
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    control_listen: Option<String>,
    models_root: Option<PathBuf>,
    manifest: Option<PathBuf>,
    models: Option<Vec<String>>,
    device: Option<String>,
    max_concurrent: Option<usize>,
    max_batch: Option<usize>,
    step_tokens: Option<usize>,
    kv_cache_tokens: Option<usize>,
    embed_queue_delay_us: Option<u64>,
    background_slice_ms: Option<u64>,
    max_queue: Option<usize>,
    max_request_bytes: Option<usize>,
    max_embed_batch: Option<usize>,
    hf_cache: Option<PathBuf>,
    hf_offline: Option<bool>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    metrics_listen: Option<String>,
    shutdown_grace_secs: Option<f64>,
    admin_token: Option<String>,
    control_auth: Option<bool>,
    state_dir: Option<PathBuf>,
    manifest_poll_secs: Option<u64>,
    reload_failure_limit: Option<u32>,
    reload_cooldown_secs: Option<u64>,
    memory_budget_bytes: Option<u64>,
    memory_policy: Option<crate::registry::reload::MemoryPolicy>,
    auto_rollback_window_secs: Option<f64>,
    auto_rollback_error_rate: Option<f64>,
    auto_rollback_min_requests: Option<u64>,
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

    /// Like [`Config::from_args`], but reports every problem found, each naming where the
    /// value came from (the file and key, or the flag/environment variable) and why it is
    /// wrong. What `swapd config check` runs.
    pub fn check(args: &ServeArgs) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let file = match &args.config {
            Some(path) => match std::fs::read_to_string(path) {
                Err(e) => return Err(vec![ConfigError::at(path, "", e)]),
                Ok(text) => toml::from_str::<FileConfig>(&text).map_err(|e| {
                    let key = e.span().map(|s| text[s].to_string()).unwrap_or_default();
                    vec![ConfigError::at(path, key, e.message())]
                })?,
            },
            None => FileConfig::default(),
        };
        let config_path = args.config.clone();
        // Where a value came from, for its error: the flag (or its environment variable)
        // when one was given, else the config file's key.
        let mut err = |key: &str, from_flag: bool, why: String| {
            errors.push(match (&config_path, from_flag) {
                (Some(path), false) => ConfigError::at(path, key, why),
                _ => ConfigError::flag(
                    &format!(
                        "{key} (--{} / SWAPD_{})",
                        key.replace('_', "-"),
                        key.to_uppercase()
                    ),
                    why,
                ),
            })
        };
        // A relative path in the config file is relative to the file, not the cwd.
        let base = args
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let from_file = |p: Option<PathBuf>| p.map(|p| base.join(p));
        macro_rules! pick {
            ($key:ident) => {
                (args.$key.is_some(), args.$key.clone().or(file.$key.clone()))
            };
        }
        let addr = |err: &mut dyn FnMut(&str, bool, String),
                    key: &str,
                    (flag, v): (bool, Option<String>)|
         -> Option<SocketAddr> {
            let v = v?;
            match v.parse() {
                Ok(a) => Some(a),
                Err(e) => {
                    err(key, flag, format!("`{v}`: {e} (expected IP:PORT)"));
                    None
                }
            }
        };

        let listen = match pick!(listen) {
            (_, None) => Some(SocketAddr::from(([127, 0, 0, 1], 50051))),
            p => addr(&mut err, "listen", p),
        };
        let control_listen = addr(&mut err, "control_listen", pick!(control_listen));
        let metrics_listen = addr(&mut err, "metrics_listen", pick!(metrics_listen));

        let root_flag = args.models_root.is_some();
        let root = args
            .models_root
            .clone()
            .or(from_file(file.models_root.clone()))
            .unwrap_or_else(|| PathBuf::from("models"));
        let models_root = match root.canonicalize() {
            Ok(r) if r.is_dir() => Some(r),
            Ok(_) => {
                err(
                    "models_root",
                    root_flag,
                    format!("{} is not a directory", root.display()),
                );
                None
            }
            Err(e) => {
                err("models_root", root_flag, format!("{}: {e}", root.display()));
                None
            }
        };
        let manifest_path = args
            .manifest
            .clone()
            .or(from_file(file.manifest.clone()))
            .or_else(|| models_root.as_ref().map(|r| r.join("models.toml")));
        let (models_flag, only_models) = pick!(models);
        let mut manifest_error = None;
        let manifest = match &manifest_path {
            None => None,
            Some(path) => match Manifest::load(path) {
                Ok(mut manifest) => {
                    if let Some(only) = &only_models {
                        for name in only {
                            if manifest.get(name).is_none() {
                                err(
                                    "models",
                                    models_flag,
                                    format!("`{name}` is not in {}", path.display()),
                                );
                            }
                        }
                        manifest.models.retain(|m| only.contains(&m.name));
                    }
                    Some(manifest)
                }
                // The manifest's own errors name its file and key.
                Err(e) => {
                    manifest_error = Some(e);
                    None
                }
            },
        };
        let device = match pick!(device) {
            (_, None) => Some(DeviceRequest::Auto),
            (flag, Some(v)) => match v.parse::<DeviceRequest>() {
                Ok(d) => Some(d),
                Err(e) => {
                    err("device", flag, e.to_string());
                    None
                }
            },
        };
        let d = Limits::default();
        let (flag, delay) = pick!(embed_queue_delay_us);
        let delay = delay.unwrap_or(d.embed_queue_delay_us);
        if delay > 1_000_000 {
            err(
                "embed_queue_delay_us",
                flag,
                format!("{delay}: at most 1000000 (a second)"),
            );
        }
        let (flag, slice_ms) = pick!(background_slice_ms);
        let slice_ms = slice_ms.unwrap_or(d.background_slice.as_millis() as u64);
        if !(1..=1000).contains(&slice_ms) {
            err(
                "background_slice_ms",
                flag,
                format!("{slice_ms}: must be from 1 to 1000 (a second)"),
            );
        }
        // `max`: `usize::MAX` where only the minimum matters.
        let mut limit = |key: &str, (flag, v): (bool, Option<usize>), default: usize, min, max| {
            let v = v.unwrap_or(default);
            if v < min {
                err(key, flag, format!("{v}: must be at least {min}"));
            }
            if v > max {
                err(key, flag, format!("{v}: at most {max}"));
            }
            v
        };
        let limits = Limits {
            max_concurrent: limit(
                "max_concurrent",
                pick!(max_concurrent),
                d.max_concurrent,
                1,
                usize::MAX,
            ),
            max_queue: limit("max_queue", pick!(max_queue), d.max_queue, 0, usize::MAX),
            max_request_bytes: limit(
                "max_request_bytes",
                pick!(max_request_bytes),
                d.max_request_bytes,
                1,
                usize::MAX,
            ),
            max_embed_batch: limit(
                "max_embed_batch",
                pick!(max_embed_batch),
                d.max_embed_batch,
                1,
                usize::MAX,
            ),
            max_batch: limit("max_batch", pick!(max_batch), d.max_batch, 1, 1024),
            step_tokens: limit("step_tokens", pick!(step_tokens), d.step_tokens, 1, 1 << 20),
            kv_cache_tokens: limit(
                "kv_cache_tokens",
                pick!(kv_cache_tokens),
                d.kv_cache_tokens,
                1,
                1 << 24,
            ),
            embed_queue_delay_us: delay,
            background_slice: std::time::Duration::from_millis(slice_ms.clamp(1, 1000)),
        };
        if let (flag, Some(t)) = pick!(admin_token) {
            if let Err(why) = check_admin_token(&t) {
                err("admin_token", flag, why);
            }
        }
        for (key, (flag, v)) in [
            ("manifest_poll_secs", pick!(manifest_poll_secs)),
            ("reload_cooldown_secs", pick!(reload_cooldown_secs)),
        ] {
            if let Some(v) = v.filter(|&v| v > MAX_SECS) {
                err(
                    key,
                    flag,
                    format!("{v}: at most {MAX_SECS} seconds (a year)"),
                );
            }
        }
        let mut secs = |key: &str, (flag, v): (bool, Option<f64>), default: f64| {
            let v = v.unwrap_or(default);
            if !(v.is_finite() && (0.0..=MAX_SECS as f64).contains(&v)) {
                err(
                    key,
                    flag,
                    format!("{v}: must be a number of seconds from 0 to {MAX_SECS} (a year)"),
                );
                return default;
            }
            v
        };
        let window = secs(
            "auto_rollback_window_secs",
            pick!(auto_rollback_window_secs),
            0.0,
        );
        let grace = secs(
            "shutdown_grace_secs",
            pick!(shutdown_grace_secs),
            DEFAULT_SHUTDOWN_GRACE.as_secs_f64(),
        );
        let (rate_flag, rate) = pick!(auto_rollback_error_rate);
        let rate = rate.unwrap_or(0.5);
        if !(0.0..=1.0).contains(&rate) {
            err(
                "auto_rollback_error_rate",
                rate_flag,
                format!("{rate}: must be in [0, 1]"),
            );
        }
        let (level_flag, log_level) = pick!(log_level);
        let log_level = log_level.unwrap_or_else(|| "info".into());
        if let Err(e) = log_filter(&log_level) {
            err("log_level", level_flag, format!("`{log_level}`: {e}"));
        }
        let state_dir = args.state_dir.clone().or(from_file(file.state_dir.clone()));
        let auto_rollback = (window > 0.0).then(|| crate::registry::reload::AutoRollback {
            window: std::time::Duration::from_secs_f64(window),
            min_requests: args
                .auto_rollback_min_requests
                .or(file.auto_rollback_min_requests)
                .unwrap_or(5)
                .max(1),
            max_error_rate: rate,
        });
        let hf_offline = args.hf_offline.or(file.hf_offline).unwrap_or_else(|| {
            std::env::var("HF_HUB_OFFLINE")
                .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        });
        errors.extend(manifest_error);
        let (
            Some(listen),
            Some(models_root),
            Some(manifest_path),
            Some(manifest),
            Some(device),
            true,
        ) = (
            listen,
            models_root,
            manifest_path,
            manifest,
            device,
            errors.is_empty(),
        )
        else {
            return Err(errors);
        };
        Ok(Self {
            listen,
            control_listen,
            state_dir: Some(state_dir.unwrap_or_else(|| models_root.join(".swapd"))),
            models_root,
            manifest_path,
            manifest,
            device,
            limits,
            hf_cache: args.hf_cache.clone().or(from_file(file.hf_cache)),
            hf_offline,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level,
            metrics_listen,
            shutdown_grace: std::time::Duration::from_secs_f64(grace),
            admin_token: args
                .admin_token
                .clone()
                .or(file.admin_token)
                .filter(|t| !t.is_empty())
                .map(Secret),
            control_auth: args.control_auth.or(file.control_auth).unwrap_or(true),
            only_models,
            manifest_poll: args
                .manifest_poll_secs
                .or(file.manifest_poll_secs)
                .filter(|s| *s > 0)
                .map(|s| std::time::Duration::from_secs(s.min(MAX_SECS))),
            cooldown: {
                let d = crate::registry::reload::Cooldown::default();
                crate::registry::reload::Cooldown {
                    after_failures: args
                        .reload_failure_limit
                        .or(file.reload_failure_limit)
                        .unwrap_or(d.after_failures)
                        .max(1),
                    duration: args
                        .reload_cooldown_secs
                        .or(file.reload_cooldown_secs)
                        .map(|s| std::time::Duration::from_secs(s.min(MAX_SECS)))
                        .unwrap_or(d.duration),
                }
            },
            memory_budget: args.memory_budget_bytes.or(file.memory_budget_bytes),
            memory_policy: args
                .memory_policy
                .or(file.memory_policy)
                .unwrap_or_default(),
            auto_rollback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's example config must parse: every key it documents exists.
    #[test]
    fn the_readme_example_config_is_valid() {
        let readme = include_str!("../README.md");
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
