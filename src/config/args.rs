//! The options as given: `swapd serve`'s flags (each with its `SWAPD_*` environment
//! variable) and the keys of a config file.
use std::path::PathBuf;

use serde::Deserialize;

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
pub(super) struct FileConfig {
    pub(super) listen: Option<String>,
    pub(super) control_listen: Option<String>,
    pub(super) models_root: Option<PathBuf>,
    pub(super) manifest: Option<PathBuf>,
    pub(super) models: Option<Vec<String>>,
    pub(super) device: Option<String>,
    pub(super) max_concurrent: Option<usize>,
    pub(super) max_batch: Option<usize>,
    pub(super) step_tokens: Option<usize>,
    pub(super) kv_cache_tokens: Option<usize>,
    pub(super) embed_queue_delay_us: Option<u64>,
    pub(super) background_slice_ms: Option<u64>,
    pub(super) max_queue: Option<usize>,
    pub(super) max_request_bytes: Option<usize>,
    pub(super) max_embed_batch: Option<usize>,
    pub(super) hf_cache: Option<PathBuf>,
    pub(super) hf_offline: Option<bool>,
    pub(super) log_format: Option<LogFormat>,
    pub(super) log_level: Option<String>,
    pub(super) metrics_listen: Option<String>,
    pub(super) shutdown_grace_secs: Option<f64>,
    pub(super) admin_token: Option<String>,
    pub(super) control_auth: Option<bool>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) manifest_poll_secs: Option<u64>,
    pub(super) reload_failure_limit: Option<u32>,
    pub(super) reload_cooldown_secs: Option<u64>,
    pub(super) memory_budget_bytes: Option<u64>,
    pub(super) memory_policy: Option<crate::registry::reload::MemoryPolicy>,
    pub(super) auto_rollback_window_secs: Option<f64>,
    pub(super) auto_rollback_error_rate: Option<f64>,
    pub(super) auto_rollback_min_requests: Option<u64>,
}
