//! A VMM that is not the reference VMM (a small C program on /dev/kvm with two ioeventfd doorbells)
//! has its exits and kicks counted and attributed to its cgroup, and, with --kick-latency, the time
//! until it reads each queue's eventfd. It removes its doorbells before it exits: their kicks stay
//! counted.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use vmtrace_tests::{Agent, TenantCgroup, agent_counts, agent_report, privileged_host};

/// Builds tests/foreign-vmm/foreign_vmm.c with the system C compiler.
fn build_foreign_vmm() -> PathBuf {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/foreign-vmm/foreign_vmm.c");
    let binary = std::env::temp_dir().join(format!("vmtrace-foreign-vmm-{}", std::process::id()));
    let status = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&binary)
        .arg(source)
        .status()
        .expect("running cc (apt-get install gcc)");
    assert!(status.success(), "compiling {source} failed");
    binary
}

#[test]
fn a_foreign_vmms_exits_and_kicks_are_counted_for_its_cgroup() {
    if !privileged_host("a_foreign_vmms_exits_and_kicks_are_counted_for_its_cgroup") {
        return;
    }
    let vmm = build_foreign_vmm();
    let base = format!("vmtrace-test-foreign-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenant = TenantCgroup::new(&format!("{base}/tenant"));
    let agent = Agent::start(&["--kick-latency"]);
    let output = Command::new(&vmm)
        .args([
            "--port-writes",
            "3000",
            "--kicks-q0",
            "4000",
            "--kicks-q1",
            "5000",
            "--cgroup",
        ])
        .arg(&tenant.path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let truth: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let reports = agent.stop();
    let _ = std::fs::remove_file(&vmm);

    let tenant_report = agent_report(reports.last().unwrap(), &tenant.agent_path())
        .unwrap_or_else(|| panic!("{} missing: {:?}", tenant.agent_path(), reports.last()));
    let counts = agent_counts(reports.last().unwrap(), &tenant.agent_path()).unwrap();
    let io = truth["exits"]["io"].as_u64().unwrap();
    let (q0, q1) = (
        truth["kicks"]["0"].as_u64().unwrap(),
        truth["kicks"]["1"].as_u64().unwrap(),
    );
    let expected: BTreeMap<String, u64> = [
        ("exit.io", io),
        ("pio.out", io),
        ("mmio.write", q0 + q1),
        ("mmio.write.kernel", q0 + q1),
        ("kick.q0", q0),
        ("kick.q1", q1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(
        counts, expected,
        "agent (left) vs the foreign VMM's ground truth (right)"
    );

    let pid = truth["pid"].as_u64().unwrap();
    let doorbells = tenant_report["doorbells"].as_array().unwrap();
    assert_eq!(doorbells.len(), 2, "{doorbells:?}");
    for (doorbell, (queue, kicks)) in doorbells.iter().zip([(0, q0), (1, q1)]) {
        assert_eq!(doorbell["pid"], pid);
        assert_eq!(doorbell["space"], "mmio");
        assert_eq!(doorbell["addr"], truth["doorbell"]["addr"]);
        assert_eq!(doorbell["queue"], queue);
        assert_eq!(doorbell["kicks"], kicks);
    }
    // The VMM reads each eventfd once, after the guest is done: one pending kick per queue, served
    // by that read, after at least the time the later kicks took.
    for queue in ["kick.q0", "kick.q1"] {
        let latency = &tenant_report["latency"][queue];
        assert_eq!(latency["count"], 1, "{queue}: {latency}");
        assert!(
            latency["max_ns"].as_u64().unwrap() > 0,
            "{queue}: {latency}"
        );
    }
}
