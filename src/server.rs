//! The server: opens the device, loads every configured model, then serves gRPC
//! (inference, health, reflection) on an already-bound listener until `shutdown` resolves.
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::Config;
use crate::device::{self, Device, DeviceError};
use crate::engine::Engine;
use crate::manifest::ModelSpec;
use crate::model::{self, ModelError, ModelVersion, Resolver};
use crate::proto::inference_server::InferenceServer;
use crate::proto::model_control_server::ModelControlServer;
use crate::registry::persist::{Committed, StateStore};
use crate::registry::reload::Reloader;
use crate::registry::Registry;
use crate::service::control::{AdminAuth, ControlService};
use crate::service::inference::InferenceService;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("internal: {0}")]
    Internal(String),
}

/// A started server: device open, models loaded, not yet serving.
pub struct Server {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub engine: Engine,
    pub device: Device,
    pub resolver: Resolver,
    pub reloader: Reloader,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub health: Arc<crate::health::Health>,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Requests in flight when shutdown began.
    pub in_flight_at_start: usize,
    /// Requests still running when the grace period ended (they were ended with UNAVAILABLE).
    pub cut: usize,
}

impl DrainReport {
    /// Every request in flight finished within the grace period.
    pub fn clean(&self) -> bool {
        self.cut == 0
    }
}

impl Server {
    /// Opens the device and loads every model of the manifest; any failure is returned
    /// before a request could see a half-loaded server.
    pub async fn start(config: Config) -> Result<Self, ServerError> {
        // Process-wide, as the CPU's turn queue is: the last server started sets it.
        crate::turns::set_slice(config.limits.background_slice);
        crate::memory::configure_allocator();
        let (device, fallback) = device::open(config.device)?;
        match fallback {
            Some(why) => tracing::info!(device = %device.label(), reason = %why, "using the CPU"),
            None => tracing::info!(device = %device.label(), "device opened"),
        }
        let resolver = Resolver {
            root: config.models_root.clone(),
            hf_cache: config.hf_cache.clone(),
            hf_offline: config.hf_offline,
        };
        let registry = Arc::new(Registry::default());
        let store = match &config.state_dir {
            Some(dir) => Some(Arc::new(StateStore::open(dir).map_err(|e| {
                ServerError::Internal(format!("state directory {}: {e}", dir.display()))
            })?)),
            None => None,
        };
        let committed = match &store {
            Some(s) => read_committed(s),
            None => Default::default(),
        };
        // Generations never go backwards, even when committed.json was lost: the audit log
        // remembers the highest one of each model.
        let highest = store
            .as_ref()
            .map(|s| s.highest_generations())
            .unwrap_or_default();
        let mut loads = tokio::task::JoinSet::new();
        for spec in config.manifest.models.clone() {
            let (resolver, device) = (resolver.clone(), device.clone());
            let last = committed.get(&spec.name).cloned();
            let highest = highest.get(&spec.name).copied().unwrap_or(0);
            loads.spawn(async move {
                let v = load_committed_or_manifest(&spec, last, highest, &resolver, &device).await;
                v.map(|v| (spec, v))
            });
        }
        let mut loaded = Vec::new();
        while let Some(res) = loads.join_next().await {
            loaded.push(res.map_err(|e| ServerError::Internal(e.to_string()))??);
        }
        // Slots are created in manifest order so ListModels and CLI defaults follow it.
        for spec in &config.manifest.models {
            if let Some((_, v)) = loaded.iter().find(|(s, _)| s.name == spec.name) {
                let slot = registry.slot_for(spec);
                slot.state().generation = v.generation();
                slot.activate(v.clone());
            }
        }
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let engine = Engine::new(config.limits, metrics.clone());
        let reloader = Reloader {
            registry: registry.clone(),
            resolver: resolver.clone(),
            device: device.clone(),
            store,
            cooldown: config.cooldown,
            budget: config.memory_budget,
            kv_cache_tokens: config.limits.kv_cache_tokens,
            memory_policy: config.memory_policy,
            auto_rollback: config.auto_rollback,
            metrics: metrics.clone(),
            stopping: Default::default(),
        };
        Ok(Self {
            config,
            registry,
            engine,
            device,
            resolver,
            reloader,
            metrics,
            health: Default::default(),
        })
    }

    /// Serves on `listener` until `shutdown` resolves, then drains (see
    /// [`Server::serve_split`]).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<DrainReport, ServerError> {
        self.serve_split(listener, None, shutdown).await
    }

    /// What `/metrics` reads.
    pub fn metrics_endpoint(&self) -> crate::scrape::Endpoint {
        crate::scrape::Endpoint {
            metrics: self.metrics.clone(),
            registry: self.registry.clone(),
            engine: self.engine.clone(),
            device: self.device.clone(),
        }
    }

    /// Serves inference, health and reflection on `listener`, and control there too or on
    /// `control_listener` when given, until `shutdown` resolves. Then it drains: health goes
    /// NOT_SERVING, no new connection or request is accepted, a reload in progress stops
    /// before its swap, and requests in flight get `config.shutdown_grace` to finish; those
    /// still running then end with UNAVAILABLE. The report says how it went.
    pub async fn serve_split(
        self,
        listener: TcpListener,
        control_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<DrainReport, ServerError> {
        self.health.refresh(&self.registry).await;
        let health_service = self.health.service();
        let follower = tokio::spawn(self.health.clone().follow(self.registry.clone()));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let inference = InferenceServer::new(InferenceService {
            registry: self.registry.clone(),
            engine: self.engine.clone(),
        })
        .max_decoding_message_size(self.config.limits.max_request_bytes);
        let auth = AdminAuth {
            token: self.config.admin_token.clone(),
            required: self.config.control_auth,
        };
        if auth.required && auth.token.is_none() {
            tracing::warn!("no admin token configured: control calls (reload, rollback, status) will be refused");
        }
        let control = ModelControlServer::with_interceptor(
            ControlService {
                reloader: self.reloader.clone(),
            },
            auth,
        );
        let watcher = tokio::spawn(crate::triggers::watch(
            self.reloader.clone(),
            crate::triggers::Watch {
                manifest_path: self.config.manifest_path.clone(),
                only: self.config.only_models.clone(),
                poll: self.config.manifest_poll,
            },
            self.config.manifest.clone(),
            crate::triggers::hangup(),
        ));
        let addr = listener.local_addr().ok();
        // The signal first flips health and stops reloads, then the servers stop accepting.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (engine, health, registry, reloader) = (
            self.engine.clone(),
            self.health.clone(),
            self.registry.clone(),
            self.reloader.clone(),
        );
        let in_flight_at_start = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let at_start = in_flight_at_start.clone();
        let closing = crate::service::closing::Closing::default();
        let close = closing.clone();
        tokio::spawn(async move {
            shutdown.await;
            // New calls are refused first, so none slips in between the count and the log.
            close.close();
            let n = engine.admitted();
            at_start.store(n, std::sync::atomic::Ordering::Release);
            health.shutting_down(&registry).await;
            reloader.stop();
            // Logged once all of it is true (calls are refused from the first moment), so an
            // operator (or a test) can act on the line; and before the listeners stop, so it
            // always comes before the drain's own line.
            tracing::info!(
                in_flight = n,
                "shutdown: health NOT_SERVING, no new requests, draining"
            );
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let builder = || {
            tonic::transport::Server::builder()
                .layer(crate::service::request_id::RequestIdLayer)
                .layer(crate::service::deadline::DeadlineLayer)
                .layer(closing.layer())
        };
        let served = async {
            match control_listener {
                None => {
                    tracing::info!(addr = ?addr, models = self.registry.slots().len(), "serving");
                    builder()
                        .add_service(health_service)
                        .add_service(reflection)
                        .add_service(inference)
                        .add_service(control)
                        .serve_with_incoming_shutdown(
                            TcpListenerStream::new(listener),
                            stopped(stop_rx.clone()),
                        )
                        .await
                }
                Some(control_listener) => {
                    let control_addr = control_listener.local_addr().ok();
                    let control_server = builder()
                        .add_service(health_service.clone())
                        .add_service(control)
                        .serve_with_incoming_shutdown(
                            TcpListenerStream::new(control_listener),
                            stopped(stop_rx.clone()),
                        );
                    tracing::info!(addr = ?addr, control = ?control_addr, models = self.registry.slots().len(), "serving");
                    let main_server = builder()
                        .add_service(health_service)
                        .add_service(reflection)
                        .add_service(inference)
                        .serve_with_incoming_shutdown(
                            TcpListenerStream::new(listener),
                            stopped(stop_rx.clone()),
                        );
                    let (a, b) = tokio::join!(main_server, control_server);
                    a.and(b)
                }
            }
        };
        tokio::pin!(served);
        let grace = self.config.shutdown_grace;
        let grace_over = async {
            stopped(stop_rx.clone()).await;
            tokio::time::sleep(grace).await;
        };
        let mut cut = 0;
        let result = tokio::select! {
            r = &mut served => r,
            () = grace_over => {
                cut = self.engine.admitted();
                tracing::warn!(still_running = cut, grace_secs = grace.as_secs_f64(), "shutdown: grace period over; ending the requests still running with UNAVAILABLE");
                self.engine.cut_all();
                // Generations stop at their next token; give their last messages a moment.
                match tokio::time::timeout(std::time::Duration::from_secs(2), &mut served).await {
                    Ok(r) => r,
                    Err(_) => Ok(()),
                }
            }
        };
        watcher.abort();
        follower.abort();
        result?;
        let report = DrainReport {
            in_flight_at_start: in_flight_at_start.load(std::sync::atomic::Ordering::Acquire),
            cut,
        };
        if report.clean() {
            tracing::info!(
                drained = report.in_flight_at_start,
                "shutdown: drain clean, every request in flight finished"
            );
        } else {
            tracing::warn!(
                drained = report.in_flight_at_start - cut.min(report.in_flight_at_start),
                cut,
                "shutdown: drain not clean"
            );
        }
        Ok(report)
    }
}

/// Loads the version last committed for `spec` (what a restarted swapd must serve), or the
/// manifest's when nothing was committed. If the committed files are gone or broken, the
/// manifest's version serves and the error is logged.
/// Reads the committed versions at startup. The state directory is the operator's to fix,
/// never a reason not to serve: one that cannot be written is warned about (every swap
/// would be refused), and an unreadable committed.json is set aside and treated as missing,
/// with a warning that says so.
fn read_committed(store: &StateStore) -> std::collections::BTreeMap<String, Committed> {
    if let Err(e) = store.check_writable() {
        tracing::warn!(dir = %store.dir().display(), error = %e, "the state directory is not writable: models are served, but every reload will be refused until it is (a swap that cannot be recorded is not made)");
    }
    let path = store.dir().join("committed.json");
    match store.committed() {
        Ok(c) => c,
        Err(e) => {
            let aside = match store.set_aside() {
                Ok(p) => format!("moved to {}", p.display()),
                Err(e) => format!("could not be moved aside: {e}"),
            };
            tracing::warn!(file = %path.display(), error = %e, aside = %aside, "committed.json is unreadable: serving each model's manifest version, as if no reload had been committed");
            Default::default()
        }
    }
}

async fn load_committed_or_manifest(
    spec: &ModelSpec,
    committed: Option<Committed>,
    highest: u64,
    resolver: &Resolver,
    device: &Device,
) -> Result<Arc<ModelVersion>, ModelError> {
    if let Some(c) = committed {
        let mut last = spec.clone();
        last.source = c.source.clone();
        last.sha256 = c.sha256.clone();
        // A commit older than the audit log's newest (recorded before swaps were refused
        // when they could not be recorded) comes back as a new activation.
        let generation = if c.generation >= highest {
            c.generation
        } else {
            tracing::warn!(model = %spec.name, committed = c.generation, highest, "committed.json is older than the audit log; its version is served at the next generation");
            highest + 1
        };
        match load_checked(&last, resolver, device, generation).await {
            Ok(v) => {
                tracing::info!(model = %spec.name, version = %v.version, generation, "serving the last committed version");
                return Ok(v);
            }
            Err(e) => tracing::error!(
                model = %spec.name,
                error = %e,
                "the last committed version cannot be loaded; serving the manifest's"
            ),
        }
    }
    // Anything but the last commit is a new activation: the next generation.
    load_checked(spec, resolver, device, highest + 1).await
}

/// Loads a version and runs its pre-flight checks (no serving version to compare with), so a
/// model is only ever served, and reported SERVING, once it passed them.
async fn load_checked(
    spec: &ModelSpec,
    resolver: &Resolver,
    device: &Device,
    generation: u64,
) -> Result<Arc<ModelVersion>, ModelError> {
    let v = model::load(spec, resolver, device, generation).await?;
    let (v2, checks) = (v.clone(), spec.preflight.clone());
    let results =
        tokio::task::spawn_blocking(move || model::preflight::run(&v2, None, &checks, &mut |_| {}))
            .await
            .map_err(|e| ModelError::Inference {
                model: spec.name.clone(),
                reason: format!("pre-flight thread: {e}"),
            })?;
    if let Some(bad) = results.into_iter().find(|c| !c.passed) {
        return Err(ModelError::Preflight {
            model: spec.name.clone(),
            check: bad.name,
            detail: bad.detail,
        });
    }
    tracing::info!(model = %spec.name, version = %v.version, "pre-flight checks passed");
    Ok(v)
}
