//! grpc.health.v1 as orchestrators read it. Per model name: SERVING while a version is
//! active (a reload keeps it SERVING: the old version serves until the swap), NOT_SERVING
//! while it has none (before its first load, or while a resource-preserving reload has it
//! suspended), and once unloaded (its manifest entry removed). The overall status (`""`) and `swapd.v1.Inference` are SERVING only while every
//! configured model is. Once shutdown begins, everything is NOT_SERVING.
//!
//! The statuses are recomputed from the registry whenever it reports a change, and only
//! real transitions are published, so a `Watch` stream sees each change once.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::registry::Registry;

/// The names of swapd's own gRPC services, as health reports them.
pub const INFERENCE: &str = "swapd.v1.Inference";
pub const CONTROL: &str = "swapd.v1.ModelControl";

/// What the health service reports, kept in step with the registry.
pub struct Health {
    reporter: HealthReporter,
    published: tokio::sync::Mutex<HashMap<String, ServingStatus>>,
    stopping: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            reporter: HealthReporter::new(),
            published: Default::default(),
            stopping: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// A gRPC service answering Check and Watch from these statuses.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }

    /// What every name should report now.
    pub fn compute(&self, registry: &Registry) -> Vec<(String, ServingStatus)> {
        let stopping = self.stopping.load(Ordering::Acquire);
        let status = |up: bool| {
            if up && !stopping {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        let slots = registry.slots();
        let mut all = !slots.is_empty();
        let mut out = Vec::with_capacity(slots.len() + 3);
        for slot in &slots {
            let up = slot.is_serving();
            all &= up;
            out.push((slot.spec.name.clone(), status(up)));
        }
        out.push((String::new(), status(all)));
        out.push((INFERENCE.to_string(), status(all)));
        out.push((CONTROL.to_string(), status(true)));
        out
    }

    /// Publishes the statuses that changed. A model no longer configured (unloaded) stays
    /// NOT_SERVING, so a watcher learns it is gone.
    pub async fn refresh(&self, registry: &Registry) {
        let mut published = self.published.lock().await;
        let mut now = self.compute(registry);
        for name in published.keys() {
            if !now.iter().any(|(n, _)| n == name) {
                now.push((name.clone(), ServingStatus::NotServing));
            }
        }
        for (name, status) in now {
            if published.get(&name) != Some(&status) {
                tracing::info!(service = %name, status = ?status, "health");
                self.reporter.set_service_status(&name, status).await;
                published.insert(name, status);
            }
        }
    }

    /// Shutdown began: everything goes NOT_SERVING, for good.
    pub async fn shutting_down(&self, registry: &Registry) {
        self.stopping.store(true, Ordering::Release);
        self.refresh(registry).await;
    }

    /// Keeps the statuses in step with the registry until the registry goes away.
    pub async fn follow(self: Arc<Self>, registry: Arc<Registry>) {
        let mut changes = registry.watch_serving();
        loop {
            self.refresh(&registry).await;
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}
