//! Merging the config file, the environment and the flags into a [`Config`], and checking
//! every value, each error naming where the value came from.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::args::FileConfig;
use super::{
    check_admin_token, log_filter, Config, ConfigError, Limits, Secret, ServeArgs,
    DEFAULT_SHUTDOWN_GRACE, MAX_SECS,
};
use crate::device::DeviceRequest;
use crate::manifest::Manifest;

impl Config {
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
                    manifest_error = Some(ConfigError::from(e));
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
