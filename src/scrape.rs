//! The `/metrics` endpoint: gathers what the gauges show from the registry, the engine and
//! the device at each scrape, and has [`Metrics`] render it. It sits above all three, so
//! the metrics sink below them needs to know none of them.
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::device::Device;
use crate::engine::Engine;
use crate::metrics::{ActiveVersion, BatchGauges, DeviceGauges, LiveVersion, Metrics, Snapshot};
use crate::registry::Registry;

/// The server's state now, as the gauges show it.
pub fn snapshot(registry: &Registry, engine: &Engine, device: &Device) -> Snapshot {
    let mut s = Snapshot::default();
    for slot in registry.slots() {
        let model = slot.spec.name.clone();
        if let Some(v) = slot.active() {
            s.active.push(ActiveVersion {
                model: model.clone(),
                version: v.version.clone(),
                generation: v.generation(),
                sha256: v.weights_sha256().to_string(),
                device: v.device(),
            });
        }
        for (t, role) in slot.live_versions() {
            s.versions.push(LiveVersion {
                model: model.clone(),
                version: t.name.clone(),
                role: role.as_str(),
                in_flight: t.stats.in_flight(),
                device: t.device.clone(),
                weight_bytes: t.weight_bytes,
            });
        }
        s.reloading.push((model, slot.state().reloading.is_some()));
    }
    for (model, version, b) in engine.batches() {
        s.batches.push(BatchGauges {
            model,
            version,
            sequences: b.sequences.load(Relaxed),
            parked: b.parked.load(Relaxed),
            waiting: b.waiting.load(Relaxed),
            kv_tokens: b.kv_tokens.load(Relaxed),
        });
    }
    (s.running, s.queued) = engine.load();
    s.device = device
        .memory()
        .free_total()
        .map(|(free, total)| DeviceGauges {
            label: device.label(),
            free,
            total,
        });
    s
}

/// What the `/metrics` endpoint reads.
#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    pub engine: Engine,
    pub device: Device,
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    endpoint: Endpoint,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let e = endpoint.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || {
                    e.metrics
                        .render(&snapshot(&e.registry, &e.engine, &e.device))
                })
                .await
                .unwrap_or_default();
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    tracing::info!(addr = ?addr, "metrics endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
