//! `/metrics` in both formats, chosen by `Accept` as the Prometheus client libraries do: the text
//! format 0.0.4 by default, which `promtool check metrics` passes without a word, and OpenMetrics
//! when asked (as Prometheus asks), which the reference Python client's strict OpenMetrics parser
//! reads. Both carry the same samples, while reference VMMs give tenants counters and histograms.

use std::{
    collections::BTreeSet,
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use vmtrace_tests::{
    TenantCgroup, binary, free_port, have, http_get,
    manifests::python,
    on_path, privileged_host,
    process::Proc,
    run_vmm,
    wait::{poll, wait_for},
};

/// Prometheus' own `Accept` when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// The body and Content-Type of a GET with `accept` (none when empty).
fn get(port: u16, accept: &str) -> (String, String) {
    let mut curl = Command::new("curl");
    curl.args(["--silent", "--show-error", "--dump-header", "/dev/stderr"]);
    if !accept.is_empty() {
        curl.args(["--header", &format!("Accept: {accept}")]);
    }
    let output = curl
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("curl");
    let headers = String::from_utf8_lossy(&output.stderr).to_lowercase();
    let content_type = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-type:"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        content_type,
    )
}

/// The sample lines of an exposition, without comments.
fn samples(exposition: &str) -> BTreeSet<&str> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect()
}

#[test]
fn the_exposition_follows_accept_and_each_format_is_clean() {
    let test = "the_exposition_follows_accept_and_each_format_is_clean";
    if !privileged_host(test) {
        return;
    }
    for tool in ["promtool", "curl"] {
        if !have(
            test,
            on_path(tool),
            &format!("{tool} missing (`cargo xtask setup`)"),
        ) {
            return;
        }
    }
    let python = match python() {
        Ok(p) => p,
        Err(e) => {
            have(test, false, &format!("prometheus-client unavailable: {e}"));
            return;
        }
    };
    let port = free_port();
    let _agent = Proc::spawn(
        "vmtrace agent",
        Command::new(binary("vmtrace"))
            .args([
                "agent",
                "--interval",
                "200ms",
                "--state-dir",
                "off",
                "--kick-latency",
                "--service-time",
            ])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    wait_for("the agent to be ready", Duration::from_mins(1), || {
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    let tenant = TenantCgroup::new(&format!("vmtrace-exposition-{}", std::process::id()));
    for scenario in ["pio", "doorbell"] {
        run_vmm(&[
            "--scenario",
            scenario,
            "--count",
            "300",
            "--cgroup",
            &tenant.relative,
        ]);
    }
    let path = tenant.agent_path();
    let kicks = format!("vmtrace_virtio_kick_service_duration_seconds_count{{tenant=\"{path}\"");
    poll(Duration::from_secs(20), || {
        get(port, "").0.contains(&kicks).then_some(())
    });

    // Taken one after the other; the samples must match, so both come from one sample: the
    // interval is 200 ms, so retry until two fetches fall within one.
    let (text, text_type, openmetrics, openmetrics_type) = poll(Duration::from_secs(20), || {
        let (text, text_type) = get(port, "");
        let (openmetrics, openmetrics_type) = get(port, PROMETHEUS_ACCEPT);
        (samples(&text) == samples(&openmetrics)).then_some((
            text,
            text_type,
            openmetrics,
            openmetrics_type,
        ))
    })
    .expect("the two formats never carried the same samples");
    assert!(text.contains(&kicks), "the tenant's histograms are there");
    assert_eq!(text_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(
        openmetrics_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(openmetrics.ends_with("# EOF\n") && !text.contains("# EOF"));

    // promtool lints the text format: not a word.
    let (clean, said) = promtool_lint(&text);
    assert!(
        clean && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );
    // promtool has no OpenMetrics parser (prometheus/prometheus#8932): it reads OpenMetrics as the
    // text format, where a counter's HELP under its family name (`x`, as OpenMetrics requires)
    // does not cover its `x_total` samples. That, for each counter with samples, is all it says.
    let (_, said) = promtool_lint(&openmetrics);
    let mut counters: Vec<String> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .map(|family| format!("{family}_total"))
        .filter(|sample| {
            openmetrics.lines().any(|l| {
                l.starts_with(&format!("{sample}{{")) || l.starts_with(&format!("{sample} "))
            })
        })
        .collect();
    counters.sort();
    assert!(
        counters.len() > 6,
        "the tenants' counters too: {counters:?}"
    );
    let mut complaints: Vec<&str> = said.lines().collect();
    complaints.sort_unstable();
    let expected: Vec<String> = counters
        .iter()
        .map(|c| format!("{c} no help text"))
        .collect();
    assert_eq!(complaints, expected, "promtool on OpenMetrics:\n{said}");

    // The Python client's OpenMetrics parser accepts the OpenMetrics answer whole.
    let mut parse = Command::new(&python)
        .args([
            "-c",
            "import sys\n\
             from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
             families = list(text_string_to_metric_families(sys.stdin.read()))\n\
             print(len(families), sum(len(f.samples) for f in families))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    parse
        .stdin
        .take()
        .unwrap()
        .write_all(openmetrics.as_bytes())
        .unwrap();
    let parsed = parse.wait_with_output().unwrap();
    assert!(
        parsed.status.success(),
        "the OpenMetrics parser refused the exposition: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let counts = String::from_utf8_lossy(&parsed.stdout);
    let parsed_samples: usize = counts
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        parsed_samples,
        samples(&openmetrics).len(),
        "every sample parsed"
    );
    eprintln!(
        "text format: promtool clean; OpenMetrics: {} families, {parsed_samples} samples parsed",
        counts.split_whitespace().next().unwrap_or("?")
    );
}

/// The lines of `exposition` that are the series of the tenant at `path`.
fn tenant_series<'a>(exposition: &'a str, path: &str) -> BTreeSet<&'a str> {
    let label = format!("tenant=\"{path}\"");
    samples(exposition)
        .into_iter()
        .filter(|l| l.contains(&label))
        .collect()
}

#[test]
fn a_coarser_bucket_factor_costs_a_tenant_fewer_series_and_keeps_every_kept_bucket_exact() {
    let test =
        "a_coarser_bucket_factor_costs_a_tenant_fewer_series_and_keeps_every_kept_bucket_exact";
    if !privileged_host(test) {
        return;
    }
    if !have(test, on_path("curl"), "curl missing (`cargo xtask setup`)") {
        return;
    }
    let agent = |factor: &str| {
        let port = free_port();
        let agent = Proc::spawn(
            "vmtrace agent",
            Command::new(binary("vmtrace"))
                .args(["agent", "--interval", "200ms", "--state-dir", "off"])
                .args(["--service-time", "--prometheus-bucket-factor", factor])
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
        );
        wait_for("the agent to be ready", Duration::from_mins(1), || {
            matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
        });
        (agent, port)
    };
    let (_fine, fine_port) = agent("2");
    let (_coarse, coarse_port) = agent("16");
    let tenant = TenantCgroup::new(&format!("vmtrace-buckets-{}", std::process::id()));
    let report = run_vmm(&[
        "--scenario",
        "pio",
        "--count",
        "200",
        "--vcpus",
        "2",
        "--cgroup",
        &tenant.relative,
    ]);
    // Every io exit but each vCPU's last was served and timed.
    let served = report.total.exits["io"] - report.vcpus.len() as u64;
    let path = tenant.agent_path();
    let served_count = |exposition: &str| -> Option<u64> {
        tenant_series(exposition, &path).into_iter().find_map(|l| {
            (l.starts_with("vmtrace_vmm_service_duration_seconds_count{")
                && l.contains("exit_reason=\"io\""))
            .then(|| l.rsplit_once(' ')?.1.parse().ok())?
        })
    };
    let [fine, coarse] = [fine_port, coarse_port].map(|port| {
        poll(Duration::from_secs(20), || {
            let (text, _) = get(port, "");
            (served_count(&text) == Some(served)).then_some(text)
        })
        .unwrap_or_else(|| panic!("the agent on {port} never counted {served} served exits"))
    });
    let (fine, coarse) = (tenant_series(&fine, &path), tenant_series(&coarse, &path));
    let buckets = |series: &BTreeSet<&str>| {
        series
            .iter()
            .filter(|l| {
                l.split_once('{')
                    .is_some_and(|(name, _)| name.ends_with("_bucket"))
            })
            .count()
    };
    let histograms = fine
        .iter()
        .filter(|l| l.contains("_seconds_count{"))
        .count();
    assert!(histograms > 0, "the tenant has latency histograms");
    // 40 buckets each (39 bounds and +Inf) against 10 (9 and +Inf).
    assert_eq!(buckets(&fine), histograms * 40);
    assert_eq!(buckets(&coarse), histograms * 10);
    assert_eq!(fine.len() - coarse.len(), histograms * 30);
    // Every series kept is one of the fine exposition's (the bounds kept are among its bounds).
    // Values are compared with the VMM's, not between the agents: each agent's probes time each
    // exit themselves, a few ns apart, so a latency near a bound may fall either side of it.
    let series = |set: &BTreeSet<&str>| -> BTreeSet<String> {
        set.iter()
            .filter_map(|l| Some(l.rsplit_once(' ')?.0.to_owned()))
            .collect()
    };
    let extra: Vec<String> = series(&coarse)
        .difference(&series(&fine))
        .cloned()
        .collect();
    assert!(extra.is_empty(), "not in the fine exposition: {extra:#?}");
    // The coarse buckets are cumulative and end at the VMM's served exits.
    let io_buckets: Vec<u64> = coarse
        .iter()
        .filter(|l| {
            l.starts_with("vmtrace_vmm_service_duration_seconds_bucket{")
                && l.contains("exit_reason=\"io\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    assert_eq!(io_buckets.len(), 10);
    assert_eq!(io_buckets.iter().max(), Some(&served));
    eprintln!(
        "series of one tenant ({histograms} latency histograms): {} at factor 2, {} at factor 16",
        fine.len(),
        coarse.len()
    );
}

/// `promtool check metrics` over `exposition`: whether it passed, and what it said.
fn promtool_lint(exposition: &str) -> (bool, String) {
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    lint.stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let lint = lint.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    (lint.status.success(), said)
}
