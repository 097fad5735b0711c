//! The scrape: the state gauges set from a [`Snapshot`] of the server, then every metric in
//! the OpenMetrics text format.
use prometheus_client::encoding::text::encode;

use super::Metrics;

impl Metrics {
    /// Sets the state gauges from `state` and renders every metric in the OpenMetrics text
    /// format.
    pub fn render(&self, state: &Snapshot) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.active_info.clear();
        self.in_flight.clear();
        self.model_memory.clear();
        self.reloading.clear();
        for v in &state.active {
            self.active_info
                .get_or_create(&vec![
                    ("model", v.model.clone()),
                    ("version", v.version.clone()),
                    ("generation", v.generation.to_string()),
                    ("sha256", v.sha256.clone()),
                    ("device", v.device.clone()),
                ])
                .set(1);
        }
        for v in &state.versions {
            let labels = vec![
                ("model", v.model.clone()),
                ("version", v.version.clone()),
                ("role", v.role.to_string()),
            ];
            self.in_flight
                .get_or_create(&labels)
                .set(v.in_flight as i64);
            let mut mem = labels;
            mem.push(("device", v.device.clone()));
            self.model_memory
                .get_or_create(&mem)
                .set(v.weight_bytes as i64);
        }
        for (model, reloading) in &state.reloading {
            self.reloading
                .get_or_create(&vec![("model", model.clone())])
                .set(*reloading as i64);
        }
        for g in [
            &self.batch_sequences,
            &self.batch_parked,
            &self.batch_waiting,
            &self.kv_tokens,
        ] {
            g.clear();
        }
        for b in &state.batches {
            let l = vec![("model", b.model.clone()), ("version", b.version.clone())];
            self.batch_sequences
                .get_or_create(&l)
                .set(b.sequences as i64);
            self.batch_parked.get_or_create(&l).set(b.parked as i64);
            self.batch_waiting.get_or_create(&l).set(b.waiting as i64);
            self.kv_tokens.get_or_create(&l).set(b.kv_tokens as i64);
        }
        self.running.set(state.running as i64);
        self.queued.set(state.queued as i64);
        self.resident.set(crate::memory::rss_bytes() as i64);
        if let Some(d) = &state.device {
            let l = vec![("device", d.label.clone())];
            self.device_free.get_or_create(&l).set(d.free as i64);
            self.device_total.get_or_create(&l).set(d.total as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The server's state at one scrape: what the gauges show.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub active: Vec<ActiveVersion>,
    /// Every version still alive (active, standby, draining), with its role.
    pub versions: Vec<LiveVersion>,
    /// Per model: whether a reload is running.
    pub reloading: Vec<(String, bool)>,
    pub batches: Vec<BatchGauges>,
    pub running: usize,
    pub queued: usize,
    pub device: Option<DeviceGauges>,
}

#[derive(Debug)]
pub struct ActiveVersion {
    pub model: String,
    pub version: String,
    pub generation: u64,
    pub sha256: String,
    pub device: String,
}

#[derive(Debug)]
pub struct LiveVersion {
    pub model: String,
    pub version: String,
    pub role: &'static str,
    pub in_flight: u64,
    pub device: String,
    pub weight_bytes: u64,
}

/// One version's batch.
#[derive(Debug)]
pub struct BatchGauges {
    pub model: String,
    pub version: String,
    pub sequences: usize,
    pub parked: usize,
    pub waiting: usize,
    pub kv_tokens: usize,
}

#[derive(Debug)]
pub struct DeviceGauges {
    pub label: String,
    pub free: u64,
    pub total: u64,
}
