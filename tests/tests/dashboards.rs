//! The Grafana dashboards in dashboards/: well-formed, and every panel query returns data from a
//! real Prometheus (Debian's `prometheus`, started here) that scrapes a real agent while reference
//! VMMs run in tenant cgroups; on each dashboard, panels whose value is known return it exactly
//! (a known tenant's exits and kicks over a time range, the one agent and its scrape target).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use vmtrace_tests::{
    TenantCgroup, binary, cgroup2_root,
    dashboards::{
        BUILTINS, CountingPanel, Dashboard, dashboards, panels, referenced_variables, regex_of,
        substitute, variable_query, variables,
    },
    expect::{Expectation, HostKvm, is_exit_without_kvm_exit},
    expected_agent_counts, free_port, have, http_get, privileged_host,
    process::Proc,
    prometheus::{self, Prometheus, count_of, describe_result, kubernetes_pod_job},
    run_vmm,
    temp::{RmdirOnDrop, TempDir},
    wait::{poll, wait_for},
};
use vmtrace_vmm::Report;

/// The labels the example scrape job (`prometheus::SCRAPE_CONFIG`) gives the agent's target: its
/// job name, its `cluster` replacement, and the node the test pretends to be.
const JOB: &str = "vmtrace";
const CLUSTER: &str = "my-cluster";
const NODE: &str = "test-node";
/// What the test substitutes for Grafana's interval variables: windows long enough for rate() to
/// see several 1 s scrapes.
const RATE_INTERVAL: &str = "30s";
const INTERVAL: &str = "15s";
const RANGE: &str = "5m";
/// Labels the agent does not export yet; a variable over them may be empty (its All value `.*`
/// still matches every series).
const FUTURE_LABELS: [&str; 1] = ["k8s_namespace_name"];

/// The labels a legend shows (`{{label}}`).
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|rest| {
            rest.split_once("}}")
                .map(|(label, _)| label.trim().to_owned())
        })
        .collect()
}

/// The Grafana unit of what `expr` measures: seconds for latencies and per-event times, a share
/// for ratios and seconds per second (CPU, busy time), bytes, bytes per second, counts per second
/// for other rates, plain numbers otherwise.
fn expected_unit(expr: &str) -> &'static str {
    let rate = expr.contains("rate(") && !expr.contains("increase(");
    if expr.contains("histogram_quantile")
        || expr.contains("scrape_duration_seconds")
        || (expr.contains("1e6") && expr.contains(" / "))
        || (expr.contains("_seconds_sum") && expr.contains("_count"))
    {
        "s"
    } else if expr.contains("_ratio") || expr.contains(" / ") {
        "percentunit"
    } else if rate && expr.contains("_bytes_total") {
        "Bps"
    } else if expr.contains("_bytes") {
        "bytes"
    } else if rate && (expr.contains("_seconds_total") || expr.contains("_seconds_sum")) {
        "percentunit"
    } else if rate {
        "cps"
    } else {
        "short"
    }
}

#[test]
fn dashboards_are_well_formed() {
    let all = dashboards();
    let mut uids = BTreeSet::new();
    let mut checked = 0;
    for Dashboard { file, json } in &all {
        let uid = json["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty(), "{file}: no uid");
        assert!(uids.insert(uid.to_owned()), "{file}: uid {uid} used twice");
        assert!(
            json["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: no title"
        );
        let schema = json["schemaVersion"].as_u64().unwrap_or(0);
        assert!(
            (36..=41).contains(&schema),
            "{file}: schemaVersion {schema}, expected about 39"
        );
        assert!(
            json["id"].is_null(),
            "{file}: a provisioned dashboard has no id"
        );

        // Variables: the data source, then query variables on it.
        let vars = variables(json);
        let by_name: BTreeMap<&str, &Value> = vars
            .iter()
            .map(|v| (v["name"].as_str().unwrap_or_default(), *v))
            .collect();
        let datasource = by_name
            .get("datasource")
            .unwrap_or_else(|| panic!("{file}: no `datasource` variable"));
        assert_eq!(datasource["type"], "datasource", "{file}");
        assert_eq!(datasource["query"], "prometheus", "{file}");
        let mut required = vec!["job", "cluster", "node"];
        if vars.iter().any(|v| v["name"] == "tenant") || file.contains("tenant") {
            required.extend(["namespace", "tenant"]);
        }
        for name in required {
            let var = by_name
                .get(name)
                .unwrap_or_else(|| panic!("{file}: no `{name}` variable"));
            assert_eq!(var["type"], "query", "{file}: ${name}");
            assert_eq!(
                var["datasource"]["uid"], "${datasource}",
                "{file}: ${name} must query the selected data source"
            );
            assert_eq!(
                var["includeAll"], true,
                "{file}: ${name} needs an All option"
            );
            if name != "job" {
                assert_eq!(
                    var["allValue"], ".*",
                    "{file}: ${name}'s All must also match series without the label"
                );
            }
            let query = variable_query(var).unwrap_or_default();
            assert!(
                query.starts_with("label_values("),
                "{file}: ${name}: {query}"
            );
        }
        let defined: BTreeSet<String> = by_name.keys().map(|k| (*k).to_owned()).collect();

        // Panels: ids unique, on the 24-column grid, on the selected data source, with targets.
        let mut ids = BTreeSet::new();
        for panel in json["panels"].as_array().expect("panels") {
            if panel["type"] == "row" {
                assert!(ids.insert(panel["id"].as_u64().expect("row id")), "{file}");
            }
        }
        let panels = panels(json);
        assert!(!panels.is_empty(), "{file}: no panels");
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(!title.is_empty(), "{file}: a panel without a title");
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: {title}: no id"));
            assert!(ids.insert(id), "{file}: panel id {id} used twice");
            let kind = panel["type"].as_str().unwrap_or_default();
            assert!(
                [
                    "timeseries",
                    "stat",
                    "table",
                    "bargauge",
                    "heatmap",
                    "gauge"
                ]
                .contains(&kind),
                "{file}: {title}: panel type {kind}"
            );
            let grid = &panel["gridPos"];
            let (x, w, h) = (
                grid["x"].as_u64().unwrap_or(99),
                grid["w"].as_u64().unwrap_or(0),
                grid["h"].as_u64().unwrap_or(0),
            );
            assert!(
                w > 0 && h > 0 && x + w <= 24 && grid["y"].is_u64(),
                "{file}: {title}: gridPos {grid}"
            );
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: {title}: the panel must use the selected data source"
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{file}: {title}: no targets");
            let mut refs = BTreeSet::new();
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_default();
                assert!(!expr.trim().is_empty(), "{file}: {title}: empty expr");
                assert!(
                    refs.insert(target["refId"].as_str().unwrap_or_default()),
                    "{file}: {title}: refId used twice"
                );
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "{file}: {title}"
                );
                for name in referenced_variables(expr) {
                    assert!(
                        defined.contains(&name) || BUILTINS.contains(&name.as_str()),
                        "{file}: {title}: ${name} is not a variable of the dashboard: {expr}"
                    );
                }
                // Legends name tenants as people read them, by labels the query keeps.
                let legend = target["legendFormat"].as_str().unwrap_or_default();
                assert!(
                    !legend.contains("{{tenant}}"),
                    "{file}: {title}: the legend shows the tenant's label, not its name ({{{{tenant_name}}}}): {legend}"
                );
                for label in legend_labels(legend) {
                    assert!(
                        expr.contains(&label),
                        "{file}: {title}: the legend's {label} is not kept by the query: {expr}"
                    );
                }
                if kind == "heatmap" {
                    assert_eq!(target["format"], "heatmap", "{file}: {title}");
                    assert!(
                        expr.contains("_bucket") && expr.contains("by (le)"),
                        "{file}: {title}: a heatmap of histogram buckets by le: {expr}"
                    );
                }
                checked += 1;
            }
            // Units from what the first query measures.
            let expr = targets[0]["expr"].as_str().unwrap_or_default();
            if kind == "heatmap" {
                assert_eq!(
                    panel["options"]["yAxis"]["unit"], "s",
                    "{file}: {title}: a heatmap of seconds buckets"
                );
            } else {
                assert_eq!(
                    panel["fieldConfig"]["defaults"]["unit"].as_str(),
                    Some(expected_unit(expr)),
                    "{file}: {title}: the unit of {expr}"
                );
            }
        }
    }
    eprintln!(
        "dashboards: {} files, {checked} panel targets well-formed",
        all.len()
    );
}

#[test]
fn substitution_follows_grafana() {
    let values = BTreeMap::from([
        ("tenant", "(/a|/b\\.c)".to_owned()),
        ("__range", "5m".to_owned()),
        ("__range_s", "300".to_owned()),
    ]);
    assert_eq!(
        substitute(
            "x{tenant=~\"$tenant\"}[$__range] $__range_s ${tenant:regex}",
            &values
        ),
        "x{tenant=~\"(/a|/b\\.c)\"}[5m] 300 (/a|/b\\.c)"
    );
    assert_eq!(
        regex_of(&["/a".into(), "/b.c".into()]),
        "(/a|/b\\.c)".to_owned()
    );
    assert_eq!(
        referenced_variables("rate(x{a=~\"$a\", b=\"${b:csv}\"}[$__rate_interval])"),
        BTreeSet::from(["a".into(), "b".into(), "__rate_interval".into()])
    );
}

// ---------------------------------------------------------------------------------------------
// The end-to-end check.

/// The reference VMMs: what each tenant runs, chosen so that every metric the panels use has data
/// (exits to the VMM of several reasons with service times, in-kernel CPUID and doorbell writes,
/// kicks on queues 0 and 1 and on a doorbell without datamatch, kick service times). `--rate`
/// keeps them running while Prometheus scrapes; they are killed at the end.
const LOAD: [(&str, &[&str]); 5] = [
    ("tenant-a", &["--scenario", "pio", "--rate", "500"]),
    (
        "tenant-b",
        &[
            "--scenario",
            "virtio",
            "--vcpus",
            "2",
            "--queues",
            "2",
            "--rate",
            "100",
        ],
    ),
    ("tenant-c", &["--scenario", "cpuid", "--rate", "300"]),
    ("tenant-c", &["--scenario", "hlt", "--rate", "100"]),
    ("tenant-c", &["--scenario", "doorbell", "--rate", "200"]),
];
/// Seconds of load: far more than the test needs; the VMMs are killed when it ends.
const LOAD_SECS: f64 = 600.0;

/// The tenant whose figures the exact panels are checked against, and what its VMMs run: the same
/// scenarios twice, one phase after the other, each to completion, paced so that a phase spans
/// several scrapes. The first phase makes every series the second adds to (exits by reason, kicks
/// by queue), so that the second phase's counts are the difference of two scrapes.
const EXACT_TENANT: &str = "tenant-exact";
const EXACT_RUNS: [&[&str]; 2] = [
    &["--scenario", "pio", "--count", "1500", "--rate", "500"],
    &[
        "--scenario",
        "virtio",
        "--queues",
        "2",
        "--count",
        "600",
        "--rate",
        "200",
    ],
];

/// A panel whose value over the known tenant's second phase is its ground truth, and how that
/// follows from the agent's expected counts.
struct ExactPanel {
    panel: CountingPanel,
    expected: fn(&BTreeMap<String, u64>) -> BTreeMap<String, u64>,
}

/// Exits by `exit_reason` as `vmtrace_vm_exits_total` counts them on a host without kvm_exit
/// (this project's): the returns to the VMM by reason, and the exits KVM completes itself under
/// their kinds' names (docs/exits.md). Where kvm_exit fires they are hardware exits, which no
/// VMM report counts.
fn exits_by_reason(counts: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    counts
        .iter()
        .filter(|(kind, _)| is_exit_without_kvm_exit(kind))
        .map(|(kind, &n)| (kind.strip_prefix("exit.").unwrap_or(kind).to_owned(), n))
        .collect()
}

fn kicks_by_queue(counts: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    counts
        .iter()
        .filter_map(|(kind, &n)| Some((kind.strip_prefix("kick.q")?.to_owned(), n)))
        .collect()
}

fn all_exits(counts: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    BTreeMap::from([(String::new(), exits_by_reason(counts).values().sum())])
}

/// The one agent the test runs, scraped as one target.
fn one_agent(_: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    BTreeMap::from([(String::new(), 1)])
}

/// One or more panels of every dashboard whose value is known exactly. agent-health has no
/// tenant panel: its exact figures are the test's one agent and its one scrape target.
const EXACT_PANELS: [ExactPanel; 6] = [
    ExactPanel {
        panel: CountingPanel {
            file: "agent-health.json",
            title: "Agents reporting",
            key: None,
            rate: false,
        },
        expected: one_agent,
    },
    ExactPanel {
        panel: CountingPanel {
            file: "agent-health.json",
            title: "Scrape targets up",
            key: None,
            rate: false,
        },
        expected: one_agent,
    },
    ExactPanel {
        panel: CountingPanel {
            file: "fleet-overview.json",
            title: "Top tenants by exits over the time range",
            key: None,
            rate: false,
        },
        expected: all_exits,
    },
    ExactPanel {
        panel: CountingPanel {
            file: "fleet-overview.json",
            title: "Agents reporting",
            key: None,
            rate: false,
        },
        expected: one_agent,
    },
    ExactPanel {
        panel: CountingPanel {
            file: "tenant-drilldown.json",
            title: "Exit rate by reason",
            key: Some("exit_reason"),
            rate: true,
        },
        expected: exits_by_reason,
    },
    ExactPanel {
        panel: CountingPanel {
            file: "tenant-drilldown.json",
            title: "Kicks per queue",
            key: Some("virtio_queue"),
            rate: true,
        },
        expected: kicks_by_queue,
    },
];

/// Whether the agent's /metrics shows `tenant` with exactly `expected`, kind by kind.
fn agent_shows(port: u16, tenant: &str, expected: &BTreeMap<String, u64>) -> bool {
    let Ok((200, metrics)) = http_get(port, "/metrics") else {
        return false;
    };
    expected
        .iter()
        .all(|(kind, &n)| count_of(&metrics, tenant, kind) == Some(n))
}

/// Milliseconds since the Unix epoch now, as Prometheus stamps its samples.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The timestamp (ms) of the first scrape after `after_ms` that stored `selector`'s series.
fn scrape_after(prometheus: &Prometheus, selector: &str, after_ms: i64) -> Option<i64> {
    let data = prometheus.query(&format!("{selector}[1m]")).ok()?;
    data["result"][0]["values"]
        .as_array()?
        .iter()
        .filter_map(|v| Some((v[0].as_f64()? * 1000.0).round() as i64))
        .find(|&ts| ts > after_ms)
}

#[test]
fn every_panel_query_returns_data_from_a_real_prometheus() {
    let name = "every_panel_query_returns_data_from_a_real_prometheus";
    if !privileged_host(name) {
        return;
    }
    if !have(
        name,
        Path::new(prometheus::BINARY).exists(),
        &format!(
            "{} missing (`cargo xtask setup` installs Debian's prometheus)",
            prometheus::BINARY
        ),
    ) {
        return;
    }
    let all = dashboards();
    let (vmtrace, vmm) = (binary("vmtrace"), binary("vmtrace-vmm"));

    // Drop order is the reverse of declaration: VMMs, agent, Prometheus, files, cgroups.
    let parent = format!("vmtrace-dashboards-{}", std::process::id());
    let _parent = RmdirOnDrop(cgroup2_root().expect("cgroup v2").join(&parent));
    let tenants: BTreeMap<&str, TenantCgroup> = LOAD
        .iter()
        .map(|(t, _)| *t)
        .chain([EXACT_TENANT])
        .map(|t| (t, TenantCgroup::new(&format!("{parent}/{t}"))))
        .collect();
    let dir = TempDir::new("dashboards");

    let agent_port = free_port();
    let mut agent = Proc::spawn(
        "vmtrace agent",
        Command::new(&vmtrace)
            .args([
                "agent",
                "--interval",
                "1s",
                "--kick-latency",
                "--service-time",
            ])
            .arg("--listen")
            .arg(format!("127.0.0.1:{agent_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let stderr = agent.child.stderr.take().expect("agent stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[vmtrace agent] {line}");
        }
    });
    wait_for("the agent's /readyz", Duration::from_mins(1), || {
        agent.assert_running("before it was ready (its stderr is above)");
        matches!(http_get(agent_port, "/readyz"), Ok((200, _))).then_some(())
    });
    let prometheus = Prometheus::start(
        dir.path(),
        &kubernetes_pod_job(JOB, agent_port, NODE, "vmtrace-test"),
    );

    let mut vmms: Vec<Proc> = LOAD
        .iter()
        .map(|(tenant, args)| {
            let rate: f64 = args[args.iter().position(|a| *a == "--rate").unwrap() + 1]
                .parse()
                .unwrap();
            Proc::spawn(
                &format!("vmtrace-vmm {args:?} in {tenant}"),
                Command::new(&vmm)
                    .args(*args)
                    .args(["--count", &((rate * LOAD_SECS) as u64).to_string()])
                    .args(["--cgroup", &tenants[tenant].relative, "--quiet"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit()),
            )
        })
        .collect();

    let tenant_paths: Vec<String> = tenants.values().map(TenantCgroup::agent_path).collect();
    let tenant_regex = regex_of(&tenant_paths);

    // The known tenant's two phases, while the load runs. Between them, and after the second, the
    // test waits until the agent shows the tenant's counts so far exactly and Prometheus has
    // scraped it after that: those two scrapes bound the second phase, with none of its exits
    // before the first and all of them by the second.
    let exact = &tenants[EXACT_TENANT];
    let exact_path = exact.agent_path();
    let exact_selector =
        format!("vmtrace_vmm_exits_total{{tenant=\"{exact_path}\", exit_reason=\"io\"}}");
    let mut so_far: Vec<Report> = Vec::new();
    let mut bounds = Vec::new();
    let mut second_phase = Vec::new();
    for phase in 0..2 {
        second_phase = std::thread::scope(|scope| {
            let runs: Vec<_> = EXACT_RUNS
                .iter()
                .map(|args| {
                    let mut args = args.to_vec();
                    args.extend(["--cgroup", &exact.relative]);
                    scope.spawn(move || run_vmm(&args))
                })
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("a VMM of the known tenant"))
                .collect()
        });
        so_far.extend(second_phase.iter().cloned());
        let expected = expected_agent_counts(&so_far);
        let shown = wait_for(
            &format!(
                "the agent to show phase {} of {EXACT_TENANT}: {expected:?}",
                phase + 1
            ),
            Duration::from_secs(20),
            || agent_shows(agent_port, &exact_path, &expected).then(now_ms),
        );
        bounds.push(wait_for(
            "a scrape of the known tenant after the agent showed it",
            Duration::from_secs(20),
            || scrape_after(&prometheus, &exact_selector, shown),
        ));
    }
    let second_phase = expected_agent_counts(&second_phase);
    // Every kind of the known tenant, host-side ones too, as /metrics shows them.
    let expectation = Expectation::of_vmms(&so_far, HostKvm::of_this_host());
    let metrics_of_tenant = || {
        let metrics = http_get(agent_port, "/metrics").map_or_else(|_| String::new(), |r| r.1);
        prometheus::tenant_counts(&metrics, &exact_path)
    };
    poll(Duration::from_secs(10), || {
        expectation
            .mismatches(&metrics_of_tenant())
            .is_empty()
            .then_some(())
    });
    expectation.assert_matches(&exact_path, &metrics_of_tenant());
    let (start, end) = (bounds[0], bounds[1]);
    // Enough scrapes for every rate() window: wait until the tenants' exits have 2 rate windows of
    // samples in Prometheus.
    let started = Instant::now();
    wait_for(
        "Prometheus to hold 40 s of the tenants' exits",
        Duration::from_mins(2),
        || {
            for vmm in &mut vmms {
                vmm.assert_running("while Prometheus was filling");
            }
            let expr = format!(
                "min(count_over_time(vmtrace_vm_exits_total{{job=\"{JOB}\", tenant=~\"{tenant_regex}\"}}[1m]))"
            );
            let data = prometheus.query(&expr).ok()?;
            let samples: f64 = data["result"][0]["value"][1].as_str()?.parse().ok()?;
            (samples >= 40.0).then_some(())
        },
    );
    eprintln!(
        "Prometheus has 40 s of samples after {:.0?}",
        started.elapsed()
    );

    // Variables: every label_values query finds values, including the test's own.
    let builtins = |values: &mut BTreeMap<&str, String>| {
        values.insert("__rate_interval", RATE_INTERVAL.to_owned());
        values.insert("__interval", INTERVAL.to_owned());
        values.insert("__interval_ms", "15000".to_owned());
        values.insert("__range", RANGE.to_owned());
        values.insert("__range_s", "300".to_owned());
        values.insert("__range_ms", "300000".to_owned());
        values.insert("datasource", "prometheus".to_owned());
    };
    // Two sets of values: each variable on the test's own value, and each on All.
    let mut chosen: BTreeMap<&str, String> = BTreeMap::from([
        ("job", JOB.to_owned()),
        ("cluster", CLUSTER.to_owned()),
        ("node", NODE.to_owned()),
        ("namespace", ".*".to_owned()),
        ("tenant", tenant_regex.clone()),
    ]);
    builtins(&mut chosen);
    let mut all_values: BTreeMap<&str, String> = BTreeMap::from([
        ("job", regex_of(&[JOB.to_owned()])),
        ("cluster", ".*".to_owned()),
        ("node", ".*".to_owned()),
        ("namespace", ".*".to_owned()),
        ("tenant", ".*".to_owned()),
    ]);
    builtins(&mut all_values);

    let expected_values: BTreeMap<&str, Vec<String>> = BTreeMap::from([
        ("job", vec![JOB.to_owned()]),
        ("cluster", vec![CLUSTER.to_owned()]),
        ("node", vec![NODE.to_owned()]),
        ("tenant", tenant_paths.clone()),
    ]);
    let mut variable_queries = 0;
    for Dashboard { file, json } in &all {
        for var in variables(json) {
            if var["type"] != "query" {
                continue;
            }
            let name = var["name"].as_str().unwrap_or_default();
            let query = variable_query(var).unwrap_or_default();
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{file}: ${name}: not label_values(..): {query}"));
            let (selector, label) = inner
                .rsplit_once(',')
                .unwrap_or_else(|| panic!("{file}: ${name}: label_values needs a selector"));
            let selector = substitute(selector.trim(), &chosen);
            let label = label.trim();
            let values = prometheus
                .label_values(&selector, label)
                .unwrap_or_else(|e| panic!("{file}: ${name}: {selector}: {e}"));
            variable_queries += 1;
            if FUTURE_LABELS.contains(&label) {
                eprintln!(
                    "{file}: ${name}: {label} {values:?} (not exported yet; All = .* matches)"
                );
                continue;
            }
            for want in expected_values.get(name).into_iter().flatten() {
                assert!(
                    values.contains(want),
                    "{file}: variable ${name} ({query}) does not offer {want}: {values:?}"
                );
            }
        }
    }

    // Every target of every panel, with both sets of values.
    let guest_time_unknown = HostKvm::of_this_host() == HostKvm::Pvm;
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut panels_checked = 0;
    for Dashboard { file, json } in &all {
        for panel in panels(json) {
            panels_checked += 1;
            let title = panel["title"].as_str().unwrap_or_default();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default();
                for (set, values) in [("selected", &chosen), ("All", &all_values)] {
                    let query = substitute(expr, values);
                    checked += 1;
                    // A host that accounts no guest time cannot know the tax's share: the panel
                    // must stay empty there (docs/tax.md).
                    if expr.contains("vmtrace_virtualization_tax_ratio") && guest_time_unknown {
                        match prometheus.query(&query).and_then(|d| describe_result(&d)) {
                            Ok(summary) => failures.push(format!(
                                "{file}: panel \"{title}\" shows a tax ratio this host cannot \
                                 know: {summary}"
                            )),
                            Err(why) => eprintln!("ok   {file} | {title} | {set}: empty ({why})"),
                        }
                        continue;
                    }
                    // A series that appeared late (first kick, first service time) may need a
                    // few more scrapes before a rate window holds two samples of it.
                    let mut outcome = Err(String::new());
                    poll(Duration::from_secs(20), || {
                        outcome = prometheus.query(&query).and_then(|d| describe_result(&d));
                        outcome.is_ok().then_some(())
                    });
                    // Every series the panel draws has the labels its legend shows: a tenant's
                    // name, never a blank.
                    let legend = target["legendFormat"].as_str().unwrap_or_default();
                    if outcome.is_ok()
                        && let Ok(data) = prometheus.query(&query)
                    {
                        for series in data["result"].as_array().into_iter().flatten() {
                            for label in legend_labels(legend) {
                                let value = series["metric"][&label].as_str().unwrap_or_default();
                                if value.is_empty() {
                                    failures.push(format!(
                                        "{file}: panel \"{title}\" ({set}): a series without {label} for its legend: {}",
                                        series["metric"]
                                    ));
                                }
                            }
                        }
                    }
                    match outcome {
                        Ok(summary) => eprintln!("ok   {file} | {title} | {set}: {summary}"),
                        Err(why) => {
                            eprintln!("FAIL {file} | {title} | {set}: {why}");
                            failures.push(format!(
                                "{file}: panel \"{title}\" ({set} variables) returned no data: {why}\n    {query}"
                            ));
                        }
                    }
                }
            }
        }
    }
    // Each exact panel over the known tenant's second phase, from the first bounding scrape to
    // the second, with the tenant variable on the known tenant.
    let mut exact_values = chosen.clone();
    exact_values.insert("tenant", regex_of(std::slice::from_ref(&exact_path)));
    for ExactPanel { panel, expected } in &EXACT_PANELS {
        let (query, counted) = panel.counts_over(&all, &prometheus, &exact_values, (start, end));
        assert_eq!(
            counted,
            expected(&second_phase),
            "{}: \"{}\" over the known tenant's second phase ({start} ms to {end} ms), and the \
             ground truth:\n    {query}",
            panel.file,
            panel.title
        );
        eprintln!(
            "exact {} | {} | over {} ms: {counted:?}",
            panel.file,
            panel.title,
            end - start
        );
    }
    for file in all.iter().map(|d| d.file.as_str()) {
        assert!(
            EXACT_PANELS.iter().any(|p| p.panel.file == file),
            "{file}: no panel is checked against an exact value"
        );
    }

    for vmm in &mut vmms {
        vmm.assert_running("before the queries were done (the load must last)");
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} panel queries returned nothing:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "dashboards: {} files, {panels_checked} panels, {checked} panel queries ({} targets x 2 \
         variable sets) and {variable_queries} variable queries returned data",
        all.len(),
        checked / 2
    );
}
