//! Host TLB flushes of a known VMM operation: a VMM whose thread write-protects a page of guest
//! RAM N times while its vCPU runs, next to a twin VMM that does not. The difference between the
//! two tenants' flushes is the VMM's doing; its bounds, and why they are bounds, are in
//! docs/memory-and-tlb.md.

use std::collections::BTreeMap;

use vmtrace_tests::{Agent, TenantCgroup, all_agent_counts, expect, privileged_host, run_vmm};

/// Write-protection cycles of the protecting VMM.
const CYCLES: u64 = 2000;
/// Flushes either VMM may make on its own beyond its twin's (an allocator's unmap, a page the
/// host migrated): none were seen, this is the slack.
const NOISE: u64 = 8;

fn count(counts: &BTreeMap<String, u64>, kind: &str) -> u64 {
    counts.get(kind).copied().unwrap_or(0)
}

#[test]
fn write_protecting_guest_memory_flushes_the_tlb_once_or_twice_per_cycle() {
    if !privileged_host("write_protecting_guest_memory_flushes_the_tlb_once_or_twice_per_cycle") {
        return;
    }
    let base = format!("vmtrace-test-tlb-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let twin = TenantCgroup::new(&format!("{base}/twin"));
    let protecting = TenantCgroup::new(&format!("{base}/protecting"));

    let agent = Agent::start(&[]);
    let cycles = CYCLES.to_string();
    // The same guest in both; long enough (about 0.3 s) that every cycle happens while it runs.
    let pio = |tenant: &TenantCgroup, extra: &[&str]| {
        let mut args = vec!["--scenario", "pio", "--count", "20000"];
        args.extend(["--cgroup", &tenant.relative]);
        args.extend(extra);
        run_vmm(&args)
    };
    let (twin_report, protecting_report) = std::thread::scope(|s| {
        let twin_run = s.spawn(|| pio(&twin, &[]));
        let protecting_run = s.spawn(|| pio(&protecting, &["--write-protect-cycles", &cycles]));
        (twin_run.join().unwrap(), protecting_run.join().unwrap())
    });
    let done = protecting_report
        .write_protect
        .expect("the VMM's write_protect report");
    assert_eq!(
        (done.cycles, done.cycles_while_vcpus_ran),
        (CYCLES, CYCLES),
        "every cycle while the vCPU ran (raise --count if the guest ended first)"
    );
    // The emptied cgroups' memory figures settle (docs/ground-truth.md), then the last sample.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let samples = agent.stop();
    let last = samples.last().unwrap();
    expect::assert_tenants(
        last,
        &format!("/{base}"),
        &[
            (twin.agent_path(), std::slice::from_ref(&twin_report)),
            (
                protecting.agent_path(),
                std::slice::from_ref(&protecting_report),
            ),
        ],
    );

    let counts = |t: &TenantCgroup| all_agent_counts(last, &t.agent_path()).unwrap();
    let (twin_counts, protecting_counts) = (counts(&twin), counts(&protecting));
    let local = |c: &BTreeMap<String, u64>| count(c, "tlb.flush.local_mm_shootdown");
    let remote = |c: &BTreeMap<String, u64>| count(c, "tlb.flush.remote_send_ipi");
    let unmaps = |c: &BTreeMap<String, u64>| count(c, "mem.unmap");
    eprintln!(
        "{CYCLES} cycles: local_mm_shootdown {} (twin {}), remote_send_ipi {} (twin {}), \
         mem.unmap {} (twin {})",
        local(&protecting_counts),
        local(&twin_counts),
        remote(&protecting_counts),
        remote(&twin_counts),
        unmaps(&protecting_counts),
        unmaps(&twin_counts),
    );
    // One local flush per write-protection, on every kernel; one more per making the page
    // writable again where the kernel flushes then too (this 6.18 kernel: exactly 2 per cycle).
    let extra_local = local(&protecting_counts).saturating_sub(local(&twin_counts));
    assert!(
        (CYCLES.saturating_sub(NOISE)..=2 * CYCLES + NOISE).contains(&extra_local),
        "{extra_local} more local flushes than the twin for {CYCLES} write-protections"
    );
    // An IPI goes to the other CPUs only while they hold the VMM's address space, which a vCPU
    // in a PVM guest need not: at most one per flush, possibly none.
    let extra_remote = remote(&protecting_counts).saturating_sub(remote(&twin_counts));
    assert!(
        extra_remote <= 2 * CYCLES + NOISE,
        "{extra_remote} more remote flushes than the twin for {CYCLES} cycles"
    );
    // Both mprotect calls of a cycle invalidate the page for KVM (its MMU notifier); the
    // write-protecting thread's own stack (mapped, guarded, unmapped) adds a few: 8 measured.
    let extra_unmaps = unmaps(&protecting_counts).saturating_sub(unmaps(&twin_counts));
    assert!(
        (2 * CYCLES..=2 * CYCLES + NOISE + 8).contains(&extra_unmaps),
        "{extra_unmaps} more KVM invalidations than the twin for {} mprotect calls",
        2 * CYCLES
    );
}
