//! `--plot FILE.png`: latency CDFs (TTFT, TPOT) of every run, and SLO attainment
//! against the request rate when the runs sweep rates. Text is drawn with a
//! system TrueType font (Debian's fonts-dejavu-core, which scripts/setup-bench.sh
//! installs).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::report::{Run, Slo};

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONTS.iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(|| {
            "no TrueType font found for --plot: install fonts-dejavu-core (scripts/setup-bench.sh)".to_string()
        })?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| "the font does not load".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn cdf(mut v: Vec<f64>) -> Vec<(f64, f64)> {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len() as f64;
    v.into_iter().enumerate().map(|(i, x)| (x, (i + 1) as f64 / n)).collect()
}

fn cdf_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    series: &[(String, Vec<f64>)],
    slo: Option<f64>,
) -> Result<()> {
    let xmax = series.iter().flat_map(|(_, v)| v.iter().copied()).fold(slo.unwrap_or(1.0), f64::max) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xmax, 0f64..1.0f64)
        .map_err(|e| anyhow!("{e}"))?;
    chart.configure_mesh().x_desc("ms").y_desc("fraction of requests").draw().map_err(|e| anyhow!("{e}"))?;
    for (i, (label, v)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(cdf(v.clone()), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if let Some(s) = slo {
        chart
            .draw_series(LineSeries::new(vec![(s, 0.0), (s, 1.0)], BLACK.stroke_width(1)))
            .map_err(|e| anyhow!("{e}"))?
            .label("SLO")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

pub fn plot(path: &Path, runs: &[Run], slo: &Slo) -> Result<()> {
    register_font()?;
    let sweep = runs.len() > 1 && runs.iter().all(|r| r.rate.is_some());
    let panels = if sweep { 3 } else { 2 };
    let root = BitMapBackend::new(path, (520 * panels as u32, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((1, panels));
    let ttft: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|r| (r.label.clone(), r.samples.iter().filter(|s| s.ok).map(|s| s.ttft.as_secs_f64() * 1e3).collect()))
        .collect();
    let tpot: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|r| (r.label.clone(), r.samples.iter().filter_map(|s| s.tpot()).map(|x| x * 1e3).collect()))
        .collect();
    cdf_panel(&areas[0], "Time to first token (CDF)", &ttft, slo.ttft_ms)?;
    cdf_panel(&areas[1], "Time per output token (CDF)", &tpot, slo.tpot_ms)?;
    if sweep {
        let pts: Vec<(f64, f64)> = runs
            .iter()
            .map(|r| {
                (
                    r.rate.unwrap_or(0.0),
                    r.samples.iter().filter(|s| slo.met(s)).count() as f64 / r.samples.len().max(1) as f64,
                )
            })
            .collect();
        let xmax = pts.iter().map(|p| p.0).fold(0.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&areas[2])
            .caption("SLO attainment vs request rate", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..xmax.max(0.1), 0f64..1.05f64)
            .map_err(|e| anyhow!("{e}"))?;
        chart.configure_mesh().x_desc("requests / s").y_desc("attainment").draw().map_err(|e| anyhow!("{e}"))?;
        chart.draw_series(LineSeries::new(pts.clone(), BLUE.stroke_width(2))).map_err(|e| anyhow!("{e}"))?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, BLUE.filled()))).map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(vec![(0.0, 0.9), (xmax, 0.9)], BLACK.stroke_width(1)))
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// One panel of `lines`: named series of (x, y) points.
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Panels side by side, each a line (with its points marked) per series: `tandem sim`'s
/// search frontier and studies.
pub fn lines(path: &Path, panels: &[Panel]) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (560 * panels.len().max(1) as u32, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (p, area) in panels.iter().zip(&areas) {
        let pts = p.series.iter().flat_map(|(_, v)| v.iter().copied());
        let (xmin, xmax, ymax) =
            pts.fold((f64::INFINITY, f64::NEG_INFINITY, 0.0f64), |(a, b, c), (x, y)| (a.min(x), b.max(x), c.max(y)));
        let (xmin, xmax) = if xmin.is_finite() { (xmin, xmax.max(xmin + 1e-9)) } else { (0.0, 1.0) };
        let pad = (xmax - xmin) * 0.05;
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((xmin - pad)..(xmax + pad), 0f64..(ymax * 1.1).max(1e-9))
            .map_err(|e| anyhow!("{e}"))?;
        chart.configure_mesh().x_desc(&p.x_desc).y_desc(&p.y_desc).draw().map_err(|e| anyhow!("{e}"))?;
        for (i, (label, v)) in p.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(v.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(v.iter().map(|&q| Circle::new(q, 4, color.filled()))).map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
