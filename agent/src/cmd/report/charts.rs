//! The report's charts, drawn with plotters as SVG (text measured with the embedded DejaVu font, so
//! the layout does not depend on the host's fonts); `png` renders them to PNG.
//!
//! Each chart is the plot on the left and its legend in a strip on the right, outside the plot, so
//! that lines are never hidden behind a legend (and a test can look for a series' colour in the
//! plot area alone).

use std::sync::Once;

use plotters::{
    coord::Shift,
    prelude::*,
    style::{FontStyle, register_font},
};

use super::series::{Histogram, Series};
use crate::cmd::top::format;

/// Size of every chart, in pixels.
pub const WIDTH: u32 = 1100;
pub const HEIGHT: u32 = 440;
/// Width of the legend strip at the right of each chart.
pub const LEGEND_WIDTH: u32 = 240;

/// Series colours (Tableau 10): distinct, and readable on white.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// The colour of the `i`th series of a chart.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// `#rrggbb`, as SVG writes colours.
pub fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

const FONT: &str = "sans-serif";

/// Makes the embedded font the one plotters measures and draws text with.
pub fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        // The DejaVu files are valid fonts; a failure would only make text measurement fail.
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Lines over time.
pub struct LineChart<'a> {
    pub title: &'a str,
    pub y_desc: &'a str,
    pub series: &'a [Series],
}

/// Latency histograms of several kinds, side by side per log2 bucket.
pub struct HistogramChart<'a> {
    pub title: &'a str,
    pub histograms: &'a [Histogram],
}

/// Where histogram bars start on their log scale: below 1, so that one event is a visible bar.
const BAR_BASE: f64 = 0.5;

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Characters of a series name that fit the legend strip.
const LEGEND_CHARS: usize = 26;

/// A series name as its legend shows it: cut at the front if long, keeping the end where tenant
/// paths differ.
pub fn legend_label(name: &str) -> String {
    format::truncate_left(name, LEGEND_CHARS)
}

/// Splits off the legend strip and draws the legend: a coloured mark and a name per series.
fn legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    entries: &[(String, RGBColor, bool)],
) -> Result<DrawingArea<DB, Shift>, DrawingAreaErrorKind<DB::ErrorType>> {
    let (plot, strip) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
    let text = (FONT, 15).into_font().color(&BLACK);
    for (i, (name, c, bar)) in entries.iter().enumerate() {
        let y = 60 + i as i32 * 24;
        if *bar {
            strip.draw(&Rectangle::new([(8, y - 6), (28, y + 6)], c.filled()))?;
        } else {
            strip.draw(&PathElement::new(vec![(8, y), (28, y)], c.stroke_width(3)))?;
        }
        strip.draw(&Text::new(legend_label(name), (36, y - 8), text.clone()))?;
    }
    Ok(plot)
}

pub fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &LineChart,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let entries: Vec<(String, RGBColor, bool)> = chart
        .series
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), color(i), false))
        .collect();
    let plot = legend(root, &entries)?;
    let points = chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let mut cc = ChartBuilder::on(&plot)
        .caption(chart.title, (FONT, 22).into_font().style(FontStyle::Bold))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, 0.0..y1)?;
    cc.configure_mesh()
        .x_desc("time since the recording started (s)")
        .y_desc(chart.y_desc)
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 13))
        .y_label_formatter(&|y| format::rate(*y))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()?;
    for (i, s) in chart.series.iter().enumerate() {
        cc.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color(i).stroke_width(2),
        ))?;
    }
    root.present()
}

pub fn draw_histograms<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &HistogramChart,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let entries: Vec<(String, RGBColor, bool)> = chart
        .histograms
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let name = format!("{} (p99 {})", h.kind, format::latency_ns(h.summary.p99_ns));
            (name, color(i), true)
        })
        .collect();
    let plot = legend(root, &entries)?;
    let index = |lowest: u64| {
        if lowest == 0 {
            0
        } else {
            lowest.trailing_zeros() as i32
        }
    };
    let buckets = chart
        .histograms
        .iter()
        .flat_map(|h| h.summary.buckets.iter());
    let (mut i0, mut i1, mut y1) = (i32::MAX, i32::MIN, 0u64);
    for &(lowest, count) in buckets {
        i0 = i0.min(index(lowest));
        i1 = i1.max(index(lowest));
        y1 = y1.max(count);
    }
    if i0 > i1 {
        (i0, i1) = (0, 1);
    }
    // Counts span orders of magnitude (the tail is what matters): a log scale, from below one so
    // that a bucket of one event still shows.
    let y1 = (y1 as f64 * 1.5).max(10.0);
    let mut cc = ChartBuilder::on(&plot)
        .caption(chart.title, (FONT, 22).into_font().style(FontStyle::Bold))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(
            f64::from(i0) - 0.5..f64::from(i1) + 0.5,
            (BAR_BASE..y1).log_scale(),
        )?;
    cc.configure_mesh()
        .x_desc("latency, log2 buckets (each bar: from its label to twice that)")
        .y_desc("events in the bucket (count, log scale)")
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 13))
        .x_labels((i1 - i0 + 1).clamp(2, 24) as usize)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() > 0.01 || !(0.0..64.0).contains(&i) {
                return String::new();
            }
            format::latency_ns(if i == 0.0 { 0 } else { 1u64 << i as u32 })
        })
        .y_label_formatter(&|y| format::count(y.round() as u64))
        .disable_x_mesh()
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()?;
    let n = chart.histograms.len().max(1) as f64;
    let width = 0.8 / n;
    for (k, h) in chart.histograms.iter().enumerate() {
        let c = color(k);
        cc.draw_series(h.summary.buckets.iter().map(|&(lowest, count)| {
            let left = f64::from(index(lowest)) - 0.4 + k as f64 * width;
            Rectangle::new([(left, BAR_BASE), (left + width, count as f64)], c.filled())
        }))?;
    }
    root.present()
}
