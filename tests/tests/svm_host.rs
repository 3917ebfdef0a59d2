//! The path where `kvm:kvm_exit` fires: every kernel Debian offers here, booted as an emulated
//! AMD-V host (tests/src/svm_host.rs), runs the agent and the reference VMM's tenants, and the
//! agent's counts there equal the VMMs'. Each kernel boots once per test process; every test
//! reads what its guest emitted.

use std::{collections::BTreeMap, sync::OnceLock};

use vmtrace_tests::{
    dashboards::{CountingPanel, dashboards, regex_of},
    expect::{Expectation, HostKvm},
    expected_agent_counts, have,
    prometheus::{self, Prometheus, RecordedTarget, kubernetes_pod_job},
    svm_host::{self, Run},
    temp::TempDir,
    wait::wait_for,
};
use vmtrace_vmm::Report;

/// The tenants the guest runs, one cgroup each: name and the reference VMM's arguments. One vCPU
/// each but for `pio`, so that a guest page is first touched by one vCPU only (see
/// `kvm_exit.npf` in tests/src/expect.rs).
const TENANTS: &[(&str, &str)] = &[
    ("pio", "--scenario pio --vcpus 2 --count 1500"),
    ("mmio", "--scenario mmio --count 1000"),
    ("cpuid", "--scenario cpuid --count 1000"),
    ("hlt", "--scenario hlt --count 500"),
    ("doorbell", "--scenario doorbell --count 1000"),
    (
        "virtio",
        "--scenario virtio --queues 2 --count 200 --request-size 4096",
    ),
    // Returned memory is told from the task's saved system-call registers: proven on each kernel.
    ("balloon", "--scenario balloon --mib 8"),
];

/// The tenants whose VMMs run again, as they did, in a second phase: the agent's /metrics after
/// each phase are two scrapes between which the dashboards' panels must show exactly the second
/// phase's figures.
const SECOND_PHASE: &[&str] = &["pio", "virtio"];

/// The Prometheus endpoint of the agent inside the guest.
const AGENT_ADDRESS: &str = "127.0.0.1:9464";

/// The guest's job: doctor; then `watch --json` and the agent while every tenant's VMM runs, and
/// the second phase's; the agent's /metrics after each phase, its last report and the VMMs'
/// reports.
fn job() -> String {
    let mut job = format!(
        r#"emit doctor vmtrace doctor
echo "+cpu +memory" > /sys/fs/cgroup/cgroup.subtree_control
vmtrace watch --json --interval 200ms --service-time > /tmp/watch.json 2> /tmp/watch.err &
watch=$!
vmtrace agent --interval 200ms --state-dir off --service-time --listen {AGENT_ADDRESS} > /tmp/agent.err 2>&1 &
agent=$!
tries=0
until grep -q "vmtrace: watching" /tmp/watch.err && wget -q -O /dev/null http://{AGENT_ADDRESS}/readyz; do
    tries=$((tries + 1))
    [ $tries -gt 600 ] && break
    sleep 0.2
done
emit readyz wget -q -O - http://{AGENT_ADDRESS}/readyz
# The agent freezes an emptied cgroup's figures once the kernel's 2 s memcg flush has passed.
scrape() {{
    sleep 6
    tries=0
    until wget -q -O /tmp/metrics http://{AGENT_ADDRESS}/metrics; do
        tries=$((tries + 1))
        [ $tries -gt 30 ] && break
        sleep 1
    done
    emit $1 cat /tmp/metrics
}}
"#
    );
    for (phase, tenants, report) in [
        ("metrics.1", TENANTS.to_vec(), "vmm"),
        (
            "metrics.2",
            TENANTS
                .iter()
                .filter(|(name, _)| SECOND_PHASE.contains(name))
                .copied()
                .collect(),
            "vmm2",
        ),
    ] {
        let mut vmms = Vec::new();
        for (name, args) in tenants {
            job.push_str(&format!(
                "mkdir -p /sys/fs/cgroup/{name}\nvmtrace-vmm {args} --cgroup {name} --quiet > /tmp/{report}.{name} 2>&1 &\nvmms=\"$vmms $!\"\n"
            ));
            vmms.push(format!("{report}.{name}"));
        }
        job.push_str(&format!("wait $vmms\nvmms=\nscrape {phase}\n"));
        for section in vmms {
            job.push_str(&format!("emit {section} cat /tmp/{section}\n"));
        }
    }
    job.push_str(
        "kill -INT $watch $agent
wait $watch $agent
emit watch tail -n 1 /tmp/watch.json
emit watch.stderr cat /tmp/watch.err
emit agent.stderr cat /tmp/agent.err
",
    );
    job
}

/// Every offered kernel's run, booted once for all the tests of this process.
fn runs() -> &'static [Run] {
    static RUNS: OnceLock<Vec<Run>> = OnceLock::new();
    RUNS.get_or_init(|| {
        let kernels = svm_host::offered_kernels();
        assert!(
            kernels.iter().any(|k| k.release().starts_with("6.1.")),
            "apt offers no Debian 12 kernel (linux-image-6.1.0-*-amd64): {kernels:?}"
        );
        let job = job();
        kernels
            .iter()
            .map(|kernel| svm_host::boot(kernel, &job))
            .collect()
    })
}

/// Whether this machine can boot the emulated host; where it cannot, the test says so, and fails
/// under VMTRACE_REQUIRE_CAPS=1.
fn can_boot(test: &str) -> bool {
    vmtrace_tests::privileged_host(test)
        && have(
            test,
            svm_host::qemu_available(),
            "qemu-system-x86_64, apt-get and dpkg-deb are needed (cargo xtask setup installs them)",
        )
}

/// One report of the VMMs of one run, by tenant; `prefix` names the phase (`vmm`, `vmm2`).
fn phase_reports(run: &Run, prefix: &str) -> BTreeMap<&'static str, Report> {
    TENANTS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| prefix == "vmm" || SECOND_PHASE.contains(name))
        .map(|name| {
            let section = format!("{prefix}.{name}");
            assert_eq!(
                run.status(&section),
                0,
                "{}: vmtrace-vmm for {name} failed: {}",
                run.kernel.0,
                run.text(&section)
            );
            let report = serde_json::from_str(&run.text(&section)).unwrap_or_else(|e| {
                panic!(
                    "{}: {name}'s report: {e}: {}",
                    run.kernel.0,
                    run.text(&section)
                )
            });
            (name, report)
        })
        .collect()
}

/// Every report of the VMMs of one run, both phases, by tenant.
fn vmm_reports(run: &Run) -> BTreeMap<&'static str, Vec<Report>> {
    let mut reports: BTreeMap<&str, Vec<Report>> = BTreeMap::new();
    for prefix in ["vmm", "vmm2"] {
        for (name, report) in phase_reports(run, prefix) {
            reports.entry(name).or_default().push(report);
        }
    }
    reports
}

/// The agent's last `watch --json` report of one run.
fn last_report(run: &Run) -> serde_json::Value {
    let text = run.text("watch");
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{}: the last watch report: {e}: {text}\nwatch's stderr:\n{}",
            run.kernel.0,
            run.text("watch.stderr")
        )
    });
    assert_eq!(report["last"], true, "{}: {report}", run.kernel.0);
    report
}

fn kvm_exits(counts: &BTreeMap<String, u64>, reason: &str) -> u64 {
    counts
        .get(&format!("kvm_exit.{reason}"))
        .copied()
        .unwrap_or(0)
}

#[test]
fn doctor_says_svm_and_that_kvm_exit_is_attached_and_fires() {
    if !can_boot("doctor_says_svm_and_that_kvm_exit_is_attached_and_fires") {
        return;
    }
    for run in runs() {
        let doctor = run.text("doctor");
        let kernel = &run.kernel.0;
        assert_eq!(
            run.status("doctor"),
            0,
            "{kernel}: doctor failed:\n{doctor}"
        );
        assert_eq!(
            run.text("uname").trim(),
            run.kernel.release(),
            "{kernel}: booted another kernel"
        );
        assert!(
            !run.sections.contains_key("insmod.failed"),
            "{kernel}: modules failed to load: {:?}\n{}",
            run.section("insmod.failed"),
            run.console
        );
        assert!(doctor.contains("SVM"), "{kernel}: doctor:\n{doctor}");
        let line = |starts: &str| {
            doctor
                .lines()
                .find(|l| l.trim_start().starts_with(starts))
                .unwrap_or_else(|| panic!("{kernel}: doctor has no {starts:?} line:\n{doctor}"))
        };
        let fires = line("kvm:kvm_exit    ");
        assert!(
            fires.contains("fires on every exit"),
            "{kernel}: doctor: {fires}"
        );
        let probe = doctor
            .lines()
            .map(str::split_whitespace)
            .find_map(|mut words| {
                (words.next() == Some("kvm:kvm_exit") && words.next() == Some("tracepoint"))
                    .then(|| words.collect::<Vec<_>>().join(" "))
            })
            .unwrap_or_else(|| panic!("{kernel}: doctor lists no kvm:kvm_exit probe:\n{doctor}"));
        assert_eq!(probe, "attached", "{kernel}: the kvm:kvm_exit probe");
        assert!(
            line("exit source").contains("kvm:kvm_exit"),
            "{kernel}: doctor:\n{doctor}"
        );
        let watching = run.text("watch.stderr");
        assert!(
            watching.contains("exit source: kvm:kvm_exit"),
            "{kernel}: the agent does not take exits from kvm_exit:\n{watching}"
        );
        eprintln!(
            "{kernel}: booted and ran in {:.1}s; doctor:\n{doctor}",
            run.took.as_secs_f64()
        );
    }
}

#[test]
fn kvm_exit_counts_per_tenant_equal_the_vmms() {
    if !can_boot("kvm_exit_counts_per_tenant_equal_the_vmms") {
        return;
    }
    let mut wrong = Vec::new();
    for run in runs() {
        let kernel = &run.kernel.0;
        let last = last_report(run);
        assert_eq!(last["exit_source"], "kvm_exit", "{kernel}: {last}");
        for (name, reports) in vmm_reports(run) {
            let counts = vmtrace_tests::all_agent_counts(&last, &format!("/{name}"))
                .unwrap_or_else(|| panic!("{kernel}: tenant /{name} not reported: {last}"));
            let exits = |reason: &str| -> u64 {
                reports
                    .iter()
                    .map(|r| r.total.exits.get(reason).copied().unwrap_or(0))
                    .sum()
            };
            // The reasons of what the guest did, each exactly.
            assert_eq!(kvm_exits(&counts, "io"), exits("io"), "{kernel} {name}");
            assert_eq!(kvm_exits(&counts, "hlt"), exits("hlt"), "{kernel} {name}");
            let cpuid: u64 = reports
                .iter()
                .filter(|r| r.scenario == vmtrace_vmm::Scenario::Cpuid)
                .map(|r| r.total.guest_ops)
                .sum();
            assert_eq!(kvm_exits(&counts, "cpuid"), cpuid, "{kernel} {name}");
            let mismatches = Expectation::of_vmms(&reports, HostKvm::Hardware)
                .on_emulated_host()
                .mismatches(&counts);
            if !mismatches.is_empty() {
                wrong.push(format!(
                    "{kernel} /{name}:\n  {}\n  agent's counts: {counts:?}",
                    mismatches.join("\n  ")
                ));
            }
            eprintln!("{kernel} /{name}: {counts:?}");
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn exit_to_entry_histograms_hold_every_exit_that_reentered() {
    if !can_boot("exit_to_entry_histograms_hold_every_exit_that_reentered") {
        return;
    }
    for run in runs() {
        let kernel = &run.kernel.0;
        let last = last_report(run);
        for (name, reports) in vmm_reports(run) {
            let vcpus: u64 = reports.iter().map(|r| r.vcpus.len() as u64).sum();
            let tenant = vmtrace_tests::agent_report(&last, &format!("/{name}")).unwrap();
            let counts = vmtrace_tests::all_agent_counts(&last, &format!("/{name}")).unwrap();
            for (kind, &n) in counts.iter().filter(|(k, _)| k.starts_with("kvm_exit.")) {
                let held = tenant["latency"][kind]["count"].as_u64().unwrap_or(0);
                // Each vCPU's last exit, the guest's DONE port write, is never re-entered.
                let not_reentered = if kind == "kvm_exit.io" { vcpus } else { 0 };
                assert_eq!(
                    held,
                    n - not_reentered,
                    "{kernel} /{name}: {kind}'s histogram: {}",
                    tenant["latency"][kind]
                );
            }
        }
    }
}

/// On SVM too, with `--service-time`, `KVM_RUN` is seen at `kvm:kvm_fpu` (docs/latency.md): every
/// return to the VMM that the VMM followed with another `KVM_RUN` has its service time, by reason.
#[test]
fn vmm_service_times_hold_every_exit_the_vmm_served() {
    if !can_boot("vmm_service_times_hold_every_exit_the_vmm_served") {
        return;
    }
    for run in runs() {
        let kernel = &run.kernel.0;
        let last = last_report(run);
        let mut served_total = 0;
        for (name, reports) in vmm_reports(run) {
            let vcpus: u64 = reports.iter().map(|r| r.vcpus.len() as u64).sum();
            let tenant = vmtrace_tests::agent_report(&last, &format!("/{name}")).unwrap();
            let counts = vmtrace_tests::all_agent_counts(&last, &format!("/{name}")).unwrap();
            for (kind, &n) in counts.iter().filter(|(k, _)| k.starts_with("exit.")) {
                let served = tenant["latency"][kind]["count"].as_u64().unwrap_or(0);
                // Each vCPU's last exit, the guest's DONE port write, ends its run instead.
                let unserved = if kind == "exit.io" { vcpus } else { 0 };
                assert_eq!(
                    served,
                    n - unserved,
                    "{kernel} /{name}: {kind}'s service times: {}",
                    tenant["latency"][kind]
                );
                served_total += served;
            }
        }
        assert!(served_total > 0, "{kernel}: no service time at all");
        eprintln!("{kernel}: {served_total} VMM service times, one per exit the VMM served");
    }
}

/// The labels the example scrape job gives the recorded agent's target.
const JOB: &str = "vmtrace";
const NODE: &str = "svm-host";

/// The dashboards' counting panels over the second phase, from a real Prometheus that scraped the
/// agent's /metrics of each phase as recorded in the guest. Where `kvm_exit` fires, each exit is a
/// hardware exit, and a return to the VMM is one of them: a panel that added
/// `vmtrace_vmm_exits_total` to `vmtrace_vm_exits_total`, or two exit sources, would show the
/// VMM's port I/O twice.
#[test]
fn dashboard_panels_over_svm_data_count_every_exit_once() {
    let test = "dashboard_panels_over_svm_data_count_every_exit_once";
    if !can_boot(test)
        || !have(
            test,
            std::path::Path::new(prometheus::BINARY).exists(),
            "Debian's prometheus is needed (cargo xtask setup installs it)",
        )
    {
        return;
    }
    let all = dashboards();
    let panel = |file, title, key, rate| CountingPanel {
        file,
        title,
        key,
        rate,
    };
    let by_reason = panel(
        "tenant-drilldown.json",
        "Exit rate by reason",
        Some("exit_reason"),
        true,
    );
    let by_tenant = panel(
        "fleet-overview.json",
        "Top tenants by exits over the time range",
        None,
        false,
    );
    let by_queue = panel(
        "tenant-drilldown.json",
        "Kicks per queue",
        Some("virtio_queue"),
        true,
    );
    let mut wrong = Vec::new();
    for run in runs() {
        let kernel = &run.kernel.0;
        let recorded = [run.text("metrics.1"), run.text("metrics.2")];
        for metrics in &recorded {
            for line in metrics.lines() {
                assert!(
                    !line.starts_with("vmtrace_vm_exits_total{")
                        || line.contains("exit_source=\"kvm_exit\""),
                    "{kernel}: an exit series of another source than kvm_exit: {line}"
                );
            }
        }
        let second_phase = phase_reports(run, "vmm2");

        let target = RecordedTarget::serve(recorded.to_vec());
        let dir = TempDir::new("svm-dashboards");
        let prometheus = Prometheus::start(
            dir.path(),
            &kubernetes_pod_job(JOB, target.port(), NODE, "vmtrace-svm-host"),
        );
        for phase in 0..recorded.len() {
            if phase > 0 {
                target.next();
            }
            wait_for(
                &format!(
                    "3 scrapes of the agent's /metrics after phase {}",
                    phase + 1
                ),
                std::time::Duration::from_secs(30),
                || (target.scrapes() >= 3).then_some(()),
            );
        }
        // The bounds: the last scrape of the first phase's figures and the first of the second's.
        let labels = [("tenant", "/pio"), ("exit_reason", "io")];
        let first = prometheus::sample(&recorded[0], "vmtrace_vmm_exits_total", &labels)
            .unwrap_or_else(|| panic!("{kernel}: /pio has no port I/O exits after phase 1"));
        let selector = "vmtrace_vmm_exits_total{tenant=\"/pio\", exit_reason=\"io\"}";
        let data = prometheus
            .query(&format!("{selector}[2m]"))
            .unwrap_or_else(|e| panic!("{kernel}: {selector}: {e}"));
        let scrapes: Vec<(i64, f64)> = data["result"][0]["values"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| {
                let at = (v[0].as_f64().unwrap() * 1000.0).round() as i64;
                (at, v[1].as_str().unwrap().parse().unwrap())
            })
            .collect();
        let start = scrapes.iter().rev().find(|(_, v)| *v == first);
        let end = scrapes.iter().find(|(_, v)| *v > first);
        let (Some(&(start, _)), Some(&(end, _))) = (start, end) else {
            panic!("{kernel}: Prometheus holds no scrape of both phases: {scrapes:?}");
        };

        for name in SECOND_PHASE {
            let tenant = format!("/{name}");
            let values = BTreeMap::from([
                ("job", JOB.to_owned()),
                ("cluster", ".*".to_owned()),
                ("node", ".*".to_owned()),
                ("namespace", ".*".to_owned()),
                ("tenant", regex_of(std::slice::from_ref(&tenant))),
            ]);
            // What the agent's figures grew by in the second phase, kind by kind, for the kinds
            // both scrapes hold (a series that appeared in the second has no increase()).
            let before = prometheus::tenant_counts(&recorded[0], &tenant);
            let after = prometheus::tenant_counts(&recorded[1], &tenant);
            let grown = |prefix: &str| -> BTreeMap<String, u64> {
                after
                    .iter()
                    .filter_map(|(kind, &n)| {
                        let key = kind.strip_prefix(prefix)?;
                        Some((key.to_owned(), n - before.get(kind)?))
                    })
                    .collect()
            };
            let report = &second_phase[name];
            let check = |panel: &CountingPanel,
                         expected: BTreeMap<String, u64>,
                         wrong: &mut Vec<_>| {
                let (query, shown) = panel.counts_over(&all, &prometheus, &values, (start, end));
                eprintln!(
                    "{kernel} {tenant}: {} | {}: {shown:?}",
                    panel.file, panel.title
                );
                if shown != expected {
                    wrong.push(format!(
                        "{kernel} {tenant}: {} \"{}\" shows {shown:?}, the agent's figures grew \
                         by {expected:?}\n    {query}",
                        panel.file, panel.title
                    ));
                }
                shown
            };
            let exits = check(&by_reason, grown("kvm_exit."), &mut wrong);
            // The reasons of what the guest did: exactly the VMM's, once.
            for reason in ["io", "hlt"] {
                let vmm = report.total.exits.get(reason).copied().unwrap_or(0);
                if exits.get(reason).copied().unwrap_or(0) != vmm {
                    wrong.push(format!(
                        "{kernel} {tenant}: {reason} exits over the second phase: the panel \
                         shows {exits:?}, the VMM made {vmm}"
                    ));
                }
            }
            let total: u64 = exits.values().sum();
            check(
                &by_tenant,
                BTreeMap::from([(String::new(), total)]),
                &mut wrong,
            );
            let kicks: BTreeMap<String, u64> = expected_agent_counts(std::slice::from_ref(report))
                .into_iter()
                .filter_map(|(kind, n)| Some((kind.strip_prefix("kick.q")?.to_owned(), n)))
                .collect();
            assert_eq!(
                grown("kick.q"),
                kicks,
                "{kernel} {tenant}: the agent's kicks"
            );
            check(&by_queue, kicks, &mut wrong);
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
