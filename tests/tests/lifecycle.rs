//! Tenant lifecycle: a tenant whose cgroup lives for a moment is still reported by name, and once
//! its cgroup is removed its series end after one last report marked removed.

use std::time::{Duration, Instant};

use vmtrace_tests::{Agent, TenantCgroup, agent_report, privileged_host, run_vmm};

#[test]
fn a_short_lived_tenant_is_named_and_its_series_end_after_rmdir() {
    if !privileged_host("a_short_lived_tenant_is_named_and_its_series_end_after_rmdir") {
        return;
    }
    let base = format!("vmtrace-test-life-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    // A 1 s interval: the tenant is born, runs its guest and is removed between two samples, so
    // only the kernel's cgroup events can name it.
    let agent = Agent::start(&["--interval", "1s"]);
    let born = Instant::now();
    let tenant = TenantCgroup::new(&format!("{base}/brief"));
    let report = run_vmm(&[
        "--scenario",
        "pio",
        "--count",
        "200",
        "--cgroup",
        &tenant.relative,
    ]);
    let path = tenant.agent_path();
    drop(tenant); // rmdir
    let lifetime = born.elapsed();
    std::thread::sleep(Duration::from_millis(3500));
    let samples = agent.stop();

    let reported: Vec<usize> = (0..samples.len())
        .filter(|&i| agent_report(&samples[i], &path).is_some())
        .collect();
    assert_eq!(
        reported.len(),
        1,
        "{path} should be in exactly one sample: {reported:?}"
    );
    let tenant = agent_report(&samples[reported[0]], &path).unwrap();
    assert_eq!(
        tenant["identity"]["kind"], "path",
        "named from its path: {tenant}"
    );
    assert_eq!(tenant["removed"], true, "{tenant}");
    assert_eq!(tenant["counts"]["exit.io"], report.total.exits["io"]);
    assert!(
        reported[0] + 1 < samples.len(),
        "no sample after the removal was taken"
    );
    eprintln!("tenant lived {lifetime:?}, reported once by name, then its series ended");
}
