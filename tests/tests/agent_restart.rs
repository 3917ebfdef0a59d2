//! An agent killed with SIGKILL and started again under running VMMs goes on counting their kicks,
//! exactly, per queue (docs/virtio-kicks.md). With `--vm-ioctls`, the doorbells the first agent
//! learnt are kept in its state directory and put back by the second; with the default probes,
//! the second infers them from the writes the kernel completes.
//!
//! Two VMMs (a virtio-blk device with a doorbell per queue, datamatch = queue index; and a plain
//! doorbell without datamatch) register their doorbells while the first agent runs, then wait
//! before starting their vCPUs. The first agent is killed, a second one starts, and only then do
//! the guests kick: every kick is the second agent's to count.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use vmtrace_tests::{
    TenantCgroup, binary, expected_agent_counts, expected_agent_counts_learnt, free_port, http_get,
    privileged_host,
    process::Proc,
    prometheus::count_of,
    temp::TempDir,
    wait::{poll, wait_for},
};

/// How long the VMMs wait between registering their doorbells and running their guests: room to
/// kill one agent and start the next on a loaded 2-core machine.
const SETUP_DELAY_MS: u64 = 12_000;

fn agent(port: u16, state: &Path, extra: &[&str]) -> Proc {
    let mut agent = Proc::spawn(
        "vmtrace agent",
        Command::new(binary("vmtrace"))
            .args(["agent", "--interval", "200ms"])
            .args(extra)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(state)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    wait_for("the agent's /readyz", Duration::from_mins(1), || {
        agent.assert_running("before it was ready");
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    agent
}

/// The VMM pids in the agent's state file.
fn saved_pids(state: &Path) -> BTreeSet<u64> {
    let Ok(text) = std::fs::read_to_string(state.join("doorbells.json")) else {
        return BTreeSet::new();
    };
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    json["doorbells"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["tgid"].as_u64())
        .collect()
}

/// A VMM that registers its doorbells, says so on stderr, and waits before its guest runs; its
/// report goes to `report`.
fn waiting_vmm(args: &[&str], cgroup: &TenantCgroup, report: &Path) -> (Proc, mpsc::Receiver<()>) {
    let mut vmm = Proc::spawn(
        &format!("vmtrace-vmm {args:?}"),
        Command::new(binary("vmtrace-vmm"))
            .args(args)
            .args(["--vm-setup-delay-ms", &SETUP_DELAY_MS.to_string()])
            .arg("--cgroup")
            .arg(&cgroup.relative)
            .arg("--report")
            .arg(report)
            .stderr(Stdio::piped()),
    );
    let (tx, rx) = mpsc::channel();
    let stderr = vmm.child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[vmtrace-vmm] {line}");
            if line.contains("VM set up") {
                let _ = tx.send(());
            }
        }
    });
    (vmm, rx)
}

#[test]
fn kicks_of_running_vms_are_exact_after_the_agent_is_killed_and_restarted() {
    if !privileged_host("kicks_of_running_vms_are_exact_after_the_agent_is_killed_and_restarted") {
        return;
    }
    killed_and_restarted(Doorbells::Learnt);
}

#[test]
fn kicks_of_running_vms_are_inferred_exactly_after_the_agent_is_killed_and_restarted() {
    if !privileged_host(
        "kicks_of_running_vms_are_inferred_exactly_after_the_agent_is_killed_and_restarted",
    ) {
        return;
    }
    killed_and_restarted(Doorbells::Inferred);
}

/// How the agents know the doorbells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doorbells {
    /// `--vm-ioctls`: learnt by the first agent, kept in its state and put back by the second.
    Learnt,
    /// Default probes: inferred by the second agent.
    Inferred,
}

fn killed_and_restarted(doorbells: Doorbells) {
    let extra: &[&str] = match doorbells {
        Doorbells::Learnt => &["--vm-ioctls"],
        Doorbells::Inferred => &[],
    };
    let base = format!("vmtrace-test-restart-{}-{doorbells:?}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let virtio_tenant = TenantCgroup::new(&format!("{base}/virtio"));
    let doorbell_tenant = TenantCgroup::new(&format!("{base}/doorbell"));
    let dir = TempDir::new(&format!("agent-restart-{doorbells:?}"));
    let state = dir.path().join("state");
    let port = free_port();

    let mut first = agent(port, &state, extra);
    let (mut virtio, virtio_set_up) = waiting_vmm(
        &[
            "--scenario",
            "virtio",
            "--vcpus",
            "2",
            "--queues",
            "2",
            "--count",
            "500",
        ],
        &virtio_tenant,
        &dir.path().join("virtio.json"),
    );
    let (mut doorbell, doorbell_set_up) = waiting_vmm(
        &["--scenario", "doorbell", "--count", "3000"],
        &doorbell_tenant,
        &dir.path().join("doorbell.json"),
    );
    for set_up in [&virtio_set_up, &doorbell_set_up] {
        set_up
            .recv_timeout(Duration::from_mins(1))
            .expect("a VMM set its VM up");
    }
    let guests_start = Instant::now() + Duration::from_millis(SETUP_DELAY_MS);
    let pids: BTreeSet<u64> = [virtio.id(), doorbell.id()].map(u64::from).into();
    match doorbells {
        Doorbells::Learnt => wait_for(
            "the first agent to save both VMMs' doorbells",
            Duration::from_secs(5),
            || saved_pids(&state).is_superset(&pids).then_some(()),
        ),
        // Without the ioctl probe there is nothing to learn, so nothing is saved.
        Doorbells::Inferred => {
            std::thread::sleep(Duration::from_millis(600));
            assert!(saved_pids(&state).is_empty(), "doorbells saved unlearnt");
        }
    }

    first.child.kill().expect("SIGKILL to the first agent");
    first.child.wait().expect("the first agent's end");
    let second = agent(port, &state, extra);
    assert!(
        Instant::now() < guests_start,
        "the second agent was ready only after the guests had started: raise SETUP_DELAY_MS"
    );

    for (vmm, what) in [(&mut virtio, "virtio"), (&mut doorbell, "doorbell")] {
        let status = vmm.child.wait().expect("a VMM's end");
        assert!(status.success(), "the {what} VMM exited with {status}");
    }
    let report = |name: &str| -> vmtrace_vmm::Report {
        let text = std::fs::read_to_string(dir.path().join(name)).expect("a VMM report");
        serde_json::from_str(&text).expect("a VMM report")
    };
    let reports = [
        (virtio_tenant.agent_path(), report("virtio.json")),
        (doorbell_tenant.agent_path(), report("doorbell.json")),
    ];
    let mut mismatches = Vec::new();
    poll(Duration::from_secs(10), || {
        let (_, metrics) = http_get(port, "/metrics").ok()?;
        mismatches.clear();
        for (tenant, report) in &reports {
            let expected = match doorbells {
                Doorbells::Learnt => expected_agent_counts_learnt(std::slice::from_ref(report)),
                Doorbells::Inferred => expected_agent_counts(std::slice::from_ref(report)),
            };
            for (kind, &n) in &expected {
                let expected = Some(n);
                let got = count_of(&metrics, tenant, kind);
                if got != expected {
                    mismatches.push(format!("{tenant} {kind}: agent {got:?}, VMM {n}"));
                }
            }
        }
        mismatches.is_empty().then_some(())
    });
    assert!(mismatches.is_empty(), "after the restart: {mismatches:#?}");
    let kicks: u64 = reports[0]
        .1
        .virtio
        .as_ref()
        .map_or(0, |v| v.queues.iter().map(|q| q.kicks).sum());
    eprintln!(
        "{doorbells:?}: after a SIGKILL and a restart: {kicks} virtio kicks on 2 queues and {} \
         doorbell kicks counted exactly",
        reports[1].1.doorbell_signals.unwrap_or(0)
    );
    assert!(kicks > 0, "the virtio guest kicked");
    drop(second);
}
