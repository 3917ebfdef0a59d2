//! The agent against the kernel's own changes while it samples every 10 ms: doorbells deassigned
//! and registered again in a tight loop (what a guest's virtio reset makes a VMM do, and the
//! kernel then deletes entries the agent is about to delete), and tenants' cgroups created and
//! removed as fast as the host can. The agent stays up, `/healthz` answers throughout, and
//! `vmtrace.agent.sample.errors` says how many samples failed.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use vmtrace_tests::{
    TenantCgroup, binary, doorbell::DoorbellVm, free_port, http_get, privileged_host,
    process::Proc, run_vmm, wait::wait_for,
};

/// `vmtrace_agent_sample_errors_total` of a text exposition.
fn sample_errors(metrics: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix("vmtrace_agent_sample_errors_total ")
            .and_then(|v| v.trim().parse().ok())
    })
}

#[test]
fn the_agent_survives_doorbell_and_cgroup_churn_and_counts_its_sample_errors() {
    if !privileged_host("the_agent_survives_doorbell_and_cgroup_churn_and_counts_its_sample_errors")
    {
        return;
    }
    let base = format!("vmtrace-test-races-{}", std::process::id());
    let base_cgroup = TenantCgroup::new(&base);
    let port = free_port();
    let mut agent = Proc::spawn(
        "vmtrace agent",
        Command::new(binary("vmtrace"))
            .args([
                "agent",
                "--vm-ioctls",
                "--interval",
                "10ms",
                "--window",
                "2s",
                "--listen",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .env("VMTRACE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let stderr = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let pipe = agent.child.stderr.take().expect("stderr");
        let stderr = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[vmtrace] {line}");
                stderr.lock().unwrap().push(line);
            }
        });
    }
    wait_for("the agent to be ready", Duration::from_mins(1), || {
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });

    let stop = Arc::new(AtomicBool::new(false));
    let mut churn = Vec::new();
    // Doorbells: eight queues of one device deassigned and registered again, over and over.
    churn.push({
        let stop = stop.clone();
        thread::spawn(move || {
            let vm = DoorbellVm::new();
            let mut cycles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for queue in 0..8 {
                    vm.doorbell(0xd000_0050, queue, false);
                }
                for queue in 0..8 {
                    vm.doorbell(0xd000_0050, queue, true);
                }
                cycles += 1;
            }
            cycles
        })
    });
    // Cgroups: empty ones, made and removed as fast as the host allows.
    churn.push({
        let (stop, root) = (stop.clone(), base_cgroup.path.clone());
        thread::spawn(move || {
            let mut cycles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let dir = root.join(format!("empty-{}", cycles % 16));
                std::fs::create_dir(&dir).expect("mkdir");
                std::fs::remove_dir(&dir).expect("rmdir");
                cycles += 1;
            }
            cycles
        })
    });
    // Tenants with guests: each cgroup is removed as soon as its VMM has exited.
    churn.push({
        let (stop, base) = (stop.clone(), base.clone());
        thread::spawn(move || {
            let mut cycles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let tenant = TenantCgroup::new(&format!("{base}/guest-{cycles}"));
                run_vmm(&[
                    "--scenario",
                    "pio",
                    "--count",
                    "200",
                    "--cgroup",
                    &tenant.relative,
                ]);
                drop(tenant);
                cycles += 1;
            }
            cycles
        })
    });

    let started = Instant::now();
    let mut health_checks = 0;
    while started.elapsed() < Duration::from_secs(5) {
        agent.assert_running("while the kernel's maps and the cgroups churned");
        let (status, body) = http_get(port, "/healthz").expect("GET /healthz");
        assert_eq!(status, 200, "/healthz: {body}");
        health_checks += 1;
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let cycles: Vec<u64> = churn.into_iter().map(|t| t.join().unwrap()).collect();
    // A few more samples, so that the last changes are read too.
    thread::sleep(Duration::from_millis(300));
    agent.assert_running("after the churn");

    let (status, metrics) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{metrics}");
    let errors = sample_errors(&metrics)
        .unwrap_or_else(|| panic!("no vmtrace_agent_sample_errors_total in:\n{metrics}"));
    // Each kind of failure is logged once (then at most once a minute), so the log says whether
    // any sample failed, though not how many.
    let skipped: Vec<String> = stderr
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("sample skipped"))
        .cloned()
        .collect();
    eprintln!(
        "{} doorbell cycles (16 ioctls each), {} cgroup mkdir/rmdir, {} guests; {health_checks} \
         /healthz answers; sample errors: {errors}",
        cycles[0], cycles[1], cycles[2]
    );
    if skipped.is_empty() {
        assert_eq!(errors, 0.0, "errors counted but none logged");
    } else {
        assert!(
            errors >= skipped.len() as f64,
            "{errors} errors counted, {} logged: {skipped:?}",
            skipped.len()
        );
    }
    // The races above are the kernel's, not failures: none of them may be counted.
    assert!(
        skipped
            .iter()
            .all(|l| !l.contains("No such file or directory")),
        "a map entry the kernel deleted first was taken for an error: {skipped:?}"
    );
    assert!(cycles[0] > 100, "the doorbell loop barely ran: {cycles:?}");
}
