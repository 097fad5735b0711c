//! Prometheus metrics, served as text on their own HTTP address (`--metrics-listen`).
//!
//! Counters and histograms are recorded where things happen (the engine, the services, the
//! reload); gauges that describe state (active versions, in-flight requests per version,
//! memory per version, queue depth) are read from the registry and the engine at each scrape
//! ([`crate::scrape`] gathers them into a [`Snapshot`]), so they can never drift from what the
//! server really holds. This module is the sink: it knows none of the parts that feed it.
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as PromRegistry;

mod render;
mod text;

pub use render::{ActiveVersion, BatchGauges, DeviceGauges, LiveVersion, Snapshot};
pub use text::{fetch, parse, Sample};

/// Label pairs; a `Vec` keeps the families generic and the call sites readable.
pub type Labels = Vec<(&'static str, String)>;
type Hist = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn batch_histogram() -> Histogram {
    // 1, 2, 4, .. 1024 sequences.
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

fn phase_histogram() -> Histogram {
    // 1 ms .. ~9 min: a drain may wait out long streams.
    Histogram::new(exponential_buckets(0.001, 2.5, 15))
}

/// Every metric swapd exports. One per server (tests run several servers in one process).
pub struct Metrics {
    registry: PromRegistry,
    reloads: Family<Labels, Counter>,
    reload_phase: Hist,
    preflight_failures: Family<Labels, Counter>,
    memory_reclaimed: Family<Labels, Counter>,
    requests: Family<Labels, Counter>,
    ttft: Hist,
    inter_token: Hist,
    generated_tokens: Family<Labels, Counter>,
    prompt_tokens: Family<Labels, Counter>,
    rejected: Counter,
    batch_size: Hist,
    step_seconds: Hist,
    // Read at scrape time.
    batch_sequences: Family<Labels, Gauge>,
    batch_parked: Family<Labels, Gauge>,
    batch_waiting: Family<Labels, Gauge>,
    kv_tokens: Family<Labels, Gauge>,
    active_info: Family<Labels, Gauge>,
    in_flight: Family<Labels, Gauge>,
    model_memory: Family<Labels, Gauge>,
    reloading: Family<Labels, Gauge>,
    running: Gauge,
    queued: Gauge,
    resident: Gauge,
    device_free: Family<Labels, Gauge>,
    device_total: Family<Labels, Gauge>,
    scrape: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = PromRegistry::with_prefix("swapd");
        let m = Self {
            reloads: Family::default(),
            reload_phase: Family::new_with_constructor(phase_histogram),
            preflight_failures: Family::default(),
            memory_reclaimed: Family::default(),
            requests: Family::default(),
            ttft: Family::new_with_constructor(latency_histogram),
            inter_token: Family::new_with_constructor(latency_histogram),
            generated_tokens: Family::default(),
            prompt_tokens: Family::default(),
            rejected: Counter::default(),
            batch_size: Family::new_with_constructor(batch_histogram),
            step_seconds: Family::new_with_constructor(latency_histogram),
            batch_sequences: Family::default(),
            batch_parked: Family::default(),
            batch_waiting: Family::default(),
            kv_tokens: Family::default(),
            active_info: Family::default(),
            in_flight: Family::default(),
            model_memory: Family::default(),
            reloading: Family::default(),
            running: Gauge::default(),
            queued: Gauge::default(),
            resident: Gauge::default(),
            device_free: Family::default(),
            device_total: Family::default(),
            scrape: std::sync::Mutex::new(()),
            registry: PromRegistry::default(),
        };
        // Counters get `_total` appended by the encoder.
        r.register(
            "reload",
            "Reloads and rollbacks by model, action (reload, rollback, auto_rollback) and result (committed, failed)",
            m.reloads.clone(),
        );
        r.register(
            "reload_phase_seconds",
            "Duration of each reload phase (resolve, verify, admit, load, preflight, swap, drain, free)",
            m.reload_phase.clone(),
        );
        r.register(
            "preflight_failures",
            "Reloads refused by a pre-flight check, by check",
            m.preflight_failures.clone(),
        );
        r.register(
            "memory_reclaimed_bytes",
            "Bytes that came back when a replaced version was freed (process RSS on the CPU, device memory in use on a GPU)",
            m.memory_reclaimed.clone(),
        );
        r.register(
            "requests",
            "Finished requests by model, RPC and gRPC status code",
            m.requests.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From admission to the first generated token",
            m.ttft.clone(),
        );
        r.register(
            "inter_token_seconds",
            "Time between consecutive generated tokens of one stream",
            m.inter_token.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        r.register(
            "admission_rejected",
            "Requests refused because the running and queued limits were full",
            m.rejected.clone(),
        );
        r.register(
            "active_model_info",
            "The active version of each model (value 1)",
            m.active_info.clone(),
        );
        r.register(
            "inflight_requests",
            "Requests holding each live version (active, standby or retiring)",
            m.in_flight.clone(),
        );
        r.register(
            "model_memory_bytes",
            "Weight bytes held by each live version",
            m.model_memory.clone(),
        );
        r.register(
            "reload_in_progress",
            "1 while a reload or rollback of the model runs",
            m.reloading.clone(),
        );
        r.register(
            "running_requests",
            "Requests holding a running slot",
            m.running.clone(),
        );
        r.register(
            "queue_depth",
            "Requests admitted and waiting for a running slot",
            m.queued.clone(),
        );
        r.register(
            "resident_memory_bytes",
            "Resident set size of the process",
            m.resident.clone(),
        );
        r.register(
            "device_memory_free_bytes",
            "Free memory of the device models load onto (MemAvailable on the CPU, the driver's free bytes on a GPU); admission compares against it",
            m.device_free.clone(),
        );
        r.register(
            "device_memory_total_bytes",
            "Total memory of the device models load onto (MemTotal on the CPU)",
            m.device_total.clone(),
        );
        r.register(
            "batch_size",
            "Sequences in each batch step, by model",
            m.batch_size.clone(),
        );
        r.register(
            "step_seconds",
            "Duration of each batch step (one forward pass over the batch, sampling included), by model",
            m.step_seconds.clone(),
        );
        r.register(
            "batch_sequences",
            "Sequences in a version's batch (running or parked), by model and version",
            m.batch_sequences.clone(),
        );
        r.register(
            "batch_parked_sequences",
            "Sequences out of their batch because their client does not read, by model and version",
            m.batch_parked.clone(),
        );
        r.register(
            "batch_waiting_sequences",
            "Sequences waiting to join their version's batch (batch full or KV budget used), by model and version",
            m.batch_waiting.clone(),
        );
        r.register(
            "kv_cache_tokens",
            "KV cache tokens reserved by a version's sequences, by model and version",
            m.kv_tokens.clone(),
        );
        Self { registry: r, ..m }
    }

    /// One batch step of `model` over `size` sequences.
    pub fn batch_step(&self, model: &str, size: usize, took: Duration) {
        let l = vec![("model", model.to_string())];
        self.batch_size.get_or_create(&l).observe(size as f64);
        self.step_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// A finished request: `code` is the gRPC code name (`OK`, `INVALID_ARGUMENT`, ...).
    pub fn request(&self, model: &str, rpc: &'static str, code: tonic::Code) {
        self.requests
            .get_or_create(&vec![
                ("model", model.to_string()),
                ("rpc", rpc.to_string()),
                ("code", code_name(code).to_string()),
            ])
            .inc();
    }

    pub fn rejected(&self) {
        self.rejected.inc();
    }

    pub fn first_token(&self, model: &str, after: Duration, prompt_tokens: usize) {
        let l = vec![("model", model.to_string())];
        self.ttft.get_or_create(&l).observe(after.as_secs_f64());
        self.prompt_tokens
            .get_or_create(&l)
            .inc_by(prompt_tokens as u64);
    }

    pub fn token(&self, model: &str, since_previous: Option<Duration>) {
        let l = vec![("model", model.to_string())];
        self.generated_tokens.get_or_create(&l).inc();
        if let Some(d) = since_previous {
            self.inter_token.get_or_create(&l).observe(d.as_secs_f64());
        }
    }

    /// A reload or rollback ended: one count, one phase sample per phase it went through.
    pub fn reload_done(&self, model: &str, action: &str, o: &ReloadSample<'_>) {
        let result = if o.committed { "committed" } else { "failed" };
        self.reloads
            .get_or_create(&vec![
                ("model", model.to_string()),
                ("action", action.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
        for (phase, d) in &o.phases {
            self.reload_phase
                .get_or_create(&vec![
                    ("model", model.to_string()),
                    ("phase", phase.to_string()),
                ])
                .observe(d.as_secs_f64());
        }
        if let Some(check) = o.failed_check {
            self.preflight_failures
                .get_or_create(&vec![
                    ("model", model.to_string()),
                    ("check", check.to_string()),
                ])
                .inc();
        }
        if o.bytes_released > 0 {
            self.memory_reclaimed
                .get_or_create(&vec![("model", model.to_string())])
                .inc_by(o.bytes_released as u64);
        }
    }
}

/// What a finished reload or rollback tells the metrics.
#[derive(Debug, Default)]
pub struct ReloadSample<'a> {
    pub committed: bool,
    /// Each phase it went through, by name, and how long it took.
    pub phases: Vec<(&'static str, Duration)>,
    pub failed_check: Option<&'a str>,
    pub bytes_released: i64,
}

/// gRPC's upper-case code names, as dashboards expect them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_render_under_the_documented_names() {
        let m = Metrics::new();
        m.request("m", "Generate", tonic::Code::Ok);
        m.token("m", Some(Duration::from_millis(10)));
        let o = ReloadSample {
            committed: true,
            phases: vec![
                ("resolve", Duration::from_millis(1)),
                ("swap", Duration::ZERO),
            ],
            bytes_released: 1000,
            ..Default::default()
        };
        m.reload_done("m", "reload", &o);
        let state = Snapshot {
            batches: vec![BatchGauges {
                model: "m".into(),
                version: "v".into(),
                sequences: 3,
                parked: 1,
                waiting: 2,
                kv_tokens: 99,
            }],
            device: Some(DeviceGauges {
                label: "cpu".into(),
                free: 10,
                total: 20,
            }),
            ..Default::default()
        };
        let text = m.render(&state);
        let s = parse(&text);
        let one = |name: &str| s.iter().find(|x| x.name == name).map(|x| x.value);
        assert_eq!(one("swapd_requests_total"), Some(1.0));
        assert_eq!(one("swapd_reload_total"), Some(1.0));
        assert_eq!(one("swapd_memory_reclaimed_bytes_total"), Some(1000.0));
        assert_eq!(one("swapd_generated_tokens_total"), Some(1.0));
        let (free, total) = (
            one("swapd_device_memory_free_bytes").unwrap(),
            one("swapd_device_memory_total_bytes").unwrap(),
        );
        assert_eq!((free, total), (10.0, 20.0));
        assert_eq!(one("swapd_kv_cache_tokens"), Some(99.0));
        assert_eq!(one("swapd_batch_parked_sequences"), Some(1.0));
        assert_eq!(one("swapd_inter_token_seconds_count"), Some(1.0));
        let phases: Vec<_> = s
            .iter()
            .filter(|x| x.name == "swapd_reload_phase_seconds_count")
            .map(|x| x.label("phase").unwrap().to_string())
            .collect();
        assert_eq!(phases.len(), 2, "{phases:?}");
        assert!(text.ends_with("# EOF\n"));
    }
}
