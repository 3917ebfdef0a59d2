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
fn pio_in() {
    if !kvm_or_skip("pio_in") {
        return;
    }
    let r = run(Scenario::PioIn, None, COUNT);
    let want = exits(&[("io", COUNT + 1)]);
    check(&r, Scenario::PioIn, COUNT, &want, true, false);
}

/// Every operation waits for an EINTR, so there are at least as many; the report gives all.
#[test]
fn signal() {
    if !kvm_or_skip("signal") {
        return;
    }
    let r = run(Scenario::Signal, None, COUNT);
    for vcpu in &r.vcpus {
        assert_eq!(vcpu.guest_ops, COUNT, "vCPU {}", vcpu.index);
        assert_eq!(vcpu.vmm_observed_ops, None);
        let eintrs = vcpu.exits.get("intr").copied().unwrap_or(0);
        assert!(eintrs >= COUNT, "vCPU {}: {eintrs} EINTRs", vcpu.index);
        assert_eq!(vcpu.exits.get("io"), Some(&1), "DONE: {:?}", vcpu.exits);
        assert_eq!(vcpu.exits.len(), 2, "{:?}", vcpu.exits);
    }
    let eintrs: u64 = r.vcpus.iter().map(|v| v.exits["intr"]).sum();
    assert_eq!(r.total.exits.get("intr"), Some(&eintrs));
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
        let config = VmmConfig {
            vcpus: if scenario == Scenario::Balloon {
                1
            } else {
                VCPUS
            },
            count: 20,
            mib: 1,
            ..VmmConfig::new(scenario)
        };
        let r = vmtrace_vmm::run(config).unwrap_or_else(|e| panic!("{scenario}: {e}"));
        for vcpu in &r.vcpus {
            assert_eq!(vcpu.guest_ops, r.count, "{scenario}");
            let mut exits = vcpu.exits.clone();
            // The signal guest's EINTRs: at least one per operation, as many as signals reached
            // KVM_RUN.
            if scenario == Scenario::Signal {
                let eintrs = exits.remove("intr").unwrap_or(0);
                assert!(eintrs >= r.count, "{scenario}: {eintrs} EINTRs");
            }
            assert_eq!(
                exits,
                vmtrace_vmm::report::expected_vcpu_exits(scenario, r.count, false),
                "{scenario}"
            );
        }
        assert_eq!(r.memory.is_some(), scenario.touches_memory(), "{scenario}");
    }
}

/// Runs the virtio scenario and checks everything that does not depend on timing: per queue,
/// kicks (what the worker read from the eventfd) == the guest's own kick count == requests
/// served == the round-robin plan, bytes == requests x request size; per vCPU, the guest's
/// request count and the exits (4 probe reads + DONE). The VMM itself has already compared
/// every byte of the disk and of the guest's buffers with the expected pattern (it returns no
/// report otherwise).
fn virtio(vcpus: u32, queues: u32, count: u64, request_size: u32) -> Report {
    let config = VmmConfig {
        vcpus,
        queues,
        count,
        request_size,
        ..VmmConfig::new(Scenario::Virtio)
    };
    let report = vmtrace_vmm::run(config)
        .unwrap_or_else(|e| panic!("virtio {vcpus} vCPU(s) {queues} queues: {e}"));
    let who = format!("{vcpus} vCPU(s), {queues} queues");
    assert_eq!(report.scenario, Scenario::Virtio);
    assert_eq!(report.vcpus.len(), vcpus as usize);
    for vcpu in &report.vcpus {
        assert_eq!(vcpu.guest_ops, count, "{who}: vCPU {}", vcpu.index);
        assert_eq!(vcpu.vmm_observed_ops, None);
        assert_eq!(
            vcpu.exits,
            vmtrace_vmm::report::expected_vcpu_exits(Scenario::Virtio, count, false),
            "{who}: vCPU {}",
            vcpu.index
        );
        assert_eq!(vcpu.exits, exits(&[("io", 1), ("mmio", 4)]));
    }
    let v = report.virtio.as_ref().expect("no virtio section");
    assert_eq!(v.mmio_base, 0xD0000);
    assert_eq!(v.notify_addr, 0xD0050);
    assert_eq!(v.request_size, request_size);
    assert_eq!(v.queues.len(), queues as usize);
    // One ioeventfd per queue on QueueNotify, datamatch = queue index, and nothing else.
    assert_eq!(report.ioeventfds.len(), queues as usize);
    for (q, (io, queue)) in report.ioeventfds.iter().zip(&v.queues).enumerate() {
        assert_eq!(
            (io.space.as_str(), io.addr, io.len, io.datamatch),
            ("mmio", 0xD0050, 4, Some(q as u64)),
            "{who}"
        );
        assert_eq!(queue.index, q as u32);
        assert_eq!(queue.datamatch, q as u64);
        assert_eq!(queue.notify_addr, io.addr);
    }
    let mut per_vcpu = vec![0u64; vcpus as usize];
    for q in &v.queues {
        let who = format!("{who}: queue {}", q.index);
        // Queue q belongs to vCPU q mod vcpus; the vCPU goes round-robin over its queues.
        assert_eq!(q.vcpu, q.index % vcpus, "{who}");
        let mine = (q.vcpu..queues).step_by(vcpus as usize).collect::<Vec<_>>();
        let j = mine.iter().position(|&x| x == q.index).unwrap() as u64;
        let want = (count - j).div_ceil(mine.len() as u64);
        assert_eq!(q.kicks, want, "{who}: kicks");
        // Each read returns at least one kick (more if kicks coalesced).
        assert!(
            q.eventfd_reads <= q.kicks && (q.eventfd_reads > 0) == (q.kicks > 0),
            "{who}: {} eventfd reads",
            q.eventfd_reads
        );
        assert_eq!(q.guest_kicks, want, "{who}: guest kicks");
        assert_eq!(q.requests, want, "{who}: requests");
        assert_eq!(q.writes + q.reads, q.requests, "{who}");
        assert_eq!(
            q.bytes,
            q.requests * u64::from(request_size),
            "{who}: bytes"
        );
        per_vcpu[q.vcpu as usize] += q.kicks;
    }
    // Every guest request was exactly one kick, and writes and reads pair up.
    assert!(per_vcpu.iter().all(|&k| k == count), "{who}: {per_vcpu:?}");
    let writes: u64 = v.queues.iter().map(|q| q.writes).sum();
    assert_eq!(writes, u64::from(vcpus) * count.div_ceil(2), "{who}");
    assert_eq!(report.doorbell_signals, None);
    assert_eq!(&Report::from_json(&report.to_json()).unwrap(), &report);
    report
}

#[test]
fn virtio_one_vcpu() {
    if !kvm_or_skip("virtio_one_vcpu") {
        return;
    }
    virtio(1, 2, 100, 4096);
    virtio(1, 4, 100, 512);
}

#[test]
fn virtio_two_vcpus() {
    if !kvm_or_skip("virtio_two_vcpus") {
        return;
    }
    virtio(2, 2, 100, 4096);
    virtio(2, 4, 100, 1024);
}

/// Odd counts, queues that do not divide evenly among the vCPUs, the largest requests.
#[test]
fn virtio_uneven_plans() {
    if !kvm_or_skip("virtio_uneven_plans") {
        return;
    }
    virtio(2, 3, 101, 65536);
    virtio(1, 3, 7, 512);
    virtio(1, 1, 1, 512);
}

/// The slow-VMM flag: the run loop sleeps after every exit; the report says so and the counts
/// stay exact (no timing is asserted).
#[test]
fn exit_delay_is_reported() {
    if !kvm_or_skip("exit_delay_is_reported") {
        return;
    }
    let config = VmmConfig {
        vcpus: VCPUS,
        count: 50,
        exit_delay_us: 200,
        vm_setup_delay_ms: 20,
        ..VmmConfig::new(Scenario::Mmio)
    };
    let r = vmtrace_vmm::run(config).unwrap();
    check(
        &r,
        Scenario::Mmio,
        50,
        &exits(&[("io", 1), ("mmio", 50)]),
        true,
        false,
    );
    assert_eq!((r.exit_delay_us, r.vm_setup_delay_ms), (200, 20));
    let config = VmmConfig {
        count: 20,
        exit_delay_us: 50,
        rate: Some(5000.0),
        ..VmmConfig::new(Scenario::Virtio)
    };
    let r = vmtrace_vmm::run(config).unwrap();
    assert_eq!(r.exit_delay_us, 50);
    assert_eq!(r.vcpus[0].exits, exits(&[("io", 21), ("mmio", 4)]));
}

/// Runs touch or balloon and checks everything that does not depend on timing: the guest's
/// counters (pages written, per vCPU), the exits (DONE, BALLOON, PACE), the memory section and
/// the region's residency. The VMM itself has already read every page back (it returns no
/// report otherwise).
fn region(
    scenario: Scenario,
    vcpus: u32,
    mib: u32,
    balloon_mib: Option<u32>,
    rate: Option<f64>,
) -> Report {
    let config = VmmConfig {
        vcpus,
        mib,
        balloon_mib,
        rate,
        ..VmmConfig::new(scenario)
    };
    let who = format!("{scenario} {vcpus} vCPU(s) {mib} MiB {balloon_mib:?}");
    let r = vmtrace_vmm::run(config).unwrap_or_else(|e| panic!("{who}: {e}"));
    let pages = u64::from(mib) * 256;
    let returned_mib = u64::from(balloon_mib.unwrap_or(0));
    let retouched = returned_mib * 256;
    let per_vcpu = pages / u64::from(vcpus) + retouched;
    assert_eq!(r.scenario, scenario);
    assert_eq!(r.count, per_vcpu, "{who}");
    assert_eq!(r.vcpus.len(), vcpus as usize);
    let paced = rate.is_some();
    for vcpu in &r.vcpus {
        assert_eq!(vcpu.guest_ops, per_vcpu, "{who}: vCPU {}", vcpu.index);
        assert_eq!(vcpu.vmm_observed_ops, None);
        let io = 1 + u64::from(scenario == Scenario::Balloon) + if paced { per_vcpu } else { 0 };
        assert_eq!(
            vcpu.exits,
            exits(&[("io", io)]),
            "{who}: vCPU {}",
            vcpu.index
        );
        assert_eq!(
            vcpu.exits,
            vmtrace_vmm::report::expected_vcpu_exits(scenario, per_vcpu, paced)
        );
    }
    assert_eq!(r.total.guest_ops, pages + retouched, "{who}");
    assert!(r.ioeventfds.is_empty() && r.virtio.is_none() && r.doorbell_signals.is_none());
    let m = r.memory.as_ref().expect("no memory section");
    assert_eq!((m.slot, m.region_gpa, m.page_size), (1, 0x100_0000, 4096));
    assert_eq!(m.region_bytes, u64::from(mib) << 20, "{who}");
    assert_eq!(m.region_hva % 4096, 0);
    assert_eq!(m.pages_touched, pages, "{who}");
    assert_eq!(m.bytes_returned, returned_mib << 20, "{who}");
    assert_eq!(m.pages_retouched, retouched, "{who}");
    assert_eq!(m.bytes_retouched, returned_mib << 20, "{who}");
    if scenario == Scenario::Balloon {
        assert_eq!(m.madvise_calls, 1);
        assert_eq!(m.returned_hva, Some(m.region_hva));
        // The madvise freed exactly the returned pages.
        assert_eq!(
            m.resident_pages_after_return,
            Some(pages - retouched),
            "{who}"
        );
    } else {
        assert_eq!(m.madvise_calls, 0);
        assert_eq!(m.returned_hva, None);
        assert_eq!(m.resident_pages_after_return, None);
    }
    // Fresh memory before, every page present at the end (this host has no swap pressure
    // during the tests).
    assert_eq!(m.resident_pages_before, 0, "{who}");
    assert_eq!(m.resident_pages_end, pages, "{who}");
    assert_eq!(&Report::from_json(&r.to_json()).unwrap(), &r);
    r
}

#[test]
fn touch_one_vcpu() {
    if !kvm_or_skip("touch_one_vcpu") {
        return;
    }
    let r = region(Scenario::Touch, 1, 2, None, None);
    assert_eq!(r.memory.unwrap().pages_touched, 512);
}

#[test]
fn touch_split_across_vcpus() {
    if !kvm_or_skip("touch_split_across_vcpus") {
        return;
    }
    region(Scenario::Touch, 2, 2, None, None);
    region(Scenario::Touch, 4, 1, None, None);
    // A PACE exit after every page.
    region(Scenario::Touch, 2, 1, None, Some(1e6));
}

#[test]
fn balloon_returns_and_retouches() {
    if !kvm_or_skip("balloon_returns_and_retouches") {
        return;
    }
    let r = region(Scenario::Balloon, 1, 4, Some(2), None);
    let m = r.memory.unwrap();
    assert_eq!(m.bytes_returned, 2 << 20);
    assert_eq!(m.pages_retouched, 512);
    // All of it, and the smallest balloon, paced.
    region(Scenario::Balloon, 1, 3, Some(3), None);
    region(Scenario::Balloon, 1, 1, Some(1), Some(1e6));
}
