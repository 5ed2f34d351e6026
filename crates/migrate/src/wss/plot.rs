//! An SVG of a working-set run, in the style of the migration charts
//! ([`crate::plot`]): dirty pages per interval over time on top, the working
//! set against the window length below (log scale: 100 ms to minutes), with
//! the migration forecast, when there is one, in the caption.

use std::error::Error as StdError;
use std::path::Path;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{Prediction, WssReport, PAGE_BYTES};
use crate::plot::{clean, fmt_ms, fmt_num, plural, text, PlotError, COPY, DIRTY, FONT, GRID, INK, LIVE};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 820;
const HEADER: u32 = 110;
const TOP_PANEL: u32 = 330;
const LEFT_AXIS: u32 = 92;
const RIGHT_MARGIN: u32 = 36;

type Drawn = Result<(), Box<dyn StdError>>;

/// Writes the chart to `path` (replacing it). Any report is accepted (no
/// samples, zero values, NaN): what cannot be drawn is left out.
pub fn plot_wss(report: &WssReport, prediction: Option<&Prediction>, path: &Path) -> Result<(), PlotError> {
    let mut svg = String::new();
    render(report, prediction, &mut svg)
        .map_err(|e| PlotError::Draw { path: path.to_path_buf(), message: e.to_string() })?;
    std::fs::write(path, svg).map_err(|source| PlotError::Write { path: path.to_path_buf(), source })
}

fn mib(pages: f64) -> f64 {
    pages * PAGE_BYTES as f64 / (1u64 << 20) as f64
}

fn caption(report: &WssReport, prediction: Option<&Prediction>) -> Vec<String> {
    let n = report.samples.len();
    let mean = if n > 0 { report.samples.iter().map(|s| s.pages_per_s).sum::<f64>() / n as f64 } else { 0.0 };
    let mut lines = vec![format!(
        "{} of {}  ·  mean dirty rate {} pages/s ({} MiB/s)  ·  {} distinct ({} MiB) over the run",
        plural(n as u64, "interval"),
        fmt_ms(report.interval_ms as f64),
        fmt_num(mean),
        fmt_num(mib(mean)),
        plural(report.distinct_pages, "page"),
        fmt_num(mib(report.distinct_pages as f64)),
    )];
    if let Some(p) = prediction {
        lines.push(format!(
            "pre-copy at {} MiB/s, {} ms budget: {}, {} ({}), final set {} pages, {} paused copy, total {}",
            fmt_num(p.params.bandwidth_bytes_per_s as f64 / (1u64 << 20) as f64),
            p.params.downtime_ms,
            plural(p.rounds.len() as u64, "live round"),
            if p.converges { "converges" } else { "does not converge" },
            serde_json::to_value(p.stop_reason).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            fmt_num(p.final_pages as f64),
            fmt_ms(p.final_copy_ms),
            fmt_ms(p.total_ms),
        ));
    }
    lines
}

fn render(report: &WssReport, prediction: Option<&Prediction>, out: &mut String) -> Drawn {
    let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(HEADER);
    header.draw_text(
        "Working set of a running guest",
        &(FONT, 25).into_font().style(FontStyle::Bold).color(&INK),
        (LEFT_AXIS as i32 - 60, 14),
    )?;
    for (i, line) in caption(report, prediction).iter().enumerate() {
        header.draw_text(line, &text(17, INK), (LEFT_AXIS as i32 - 60, 48 + 22 * i as i32))?;
    }
    if report.samples.is_empty() {
        let (w, h) = body.dim_in_pixel();
        body.draw_text(
            "No intervals were sampled: there is nothing to plot.",
            &text(18, INK).pos(Pos::new(HPos::Center, VPos::Center)),
            (w as i32 / 2, h as i32 / 2),
        )?;
        root.present()?;
        return Ok(());
    }
    let (top, bottom) = body.split_vertically(TOP_PANEL);
    samples_panel(&top, report)?;
    windows_panel(&bottom, report)?;
    root.present()?;
    Ok(())
}

fn samples_panel(area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, report: &WssReport) -> Drawn {
    let end_s = report.samples.iter().map(|s| clean(s.t_ms)).fold(0.0, f64::max) / 1e3;
    let max = report.samples.iter().map(|s| clean(s.pages as f64)).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .margin_top(10)
        .margin_right(RIGHT_MARGIN)
        .x_label_area_size(44)
        .y_label_area_size(LEFT_AXIS)
        .build_cartesian_2d(0.0..(end_s * 1.02).max(0.001), 0.0..(max * 1.15).max(1.0))?;
    let f = |v: &f64| fmt_num(*v);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .x_labels(12)
        .y_labels(8)
        .x_label_formatter(&f)
        .y_label_formatter(&f)
        .x_desc("time since sampling started (s)")
        .y_desc("pages dirtied per interval")
        .label_style(text(15, INK))
        .axis_desc_style(text(16, INK))
        .draw()?;
    chart.draw_series(report.samples.iter().map(|s| {
        let b = clean(s.t_ms) / 1e3;
        let a = (b - clean(s.ms) / 1e3).max(0.0);
        Rectangle::new([(a, 0.0), (b, clean(s.pages as f64))], LIVE.filled())
    }))?;
    Ok(())
}

fn windows_panel(area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, report: &WssReport) -> Drawn {
    let pts: Vec<(f64, f64)> = report
        .windows
        .iter()
        .filter(|w| w.ms.is_finite() && w.ms > 0.0)
        .map(|w| (clean(w.ms) / 1e3, mib(clean(w.mean_pages))))
        .collect();
    let lo = pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.0).fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo { (lo / 1.3, hi * 1.3) } else { (0.01, 10.0) };
    let top = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .margin_top(16)
        .margin_bottom(8)
        .margin_right(RIGHT_MARGIN)
        .x_label_area_size(56)
        .y_label_area_size(LEFT_AXIS)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..(top * 1.15).max(0.01))?;
    let f = |v: &f64| fmt_num(*v);
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .x_labels(10)
        .y_labels(6)
        .x_label_formatter(&f)
        .y_label_formatter(&f)
        .x_desc("window length (s, log scale)")
        .y_desc("working set (MiB, distinct pages)")
        .label_style(text(15, INK))
        .axis_desc_style(text(16, INK))
        .draw()?;
    let total = mib(report.distinct_pages as f64);
    if total > 0.0 {
        chart.draw_series(std::iter::once(DashedPathElement::new(
            vec![(lo, total), (hi, total)],
            6,
            4,
            COPY.stroke_width(2),
        )))?;
    }
    chart.draw_series(std::iter::once(PathElement::new(pts.clone(), DIRTY.stroke_width(3))))?;
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 5, DIRTY.filled())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wss::{predict, PredictParams, WssEnd, WssSample, WssWindow};

    fn report(samples: Vec<WssSample>, windows: Vec<WssWindow>) -> WssReport {
        WssReport {
            interval_ms: 100,
            duration_ms: 1000,
            end: WssEnd::Completed,
            ram_pages: 32768,
            populated_pages: 30000,
            zero_pages: 10,
            samples,
            windows,
            distinct_pages: 2050,
            sampler_busy_ms: 1.0,
            max_late_ms: 0.5,
            sample_one_in: 1,
            sample_one_in_requested: 1,
            fault_budget_per_s: 0,
            sample_changes: vec![],
        }
    }

    fn window(intervals: u32, pages: f64) -> WssWindow {
        WssWindow {
            intervals,
            ms: f64::from(intervals) * 100.0,
            windows: 1,
            mean_pages: pages,
            max_pages: pages as u64,
            min_pages: pages as u64,
        }
    }

    #[test]
    fn chart_with_a_forecast() {
        let samples = (1..=10)
            .map(|i| WssSample {
                t_ms: f64::from(i) * 100.0,
                ms: 100.0,
                pages: 400 + i as u64,
                pages_per_s: 4000.0,
                sample_one_in: 1,
            })
            .collect();
        let r = report(samples, vec![window(1, 400.0), window(5, 2000.0), window(10, 2050.0)]);
        let p = predict(&r, &PredictParams::migrate_defaults(40 << 20));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.svg");
        plot_wss(&r, Some(&p), &path).unwrap();
        let s = std::fs::read_to_string(&path).unwrap();
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("pre-copy at 40 MiB/s") && s.contains("converges"), "the forecast is in the caption");
        assert!(s.contains("working set (MiB, distinct pages)"));
        assert!(s.matches("<rect").count() >= 10);
    }

    #[test]
    fn empty_and_absurd_reports_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.svg");
        plot_wss(&report(vec![], vec![]), None, &path).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("nothing to plot"));
        let bad =
            vec![WssSample { t_ms: f64::NAN, ms: -1.0, pages: u64::MAX, pages_per_s: f64::INFINITY, sample_one_in: 1 }];
        plot_wss(&report(bad, vec![window(1, f64::NAN), window(2, 1e300)]), None, &path).unwrap();
        let err = plot_wss(&report(vec![], vec![]), None, Path::new("/nonexistent/dir/x.svg")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/dir/x.svg"), "{err}");
    }
}
