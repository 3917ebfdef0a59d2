//! The agent's per-tenant counts equal the reference VMM's ground truth: exactly for what the
//! guests did, within the stated tolerances of `vmtrace_tests::expect` for what the host did.

use std::thread;

use vmtrace_tests::{
    Agent, TenantCgroup, agent_counts, expect, expected_agent_counts, privileged_host, run_vmm,
};

/// One VMM run: scenario, vCPUs, operations per vCPU.
type Run = (&'static str, &'static str, &'static str);

/// Three tenants run VMMs concurrently with different scenarios and counts while the agent watches;
/// for every tenant and kind the agent's count equals the ground truth, over >= 100,000 exits.
#[test]
fn agent_counts_equal_vmm_ground_truth_per_tenant_and_kind() {
    if !privileged_host("agent_counts_equal_vmm_ground_truth_per_tenant_and_kind") {
        return;
    }
    let base = format!("vmtrace-test-exact-{}", std::process::id());
    let _base_guard = TenantCgroup::new(&base);
    let plan: [(&str, &[Run]); 3] = [
        (
            "tenant-a",
            &[("pio", "2", "20000"), ("cpuid", "1", "15000")],
        ),
        (
            "tenant-b",
            &[
                ("mmio", "2", "15000"),
                ("hlt", "1", "10000"),
                ("pio-in", "1", "5000"),
            ],
        ),
        (
            "tenant-c",
            &[
                ("doorbell", "3", "10000"),
                ("pio", "1", "5000"),
                ("signal", "1", "500"),
            ],
        ),
    ];
    let tenants: Vec<TenantCgroup> = plan
        .iter()
        .map(|(name, _)| TenantCgroup::new(&format!("{base}/{name}")))
        .collect();

    let agent = Agent::start(&[]);
    let reports: Vec<Vec<vmtrace_vmm::Report>> = thread::scope(|scope| {
        let handles: Vec<_> = plan
            .iter()
            .zip(&tenants)
            .map(|((_, runs), cgroup)| {
                let runs: Vec<_> = runs
                    .iter()
                    .map(|(scenario, vcpus, count)| {
                        let relative = cgroup.relative.clone();
                        scope.spawn(move || {
                            run_vmm(&[
                                "--scenario",
                                scenario,
                                "--vcpus",
                                vcpus,
                                "--count",
                                count,
                                "--cgroup",
                                &relative,
                            ])
                        })
                    })
                    .collect();
                runs
            })
            .collect();
        handles
            .into_iter()
            .map(|runs| {
                runs.into_iter()
                    .map(|h| h.join().expect("VMM thread"))
                    .collect()
            })
            .collect()
    });
    // One more interval so that the final report holds every event.
    thread::sleep(std::time::Duration::from_millis(400));
    let agent_reports = agent.stop();
    let last = agent_reports.last().unwrap();

    assert_eq!(
        last["exit_source"], "derived",
        "this host's kvm_exit is silent (PVM)"
    );
    for (name, count) in last["drops"].as_object().unwrap() {
        assert_eq!(count, 0, "events lost: {name}");
    }
    let mut total_exits = 0u64;
    let mut kinds_checked = std::collections::BTreeSet::new();
    for (cgroup, vmm_reports) in tenants.iter().zip(&reports) {
        for report in vmm_reports {
            let cgroup_id =
                std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cgroup.path).unwrap());
            assert_eq!(
                report.cgroup.as_ref().unwrap().id,
                cgroup_id,
                "VMM ran in its tenant cgroup"
            );
            total_exits += report.total.exits.values().sum::<u64>()
                + report.doorbell_signals.unwrap_or(0)
                + if report.scenario == vmtrace_vmm::Scenario::Cpuid {
                    report.total.guest_ops
                } else {
                    0
                };
        }
        let expected = expected_agent_counts(vmm_reports);
        let actual = agent_counts(last, &cgroup.agent_path()).unwrap_or_else(|| {
            panic!(
                "tenant {} missing from the agent's report: {last}",
                cgroup.agent_path()
            )
        });
        assert_eq!(
            actual,
            expected,
            "tenant {}: agent (left) vs VMM ground truth (right)",
            cgroup.agent_path()
        );
        kinds_checked.extend(expected.keys().cloned());
        eprintln!("{}: {actual:?}", cgroup.agent_path());
    }
    // Every other kind of every tenant against the VMMs' own accounting, and nothing on the
    // parent cgroup.
    let checked: Vec<(String, &[vmtrace_vmm::Report])> = tenants
        .iter()
        .zip(&reports)
        .map(|(t, r)| (t.agent_path(), &r[..]))
        .collect();
    expect::assert_tenants(last, &format!("/{base}"), &checked);
    assert!(
        total_exits >= 100_000,
        "only {total_exits} exits were checked"
    );
    assert!(
        kinds_checked.len() >= 4,
        "only {kinds_checked:?} were checked"
    );
    eprintln!(
        "checked {total_exits} exits of kinds {kinds_checked:?} across {} tenants",
        tenants.len()
    );
    drop(tenants);
}
