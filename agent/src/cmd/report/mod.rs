//! `vmtrace report`: a recording drawn as charts an SRE pastes into an incident review: exits per
//! second by tenant, each tenant's exits by reason and kicks over time, and its latency histograms,
//! as SVG and PNG files and one HTML page that holds them all.
//!
//! `series` takes the numbers out of the samples, [`charts`] draws them, `html` lays out the page.

pub mod charts;
pub(crate) mod html;
pub(crate) mod png;
pub(crate) mod series;

use std::{
    fs,
    io::IsTerminal,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use plotters::prelude::{DrawingBackend, IntoDrawingArea, SVGBackend};

use crate::{cmd::record::human_bytes, sample::recording::read_all};
use charts::{HEIGHT, HistogramChart, LineChart, WIDTH};
use series::{Series, TenantSeries, slug, tenant_series};

/// Draw a recording as charts: SVG and PNG files and an HTML page that holds them.
///
/// Writes into the output directory (created if needed): `index.html` (self-contained, charts
/// inline), `overview.svg`/`.png` (exits per second by tenant), and per tenant
/// `NN-<tenant>-timeline.svg`/`.png` (exits per second by reason, virtio kicks per second, and
/// TLB flushes and faults where recorded) and `NN-<tenant>-latency.svg`/`.png` (latency histograms
/// of its busiest kinds). Axes are labelled with units. PNG text uses an embedded font: no system
/// fonts needed. Progress goes to stderr.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// The recording (`vmtrace record`, or saved `vmtrace watch --json` output).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Output directory, created if needed; existing files of the same names are replaced.
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Write SVG and HTML only, no PNG files.
    #[arg(long)]
    pub no_png: bool,
    /// Only tenants whose name contains this text (case-insensitive); may be given more than once.
    #[arg(long, value_name = "TEXT")]
    pub filter: Vec<String>,
}

/// A chart to draw.
enum Chart<'a> {
    Lines(LineChart<'a>),
    Histograms(HistogramChart<'a>),
}

impl Chart<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &plotters::drawing::DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<()> {
        match self {
            Chart::Lines(c) => charts::draw_lines(root, c),
            Chart::Histograms(c) => charts::draw_histograms(root, c),
        }
        .map_err(|e| anyhow!("{e}"))
    }
}

/// Progress on stderr: one line per step, rewritten in place on a terminal.
struct Progress {
    tty: bool,
    total: usize,
    done: usize,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        let line = format!("vmtrace: drawing {}/{}: {what}", self.done, self.total);
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Draws `chart` as `<stem>.svg` (returned, for the page) and, with `png`, `<stem>.png`.
fn render(chart: &Chart, dir: &Path, stem: &str, png: bool) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        chart
            .draw(&root)
            .with_context(|| format!("drawing {stem}.svg"))?;
    }
    let path = dir.join(format!("{stem}.svg"));
    fs::write(&path, &svg).with_context(|| format!("cannot write {}", path.display()))?;
    if png {
        let path = dir.join(format!("{stem}.png"));
        let bytes =
            png::svg_to_png(&svg, 1.0).with_context(|| format!("drawing {}", path.display()))?;
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(svg)
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let started = Instant::now();
    eprintln!("vmtrace: reading {}", args.file.display());
    let (header, samples) = read_all(&args.file)?;
    if samples.is_empty() {
        bail!("{} has no samples: nothing to draw", args.file.display());
    }
    let filters: Vec<String> = args.filter.iter().map(|f| f.to_lowercase()).collect();
    let tenants: Vec<TenantSeries> = tenant_series(&samples)
        .into_iter()
        .filter(|t| {
            let name = t.tenant.to_lowercase();
            filters.is_empty() || filters.iter().any(|f| name.contains(f))
        })
        .collect();
    let first = samples.first().map_or(0.0, |s| s.elapsed_secs);
    let last = samples.last().map_or(0.0, |s| s.elapsed_secs);
    eprintln!(
        "vmtrace: {} samples over {:.0}s, {} tenant{}",
        samples.len(),
        last - first,
        tenants.len(),
        if tenants.len() == 1 { "" } else { "s" }
    );
    fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    charts::register_fonts();
    let png = !args.no_png;
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        total: 1 + tenants.len() * 2,
        done: 0,
    };

    progress.step("exits per second by tenant");
    let overview: Vec<Series> = tenants.iter().map(|t| t.exits.clone()).collect();
    let overview = render(
        &Chart::Lines(LineChart {
            title: "Exits per second by tenant",
            y_desc: "exits per second (1/s)",
            series: &overview,
        }),
        &args.output,
        "overview",
        png,
    )?;
    let mut pages = Vec::new();
    for (i, tenant) in tenants.iter().enumerate() {
        pages.push(render_tenant(&mut progress, tenant, i, &args.output, png)?);
    }
    progress.finish();
    let source = args.file.display().to_string();
    let page = html::render(&html::Page {
        source: &source,
        header: header.as_ref(),
        samples: samples.len(),
        duration_secs: last - first,
        tenants: &tenants,
        overview: &overview,
        charts: &pages,
        png,
    });
    let index = args.output.join("index.html");
    fs::write(&index, &page).with_context(|| format!("cannot write {}", index.display()))?;
    eprintln!(
        "vmtrace: wrote {} ({}, {} charts{}) in {:.1}s",
        index.display(),
        human_bytes(page.len() as u64),
        1 + pages
            .iter()
            .map(|p| 1 + usize::from(p.2.is_some()))
            .sum::<usize>(),
        if png { ", as SVG and PNG" } else { ", as SVG" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One tenant's timeline and latency charts: (file stem, timeline SVG, latency SVG).
fn render_tenant(
    progress: &mut Progress,
    tenant: &TenantSeries,
    i: usize,
    dir: &Path,
    png: bool,
) -> Result<(String, String, Option<String>)> {
    let stem = format!("{:02}-{}", i + 1, slug(&tenant.tenant));
    progress.step(&format!("{}: timeline", tenant.tenant));
    let title = format!("{}: exits by reason, kicks (per second)", tenant.tenant);
    let timeline = render(
        &Chart::Lines(LineChart {
            title: &title,
            y_desc: "events per second (1/s)",
            series: &tenant.timeline,
        }),
        dir,
        &format!("{stem}-timeline"),
        png,
    )?;
    progress.step(&format!("{}: latency", tenant.tenant));
    let latency = if tenant.histograms.is_empty() {
        None
    } else {
        let title = format!("{}: latency at the end of the recording", tenant.tenant);
        Some(render(
            &Chart::Histograms(HistogramChart {
                title: &title,
                histograms: &tenant.histograms,
            }),
            dir,
            &format!("{stem}-latency"),
            png,
        )?)
    };
    Ok((stem, timeline, latency))
}
