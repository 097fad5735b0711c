//! What starts reloads besides the RPC: SIGHUP and, when configured, a manifest poll. Both
//! re-read the manifest and reload every model whose entry changed (source or digests);
//! a model name not served yet is loaded through the same path.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::manifest::{Manifest, ModelSpec};
use crate::registry::reload::{ReloadEvent, ReloadRequest, Reloader};

/// Settings of the watcher.
pub struct Watch {
    pub manifest_path: PathBuf,
    /// Serve only these names (the `models` option), if set.
    pub only: Option<Vec<String>>,
    /// Poll the manifest this often; `None` reacts to SIGHUP only.
    pub poll: Option<Duration>,
}

fn key(spec: &ModelSpec) -> (String, Vec<(String, String)>) {
    (
        spec.source.clone(),
        spec.sha256
            .iter()
            .map(|(k, v)| (k.clone(), v.to_ascii_lowercase()))
            .collect(),
    )
}

/// The SIGHUP stream. Take it before the server says it is serving: until a handler is
/// registered, SIGHUP's default action ends the process.
#[cfg(unix)]
pub type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
pub type Hangup = ();

/// Registers the SIGHUP handler (`None` where that fails, with a warning).
pub fn hangup() -> Option<Hangup> {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Runs until aborted. `initial` is the manifest the server started from.
pub async fn watch(reloader: Reloader, w: Watch, initial: Manifest, hup: Option<Hangup>) {
    let mut seen: HashMap<String, (String, Vec<(String, String)>)> = initial
        .models
        .iter()
        .map(|m| (m.name.clone(), key(m)))
        .collect();
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut hup = hup;
    let mut tick = w.poll.map(tokio::time::interval);
    loop {
        let cause = tokio::select! {
            Some(()) = async {
                #[cfg(unix)]
                if let Some(h) = hup.as_mut() { return h.recv().await; }
                std::future::pending::<Option<()>>().await
            } => "SIGHUP",
            _ = async {
                match tick.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => "manifest poll",
        };
        let manifest = match Manifest::load(&w.manifest_path) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(cause, error = %e, "manifest not reloaded");
                continue;
            }
        };
        for spec in &manifest.models {
            if w.only.as_ref().is_some_and(|o| !o.contains(&spec.name)) {
                continue;
            }
            let k = key(spec);
            if seen.get(&spec.name) == Some(&k) {
                continue;
            }
            tracing::info!(cause, model = %spec.name, source = %spec.source, "manifest entry changed; reloading");
            reloader.registry.slot_for(spec);
            let req = ReloadRequest {
                model: spec.name.clone(),
                source: Some(spec.source.clone()),
                sha256: spec.sha256.clone(),
                actor: cause.to_string(),
                ..Default::default()
            };
            match reloader.reload(req) {
                Ok(mut events) => {
                    // Remember the entry only once it committed, so a failed one is retried
                    // on the next trigger.
                    while let Some(ev) = events.recv().await {
                        if let ReloadEvent::Done(o) = ev {
                            if o.committed {
                                seen.insert(spec.name.clone(), k.clone());
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(cause, model = %spec.name, error = %e, "reload not started")
                }
            }
        }
        // Entries gone from the manifest are unloaded: new requests get NOT_FOUND, health
        // reports NOT_SERVING, and the version is freed when its last request ends.
        let gone: Vec<String> = seen
            .keys()
            .filter(|name| manifest.get(name).is_none())
            .cloned()
            .collect();
        for name in gone {
            match reloader.unload(&name) {
                Ok(()) => {
                    tracing::info!(cause, model = %name, "manifest entry removed; model unloaded");
                    seen.remove(&name);
                }
                Err(e) => tracing::warn!(cause, model = %name, error = %e, "not unloaded"),
            }
        }
    }
}
