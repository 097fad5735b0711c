//! The reload benchmark's plots.
use anyhow::Result;

use super::report::{Report, RequestRecord};
use crate::cli::stats::percentile;

/// Inter-token latency (dots) and RSS (line) over time, reload phases shaded.
/// Plots the seconds `x0..x1` of the run.
pub(super) fn plot(
    path: &std::path::Path,
    r: &Report,
    records: &[RequestRecord],
    rss: &[(f64, u64)],
    (x0, x1): (f64, f64),
) -> Result<()> {
    use plotters::prelude::*;
    let inside = |t: f64| t >= x0 && t <= x1;
    let points: Vec<(f64, f64)> = records
        .iter()
        .flat_map(|rec| {
            rec.tokens
                .windows(2)
                .map(|w| (w[1], (w[1] - w[0]) * 1e3))
                .filter(|(t, _)| inside(*t))
                .collect::<Vec<_>>()
        })
        .collect();
    let rss: Vec<(f64, u64)> = rss.iter().copied().filter(|(t, _)| inside(*t)).collect();
    let mut sorted: Vec<f64> = points.iter().map(|p| p.1).collect();
    // One median and one maximum per 100 ms keep the file small and every spike visible.
    let mut bins: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for (t, v) in &points {
        bins.entry((t * 10.0) as u64).or_default().push(*v);
    }
    let (mut medians, mut maxima) = (Vec::new(), Vec::new());
    for (bin, mut vs) in bins {
        let t = bin as f64 / 10.0 + 0.05;
        medians.push((t, percentile(&mut vs, 50.0)));
        maxima.push((t, vs[vs.len() - 1]));
    }
    let y_max = (percentile(&mut sorted, 99.9) * 1.2).max(1.0);
    let rss_max = rss.iter().map(|x| x.1).max().unwrap_or(1) as f64 / 1e6 * 1.1;
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: inter-token latency per 100 ms (blue median, magenta max, ms), RSS (red, MB); reload phases shaded",
                r.label
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .right_y_label_area_size(55)
        .build_cartesian_2d(x0..x1, 0f64..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .set_secondary_coord(x0..x1, 0f64..rss_max.max(1.0));
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("inter-token latency (ms)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_secondary_axes()
        .y_desc("RSS (MB)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let shade = |phase: &str| match phase {
        "load" => RGBColor(255, 200, 120),
        "preflight" => RGBColor(255, 230, 150),
        "drain" => RGBColor(170, 210, 255),
        "free" => RGBColor(180, 240, 180),
        _ => RGBColor(220, 220, 220),
    };
    for rl in &r.reload_details {
        chart
            .draw_series(
                rl.phases
                    .iter()
                    .filter(|p| p.end >= x0 && p.start <= x1)
                    .map(|p| {
                        Rectangle::new(
                            [
                                (p.start.max(x0), 0.0),
                                (p.end.max(p.start + 0.01).min(x1), y_max),
                            ],
                            shade(&p.phase).mix(0.6).filled(),
                        )
                    }),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for (series, color) in [(&maxima, MAGENTA.mix(0.5)), (&medians, BLUE.mix(0.7))] {
        chart
            .draw_series(
                series
                    .iter()
                    .map(|(t, v)| Circle::new((*t, v.min(y_max)), 1, color.filled())),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .draw_secondary_series(LineSeries::new(
            rss.iter().map(|(t, v)| (*t, *v as f64 / 1e6)),
            RED.stroke_width(2),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
