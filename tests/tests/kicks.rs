//! Virtio kicks per tenant and queue against the reference VMM's virtio-blk device, doorbells that
//! predate the agent (their kicks inferred per queue), and VMM service time of a VMM made slow on
//! purpose.

use std::{thread, time::Duration};

use vmtrace::{
    host,
    probe::counters::Counters,
    probe::load::{ProbeOptions, Probes},
};
use vmtrace_common::{ANY_QUEUE, Doorbell, DoorbellKey, SPACE_MMIO};

use vmtrace_tests::{
    Agent, TenantCgroup, agent_counts, agent_report, all_agent_counts, expect,
    expected_agent_counts, privileged_host, run_vmm,
};

/// Runs each tenant's VMMs concurrently and returns their reports, per tenant.
fn run_tenants(runs: &[(&TenantCgroup, Vec<&str>)]) -> Vec<vmtrace_vmm::Report> {
    thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(tenant, args)| {
                let mut args = args.clone();
                args.extend(["--cgroup", tenant.relative.as_str()]);
                scope.spawn(move || run_vmm(&args))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("VMM thread"))
            .collect()
    })
}

#[test]
fn virtio_kicks_per_tenant_and_queue_equal_the_vmms_count() {
    if !privileged_host("virtio_kicks_per_tenant_and_queue_equal_the_vmms_count") {
        return;
    }
    let base = format!("vmtrace-test-kicks-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenants: Vec<TenantCgroup> = ["a", "b", "c"]
        .iter()
        .map(|t| TenantCgroup::new(&format!("{base}/{t}")))
        .collect();
    let agent = Agent::start(&["--kick-latency"]);
    let reports = run_tenants(&[
        (
            &tenants[0],
            vec![
                "--scenario",
                "virtio",
                "--vcpus",
                "1",
                "--queues",
                "2",
                "--count",
                "300",
            ],
        ),
        (
            &tenants[1],
            vec![
                "--scenario",
                "virtio",
                "--vcpus",
                "2",
                "--queues",
                "4",
                "--count",
                "200",
            ],
        ),
        (
            &tenants[2],
            vec![
                "--scenario",
                "virtio",
                "--vcpus",
                "1",
                "--queues",
                "3",
                "--count",
                "250",
                "--request-size",
                "512",
            ],
        ),
    ]);
    thread::sleep(Duration::from_millis(400));
    let samples = agent.stop();
    let last = samples.last().unwrap();
    for (tenant, report) in tenants.iter().zip(&reports) {
        let virtio = report.virtio.as_ref().unwrap();
        assert!(virtio.queues.len() >= 2);
        let expected = expected_agent_counts(std::slice::from_ref(report));
        let actual = agent_counts(last, &tenant.agent_path()).expect("tenant reported");
        assert_eq!(
            actual,
            expected,
            "{}: agent (left) vs VMM (right)",
            tenant.agent_path()
        );
        let detail = agent_report(last, &tenant.agent_path()).unwrap();
        let doorbells = detail["doorbells"].as_array().unwrap();
        assert_eq!(doorbells.len(), virtio.queues.len(), "{doorbells:?}");
        for queue in &virtio.queues {
            let doorbell = doorbells
                .iter()
                .find(|d| d["queue"] == queue.index)
                .unwrap();
            assert_eq!(doorbell["kicks"], queue.kicks);
            assert_eq!(doorbell["pid"], report.pid);
            assert_eq!(doorbell["addr"], queue.notify_addr);
            // The worker reads the eventfd after kicks: each read serves the kicks pending on it,
            // and is one service, from the first of them to the read.
            let served = detail["latency"][format!("kick.q{}", queue.index)]["count"]
                .as_u64()
                .unwrap();
            assert_eq!(
                served, queue.eventfd_reads,
                "queue {}: {served} services for {} eventfd reads ({} kicks)",
                queue.index, queue.eventfd_reads, queue.kicks
            );
        }
        eprintln!("{}: {actual:?}", tenant.agent_path());
    }
    let checked: Vec<_> = tenants
        .iter()
        .zip(&reports)
        .map(|(t, r)| (t.agent_path(), std::slice::from_ref(r)))
        .collect();
    expect::assert_tenants(last, &format!("/{base}"), &checked);
}

#[test]
fn kicks_to_doorbells_registered_before_the_agent_started_are_counted_per_queue() {
    if !privileged_host(
        "kicks_to_doorbells_registered_before_the_agent_started_are_counted_per_queue",
    ) {
        return;
    }
    let base = format!("vmtrace-test-early-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let virtio_tenant = TenantCgroup::new(&format!("{base}/virtio"));
    let doorbell_tenant = TenantCgroup::new(&format!("{base}/doorbell"));
    // Each VMM registers its doorbells, then waits 4 s before running the guest; the agent
    // starts within that wait, after the registrations, so it never sees them.
    let delayed = |tenant: &TenantCgroup, scenario: &'static [&'static str]| {
        let relative = tenant.relative.clone();
        thread::spawn(move || {
            let mut args = scenario.to_vec();
            args.extend(["--vm-setup-delay-ms", "4000", "--cgroup", &relative]);
            run_vmm(&args)
        })
    };
    let virtio = delayed(
        &virtio_tenant,
        &[
            "--scenario",
            "virtio",
            "--vcpus",
            "2",
            "--queues",
            "3",
            "--count",
            "200",
        ],
    );
    // A doorbell without datamatch, written with 0 (AL holds the low byte of the guest's
    // segment, 0xD000).
    let doorbell = delayed(
        &doorbell_tenant,
        &["--scenario", "doorbell", "--count", "5000"],
    );
    thread::sleep(Duration::from_millis(500));
    let agent = Agent::start(&[]);
    let virtio = virtio.join().unwrap();
    let doorbell = doorbell.join().unwrap();
    thread::sleep(Duration::from_millis(400));
    let samples = agent.stop();
    let last = samples.last().unwrap();

    // Every queue's kicks, inferred from the writes the kernel completed, equal the VMM's.
    let queues = &virtio.virtio.as_ref().unwrap().queues;
    assert!(queues.len() >= 2);
    let counts = agent_counts(last, &virtio_tenant.agent_path()).expect("tenant reported");
    assert_eq!(
        counts,
        expected_agent_counts(std::slice::from_ref(&virtio)),
        "agent (left) vs VMM (right)"
    );
    let detail = agent_report(last, &virtio_tenant.agent_path()).unwrap();
    let doorbells = detail["doorbells"].as_array().unwrap();
    assert_eq!(doorbells.len(), queues.len(), "{doorbells:?}");
    for queue in queues {
        let found = doorbells
            .iter()
            .find(|d| d["queue"] == queue.index)
            .unwrap_or_else(|| panic!("queue {}: {doorbells:?}", queue.index));
        assert_eq!(found["kicks"], queue.kicks);
        assert_eq!(found["pid"], virtio.pid);
        assert_eq!(found["addr"], queue.notify_addr);
        assert_eq!(found["vm_fd"], 0, "an inferred doorbell has no known VM fd");
    }

    // The doorbell without datamatch: its kicks are those of the queue its value names.
    let counts = agent_counts(last, &doorbell_tenant.agent_path()).expect("tenant reported");
    let signals = doorbell.doorbell_signals.unwrap();
    assert_eq!(counts.get("kick.q0"), Some(&signals), "{counts:?}");
    assert_eq!(
        counts.get("mmio.write.kernel"),
        Some(&signals),
        "{counts:?}"
    );
    // The host's side: the VMMs became ones before the agent started, so their set-up faults
    // were not seen; the rest was.
    for (tenant, report) in [(&virtio_tenant, &virtio), (&doorbell_tenant, &doorbell)] {
        let all = all_agent_counts(last, &tenant.agent_path()).unwrap();
        eprintln!("{}: {all:?}", tenant.agent_path());
        let guest_side = expected_agent_counts(std::slice::from_ref(report));
        expect::Expectation::of_vmms(
            std::slice::from_ref(report),
            expect::HostKvm::of_this_host(),
        )
        .with_exact(guest_side)
        .seen_from_mid_run()
        .assert_matches(&tenant.agent_path(), &all);
    }
}

#[test]
fn a_slow_vmm_shows_in_its_service_time_percentiles() {
    if !privileged_host("a_slow_vmm_shows_in_its_service_time_percentiles") {
        return;
    }
    let base = format!("vmtrace-test-slow-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let (fast, slow) = (
        TenantCgroup::new(&format!("{base}/fast")),
        TenantCgroup::new(&format!("{base}/slow")),
    );
    let agent = Agent::start(&["--service-time"]);
    let reports = run_tenants(&[
        (&fast, vec!["--scenario", "pio", "--count", "3000"]),
        (
            &slow,
            vec![
                "--scenario",
                "pio",
                "--count",
                "300",
                "--exit-delay-us",
                "2000",
            ],
        ),
    ]);
    thread::sleep(Duration::from_millis(400));
    let samples = agent.stop();
    let last = samples.last().unwrap();
    let service = |tenant: &TenantCgroup| {
        agent_report(last, &tenant.agent_path()).unwrap()["latency"]["exit.io"].clone()
    };
    let (fast_latency, slow_latency) = (service(&fast), service(&slow));
    let ns = |v: &serde_json::Value, key: &str| v[key].as_u64().unwrap();
    // Every served exit of the slow VMM includes its 2 ms sleep.
    assert!(ns(&slow_latency, "p50_ns") >= 2_000_000, "{slow_latency}");
    assert!(ns(&slow_latency, "p99_ns") >= 2_000_000, "{slow_latency}");
    assert!(ns(&fast_latency, "p50_ns") < 1_000_000, "{fast_latency}");
    assert_eq!(ns(&slow_latency, "count"), reports[1].total.exits["io"] - 1);
    let checked = [
        (fast.agent_path(), &reports[..1]),
        (slow.agent_path(), &reports[1..]),
    ];
    expect::assert_tenants(last, &format!("/{base}"), &checked);
    eprintln!(
        "service time p50/p99: fast {}/{} ns, slow {}/{} ns",
        ns(&fast_latency, "p50_ns"),
        ns(&fast_latency, "p99_ns"),
        ns(&slow_latency, "p50_ns"),
        ns(&slow_latency, "p99_ns")
    );
}

/// VMX completes writes to doorbells of length 0 on its fast MMIO bus, tracing `kvm_fast_mmio`
/// instead of `kvm_mmio`. These hosts have no VMX, so the probe itself is run through
/// `BPF_PROG_TEST_RUN`, in this process, as a VMM's vCPU thread would run it: writes to a known
/// doorbell are its kicks, and those to an unknown one are inferred kicks of an unknown queue.
#[test]
fn fast_mmio_writes_are_kicks_of_their_doorbell_or_inferred() {
    if !privileged_host("fast_mmio_writes_are_kicks_of_their_doorbell_or_inferred") {
        return;
    }
    // Known doorbells are looked up only where they can be learnt.
    let options = ProbeOptions {
        vm_ioctls: true,
        ..ProbeOptions::default()
    };
    let mut probes = Probes::attach(&host::detect_kvm(), &options).expect("attaching the probes");
    let mut counters = Counters::new(&mut probes.ebpf).unwrap();
    let pid = std::process::id();
    // Addresses no guest of this host uses, and a cgroup id no cgroup has.
    let known = 0xdead_0000_0000 + u64::from(pid) * 0x1000;
    let unknown = known + 0x800;
    let cgroup_id = u64::MAX - u64::from(pid);
    let key = DoorbellKey {
        tgid: pid,
        space: SPACE_MMIO,
        addr: known,
        datamatch: 0,
        wildcard: 1,
        len: 0,
    };
    let doorbell = Doorbell {
        queue: ANY_QUEUE,
        vm_fd: 7,
        eventfd: 9,
        reserved: 0,
        cgroup_id,
    };
    assert_eq!(counters.restore_doorbells(&[(key, doorbell)]).unwrap(), 1);
    for _ in 0..25 {
        probes.replay_fast_mmio(known).unwrap();
    }
    for _ in 0..13 {
        probes.replay_fast_mmio(unknown).unwrap();
    }
    let snapshot = counters.read(&probes.reason_names).unwrap();
    let count = |cgroup: u64, name: &str| {
        snapshot.by_cgroup.get(&cgroup).and_then(|counts| {
            counts
                .iter()
                .find(|(kind, _)| kind.to_string() == name)
                .map(|(_, &n)| n)
        })
    };
    // The known doorbell's kicks, in its tenant, and as the MMIO writes they are.
    assert_eq!(count(cgroup_id, "kick.any"), Some(25));
    assert_eq!(count(cgroup_id, "mmio.write"), Some(25));
    let doorbells = &snapshot.kicks_by_cgroup[&cgroup_id];
    assert_eq!(doorbells.len(), 1, "{doorbells:?}");
    assert_eq!(
        (
            doorbells[0].addr,
            doorbells[0].vm_fd,
            doorbells[0].queue,
            doorbells[0].kicks
        ),
        (known, 7, None, 25)
    );
    // The unknown one's, in this process's own cgroup, without a VM fd or queue.
    let inferred: Vec<_> = snapshot
        .kicks_by_cgroup
        .values()
        .flatten()
        .filter(|d| d.pid == pid && d.addr == unknown)
        .collect();
    assert_eq!(inferred.len(), 1, "{inferred:?}");
    assert_eq!(
        (inferred[0].vm_fd, inferred[0].queue, inferred[0].kicks),
        (0, None, 13)
    );
    // And as the MMIO writes they are, which the probe counted as kicks alone.
    let own = snapshot
        .kicks_by_cgroup
        .iter()
        .find(|(_, doorbells)| doorbells.iter().any(|d| d.addr == unknown))
        .map(|(cgroup, _)| *cgroup)
        .unwrap();
    assert_eq!(count(own, "mmio.write"), Some(13));
}
