//! The virtualisation tax (host CPU a tenant uses outside guest mode) grows with its exits; TLB
//! flushes and host faults are counted for VMM processes only; hardware dTLB-miss counters are
//! counted where the host has them and reported unavailable, with the kernel's reason, where not.

use std::{collections::BTreeMap, process::Command};

use vmtrace_tests::{
    Agent, TenantCgroup, agent_report, all_agent_counts, dtlb_counters, expect, privileged_host,
    run_vmm,
};

fn tax_ns(counts: &BTreeMap<String, u64>) -> u64 {
    counts.get("tax.kernel").copied().unwrap_or(0) + counts.get("tax.vmm").copied().unwrap_or(0)
}

#[test]
fn tax_grows_with_exits_and_tlb_and_faults_are_counted_for_vmms_only() {
    if !privileged_host("tax_grows_with_exits_and_tlb_and_faults_are_counted_for_vmms_only") {
        return;
    }
    let base = format!("vmtrace-test-tax-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let light = TenantCgroup::new(&format!("{base}/light"));
    let heavy = TenantCgroup::new(&format!("{base}/heavy"));
    let not_vmm = TenantCgroup::new(&format!("{base}/not-a-vmm"));

    let agent = Agent::start(&[]);
    let pio = |count: &str, tenant: &TenantCgroup| {
        run_vmm(&[
            "--scenario",
            "pio",
            "--count",
            count,
            "--cgroup",
            &tenant.relative,
        ])
    };
    let (light_report, heavy_report) = std::thread::scope(|s| {
        let light_run = s.spawn(|| pio("2000", &light));
        let heavy_run = s.spawn(|| pio("20000", &heavy));
        // A process that is no VMM takes page faults and TLB flushes in a cgroup of its own.
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec dd if=/dev/zero of=/dev/null bs=32M count=8 \
                 status=none",
                not_vmm.path.display()
            ))
            .status()
            .expect("running dd");
        assert!(status.success());
        (light_run.join().unwrap(), heavy_run.join().unwrap())
    });
    std::thread::sleep(std::time::Duration::from_millis(600));
    let samples = agent.stop();
    let last = samples.last().unwrap();

    let counts = |t: &TenantCgroup| all_agent_counts(last, &t.agent_path()).unwrap();
    let (light_counts, heavy_counts) = (counts(&light), counts(&heavy));
    let (light_tax, heavy_tax) = (tax_ns(&light_counts), tax_ns(&heavy_counts));
    eprintln!(
        "tax: {} exits -> {:.1} ms, {} exits -> {:.1} ms",
        light_report.total.exits["io"],
        light_tax as f64 / 1e6,
        heavy_report.total.exits["io"],
        heavy_tax as f64 / 1e6
    );
    assert_eq!(
        heavy_report.total.exits["io"],
        10 * light_report.total.exits["io"] - 9,
        "10x the operations, one DONE exit each"
    );
    assert!(light_tax > 0, "{light_counts:?}");
    assert!(
        heavy_tax > 3 * light_tax,
        "10x the exits must cost clearly more: {heavy_tax} ns vs {light_tax} ns"
    );
    // Each tenant's tax, faults and flushes against its VMM's own accounting.
    let runs = [light_report, heavy_report];
    expect::assert_tenants(
        last,
        &format!("/{base}"),
        &[
            (light.agent_path(), &runs[..1]),
            (heavy.agent_path(), &runs[1..]),
        ],
    );
    // The share of CPU that was tax, over each interval in which the heavy tenant ran: known only
    // where the kernel accounts guest time. The VMM reads its vCPU threads' guest time itself.
    let ratios: Vec<f64> = samples
        .iter()
        .filter_map(|s| agent_report(s, &heavy.agent_path()))
        .filter_map(|t| t["gauges"]["tax.ratio"].as_f64())
        .collect();
    let guest_ns: u64 = runs.iter().flat_map(|r| &r.vcpus).map(|v| v.guest_ns).sum();
    if expect::HostKvm::of_this_host() == expect::HostKvm::Pvm {
        assert!(
            ratios.is_empty(),
            "a tax ratio the host cannot know: {ratios:?}"
        );
        for sample in &samples {
            let why = sample["guest_time_unavailable"]
                .as_str()
                .unwrap_or_default();
            assert!(
                why.contains("PVM accounts next to no guest time"),
                "{sample}"
            );
        }
    } else {
        assert!(guest_ns > 0, "{runs:?}");
        assert!(!ratios.is_empty(), "no tax ratio reported");
        assert!(ratios.iter().all(|r| (0.0..1.0).contains(r)), "{ratios:?}");
        assert!(last["guest_time_unavailable"].is_null(), "{last}");
    }

    // TLB flushes while the VMM ran are its tenant's; the process that is no VMM is no tenant.
    let flushes: u64 = heavy_counts
        .iter()
        .filter(|(k, _)| k.starts_with("tlb.flush."))
        .map(|(_, v)| v)
        .sum();
    assert!(flushes > 0, "{heavy_counts:?}");
    for sample in &samples {
        assert!(
            agent_report(sample, &not_vmm.agent_path()).is_none(),
            "a process that is no VMM became a tenant: {sample}"
        );
    }

    if let Err(e) = dtlb_counters() {
        let reason = last["dtlb_unavailable"].as_str().unwrap_or_else(|| {
            panic!("the kernel refuses dTLB counters ({e}) but the agent does not say so")
        });
        eprintln!("dTLB counters: {reason}");
        assert!(
            reason.starts_with("perf_event_open of a hardware dTLB-miss counter failed"),
            "{reason}"
        );
        assert!(reason.contains(&e.to_string()), "{reason} vs {e}");
        assert!(!heavy_counts.contains_key("tlb.dtlb_load_miss"));
    } else {
        assert!(last["dtlb_unavailable"].is_null(), "{last}");
        assert!(
            heavy_counts.get("tlb.dtlb_load_miss").copied().unwrap_or(0) > 0,
            "{heavy_counts:?}"
        );
    }
}
