//! deploy/rules/: the recording rules and alerts pass `promtool check rules` and their unit tests
//! (`promtool test rules`, Debian's prometheus package); every alert is tested and has a runbook in
//! docs/alerts.md; the PrometheusRule carries the same groups; and the unit tests' input series are
//! shaped like a real agent's: each `vmtrace_*` series there has a name and labels that the agent's
//! /metrics gives it, while reference VMMs run, plus the scrape job's target labels.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use vmtrace_tests::{
    TenantCgroup, binary, free_port, have, http_get,
    manifests::{deploy_dir, find_kind, python, yaml_docs},
    on_path, privileged_host,
    process::Proc,
    run_vmm,
    wait::{poll, wait_for},
};

/// Labels the scrape job adds to every series (deploy/prometheus-scrape-config.yaml).
const TARGET_LABELS: [&str; 4] = ["job", "instance", "node", "cluster"];

fn promtool(args: &[&str], dir: &Path) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// A series selector of a unit test, `name{a="x", b="y"}`: its name and label names.
fn series_shape(series: &str) -> (String, BTreeSet<String>) {
    let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
    let labels = labels.trim_end_matches('}');
    let mut names = BTreeSet::new();
    // Values are quoted and may hold commas: split on `="..."` pairs.
    let mut rest = labels;
    while let Some((key, after)) = rest.split_once("=\"") {
        names.insert(key.trim().trim_start_matches(',').trim().to_owned());
        let end = after.find('"').expect("a closing quote");
        rest = &after[end + 1..];
    }
    (name.trim().to_owned(), names)
}

/// Every label-name set each metric has in an exposition.
fn exposition_shapes(metrics: &str) -> BTreeMap<String, BTreeSet<BTreeSet<String>>> {
    let mut shapes: BTreeMap<String, BTreeSet<BTreeSet<String>>> = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let selector = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = series_shape(selector);
        shapes.entry(name).or_default().insert(labels);
    }
    shapes
}

#[test]
fn the_rules_pass_their_unit_tests_and_every_alert_has_a_runbook() {
    let test = "the_rules_pass_their_unit_tests_and_every_alert_has_a_runbook";
    if !have(
        test,
        on_path("promtool"),
        "promtool missing (Debian's prometheus)",
    ) {
        return;
    }
    let python = match python() {
        Ok(p) => p,
        Err(e) => {
            have(test, false, &format!("PyYAML unavailable: {e}"));
            return;
        }
    };
    let rules_dir = deploy_dir().join("rules");
    let checked = promtool(&["check", "rules", "vmtrace.rules.yaml"], &rules_dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "vmtrace.rules.test.yaml"], &rules_dir);
    assert!(tested.contains("SUCCESS"), "{tested}");

    let rules = yaml_docs(&python, &rules_dir.join("vmtrace.rules.yaml")).remove(0);
    let operator = yaml_docs(&python, &deploy_dir().join("prometheusrule.yaml"));
    assert_eq!(
        find_kind(&operator, "PrometheusRule")["spec"]["groups"],
        rules["groups"],
        "deploy/prometheusrule.yaml carries the groups of deploy/rules/vmtrace.rules.yaml"
    );
    let unit_tests = yaml_docs(&python, &rules_dir.join("vmtrace.rules.test.yaml")).remove(0);
    let tested_alerts: BTreeSet<&str> = unit_tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|t| t["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|t| t["alertname"].as_str())
        .collect();
    let runbooks = fs::read_to_string(deploy_dir().join("../docs/alerts.md")).unwrap();
    let anchors: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|heading| heading.trim().to_lowercase())
        .collect();
    let alerts: Vec<&Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter(|r| r["alert"].is_string())
        .collect();
    assert!(alerts.len() >= 10, "{} alerts", alerts.len());
    for alert in alerts {
        let name = alert["alert"].as_str().unwrap();
        assert!(
            tested_alerts.contains(name),
            "{name} never fires in the unit tests"
        );
        let url = alert["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        let anchor = url.split_once("docs/alerts.md#").map(|(_, a)| a);
        assert!(
            anchor.is_some_and(|a| anchors.contains(a)),
            "{name}: runbook_url {url:?} is not a section of docs/alerts.md"
        );
        for key in ["summary", "description"] {
            assert!(alert["annotations"][key].is_string(), "{name}: no {key}");
        }
        assert!(
            alert["labels"]["severity"].is_string(),
            "{name}: no severity"
        );
    }
    eprintln!("{tested}");
}

#[test]
fn the_rules_unit_tests_use_series_shaped_like_the_agents() {
    let test = "the_rules_unit_tests_use_series_shaped_like_the_agents";
    if !privileged_host(test) {
        return;
    }
    let python = match python() {
        Ok(p) => p,
        Err(e) => {
            have(test, false, &format!("PyYAML unavailable: {e}"));
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
                "--listen",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    wait_for("the agent to be ready", Duration::from_mins(1), || {
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    let tenant = TenantCgroup::new(&format!("vmtrace-alerts-{}", std::process::id()));
    for scenario in ["pio", "doorbell"] {
        run_vmm(&[
            "--scenario",
            scenario,
            "--count",
            "500",
            "--cgroup",
            &tenant.relative,
        ]);
    }
    let path = tenant.agent_path();
    let mut metrics = String::new();
    poll(Duration::from_secs(20), || {
        metrics = http_get(port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        (metrics.contains(&format!("vmtrace_virtio_kicks_total{{tenant=\"{path}\""))
            && metrics.contains(&format!(
                "vmtrace_cpu_time_seconds_total{{tenant=\"{path}\""
            )))
        .then_some(())
    });
    let real = exposition_shapes(&metrics);
    // What docs/metrics.md lists as each metric's attributes, for series a tenant has only on some
    // hosts or only while something fails (a probe's `reason`, the tax ratio on VMX/SVM hosts).
    let documented = documented_attributes();

    let unit_tests =
        yaml_docs(&python, &deploy_dir().join("rules/vmtrace.rules.test.yaml")).remove(0);
    let mut checked = 0;
    for series in unit_tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["input_series"].as_array().unwrap())
        .filter_map(|s| s["series"].as_str())
        .filter(|s| s.starts_with("vmtrace_"))
    {
        let (name, mut labels) = series_shape(series);
        for target in TARGET_LABELS {
            assert!(labels.remove(target), "{series}: no target label {target}");
        }
        let seen = real.get(&name);
        let fits_real = seen.is_some_and(|shapes| {
            shapes
                .iter()
                .any(|s| labels.is_subset(s) && s.is_subset(&labels))
        });
        let fits_documented = documented
            .get(&name)
            .is_some_and(|attributes| labels.is_subset(attributes));
        assert!(
            fits_real
                || (fits_documented
                    && seen.is_none_or(|shapes| shapes.iter().any(|s| s.is_subset(&labels)))),
            "{series}: the agent gives {name} the labels {seen:?} (docs/metrics.md: {:?})",
            documented.get(&name)
        );
        checked += 1;
    }
    assert!(checked >= 15, "{checked} series checked");
    eprintln!("{checked} input series shaped like the agent's /metrics");
}

/// Each metric's attributes in docs/metrics.md, under its Prometheus names (`tenant` standing
/// for the tenant label alone).
fn documented_attributes() -> BTreeMap<String, BTreeSet<String>> {
    let docs = fs::read_to_string(deploy_dir().join("../docs/metrics.md")).unwrap();
    let mut documented = BTreeMap::new();
    for row in docs.lines().filter(|l| l.starts_with("| `vmtrace.")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (name, kind, unit, attributes) = (cells[1], cells[2], cells[3], cells[4]);
        let mut prometheus = name.trim_matches('`').replace('.', "_");
        match unit.trim_matches('`') {
            "s" => prometheus.push_str("_seconds"),
            "By" => prometheus.push_str("_bytes"),
            _ => {}
        }
        if kind == "counter" {
            prometheus.push_str("_total");
        }
        let mut labels: BTreeSet<String> = attributes
            .split(',')
            .map(|a| a.trim().trim_matches('`').replace('.', "_"))
            .filter(|a| !a.is_empty())
            .collect();
        // "tenant" in the table stands for the tenant's labels: `tenant` and `tenant_name`.
        if labels.contains("tenant") {
            labels.insert("tenant_name".to_owned());
        }
        documented.insert(prometheus, labels);
    }
    documented
}
