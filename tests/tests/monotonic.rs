//! A tenant whose cgroups go one at a time (a pod whose container ended): its counters, those
//! read from cgroupfs (CPU, tax, memcg events) as well as the probes', never go down, so
//! Prometheus sees no false reset, and its counts stay exact.

use std::time::Duration;

use vmtrace_tests::{
    Agent, TenantCgroup, all_agent_counts,
    expect::{Expectation, HostKvm},
    expected_agent_counts, privileged_host, run_vmm,
};

#[test]
fn a_tenants_counters_keep_the_figures_of_its_removed_cgroups() {
    let test = "a_tenants_counters_keep_the_figures_of_its_removed_cgroups";
    if !privileged_host(test) {
        return;
    }
    let pid = std::process::id();
    let base = TenantCgroup::new(&format!("vmtrace-test-monotonic-{pid}"));
    let uid = format!("{pid:08x}-0000-4000-8000-{pid:012x}");
    let pod = TenantCgroup::new(&format!("{}/kubepods/burstable/pod{uid}", base.relative));
    let first = TenantCgroup::new(&format!("{}/ctr-first", pod.relative));
    let second = TenantCgroup::new(&format!("{}/ctr-second", pod.relative));
    let tenant = format!("pod/{uid}");

    let agent = Agent::start(&["--interval", "200ms"]);
    let vmm = |cgroup: &TenantCgroup, scenario: &str| {
        run_vmm(&[
            "--scenario",
            scenario,
            "--count",
            "3000",
            "--cgroup",
            &cgroup.relative,
        ])
    };
    let reports = vec![vmm(&first, "pio"), vmm(&second, "mmio")];
    std::thread::sleep(Duration::from_secs(1));
    // The first container ends: its cgroup goes, the pod stays.
    drop(first);
    std::thread::sleep(Duration::from_secs(2));
    let samples = agent.stop();

    let counts: Vec<_> = samples
        .iter()
        .filter_map(|s| all_agent_counts(s, &tenant))
        .collect();
    assert!(counts.len() >= 10, "the pod tenant in too few samples");
    // The cgroupfs figures were there before and after the removal, so the check below means
    // something. (`tax.vmm`, user time beyond guest time, may round to nothing in a short run.)
    for kind in ["tax.kernel", "memcg.pgfault"] {
        assert!(
            counts.first().is_some_and(|c| c.contains_key(kind))
                || counts.get(1).is_some_and(|c| c.contains_key(kind)),
            "{kind} missing from the first samples: {:?}",
            counts.first()
        );
        assert!(
            counts.last().is_some_and(|c| c.contains_key(kind)),
            "{kind} missing after a cgroup of the tenant went: {:?}",
            counts.last()
        );
    }
    for (i, pair) in counts.windows(2).enumerate() {
        for (kind, before) in &pair[0] {
            let after = pair[1].get(kind).copied().unwrap_or(0);
            assert!(
                after >= *before,
                "{kind} went down from {before} to {after} between samples {i} and {}",
                i + 1
            );
        }
    }
    let last = counts.last().unwrap();
    for (kind, expected) in expected_agent_counts(&reports) {
        assert_eq!(last.get(&kind), Some(&expected), "{kind}: {last:?}");
    }
    // Every kind, the removed container's CPU and memory figures included, against both VMMs'
    // own accounting.
    Expectation::of_vmms(&reports, HostKvm::of_this_host()).assert_matches(&tenant, last);
    drop(second);
}
