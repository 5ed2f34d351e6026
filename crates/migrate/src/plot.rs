//! SVG charts of pre-copy rounds, for a person to see at a glance how a live
//! migration or a live snapshot went: how many pages each round copied, how
//! long it took, how fast the guest dirtied memory meanwhile, and where the
//! guest was paused.
//!
//! The chart has two panels over one time axis (milliseconds from the start
//! of round 1, each round as wide as it lasted): pages per round as bars,
//! and the guest's dirty rate next to ferry's copy rate, both in pages/s.
//! Pre-copy converges when the first stays below the second, so the pair
//! answers "why did it take this many rounds" without a table.
//!
//! Only plotters' SVG backend is used, with its built-in text-size estimate:
//! SVG text is laid out by whoever views the file, so no font library
//! (fontconfig, freetype) or C build is involved.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::migration::MigrationStats;
use crate::precopy::RoundStats;

/// Why a chart could not be written. Each variant names the file, so a
/// caller can report it without adding context.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// plotters refused to draw the chart (a bug here rather than bad
    /// input: inputs are sanitised before drawing).
    #[error("drawing the chart for {path}: {message}")]
    Draw {
        /// The file that was to be written.
        path: PathBuf,
        /// plotters' error.
        message: String,
    },
    /// The SVG could not be written to the file.
    #[error("writing the chart to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Writes an SVG chart of a live migration's rounds to `path`, so that a
/// migration's figures (`ferry migrate --json`, `GET /vm/migration`) can be
/// read without adding up rounds by hand.
///
/// Top panel: pages sent in each round as bars, as wide as the round lasted;
/// the final round, when the guest was paused, is red on a shaded band.
/// Bottom panel: the guest's dirty rate ([`crate::migration::RoundFigures::dirty_pages_per_s`])
/// and the copy rate of each round, in pages/s. The title names the
/// destination and the outcome; the caption gives the total time, the
/// downtime against its budget, why pre-copy stopped and the volume sent.
///
/// Any figures are accepted (no rounds, zero-length rounds, missing rates,
/// NaN or huge values): what cannot be drawn is left out, never a panic.
/// The file is replaced if it exists.
pub fn plot_migration(stats: &MigrationStats, path: &Path) -> Result<(), PlotError> {
    let rounds: Vec<Round> = stats
        .rounds
        .iter()
        .map(|r| Round {
            pages: clean(r.pages as f64),
            ms: clean(r.ms),
            paused: r.paused,
            dirty_per_s: r.dirty_pages_per_s.filter(|v| v.is_finite() && *v >= 0.0).map(clean),
        })
        .collect();
    let state = serde_name(&stats.state).unwrap_or_else(|| format!("{:?}", stats.state));
    let title = format!(
        "Live migration to {} over {}: {}",
        shorten(&stats.to, 50),
        shorten(&stats.transport, 12),
        state.replace('-', " ")
    );
    let stop = serde_name(&stats.stop_reason).unwrap_or_else(|| format!("{:?}", stats.stop_reason));
    let mut line1 = format!(
        "total {}  ·  downtime {} (budget {})  ·  setup {}  ·  stop reason: {}",
        fmt_ms(stats.total_ms),
        fmt_ms(stats.downtime_ms),
        fmt_ms(stats.expected_downtime_ms),
        fmt_ms(stats.setup_ms),
        explain_stop(&stop)
    );
    if let Some(t) = &stats.throttle {
        line1.push_str(&format!(
            "  ·  auto-converge up to {}%, vCPUs held {}",
            t.final_percent,
            fmt_ms(t.throttled_ms)
        ));
    }
    let mut line2 = format!(
        "{}  ·  {} with data, {} zero, {} never touched  ·  {} sent  ·  live throughput {}",
        plural(rounds.len() as u64, "round"),
        plural(stats.pages_normal, "page"),
        group(stats.pages_zero),
        group(stats.pages_skipped_unpopulated),
        fmt_bytes(stats.bytes_sent),
        fmt_mb_per_s(stats.throughput_mb_per_s)
    );
    match (&stats.memory_digest, &stats.destination_digest) {
        (Some(a), Some(b)) if a == b => line2.push_str("  ·  memory digests match"),
        (Some(_), Some(_)) => line2.push_str("  ·  memory digests DIFFER"),
        _ => {}
    }
    let figure = Figure { title, caption: vec![line1, line2], rounds };
    write_svg(&figure, path)
}

/// Writes an SVG chart of a live snapshot's pre-copy rounds to `path`, the
/// same chart as [`plot_migration`] (sharing its code) with `title` on top.
///
/// Snapshot rounds carry no dirty rate of their own; it is derived as
/// [`crate::migration::RoundFigures::dirty_pages_per_s`] is for a migration:
/// the next round's pages over this round's time. The caption gives the
/// time of all rounds, the paused time and the pages copied.
pub fn plot_snapshot_rounds(rounds: &[RoundStats], title: &str, path: &Path) -> Result<(), PlotError> {
    let rs: Vec<Round> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let ms = clean(r.ms);
            Round {
                pages: clean(r.pages as f64),
                ms,
                paused: r.paused,
                dirty_per_s: rounds.get(i + 1).filter(|_| ms > 0.0).map(|n| clean(n.pages as f64 / (ms / 1e3))),
            }
        })
        .collect();
    let total: f64 = rs.iter().map(|r| r.ms).sum();
    let paused: f64 = rs.iter().filter(|r| r.paused).map(|r| r.ms).sum();
    let data: u64 = rounds.iter().fold(0u64, |a, r| a.saturating_add(r.data_pages));
    let zero: u64 = rounds.iter().fold(0u64, |a, r| a.saturating_add(r.zero_pages));
    let caption = vec![format!(
        "{} in {}  ·  paused {}  ·  {} with data, {} zero",
        plural(rs.len() as u64, "round"),
        fmt_ms(total),
        fmt_ms(paused),
        plural(data, "page"),
        group(zero)
    )];
    let figure = Figure { title: shorten(title, 110), caption, rounds: rs };
    write_svg(&figure, path)
}

/// What both charts are drawn from, cleaned: every number finite, >= 0 and
/// at most [`CAP`].
struct Figure {
    title: String,
    caption: Vec<String>,
    rounds: Vec<Round>,
}

struct Round {
    pages: f64,
    ms: f64,
    paused: bool,
    dirty_per_s: Option<f64>,
}

impl Round {
    /// Pages copied per second in this round (None for a round of no time).
    fn copy_per_s(&self) -> Option<f64> {
        (self.ms > 0.0).then(|| clean(self.pages / (self.ms / 1e3)))
    }
}

/// Largest value drawn: sums of thousands of rounds stay finite, and pixel
/// arithmetic in plotters stays far from overflow trouble.
pub(crate) const CAP: f64 = 1e18;

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 780;
const HEADER: u32 = 128;
const PAGES_PANEL: u32 = 350;
const LEFT_AXIS: u32 = 92;
const RIGHT_MARGIN: u32 = 36;
/// Narrowest bar, in pixels, so that short rounds (a paused round of a few
/// milliseconds next to a first round of seconds) stay visible.
const MIN_BAR_PX: f64 = 7.0;
/// Rounds above which the rate lines are drawn without point markers.
const MAX_MARKERS: usize = 200;
pub(crate) const FONT: &str = "sans-serif";

pub(crate) const LIVE: RGBColor = RGBColor(59, 117, 196);
pub(crate) const PAUSED: RGBColor = RGBColor(204, 51, 51);
pub(crate) const DIRTY: RGBColor = RGBColor(30, 140, 70);
pub(crate) const COPY: RGBColor = RGBColor(110, 110, 110);
pub(crate) const INK: RGBColor = RGBColor(30, 30, 30);
pub(crate) const GRID: RGBColor = RGBColor(225, 225, 225);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn = Result<(), Box<dyn StdError>>;

fn write_svg(figure: &Figure, path: &Path) -> Result<(), PlotError> {
    let mut svg = String::new();
    render(figure, &mut svg).map_err(|e| PlotError::Draw { path: path.to_path_buf(), message: e.to_string() })?;
    std::fs::write(path, svg).map_err(|source| PlotError::Write { path: path.to_path_buf(), source })
}

fn render(figure: &Figure, out: &mut String) -> Drawn {
    {
        let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let (header, body) = root.split_vertically(HEADER);
        draw_header(&header, figure)?;
        if figure.rounds.is_empty() {
            let (w, h) = body.dim_in_pixel();
            body.draw_text(
                "No pre-copy rounds were recorded: there is nothing to plot.",
                &text(18, INK).pos(Pos::new(HPos::Center, VPos::Center)),
                (w as i32 / 2, h as i32 / 2),
            )?;
        } else {
            let (top, bottom) = body.split_vertically(PAGES_PANEL);
            let axis = TimeAxis::new(figure);
            let max_pages = figure.rounds.iter().map(|r| r.pages).fold(0.0, f64::max);
            let min_pages = figure.rounds.iter().map(|r| r.pages).filter(|p| *p > 0.0).fold(f64::INFINITY, f64::min);
            // One big first round (all of memory) and small later ones: a
            // linear axis would flatten the later ones to nothing.
            if max_pages > 0.0 && max_pages / min_pages > 100.0 {
                let lo = 10f64.powf(min_pages.log10().floor()).max(1.0) / 2.0;
                let hi = max_pages * 4.0;
                pages_panel(&top, figure, &axis, (lo..hi).log_scale(), lo, true)?;
            } else {
                pages_panel(&top, figure, &axis, 0.0..(max_pages * 1.18).max(1.0), 0.0, false)?;
            }
            rate_panel(&bottom, figure, &axis)?;
        }
        root.present()?;
    }
    Ok(())
}

pub(crate) fn text(size: u32, color: RGBColor) -> TextStyle<'static> {
    (FONT, size).into_font().color(&color)
}

fn draw_header(area: &Area, figure: &Figure) -> Drawn {
    area.draw_text(
        &figure.title,
        &(FONT, 25).into_font().style(FontStyle::Bold).color(&INK),
        (LEFT_AXIS as i32 - 60, 14),
    )?;
    let mut y = 48;
    for line in &figure.caption {
        area.draw_text(line, &text(17, INK), (LEFT_AXIS as i32 - 60, y))?;
        y += 22;
    }
    if figure.rounds.is_empty() {
        return Ok(());
    }
    // Legend, one row, outside the panels so it never hides data.
    let y = HEADER as i32 - 22;
    let mut x = LEFT_AXIS as i32 - 60;
    let label = text(16, INK).pos(Pos::new(HPos::Left, VPos::Center));
    let entry = |x: &mut i32, swatch: &dyn Fn(&Area, i32) -> Drawn, name: &str| -> Drawn {
        swatch(area, *x)?;
        area.draw_text(name, &label, (*x + 24, y))?;
        *x += 24 + (name.chars().count() as f64 * 7.6) as i32 + 28;
        Ok(())
    };
    entry(
        &mut x,
        &|a, x| Ok(a.draw(&Rectangle::new([(x, y - 7), (x + 16, y + 7)], LIVE.filled()))?),
        "pages copied, guest running",
    )?;
    entry(
        &mut x,
        &|a, x| Ok(a.draw(&Rectangle::new([(x, y - 7), (x + 16, y + 7)], PAUSED.filled()))?),
        "pages copied, guest paused",
    )?;
    entry(
        &mut x,
        &|a, x| {
            a.draw(&PathElement::new(vec![(x - 2, y), (x + 18, y)], DIRTY.stroke_width(3)))?;
            Ok(a.draw(&Circle::new((x + 8, y), 4, DIRTY.filled()))?)
        },
        "dirty rate (guest)",
    )?;
    entry(
        &mut x,
        &|a, x| Ok(a.draw(&DashedPathElement::new(vec![(x - 2, y), (x + 18, y)], 5, 3, COPY.stroke_width(2)))?),
        "copy rate (ferry)",
    )?;
    Ok(())
}

/// The shared x axis: where each round starts and ends, in ms or, for long
/// runs, seconds.
struct TimeAxis {
    unit: &'static str,
    end: f64,
    spans: Vec<(f64, f64)>,
}

impl TimeAxis {
    fn new(figure: &Figure) -> TimeAxis {
        let total: f64 = figure.rounds.iter().map(|r| r.ms).sum::<f64>().min(CAP);
        let (scale, unit) = if total >= 10_000.0 { (1000.0, "s") } else { (1.0, "ms") };
        let mut t = 0.0;
        let spans = figure
            .rounds
            .iter()
            .map(|r| {
                let s = (t / scale, (t + r.ms).min(CAP) / scale);
                t = (t + r.ms).min(CAP);
                s
            })
            .collect();
        // Room on the right for the narrowest bar after the last round.
        let end = if total > 0.0 { total / scale * 1.03 } else { 1.0 };
        TimeAxis { unit, end, spans }
    }

    /// Round spans widened to [`MIN_BAR_PX`] for a plot `px` pixels wide,
    /// kept inside the axis.
    fn bars(&self, px: u32) -> Vec<(f64, f64)> {
        let min = self.end / f64::from(px.max(1)) * MIN_BAR_PX;
        self.spans
            .iter()
            .map(|&(a, b)| {
                if b - a >= min {
                    (a, b)
                } else {
                    let a = a.min(self.end - min).max(0.0);
                    (a, a + min)
                }
            })
            .collect()
    }

    fn label(&self) -> String {
        format!("time since round 1 started ({})", self.unit)
    }
}

fn pages_panel<Y>(area: &Area, figure: &Figure, axis: &TimeAxis, y: Y, y_floor: f64, log: bool) -> Drawn
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .margin_top(10)
        .margin_right(RIGHT_MARGIN)
        .x_label_area_size(30)
        .y_label_area_size(LEFT_AXIS)
        .build_cartesian_2d(0.0..axis.end, y)?;
    let fx = |v: &f64| fmt_num(*v);
    let fy = |v: &f64| if log && !is_power_of_ten(*v) { String::new() } else { fmt_num(*v) };
    let desc = if log { "pages per round (log scale)" } else { "pages per round" };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .x_labels(12)
        .y_labels(8)
        .x_label_formatter(&fx)
        .y_label_formatter(&fy)
        .y_desc(desc)
        .label_style(text(15, INK))
        .axis_desc_style(text(16, INK))
        .draw()?;
    let y_top = chart.y_range().end;
    let px = chart.plotting_area().dim_in_pixel().0;
    let bars = axis.bars(px);
    let bar_px = |(a, b): (f64, f64)| (b - a) / axis.end * f64::from(px);

    // The paused round: a band over the whole panel height, then its bar.
    for (r, &(a, b)) in figure.rounds.iter().zip(&bars) {
        if r.paused {
            chart
                .draw_series(std::iter::once(Rectangle::new([(a, y_floor), (b, y_top)], PAUSED.mix(0.12).filled())))?;
        }
    }
    for (r, &(a, b)) in figure.rounds.iter().zip(&bars) {
        if r.pages <= y_floor {
            continue;
        }
        let colour = if r.paused { PAUSED } else { LIVE };
        // A pixel of white between neighbouring bars when they are wide enough.
        let inset = if bar_px((a, b)) > 6.0 { (b - a) * 0.5 / bar_px((a, b)) } else { 0.0 };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(a + inset, y_floor), (b - inset, r.pages)],
            colour.filled(),
        )))?;
    }
    // Page counts over the bars that are wide enough to carry one.
    let above = text(14, INK).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (r, &(a, b)) in figure.rounds.iter().zip(&bars) {
        let label = fmt_num(r.pages);
        if r.paused || bar_px((a, b)) < label.len() as f64 * 8.5 + 6.0 {
            continue;
        }
        let at = (a + (b - a) / 2.0, r.pages.max(y_floor));
        chart.draw_series(std::iter::once(EmptyElement::at(at) + Text::new(label, (0, -4), above.clone())))?;
    }
    // The paused round is named in words, beside its band: to the left when
    // it is the last round, as it should be; inside it when it fills the
    // panel (a stop-the-world copy).
    if let Some((i, r)) = figure.rounds.iter().enumerate().rev().find(|(_, r)| r.paused) {
        let (a, b) = bars[i];
        let (x, dx, h) = if a > axis.end * 0.35 {
            (a, -8, HPos::Right)
        } else if b < axis.end * 0.65 {
            (b, 8, HPos::Left)
        } else {
            (b, -8, HPos::Right)
        };
        let lines = [
            "final round, guest paused".to_string(),
            format!("{} in {}", plural(r.pages as u64, "page"), fmt_ms(r.ms)),
        ];
        for (k, line) in lines.into_iter().enumerate() {
            let style = text(15, PAUSED).pos(Pos::new(h, VPos::Top));
            chart.draw_series(std::iter::once(
                EmptyElement::at((x, y_top)) + Text::new(line, (dx, 8 + 19 * k as i32), style),
            ))?;
        }
    }
    Ok(())
}

fn rate_panel(area: &Area, figure: &Figure, axis: &TimeAxis) -> Drawn {
    let max = figure.rounds.iter().flat_map(|r| [r.dirty_per_s, r.copy_per_s()]).flatten().fold(0.0, f64::max);
    let y_top = (max * 1.15).max(1.0);
    let mut chart = ChartBuilder::on(area)
        .margin_top(12)
        .margin_bottom(8)
        .margin_right(RIGHT_MARGIN)
        .x_label_area_size(56)
        .y_label_area_size(LEFT_AXIS)
        .build_cartesian_2d(0.0..axis.end, 0.0..y_top)?;
    let fx = |v: &f64| fmt_num(*v);
    let fy = |v: &f64| fmt_num(*v);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .x_labels(12)
        .y_labels(6)
        .x_label_formatter(&fx)
        .y_label_formatter(&fy)
        .x_desc(axis.label())
        .y_desc("pages per second")
        .label_style(text(15, INK))
        .axis_desc_style(text(16, INK))
        .draw()?;
    let px = chart.plotting_area().dim_in_pixel().0;
    let bars = axis.bars(px);
    for (r, &(a, b)) in figure.rounds.iter().zip(&bars) {
        if r.paused {
            chart.draw_series(std::iter::once(Rectangle::new([(a, 0.0), (b, y_top)], PAUSED.mix(0.12).filled())))?;
        }
    }
    let mid = |(a, b): (f64, f64)| a + (b - a) / 2.0;
    // Markers only while they can be told apart (and the file stays small).
    let markers = figure.rounds.len() <= MAX_MARKERS;
    // Copy rate: one dashed line through every round that took time.
    let copy: Vec<(f64, f64)> =
        figure.rounds.iter().zip(&bars).filter_map(|(r, &s)| r.copy_per_s().map(|v| (mid(s), v))).collect();
    chart.draw_series(std::iter::once(DashedPathElement::new(copy.clone(), 6, 4, COPY.stroke_width(2))))?;
    chart.draw_series(copy.iter().filter(|_| markers).map(|&p| Circle::new(p, 3, COPY.filled())))?;
    // Dirty rate: broken where a round has none (the last one never has).
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (r, &s) in figure.rounds.iter().zip(&bars) {
        match r.dirty_per_s {
            Some(v) => {
                if let Some(run) = runs.last_mut() {
                    run.push((mid(s), v));
                }
            }
            None => runs.push(Vec::new()),
        }
    }
    for run in runs.iter().filter(|r| !r.is_empty()) {
        chart.draw_series(std::iter::once(PathElement::new(run.clone(), DIRTY.stroke_width(3))))?;
        chart.draw_series(run.iter().filter(|_| markers).map(|&p| Circle::new(p, 5, DIRTY.filled())))?;
    }
    if runs.iter().all(|r| r.is_empty()) {
        let (w, _) = chart.plotting_area().dim_in_pixel();
        chart.draw_series(std::iter::once(
            EmptyElement::at((0.0, y_top))
                + Text::new(
                    "no dirty rate: it needs a round after the one it is measured over",
                    (w as i32 / 2, 12),
                    text(15, DIRTY).pos(Pos::new(HPos::Center, VPos::Top)),
                ),
        ))?;
    }
    Ok(())
}

/// NaN, infinities and negatives become 0; anything above [`CAP`] becomes [`CAP`].
pub(crate) fn clean(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v.min(CAP)
    } else {
        0.0
    }
}

fn is_power_of_ten(v: f64) -> bool {
    v > 0.0 && (v.log10() - v.log10().round()).abs() < 1e-6
}

/// The name serde gives a unit enum variant, which is what `--json` shows.
fn serde_name<T: serde::Serialize>(v: &T) -> Option<String> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => Some(s),
        _ => None,
    }
}

fn explain_stop(name: &str) -> String {
    let why = match name {
        "converged" => " (the dirty set fit the pause budget)",
        "max_rounds" => " (round limit reached)",
        "not_converging" => " (the dirty set stopped shrinking)",
        "paused" => " (no live rounds: the guest was paused from the start)",
        _ => "",
    };
    format!("{}{why}", name.replace('_', " "))
}

/// A short axis or bar label: "0.25", "12.5", "300", "1.2k", "262k", "3.4M".
pub(crate) fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if a < 1000.0 {
        let s = if a >= 100.0 || a == a.round() {
            format!("{v:.0}")
        } else if a >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        };
        return trim_zeros(s);
    }
    let (div, suffix) = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(d, _)| a >= *d)
        .unwrap_or((1e3, "k"));
    let x = v / div;
    let s = if x.abs() >= 100.0 { format!("{x:.0}") } else { format!("{x:.1}") };
    format!("{}{suffix}", trim_zeros(s))
}

fn trim_zeros(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Milliseconds as a person reads them: "0.42 ms", "123 ms", "4.56 s".
pub(crate) fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        "n/a".into()
    } else if ms == 0.0 {
        // Not "-0.00 ms" for a sum of nothing.
        "0 ms".into()
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1e3)
    }
}

fn fmt_mb_per_s(v: f64) -> String {
    if !v.is_finite() || v < 0.0 {
        "n/a".into()
    } else if v >= 100.0 {
        format!("{v:.0} MB/s")
    } else {
        format!("{v:.1} MB/s")
    }
}

pub(crate) fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} bytes")
    }
}

/// "1 page", "262,144 pages".
pub(crate) fn plural(n: u64, word: &str) -> String {
    format!("{} {word}{}", group(n), if n == 1 { "" } else { "s" })
}

/// "262,144".
pub(crate) fn group(n: u64) -> String {
    let digits = n.to_string();
    let groups: Vec<&str> = digits.as_bytes().rchunks(3).rev().map(|g| std::str::from_utf8(g).unwrap_or("")).collect();
    groups.join(",")
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::{MigrationMode, MigrationState, RoundFigures};
    use crate::precopy::StopReason;

    /// Rounds as `finish_stats` makes them: the dirty rate of a round is
    /// the next round's pages over this round's time.
    fn figures(rounds: &[(u64, f64, bool)]) -> Vec<RoundFigures> {
        rounds
            .iter()
            .enumerate()
            .map(|(i, &(pages, ms, paused))| RoundFigures {
                pages,
                data_pages: pages - pages / 10,
                zero_pages: pages / 10,
                ms,
                paused,
                dirty_pages_per_s: rounds.get(i + 1).filter(|_| ms > 0.0).map(|n| n.0 as f64 / (ms / 1e3)),
                wire_bytes: 0,
                wire_bytes_per_s: 0.0,
            })
            .collect()
    }

    /// A 1 GiB guest dirtying 64 MiB, over unix: converges in four live rounds.
    fn stats(rounds: Vec<RoundFigures>) -> MigrationStats {
        MigrationStats {
            state: MigrationState::Completed,
            migration_id: "m-1234".into(),
            to: "unix:///tmp/m.sock".into(),
            transport: "unix".into(),
            total_ms: 912.4,
            setup_ms: 3.2,
            downtime_ms: 4.1,
            expected_downtime_ms: 5.0,
            bytes_sent: 1_161_000_000,
            bytes_received: 4_200,
            pages_normal: 254_000,
            pages_zero: 28_484,
            pages_skipped_unpopulated: 1_000,
            rounds,
            stop_reason: StopReason::Converged,
            throughput_mb_per_s: 1_402.5,
            memory_digest: Some("ab".into()),
            destination_digest: Some("ab".into()),
            throttle: None,
            mode: MigrationMode::Precopy,
            postcopy: None,
            stream_bytes: Vec::new(),
            local: false,
            working_set_held_pages: 0,
            working_set_resends_saved: 0,
            compress: crate::wire::WireCodec::Lz4,
            max_bandwidth: None,
            bandwidth_wait_ms: 0.0,
        }
    }

    fn sample() -> MigrationStats {
        stats(figures(&[
            (262_144, 812.0, false),
            (16_500, 61.0, false),
            (3_100, 12.0, false),
            (600, 2.4, false),
            (140, 1.1, true),
        ]))
    }

    fn render_migration(s: &MigrationStats) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.svg");
        plot_migration(s, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_svg(&svg);
        svg
    }

    /// Well-formed enough for a viewer: one root element, balanced text
    /// elements, nothing plotters would print for a value it could not map.
    fn assert_svg(svg: &str) {
        let t = svg.trim_start();
        assert!(t.starts_with("<svg") || t.starts_with("<?xml"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert!(!svg.contains("NaN"), "NaN in the SVG");
        assert!(!svg.contains("inf\""), "infinity in the SVG");
    }

    #[test]
    fn migration_chart_has_title_caption_axes_and_paused_round() {
        let svg = render_migration(&sample());
        for want in [
            "Live migration to unix:///tmp/m.sock over unix: completed",
            "total 912.4 ms",
            "downtime 4.10 ms (budget 5.00 ms)",
            "stop reason: converged (the dirty set fit the pause budget)",
            "5 rounds",
            "254,000 pages with data",
            "memory digests match",
            "pages per round (log scale)",
            "pages per second",
            "time since round 1 started (ms)",
            "final round, guest paused",
            "140 pages in 1.10 ms",
            "dirty rate (guest)",
            "copy rate (ferry)",
            "262k",
        ] {
            assert!(svg.contains(want), "{want:?} missing");
        }
        // The paused round is drawn in its own colour.
        assert!(svg.contains("#CC3333"));
    }

    #[test]
    fn snapshot_chart_shares_the_layout() {
        let rounds: Vec<RoundStats> = [(65_536, 200.0, false), (2_000, 8.0, false), (300, 0.9, true)]
            .iter()
            .map(|&(pages, ms, paused)| RoundStats { pages, data_pages: pages, zero_pages: 0, ms, paused })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.svg");
        plot_snapshot_rounds(&rounds, "Live snapshot of vm-1 to vm.img", &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_svg(&svg);
        for want in
            ["Live snapshot of vm-1 to vm.img", "3 rounds in 208.9 ms", "paused 0.90 ms", "final round, guest paused"]
        {
            assert!(svg.contains(want), "{want:?} missing");
        }
        // Derived dirty rates: 2,000 pages over 200 ms is 10k pages/s, drawn as a point.
        assert!(svg.matches("<circle").count() >= 4);
    }

    #[test]
    fn no_rounds_says_so() {
        let svg = render_migration(&stats(Vec::new()));
        assert!(svg.contains("nothing to plot"));
        assert!(svg.contains("0 rounds"));
        assert!(!svg.contains("pages copied, guest running"), "no legend without data");
        let dir = tempfile::tempdir().unwrap();
        plot_snapshot_rounds(&[], "empty", &dir.path().join("e.svg")).unwrap();
    }

    #[test]
    fn one_paused_round_has_no_dirty_rate() {
        let mut s = stats(figures(&[(1_000, 3.0, true)]));
        s.stop_reason = StopReason::Paused;
        let svg = render_migration(&s);
        assert!(svg.contains("no dirty rate"));
        assert!(svg.contains("stop reason: paused"));
        assert!(svg.contains("1 round  "));
        assert!(svg.contains("final round, guest paused"));
    }

    #[test]
    fn zero_length_rounds_and_missing_rates() {
        let mut rounds = figures(&[(0, 0.0, false), (500, 0.0, false), (0, 4.0, false), (20, 0.0, true)]);
        rounds[2].dirty_pages_per_s = None;
        render_migration(&stats(rounds));
        // All of no time: a 1 ms axis.
        let svg = render_migration(&stats(figures(&[(0, 0.0, false), (0, 0.0, true)])));
        assert!(svg.contains("(ms)"));
    }

    #[test]
    fn absurd_values_do_not_panic() {
        let mut rounds = figures(&[(u64::MAX, 1e300, false), (u64::MAX / 2, f64::MAX, false), (1, 1e-300, true)]);
        rounds[0].dirty_pages_per_s = Some(f64::INFINITY);
        rounds[1].dirty_pages_per_s = Some(f64::NAN);
        rounds[2].dirty_pages_per_s = Some(-5.0);
        let mut s = stats(rounds);
        s.total_ms = f64::NAN;
        s.downtime_ms = -1.0;
        s.expected_downtime_ms = f64::INFINITY;
        s.throughput_mb_per_s = f64::NAN;
        s.bytes_sent = u64::MAX;
        s.pages_normal = u64::MAX;
        s.to = "x".repeat(10_000);
        let svg = render_migration(&s);
        assert!(svg.contains("downtime n/a"));
        assert!(svg.contains("(s)"), "long runs are drawn in seconds");

        let mut rounds = figures(&[(5, f64::NAN, false), (7, f64::NEG_INFINITY, true)]);
        rounds[0].dirty_pages_per_s = Some(f64::MAX);
        render_migration(&stats(rounds));

        // Many rounds.
        let many: Vec<(u64, f64, bool)> = (0..2_000).map(|i| (1_000 + i, 0.5, i == 1_999)).collect();
        let svg = render_migration(&stats(figures(&many)));
        assert!(svg.contains("2,000 rounds"));
        assert_eq!(svg.matches("<circle").count(), 1, "no markers for 2,000 rounds, only the legend's");
    }

    #[test]
    fn text_is_escaped() {
        let mut s = sample();
        s.to = "unix:///tmp/a&b<c>.sock".into();
        let svg = render_migration(&s);
        assert!(svg.contains("a&amp;b&lt;c&gt;.sock"));
        assert!(!svg.contains("a&b"));
    }

    #[test]
    fn write_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("m.svg");
        let e = plot_migration(&sample(), &path).unwrap_err();
        assert!(matches!(&e, PlotError::Write { path: p, .. } if *p == path));
        assert!(e.to_string().contains("missing-dir/m.svg"), "{e}");
    }

    #[test]
    fn number_formats() {
        assert_eq!(group(0), "0");
        assert_eq!(group(262_144), "262,144");
        assert_eq!(group(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(0.25), "0.25");
        assert_eq!(fmt_num(12.5), "12.5");
        assert_eq!(fmt_num(300.0), "300");
        assert_eq!(fmt_num(1_200.0), "1.2k");
        assert_eq!(fmt_num(262_144.0), "262k");
        assert_eq!(fmt_num(1.5e6), "1.5M");
        assert_eq!(fmt_num(2e19), "20E");
        assert_eq!(fmt_ms(4.1), "4.10 ms");
        assert_eq!(fmt_ms(912.44), "912.4 ms");
        assert_eq!(fmt_ms(12_345.0), "12.35 s");
        assert_eq!(fmt_ms(-0.0), "0 ms");
        assert_eq!(fmt_num(-0.0), "0");
        assert_eq!(plural(1, "page"), "1 page");
        assert_eq!(plural(1_000, "page"), "1,000 pages");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert!(is_power_of_ten(1e5) && !is_power_of_ten(2e5));
    }
}
