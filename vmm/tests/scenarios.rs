//! Every scenario run in-process with 2 vCPUs: the report must be exact.

use std::time::Duration;

use vmtrace_vmm::caps::kvm_or_skip;
use vmtrace_vmm::report::{ExitCounts, Report};
use vmtrace_vmm::{Scenario, VmmConfig};

const VCPUS: u32 = 2;
const COUNT: u64 = 200;

fn run(scenario: Scenario, rate: Option<f64>, count: u64) -> Report {
    let config = VmmConfig {
        vcpus: VCPUS,
        count,
        rate,
        ..VmmConfig::new(scenario)
    };
    vmtrace_vmm::run(config).unwrap_or_else(|e| panic!("{scenario}: {e}"))
}

fn exits(pairs: &[(&str, u64)]) -> ExitCounts {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Checks everything in `report` that does not depend on timing or the host.
fn check(
    report: &Report,
    scenario: Scenario,
    count: u64,
    per_vcpu: &ExitCounts,
    observed: bool,
    doorbell: bool,
) {
    assert_eq!(report.scenario, scenario);
    assert_eq!(report.pid, std::process::id());
    assert_eq!(report.count, count);
    assert_eq!(report.vcpus.len(), VCPUS as usize);
    for (i, vcpu) in report.vcpus.iter().enumerate() {
        assert_eq!(vcpu.index, i as u32);
        assert_eq!(vcpu.guest_ops, count, "vCPU {i}");
        assert_eq!(vcpu.vmm_observed_ops, observed.then_some(count), "vCPU {i}");
        assert_eq!(&vcpu.exits, per_vcpu, "vCPU {i}");
        assert_ne!(vcpu.tid, report.pid, "a vCPU ran on the main thread");
    }
    assert_ne!(report.vcpus[0].tid, report.vcpus[1].tid);
    assert_eq!(report.total.guest_ops, count * u64::from(VCPUS));
    let total: ExitCounts = per_vcpu
        .iter()
        .map(|(k, v)| (k.clone(), v * u64::from(VCPUS)))
        .collect();
    assert_eq!(report.total.exits, total);
    if doorbell {
        assert_eq!(report.doorbell_signals, Some(count * u64::from(VCPUS)));
        assert_eq!(report.ioeventfds.len(), 1);
        assert_eq!(report.ioeventfds[0].addr, 0xE1000);
        assert_eq!(report.ioeventfds[0].len, 1);
        assert_eq!(report.ioeventfds[0].datamatch, None);
    } else {
        assert_eq!(report.doorbell_signals, None);
        assert!(report.ioeventfds.is_empty());
    }
    assert!(report.duration_secs > 0.0);
    // The report survives a JSON round trip.
    assert_eq!(&Report::from_json(&report.to_json()).unwrap(), report);
}

#[test]
fn pio() {
    if !kvm_or_skip("pio") {
        return;
    }
    let r = run(Scenario::Pio, None, COUNT);
    check(
        &r,
        Scenario::Pio,
        COUNT,
        &exits(&[("io", COUNT + 1)]),
        true,
        false,
    );
}

#[test]
fn mmio() {
    if !kvm_or_skip("mmio") {
        return;
    }
    let r = run(Scenario::Mmio, None, COUNT);
    let want = exits(&[("io", 1), ("mmio", COUNT)]);
    check(&r, Scenario::Mmio, COUNT, &want, true, false);
}

#[test]
fn doorbell() {
    if !kvm_or_skip("doorbell") {
        return;
    }
    let r = run(Scenario::Doorbell, None, COUNT);
    check(
        &r,
        Scenario::Doorbell,
        COUNT,
        &exits(&[("io", 1)]),
        false,
        true,
    );
}

#[test]
fn cpuid() {
    if !kvm_or_skip("cpuid") {
        return;
    }
    let r = run(Scenario::Cpuid, None, COUNT);
    check(
        &r,
        Scenario::Cpuid,
        COUNT,
        &exits(&[("io", 1)]),
        false,
        false,
    );
}

#[test]
fn hlt() {
    if !kvm_or_skip("hlt") {
        return;
    }
    let r = run(Scenario::Hlt, None, COUNT);
    let want = exits(&[("hlt", COUNT), ("io", 1)]);
    check(&r, Scenario::Hlt, COUNT, &want, true, false);
}

/// With a rate every operation adds a PACE exit, and the run takes at least count/rate.
#[test]
fn paced_doorbell_holds_the_rate() {
    if !kvm_or_skip("paced_doorbell_holds_the_rate") {
        return;
    }
    let (count, rate) = (50, 1000.0);
    let r = run(Scenario::Doorbell, Some(rate), count);
    check(
        &r,
        Scenario::Doorbell,
        count,
        &exits(&[("io", count + 1)]),
        false,
        true,
    );
    assert_eq!(r.rate, Some(rate));
    let least = Duration::from_secs_f64(count as f64 / rate);
    assert!(
        r.duration_secs >= least.as_secs_f64() * 0.99,
        "took {} s, the rate allows no less than {:?}",
        r.duration_secs,
        least
    );
}

#[test]
fn every_scenario_matches_the_documented_expectation() {
    if !kvm_or_skip("every_scenario_matches_the_documented_expectation") {
        return;
    }
    for scenario in Scenario::ALL {
        let r = run(scenario, None, 20);
        for vcpu in &r.vcpus {
            assert_eq!(
                vcpu.exits,
                vmtrace_vmm::report::expected_vcpu_exits(scenario, 20, false),
                "{scenario}"
            );
        }
    }
}
