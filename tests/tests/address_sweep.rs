//! A guest that writes to a million distinct addresses, each an MMIO exit at an address never
//! written before (any of which could have been a doorbell), leaves the agent's memory where it
//! was and every count exact: nothing in the kernel or the agent is kept per guest address.

use vmtrace_tests::{
    Agent, TenantCgroup, agent_counts, expect, expected_agent_counts, privileged_host, run_vmm,
};

/// Distinct addresses written: two vCPUs, half a million each.
const PER_VCPU: &str = "500000";
/// How much the agent's memory may grow meanwhile: a per-address entry of even 8 bytes would
/// take 8 MB.
const RSS_GROWTH_KIB: u64 = 2 * 1024;

#[test]
fn a_million_distinct_guest_addresses_leave_memory_flat_and_counts_exact() {
    if !privileged_host("a_million_distinct_guest_addresses_leave_memory_flat_and_counts_exact") {
        return;
    }
    let base = format!("vmtrace-test-sweep-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenant = TenantCgroup::new(&format!("{base}/sweeper"));
    let agent = Agent::start(&[]);
    // A short guest first, so that the tenant, its series and the agent's buffers exist before
    // the figure the growth is measured from.
    let warm_up = run_vmm(&[
        "--scenario",
        "mmio-sweep",
        "--count",
        "1000",
        "--cgroup",
        &tenant.relative,
    ]);
    std::thread::sleep(std::time::Duration::from_millis(600));
    let before = agent.rss_kib();
    let sweep = run_vmm(&[
        "--scenario",
        "mmio-sweep",
        "--vcpus",
        "2",
        "--count",
        PER_VCPU,
        "--cgroup",
        &tenant.relative,
    ]);
    std::thread::sleep(std::time::Duration::from_millis(600));
    let after = agent.rss_kib();
    assert_eq!(sweep.total.guest_ops, 1_000_000);
    assert_eq!(sweep.total.exits["mmio"], 1_000_000, "one exit per address");

    let reports = agent.stop();
    let last = reports.last().unwrap();
    let actual = agent_counts(last, &tenant.agent_path()).expect("the sweeping tenant");
    let runs = [warm_up, sweep];
    let expected = expected_agent_counts(&runs);
    assert_eq!(actual, expected, "agent (left) vs VMM (right)");
    expect::assert_tenants(last, &format!("/{base}"), &[(tenant.agent_path(), &runs)]);
    eprintln!(
        "1,000,000 distinct MMIO addresses: agent RSS {before} KiB before, {after} KiB after; \
         counts {actual:?}"
    );
    assert!(
        after <= before + RSS_GROWTH_KIB,
        "the agent's memory grew from {before} KiB to {after} KiB"
    );
}
