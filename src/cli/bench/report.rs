//! The reload benchmark's records, their split into steady and reload windows, and the
//! Markdown report.
use serde::Serialize;

use crate::cli::stats::percentile;

/// One request as the client saw it; times in seconds since the benchmark started.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub client: usize,
    pub start: f64,
    /// Arrival of each delta carrying text or ids.
    pub tokens: Vec<f64>,
    pub code: String,
    /// Distinct (version, generation) pairs its messages named.
    pub versions: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseRecord {
    pub phase: String,
    pub start: f64,
    pub end: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadRecord {
    pub source: String,
    pub start: f64,
    pub end: f64,
    pub committed: bool,
    pub error: String,
    pub phases: Vec<PhaseRecord>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct WindowStats {
    pub seconds: f64,
    pub tokens: usize,
    pub aggregate_tokens_per_s: f64,
    pub per_stream_tokens_per_s_p50: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p99: f64,
    pub itl_ms_p50: f64,
    pub itl_ms_p99: f64,
    pub itl_samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub model: String,
    pub clients: usize,
    pub duration_s: f64,
    pub reload_every_s: f64,
    pub resource_preserving: bool,
    pub requests: usize,
    pub failed_requests: usize,
    pub mixed_version_streams: usize,
    pub reloads: usize,
    pub reloads_committed: usize,
    pub steady: WindowStats,
    pub during_reload: WindowStats,
    /// Median RSS outside reloads, and the highest RSS seen during one.
    pub steady_rss_bytes: Option<u64>,
    pub peak_rss_during_reload_bytes: Option<u64>,
    pub peak_over_steady: Option<f64>,
    /// Per reload: from the drain's end until RSS was back within 2% of steady (ms).
    pub memory_back_ms: Vec<Option<f64>>,
    /// Inter-token latency by the reload phase running when the token arrived (all reloads).
    pub itl_by_phase: Vec<PhaseItl>,
    pub reload_details: Vec<ReloadRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseItl {
    pub phase: String,
    pub samples: usize,
    pub itl_ms_p50: f64,
    pub itl_ms_p99: f64,
}

/// What the report says of the run itself (from the benchmark's options).
#[derive(Debug, Clone)]
pub(super) struct RunInfo {
    pub label: String,
    pub model: String,
    pub clients: usize,
    pub duration: f64,
    pub reload_every: f64,
    pub resource_preserving: bool,
}

pub(super) fn analyze(
    b: &RunInfo,
    records: Vec<RequestRecord>,
    rss: &[(f64, u64)],
    reloads: Vec<ReloadRecord>,
) -> Report {
    let windows: Vec<(f64, f64)> = reloads.iter().map(|r| (r.start, r.end)).collect();
    let in_reload = |t: f64| windows.iter().any(|(a, z)| t >= *a && t <= *z);
    let reload_secs: f64 = windows
        .iter()
        .map(|(a, z)| (z.min(b.duration) - a.min(b.duration)).max(0.0))
        .sum::<f64>()
        + 0.0; // An empty float sum is -0.0.
    let stats = |during: bool| {
        let mut s = WindowStats {
            seconds: if during {
                reload_secs
            } else {
                (b.duration - reload_secs).max(0.0)
            },
            ..Default::default()
        };
        let (mut ttft, mut itl, mut per_stream) = (Vec::new(), Vec::new(), Vec::new());
        for r in &records {
            for (i, t) in r.tokens.iter().enumerate() {
                if in_reload(*t) == during && *t <= b.duration {
                    s.tokens += 1;
                    if i > 0 {
                        itl.push((t - r.tokens[i - 1]) * 1e3);
                    }
                }
            }
            if let Some(first) = r.tokens.first() {
                if in_reload(r.start) == during {
                    ttft.push((first - r.start) * 1e3);
                }
                if r.tokens.len() > 1 && in_reload(*first) == during {
                    let span = r.tokens[r.tokens.len() - 1] - first;
                    if span > 0.0 {
                        per_stream.push((r.tokens.len() - 1) as f64 / span);
                    }
                }
            }
        }
        s.aggregate_tokens_per_s = if s.seconds > 0.0 {
            s.tokens as f64 / s.seconds
        } else {
            0.0
        };
        s.itl_samples = itl.len();
        s.ttft_ms_p50 = percentile(&mut ttft, 50.0);
        s.ttft_ms_p99 = percentile(&mut ttft, 99.0);
        s.itl_ms_p50 = percentile(&mut itl, 50.0);
        s.itl_ms_p99 = percentile(&mut itl, 99.0);
        s.per_stream_tokens_per_s_p50 = percentile(&mut per_stream, 50.0);
        s
    };
    let steady = stats(false);
    let during_reload = stats(true);
    let mut steady_rss: Vec<f64> = rss
        .iter()
        .filter(|(t, _)| !in_reload(*t))
        .map(|(_, v)| *v as f64)
        .collect();
    let steady_rss = (!steady_rss.is_empty()).then(|| percentile(&mut steady_rss, 50.0) as u64);
    let peak = rss
        .iter()
        .filter(|(t, _)| in_reload(*t))
        .map(|(_, v)| *v)
        .max();
    let memory_back_ms = reloads
        .iter()
        .map(|r| {
            let drain_end = r.phases.iter().find(|p| p.phase == "drain")?.end;
            let steady = steady_rss? as f64;
            rss.iter()
                .find(|(t, v)| *t >= drain_end && (*v as f64) <= steady * 1.02)
                .map(|(t, _)| (t - drain_end).max(0.0) * 1e3)
        })
        .collect();
    // Which phase each inter-token gap ended in: where the latency during reloads comes from.
    let phase_at = |t: f64| {
        reloads
            .iter()
            .filter(|r| t >= r.start && t <= r.end)
            .flat_map(|r| &r.phases)
            .find(|p| t >= p.start && t <= p.end)
            .map(|p| p.phase.as_str())
    };
    let mut by_phase: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for r in &records {
        for w in r.tokens.windows(2) {
            if let Some(phase) = phase_at(w[1]) {
                by_phase.entry(phase).or_default().push((w[1] - w[0]) * 1e3);
            }
        }
    }
    let itl_by_phase = crate::registry::reload::Phase::ALL
        .map(crate::registry::reload::phase_name)
        .into_iter()
        .filter_map(|name| {
            let mut v = by_phase.remove(name)?;
            Some(PhaseItl {
                phase: name.to_string(),
                samples: v.len(),
                itl_ms_p50: percentile(&mut v, 50.0),
                itl_ms_p99: percentile(&mut v, 99.0),
            })
        })
        .collect();
    Report {
        label: b.label.clone(),
        model: b.model.clone(),
        clients: b.clients,
        duration_s: b.duration,
        reload_every_s: b.reload_every,
        resource_preserving: b.resource_preserving,
        requests: records.len(),
        failed_requests: records.iter().filter(|r| r.code != "OK").count(),
        mixed_version_streams: records.iter().filter(|r| r.versions.len() > 1).count(),
        reloads: reloads.len(),
        reloads_committed: reloads.iter().filter(|r| r.committed).count(),
        steady,
        during_reload,
        steady_rss_bytes: steady_rss,
        peak_rss_during_reload_bytes: peak,
        peak_over_steady: match (peak, steady_rss) {
            (Some(p), Some(s)) if s > 0 => Some(p as f64 / s as f64),
            _ => None,
        },
        memory_back_ms,
        itl_by_phase,
        reload_details: reloads,
    }
}

/// The report as Markdown: one summary table, then each reload's phases.
pub fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### {}: {} clients, {:.0} s, reload every {} s{}\n",
        r.label,
        r.clients,
        r.duration_s,
        r.reload_every_s,
        if r.resource_preserving {
            ", resource-preserving"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "| | steady | during reloads |\n|---|---|---|");
    let row = |s: &mut String, name: &str, a: String, b: String| {
        let _ = writeln!(s, "| {name} | {a} | {b} |");
    };
    let (a, b) = (&r.steady, &r.during_reload);
    row(
        &mut s,
        "seconds",
        format!("{:.1}", a.seconds),
        format!("{:.1}", b.seconds),
    );
    row(
        &mut s,
        "aggregate decode tokens/s",
        format!("{:.1}", a.aggregate_tokens_per_s),
        format!("{:.1}", b.aggregate_tokens_per_s),
    );
    row(
        &mut s,
        "per-stream tokens/s (p50)",
        format!("{:.1}", a.per_stream_tokens_per_s_p50),
        format!("{:.1}", b.per_stream_tokens_per_s_p50),
    );
    row(
        &mut s,
        "time to first token p50 / p99 (ms)",
        format!("{:.0} / {:.0}", a.ttft_ms_p50, a.ttft_ms_p99),
        format!("{:.0} / {:.0}", b.ttft_ms_p50, b.ttft_ms_p99),
    );
    row(
        &mut s,
        "inter-token latency p50 / p99 (ms)",
        format!("{:.1} / {:.1}", a.itl_ms_p50, a.itl_ms_p99),
        format!("{:.1} / {:.1}", b.itl_ms_p50, b.itl_ms_p99),
    );
    let _ = writeln!(
        s,
        "\nrequests {}, failed {}, mixed-version streams {}, reloads {} ({} committed)",
        r.requests, r.failed_requests, r.mixed_version_streams, r.reloads, r.reloads_committed
    );
    if let (Some(st), Some(pk)) = (r.steady_rss_bytes, r.peak_rss_during_reload_bytes) {
        let back: Vec<String> = r
            .memory_back_ms
            .iter()
            .map(|m| m.map(|v| format!("{v:.0}")).unwrap_or("-".into()))
            .collect();
        let _ = writeln!(
            s,
            "\nsteady RSS {:.1} MB, peak during reloads {:.1} MB ({:.2}×); memory back after drain (ms): {}",
            st as f64 / 1e6,
            pk as f64 / 1e6,
            pk as f64 / st as f64,
            back.join(", ")
        );
    }
    if !r.itl_by_phase.is_empty() {
        let _ = writeln!(
            s,
            "\n| inter-token latency by reload phase | samples | p50 (ms) | p99 (ms) |\n|---|---|---|---|"
        );
        for p in &r.itl_by_phase {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} |",
                p.phase, p.samples, p.itl_ms_p50, p.itl_ms_p99
            );
        }
    }
    if !r.reload_details.is_empty() {
        let names = crate::registry::reload::Phase::ALL.map(crate::registry::reload::phase_name);
        let _ = writeln!(
            s,
            "\n| reload | {} | total |\n|---|{}---|",
            names.join(" | "),
            "---|".repeat(names.len())
        );
        for (i, rl) in r.reload_details.iter().enumerate() {
            let cells: Vec<String> = names
                .iter()
                .map(|n| {
                    rl.phases
                        .iter()
                        .find(|p| p.phase == *n)
                        .map(|p| format!("{:.0}", (p.end - p.start) * 1e3))
                        .unwrap_or("-".into())
                })
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} ms |",
                i + 1,
                cells.join(" | "),
                (rl.end - rl.start) * 1e3
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(duration: f64) -> RunInfo {
        RunInfo {
            label: "t".into(),
            model: "m".into(),
            clients: 1,
            duration,
            reload_every: 5.0,
            resource_preserving: false,
        }
    }

    fn phase(name: &str, start: f64, end: f64) -> PhaseRecord {
        PhaseRecord {
            phase: name.into(),
            start,
            end,
        }
    }

    #[test]
    fn analysis_splits_windows_and_attributes_latency_to_reload_phases() {
        // One stream, a token every 100 ms for 10 s, but 400 ms gaps while the reload
        // (4–6 s) is in its load phase (4–5 s); the drain (5–6 s) is fast again.
        let mut tokens = vec![];
        let mut t = 0.0;
        while t < 10.0 {
            tokens.push(t);
            t += if (4.0..5.0).contains(&t) { 0.4 } else { 0.1 };
        }
        let records = vec![RequestRecord {
            client: 0,
            start: 0.0,
            tokens,
            code: "OK".into(),
            versions: vec!["v1@1".into()],
        }];
        let reloads = vec![ReloadRecord {
            source: "b".into(),
            start: 4.0,
            end: 6.0,
            committed: true,
            error: String::new(),
            phases: vec![phase("load", 4.0, 5.0), phase("drain", 5.0, 6.0)],
        }];
        let rss = [(1.0, 100), (4.5, 190), (5.5, 150), (6.2, 101), (8.0, 100)];
        let r = analyze(&bench(10.0), records, &rss, reloads);
        assert_eq!((r.failed_requests, r.mixed_version_streams), (0, 0));
        assert!((r.during_reload.seconds - 2.0).abs() < 1e-9);
        assert!((r.steady.itl_ms_p99 - 100.0).abs() < 1e-6, "{:?}", r.steady);
        assert!((r.during_reload.itl_ms_p99 - 400.0).abs() < 1e-6);
        let phases: Vec<_> = r.itl_by_phase.iter().map(|p| p.phase.as_str()).collect();
        assert_eq!(phases, ["load", "drain"], "in Phase::ALL order");
        assert!((r.itl_by_phase[0].itl_ms_p50 - 400.0).abs() < 1e-6);
        assert!((r.itl_by_phase[1].itl_ms_p50 - 100.0).abs() < 1e-6);
        assert_eq!(r.steady_rss_bytes, Some(100));
        assert_eq!(r.peak_rss_during_reload_bytes, Some(190));
        // Back within 2% of steady 200 ms after the drain ended at 6 s.
        assert!((r.memory_back_ms[0].unwrap() - 200.0).abs() < 1e-6);
        assert!(markdown(&r).contains("| load | "));
    }
}
