//! `vmtrace report`: a recording becomes SVG and PNG charts and an HTML page whose plots show each
//! tenant's series: checked in the SVG (a line of the tenant's colour with a point per sample,
//! each at its recorded value as the chart's axis scale places it, so that the plotted exits add
//! up to the recorded totals), in the PNG (pixels of that colour in the plot area, not the
//! legend) and in the page's summary table (each tenant's exits and kicks, exactly). A real
//! recording's totals are the reference VMMs' ground truth.

use std::{
    io::{BufRead, BufReader, Cursor},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::{Value, json};
use vmtrace::cmd::report::charts::{HEIGHT, LEGEND_WIDTH, WIDTH, color, hex, legend_label};
use vmtrace_tests::{
    TenantCgroup, binary,
    expect::{self, is_exit_without_kvm_exit, is_kick},
    privileged_host,
    temp::TempDir,
};
use vmtrace_vmm::Report;

fn report(recording: &Path, out: &Path, extra: &[&str]) {
    let output = Command::new(binary("vmtrace"))
        .arg("report")
        .arg(recording)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .expect("running vmtrace report");
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    assert!(output.status.success(), "vmtrace report failed: {stderr}");
    assert!(
        stderr.contains("vmtrace: drawing 1/"),
        "progress on stderr: {stderr}"
    );
    assert!(stderr.contains("index.html"), "{stderr}");
}

/// The `points` of the data line drawn in colour `i` (2 px wide; legend marks are 3 px, axes 1 px).
fn svg_series(svg: &str, i: usize) -> Option<Vec<(f64, f64)>> {
    let stroke = format!("stroke=\"{}\" stroke-width=\"2\"", hex(color(i)));
    let line = svg.split("<polyline").find(|p| p.contains(&stroke))?;
    let points = line.split("points=\"").nth(1)?.split('"').next()?;
    Some(
        points
            .split_whitespace()
            .filter_map(|p| {
                let (x, y) = p.split_once(',')?;
                Some((x.parse().ok()?, y.parse().ok()?))
            })
            .collect(),
    )
}

/// Checks that series `i` of a line chart is drawn in the plot area with `samples` points, and not
/// flat on the zero line (the lowest point drawn by any series).
fn assert_series_drawn(svg: &str, i: usize, samples: usize, baseline: f64, what: &str) {
    let points =
        svg_series(svg, i).unwrap_or_else(|| panic!("{what}: no line in {}", hex(color(i))));
    assert_eq!(points.len(), samples, "{what}: one point per sample");
    let plot_right = f64::from(WIDTH - LEGEND_WIDTH);
    assert!(
        points.iter().all(|&(x, _)| x < plot_right),
        "{what}: inside the plot area"
    );
    assert!(baseline > 100.0, "{what}: found the chart's zero line");
    assert!(
        points.iter().any(|&(_, y)| y < baseline - 10.0),
        "{what}: the line rises above zero ({baseline}): {points:?}"
    );
}

/// Pixels of the PNG near `c`, in the plot area (left of the legend strip).
fn plot_pixels(png: &[u8], c: (u8, u8, u8)) -> usize {
    let decoder = png::Decoder::new(Cursor::new(png));
    let mut reader = decoder.read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("PNG size")];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
    let channels = info.line_size / info.width as usize;
    let plot_right = (WIDTH - LEGEND_WIDTH) as usize;
    let mut n = 0;
    for y in 0..info.height as usize {
        for x in 0..plot_right {
            let p = &buf[y * info.line_size + x * channels..];
            let d = |a: u8, b: u8| (i32::from(a) - i32::from(b)).abs();
            if d(p[0], c.0) + d(p[1], c.1) + d(p[2], c.2) < 40 {
                n += 1;
            }
        }
    }
    n
}

/// The text elements of an SVG, in document order.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = t.split_once('>')?.1;
            Some(body.split("</text>").next()?.trim().to_owned())
        })
        .collect()
}

/// The zero line of a chart: the bottom of its y axis, the tallest vertical black line (the plot's
/// y range starts at zero; SVG y grows downwards).
fn baseline(svg: &str) -> f64 {
    svg.split("<polyline")
        .filter(|p| p.contains("stroke=\"#000000\""))
        .filter_map(|p| p.split("points=\"").nth(1)?.split('"').next())
        .filter_map(|points| {
            let p: Vec<(f64, f64)> = points
                .split_whitespace()
                .filter_map(|p| {
                    let (x, y) = p.split_once(',')?;
                    Some((x.parse().ok()?, y.parse().ok()?))
                })
                .collect();
            match p[..] {
                [(x0, y0), (x1, y1)] if x0 == x1 && (y1 - y0).abs() > 100.0 => Some(y0.max(y1)),
                _ => None,
            }
        })
        .fold(0.0, f64::max)
}

/// The value of a y-axis label (`0`, `500`, `1.00k`, `2.50M`), as `top`'s rate format writes it.
fn label_value(text: &str) -> Option<f64> {
    let (number, scale) = match text.chars().last()? {
        'k' => (&text[..text.len() - 1], 1e3),
        'M' => (&text[..text.len() - 1], 1e6),
        'G' => (&text[..text.len() - 1], 1e9),
        _ => (text, 1.0),
    };
    number.parse::<f64>().ok().map(|v| v * scale)
}

/// Plotters draws a value v of a y range 0..top at the pixel `zero - floor(H·v/top + 0.001)`
/// (H the axis' height in pixels): a point's pixel n = zero - y says only that H·v/top lies in
/// [n - 0.001, n + 0.999). `units` is what top/H is known to lie in.
const PIXEL_SLACK: f64 = 1e-3;

/// A line chart's y axis: the pixel of zero and the bounds of its scale (units per pixel), read
/// from its labelled ticks (each drawn at its value's pixel, the labels `text-anchor="end"` at
/// the ticks' height).
struct YAxis {
    zero: f64,
    units: (f64, f64),
}

impl YAxis {
    fn of(svg: &str) -> Self {
        let ticks: Vec<(f64, f64)> = svg
            .split("<text")
            .skip(1)
            .filter(|t| t.contains("text-anchor=\"end\""))
            .filter_map(|t| {
                let y: f64 = t.split("y=\"").nth(1)?.split('"').next()?.parse().ok()?;
                let body = t.split_once('>')?.1.split("</text>").next()?.trim();
                Some((label_value(body)?, y))
            })
            .collect();
        let zero = ticks
            .iter()
            .find(|(v, _)| *v == 0.0)
            .map(|(_, y)| *y)
            .expect("a tick at zero");
        let mut units = (0.0f64, f64::INFINITY);
        for &(value, y) in ticks.iter().filter(|(v, _)| *v > 0.0) {
            let n = zero - y;
            units.0 = units.0.max(value / (n + 1.0 - PIXEL_SLACK));
            units.1 = units.1.min(value / (n - PIXEL_SLACK));
        }
        assert!(
            units.0 > 0.0 && units.0 <= units.1,
            "y axis ticks {ticks:?} give the scale {units:?}"
        );
        Self { zero, units }
    }

    /// The values that plotters draws at pixel height `y`.
    fn values_at(&self, y: f64) -> (f64, f64) {
        let n = self.zero - y;
        (
            ((n - PIXEL_SLACK) * self.units.0).max(0.0),
            (n + 1.0 - PIXEL_SLACK) * self.units.1,
        )
    }
}

/// The recording's samples.
fn recorded_samples(recording: &Path) -> Vec<Value> {
    std::fs::read_to_string(recording)
        .expect("the recording")
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).expect("a sample"))
        .collect()
}

/// What a tenant's exits are in a recording, as `top` and the report count them: its exits per
/// second and interval in every sample (0 where it is absent), and its exits since the recording
/// started and its virtio kicks at the last sample that holds it.
struct RecordedExits {
    points: Vec<(f64, f64)>,
    exits: u64,
    kicks: u64,
}

fn recorded_exits(samples: &[Value], tenant: &str) -> RecordedExits {
    let mut recorded = RecordedExits {
        points: Vec::new(),
        exits: 0,
        kicks: 0,
    };
    for sample in samples {
        let interval = sample["interval_secs"].as_f64().expect("interval_secs");
        let Some(t) = sample["tenants"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["tenant"] == tenant))
        else {
            recorded.points.push((interval, 0.0));
            continue;
        };
        let counts = t["counts"].as_object().expect("counts");
        // A tenant's exits are its kvm_exit.* where the host emits them, else the rest.
        let hardware = counts.keys().any(|k| k.starts_with("kvm_exit."));
        let exit = |k: &String| {
            if hardware {
                k.starts_with("kvm_exit.")
            } else {
                is_exit_without_kvm_exit(k)
            }
        };
        let rate: f64 = counts
            .keys()
            .filter(|k| exit(k))
            .map(|k| t["rates"][k].as_f64().unwrap_or(0.0))
            .sum();
        recorded.points.push((interval, rate));
        let sum = |keep: &dyn Fn(&String) -> bool| -> u64 {
            counts
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(_, n)| n.as_u64().expect("a count"))
                .sum()
        };
        recorded.exits = sum(&exit);
        recorded.kicks = sum(&|k| is_kick(k));
    }
    recorded
}

/// Series `i` of a line chart shows the recorded exits per second: every point at its sample's
/// value, as far as the pixel it is drawn at tells, and so the plotted exits (each point's value
/// times its sample's interval) add up to the recorded total within the sum of those pixels'
/// spans. Returns that range of plotted totals.
fn assert_series_values(svg: &str, i: usize, recorded: &RecordedExits, what: &str) -> (f64, f64) {
    let axis = YAxis::of(svg);
    let points = svg_series(svg, i).unwrap_or_else(|| panic!("{what}: no line"));
    assert_eq!(
        points.len(),
        recorded.points.len(),
        "{what}: one point per sample"
    );
    let mut total = (0.0, 0.0);
    for (&(_, y), &(interval, rate)) in points.iter().zip(&recorded.points) {
        let (low, high) = axis.values_at(y);
        assert!(
            low <= rate && rate < high,
            "{what}: the point at y = {y} shows {low:.1} to {high:.1}/s, the sample {rate}/s"
        );
        total.0 += low * interval;
        total.1 += high * interval;
    }
    let exits = recorded.exits as f64;
    assert!(
        total.0 <= exits && exits <= total.1,
        "{what}: the plotted exits add up to {:.1} to {:.1}, the recording's total is {exits}",
        total.0,
        total.1
    );
    total
}

/// The summary table's row of `tenant`: its exits and virtio kicks cells.
fn summary_row(html: &str, tenant: &str) -> (String, String) {
    let row = html
        .split("<tr>")
        .find(|r| r.starts_with(&format!("<td>{tenant}</td>")))
        .unwrap_or_else(|| panic!("{tenant} in the summary"));
    let cells: Vec<&str> = row
        .split("<td>")
        .skip(1)
        .filter_map(|c| c.split("</td>").next())
        .collect();
    (cells[1].to_owned(), cells[6].to_owned())
}

fn assert_tenants_plotted(out: &Path, recording: &Path, tenants: &[&str], samples: usize) {
    let recorded = recorded_samples(recording);
    let svg = std::fs::read_to_string(out.join("overview.svg")).expect("overview.svg");
    let png = std::fs::read(out.join("overview.png")).expect("overview.png");
    let zero = baseline(&svg);
    let mut legend_at = Vec::new();
    let html = std::fs::read_to_string(out.join("index.html")).expect("index.html");
    for (i, tenant) in tenants.iter().enumerate() {
        assert_series_drawn(&svg, i, samples, zero, tenant);
        let exits = recorded_exits(&recorded, tenant);
        let plotted = assert_series_values(&svg, i, &exits, tenant);
        eprintln!(
            "{tenant}: plotted exits {:.1} to {:.1}, recorded {}",
            plotted.0, plotted.1, exits.exits
        );
        assert_eq!(
            summary_row(&html, tenant),
            (exits.exits.to_string(), exits.kicks.to_string()),
            "{tenant}'s exits and kicks in the summary, and the recording's"
        );
        let c = color(i);
        let pixels = plot_pixels(&png, (c.0, c.1, c.2));
        assert!(
            pixels > 300,
            "{tenant}: {pixels} pixels of its colour in the PNG's plot area"
        );
        let label = legend_label(tenant);
        let texts = svg_texts(&svg);
        legend_at.push(
            texts
                .iter()
                .position(|t| *t == label)
                .unwrap_or_else(|| panic!("{label} in the legend: {texts:?}")),
        );
    }
    assert!(legend_at.is_sorted(), "legend in colour order");
    for text in [
        "time since the recording started (s)",
        "exits per second (1/s)",
    ] {
        assert!(
            svg_texts(&svg).iter().any(|t| t == text),
            "axis label {text:?}"
        );
    }
    assert!(
        html.matches("<svg").count() > tenants.len(),
        "charts inline"
    );
}

/// A hand-made recording of three tenants with known rates (and counts that are their sums): each
/// tenant's series is in the overview (SVG and PNG) at its recorded values, its timeline shows its
/// reasons and kicks, its histogram its buckets.
#[test]
fn a_report_plots_every_tenants_series() {
    let dir = TempDir::new("report");
    let recording = dir.join("report-input.jsonl");
    let out = dir.join("report-out");
    let samples = 20;
    let mut text = serde_json::to_string(&json!({
        "format": "vmtrace-recording", "version": 1, "host": "test", "kernel": "6.18",
        "kvm": "pvm", "exit_source": "derived", "started": "2025-01-01T00:00:00Z",
        "started_unix": 1735689600.0, "interval_secs": 1.0
    }))
    .unwrap()
        + "\n";
    // Busiest first in the report: tenant-c, tenant-b, tenant-a.
    let tenants = ["/t/tenant-c", "/t/tenant-b", "/t/tenant-a"];
    let mut exits = [0u64; 3];
    for s in 1..=samples {
        let rows: Vec<_> = tenants
            .iter()
            .enumerate()
            .map(|(i, name)| {
                // Exits over each 1 s interval, and their running total.
                let rate = (3 - i) as u64 * 1000 + ((s as f64).sin() * 300.0 + 300.0) as u64;
                exits[i] += rate;
                json!({
                    "tenant": name, "identity": {"kind": "path", "path": name}, "cgroups": [],
                    "counts": {"exit.io": exits[i], "kick.q0": 5 * s * (s + 1)},
                    "rates": {"exit.io": rate as f64, "kick.q0": 10.0 * s as f64},
                    "latency": {"exit.io": {"count": s * 1000, "mean_ns": 5000, "p50_ns": 4095,
                        "p90_ns": 8191, "p99_ns": 16383, "max_ns": 20000,
                        "buckets": [[2048, s * 400], [4096, s * 500], [8192, s * 90], [16384, s * 10]]}}
                })
            })
            .collect();
        let sample = json!({"timestamp": 1735689600.0 + s as f64, "elapsed_secs": s as f64,
            "interval_secs": 1.0, "kvm": "pvm", "exit_source": "derived", "drops": {},
            "tenants": rows});
        text += &(serde_json::to_string(&sample).unwrap() + "\n");
    }
    std::fs::write(&recording, text).unwrap();
    report(&recording, &out, &[]);
    assert_tenants_plotted(&out, &recording, &tenants, samples);

    // tenant-c's own charts: exits and kicks over time, and its latency histogram's bars.
    let timeline = std::fs::read_to_string(out.join("01-t-tenant-c-timeline.svg")).unwrap();
    let zero = baseline(&timeline);
    assert_series_drawn(&timeline, 0, samples, zero, "exit io");
    // Its only exits are exit.io: the line of that reason is its exits.
    let recorded = recorded_exits(&recorded_samples(&recording), tenants[0]);
    assert_series_values(&timeline, 0, &recorded, "exit io");
    assert_series_drawn(&timeline, 1, samples, zero, "virtio kicks");
    let texts = svg_texts(&timeline);
    assert!(texts.iter().any(|t| t == "virtio kicks"), "{texts:?}");
    assert!(
        texts.iter().any(|t| t == "events per second (1/s)"),
        "{texts:?}"
    );
    let latency = std::fs::read_to_string(out.join("01-t-tenant-c-latency.svg")).unwrap();
    let bars = latency
        .matches(&format!("fill=\"{}\"", hex(color(0))))
        .count();
    assert!(bars > 4, "a bar per bucket plus the legend mark: {bars}");
    assert!(latency.contains("events in the bucket (count, log scale)"));
    for i in 1..=3 {
        for chart in ["timeline", "latency"] {
            assert!(
                out.join(format!(
                    "0{i}-t-{}-{chart}.png",
                    tenants[i - 1].trim_start_matches("/t/")
                ))
                .exists()
            );
        }
    }
}

/// A recording of real guests in two tenants, reported: both tenants' exit rates are plotted, and
/// their plotted and summed exits are the VMMs' ground truth.
#[test]
fn a_report_of_a_real_recording_plots_both_tenants() {
    if !privileged_host("a_report_of_a_real_recording_plots_both_tenants") {
        return;
    }
    let base = format!("vmtrace-test-report-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let busy = TenantCgroup::new(&format!("{base}/busy"));
    let calm = TenantCgroup::new(&format!("{base}/calm"));
    let dir = TempDir::new("report-real");
    let recording = dir.join("report-real.jsonl");
    let out = dir.join("report-real-out");

    let mut recorder = Command::new(binary("vmtrace"))
        .args(["record", "--interval", "250ms", "--duration", "6s", "-o"])
        .arg(&recording)
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmtrace record");
    wait_for_line(&mut recorder, "vmtrace: recording to");
    // Paced guests of about 2 s each, done well before the recording ends.
    let vmm = |scenario: &str, count: &str, rate: &str, cgroup: &TenantCgroup| -> Child {
        Command::new(binary("vmtrace-vmm"))
            .args(["--scenario", scenario, "--count", count, "--rate", rate])
            .args(["--cgroup", &cgroup.relative, "--quiet"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("vmtrace-vmm")
    };
    let vmms = [
        vmm("pio", "2000", "1000", &busy),
        vmm("hlt", "400", "200", &calm),
    ];
    let reports: Vec<Report> = vmms
        .into_iter()
        .map(|v| {
            let output = v.wait_with_output().expect("vmtrace-vmm");
            assert!(output.status.success(), "vmtrace-vmm failed");
            serde_json::from_slice(&output.stdout).expect("the VMM's report")
        })
        .collect();
    assert!(
        recorder.try_wait().expect("vmtrace record").is_none(),
        "the recording must outlast the guests"
    );
    let status = recorder.wait().expect("vmtrace record");
    assert!(status.success());
    let samples = std::fs::read_to_string(&recording).unwrap().lines().count() - 1;

    // The recording's totals are the ground truth, kind by kind.
    let recorded = recorded_samples(&recording);
    let last = recorded.last().expect("samples");
    expect::assert_tenants(
        last,
        &format!("/{base}"),
        &[
            (busy.agent_path(), std::slice::from_ref(&reports[0])),
            (calm.agent_path(), std::slice::from_ref(&reports[1])),
        ],
    );
    report(&recording, &out, &["--filter", &base]);
    assert_tenants_plotted(
        &out,
        &recording,
        &[&busy.agent_path(), &calm.agent_path()],
        samples,
    );
}

fn wait_for_line(child: &mut Child, prefix: &str) {
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[vmtrace] {line}");
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_mins(1)) {
            Ok(line) if line.starts_with(prefix) => return,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("no {prefix:?} from vmtrace ({e})");
            }
        }
    }
}
