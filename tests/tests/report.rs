//! `vmtrace report`: a recording becomes SVG and PNG charts and an HTML page whose plots show each
//! tenant's series: checked in the SVG (a line of the tenant's colour with a point per sample,
//! off the zero line) and in the PNG (pixels of that colour in the plot area, not the legend).

use std::{
    io::{BufRead, BufReader, Cursor},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::json;
use vmtrace::cmd::report::charts::{HEIGHT, LEGEND_WIDTH, WIDTH, color, hex, legend_label};
use vmtrace_tests::{TenantCgroup, binary, privileged_host, temp::TempDir};

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

fn assert_tenants_plotted(out: &Path, tenants: &[&str], samples: usize) {
    let svg = std::fs::read_to_string(out.join("overview.svg")).expect("overview.svg");
    let png = std::fs::read(out.join("overview.png")).expect("overview.png");
    let zero = baseline(&svg);
    let mut legend_at = Vec::new();
    for (i, tenant) in tenants.iter().enumerate() {
        assert_series_drawn(&svg, i, samples, zero, tenant);
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
    let html = std::fs::read_to_string(out.join("index.html")).expect("index.html");
    assert!(
        html.matches("<svg").count() > tenants.len(),
        "charts inline"
    );
    for tenant in tenants {
        assert!(
            html.contains(&format!("<td>{tenant}</td>")),
            "{tenant} in the summary"
        );
    }
}

/// A hand-made recording of three tenants with known rates: each tenant's series is in the overview
/// (SVG and PNG), its timeline shows its reasons and kicks, its histogram its buckets.
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
    for s in 1..=samples {
        let rows: Vec<_> = tenants
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let rate = (3 - i) as f64 * 1000.0 + (s as f64).sin() * 300.0;
                json!({
                    "tenant": name, "identity": {"kind": "path", "path": name}, "cgroups": [],
                    "counts": {"exit.io": s * 1000 * (3 - i), "kick.q0": s * 10},
                    "rates": {"exit.io": rate, "kick.q0": 10.0 * s as f64},
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
    assert_tenants_plotted(&out, &tenants, samples);

    // tenant-c's own charts: exits and kicks over time, and its latency histogram's bars.
    let timeline = std::fs::read_to_string(out.join("01-t-tenant-c-timeline.svg")).unwrap();
    let zero = baseline(&timeline);
    assert_series_drawn(&timeline, 0, samples, zero, "exit io");
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

/// A recording of real guests in two tenants, reported: both tenants' exit rates are plotted.
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
        .args(["record", "--interval", "250ms", "--duration", "4s", "-o"])
        .arg(&recording)
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmtrace record");
    wait_for_line(&mut recorder, "vmtrace: recording to");
    let vmm = |scenario: &str, rate: &str, cgroup: &TenantCgroup| -> Child {
        Command::new(binary("vmtrace-vmm"))
            .args([
                "--scenario",
                scenario,
                "--count",
                "100000",
                "--rate",
                rate,
                "--quiet",
            ])
            .args(["--cgroup", &cgroup.relative])
            .stdout(Stdio::null())
            .spawn()
            .expect("vmtrace-vmm")
    };
    let mut vmms = [vmm("pio", "3000", &busy), vmm("hlt", "300", &calm)];
    let status = recorder.wait().expect("vmtrace record");
    for v in &mut vmms {
        let _ = v.kill();
        let _ = v.wait();
    }
    assert!(status.success());
    let samples = std::fs::read_to_string(&recording).unwrap().lines().count() - 1;
    report(&recording, &out, &["--filter", &base]);
    assert_tenants_plotted(&out, &[&busy.agent_path(), &calm.agent_path()], samples);
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
