//! The agent under load and churn for a stretch of time (`VMTRACE_SOAK_SECS`, 120 s by default;
//! `cargo xtask soak` runs it for 10 minutes): tenants' cgroups created and removed continuously,
//! VMMs starting and ending, doorbells registered and removed, and scrapers and timeline clients
//! hammering the endpoint, while two long-lived tenants run guests at a steady rate.
//!
//! Afterwards the agent is alive, its memory stopped growing once its timeline window was full,
//! it holds the same file descriptors and BPF objects as at the start (but the cgroup files and VMM
//! threads' `stat` files it keeps open for live tenants, none of them of a cgroup or thread that is
//! gone), and the
//! long-lived tenants' counts equal their VMMs' ground truth exactly.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use vmtrace_tests::{
    TenantCgroup, binary,
    doorbell::DoorbellVm,
    expected_agent_counts, free_port, http_get, privileged_host,
    process::Proc,
    prometheus::count_of,
    run_vmm,
    wait::{poll, wait_for},
};

/// Seconds the churn runs for.
fn soak_secs() -> u64 {
    std::env::var("VMTRACE_SOAK_SECS")
        .ok()
        .map_or(120, |s| {
            s.parse().expect("VMTRACE_SOAK_SECS: a number of seconds")
        })
        .max(30)
}

/// The agent's timeline window: short, so that it is full well before the memory is judged.
const WINDOW: &str = "10s";

/// How much the agent's memory may grow from the second quarter of the run to its end: the larger
/// of this and [`RSS_GROWTH_RATIO`] of the second quarter's figure. Allocator noise and the
/// per-request buffers of the scrapers fit in it; a leak of a few hundred bytes per cgroup or
/// request over tens of thousands of them does not.
const RSS_GROWTH_KIB: u64 = 8 * 1024;
const RSS_GROWTH_RATIO: f64 = 0.15;

/// A line of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The process's open file descriptors: all of them but the files the agent keeps open for its
/// tenants (their cgroups' files, their VMM threads' `stat`), and those that hold BPF objects or
/// perf events (programs, maps, links, the tracepoints' perf events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct Descriptors {
    others: usize,
    bpf: usize,
}

/// The descriptors of `pid`, and the tenants' files it holds open.
fn descriptors(pid: u32) -> (Descriptors, Vec<String>) {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (Descriptors::default(), Vec::new());
    };
    let targets: Vec<String> = entries
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    let bpf = targets
        .iter()
        .filter(|t| t.starts_with("anon_inode:bpf") || t.starts_with("anon_inode:[perf_event]"))
        .count();
    let kept: Vec<String> = targets
        .iter()
        .filter(|t| t.starts_with("/sys/fs/cgroup/") || is_thread_stat(t))
        .cloned()
        .collect();
    let others = targets.len() - kept.len();
    (Descriptors { others, bpf }, kept)
}

/// Whether `path` is a `/proc/<pid>/task/<tid>/stat` file.
fn is_thread_stat(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts[..], ["", "proc", pid, "task", tid, "stat"]
        if pid.parse::<u32>().is_ok() && tid.parse::<u32>().is_ok())
}

/// The fewest descriptors seen over a few reads (a sample in progress holds a cgroup file or two
/// for a moment), with the tenants' files held then.
fn settled_descriptors(pid: u32) -> (Descriptors, Vec<String>) {
    (0..10)
        .map(|_| {
            thread::sleep(Duration::from_millis(30));
            descriptors(pid)
        })
        .min()
        .unwrap_or_default()
}

/// Creates and removes cgroups below `root` until `stop`; every eighth has a process moved in
/// (`cgroup_attach_task`) before it goes. Returns the create/remove cycles.
fn churn_cgroups(root: &Path, stop: &AtomicBool) -> u64 {
    let mut cycles = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let dir = root.join(format!("c{}", cycles % 64));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        if cycles.is_multiple_of(8) {
            let status = Command::new("sh")
                .arg("-c")
                .arg("echo $$ > \"$1/cgroup.procs\"")
                .arg("sh")
                .arg(&dir)
                .status()
                .expect("sh");
            assert!(status.success(), "moving a shell into {}", dir.display());
        }
        // The shell has been reaped, but the kernel may take a moment to let its cgroup go.
        wait_for(
            "a churned cgroup to be removable",
            Duration::from_secs(10),
            || fs::remove_dir(&dir).ok(),
        );
        cycles += 1;
        thread::sleep(Duration::from_millis(1));
    }
    cycles
}

/// Runs short VMMs, each in a new cgroup removed when it ends, until `stop`. Returns how many.
fn churn_vmms(base: &str, stop: &AtomicBool) -> u64 {
    let mut runs = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let tenant = TenantCgroup::new(&format!("{base}/vm-{runs}"));
        let scenario = if runs.is_multiple_of(2) {
            "pio"
        } else {
            "doorbell"
        };
        run_vmm(&[
            "--scenario",
            scenario,
            "--count",
            "500",
            "--cgroup",
            &tenant.relative,
        ]);
        drop(tenant);
        runs += 1;
    }
    runs
}

/// Registers and removes eight doorbells at ever other addresses until `stop`. Returns the cycles.
fn churn_doorbells(stop: &AtomicBool) -> u64 {
    let vm = DoorbellVm::new();
    let mut cycles = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let addr = 0xd000_0000 + (cycles % 4096) * 0x1000 + 0x50;
        for queue in 0..8 {
            vm.doorbell(addr, queue, false);
        }
        for queue in 0..8 {
            vm.doorbell(addr, queue, true);
        }
        cycles += 1;
        thread::sleep(Duration::from_millis(2));
    }
    cycles
}

/// Requests counted by outcome.
#[derive(Default)]
struct Requests {
    ok: AtomicU64,
    shed: AtomicU64,
    failed: AtomicU64,
}

/// GETs `paths` in turn until `stop`.
fn hammer(port: u16, paths: &[&str], stop: &AtomicBool, requests: &Requests) {
    while !stop.load(Ordering::Relaxed) {
        for path in paths {
            match http_get(port, path) {
                Ok((200, _)) => requests.ok.fetch_add(1, Ordering::Relaxed),
                Ok((503, _)) => requests.shed.fetch_add(1, Ordering::Relaxed),
                Ok((status, body)) => {
                    eprintln!("GET {path}: {status} {body}");
                    requests.failed.fetch_add(1, Ordering::Relaxed)
                }
                Err(e) => {
                    eprintln!("GET {path}: {e}");
                    requests.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }
}

#[test]
#[allow(clippy::too_many_lines)]
fn the_agent_stays_exact_and_bounded_through_load_and_churn() {
    if !privileged_host("the_agent_stays_exact_and_bounded_through_load_and_churn") {
        return;
    }
    let secs = soak_secs();
    let base = format!("vmtrace-test-soak-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let churn_root = TenantCgroup::new(&format!("{base}/churn"));
    let survivors = [
        TenantCgroup::new(&format!("{base}/survivor-virtio")),
        TenantCgroup::new(&format!("{base}/survivor-pio")),
    ];

    let port = free_port();
    let mut agent = Proc::spawn(
        "vmtrace agent",
        Command::new(binary("vmtrace"))
            .args([
                "agent",
                "--vm-ioctls",
                "--interval",
                "100ms",
                "--window",
                WINDOW,
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    wait_for("the agent's /readyz", Duration::from_mins(1), || {
        agent.assert_running("before it was ready");
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    let pid = agent.id();
    let (start_fds, _) = settled_descriptors(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(Requests::default());
    let started = Instant::now();
    // The long-lived tenants run at a steady rate and end a few seconds before the churn does.
    let guest_secs = secs - 5;
    let survivor_runs: Vec<_> = [
        ("virtio", "2", 200u64, &survivors[0]),
        ("pio", "1", 500, &survivors[1]),
    ]
    .into_iter()
    .map(|(scenario, vcpus, rate, cgroup)| {
        let relative = cgroup.relative.clone();
        thread::spawn(move || {
            run_vmm(&[
                "--scenario",
                scenario,
                "--vcpus",
                vcpus,
                "--rate",
                &rate.to_string(),
                "--count",
                &(rate * guest_secs).to_string(),
                "--cgroup",
                &relative,
            ])
        })
    })
    .collect();
    let mut churn = Vec::new();
    {
        let (stop, root) = (stop.clone(), churn_root.path.clone());
        churn.push(thread::spawn(move || churn_cgroups(&root, &stop)));
    }
    {
        let (stop, base) = (stop.clone(), base.clone());
        churn.push(thread::spawn(move || churn_vmms(&base, &stop)));
    }
    {
        let stop = stop.clone();
        churn.push(thread::spawn(move || churn_doorbells(&stop)));
    }
    let clients: Vec<_> = [
        &["/metrics", "/healthz"][..],
        &["/api/timeline", "/readyz"][..],
        &["/api/timeline?prefix=exit.", "/metrics"][..],
    ]
    .into_iter()
    .map(|paths| {
        let (stop, requests) = (stop.clone(), requests.clone());
        thread::spawn(move || hammer(port, paths, &stop, &requests))
    })
    .collect();

    // The agent's memory, every two seconds.
    let mut rss: Vec<(f64, u64)> = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        agent.assert_running("during the soak");
        if let Some(kib) = status_kib(pid, "VmRSS:") {
            rss.push((started.elapsed().as_secs_f64(), kib));
        }
        thread::sleep(Duration::from_secs(2));
    }
    stop.store(true, Ordering::Relaxed);
    let cycles: Vec<u64> = churn.into_iter().map(|t| t.join().unwrap()).collect();
    for client in clients {
        client.join().unwrap();
    }
    let reports: Vec<_> = survivor_runs
        .into_iter()
        .map(|t| t.join().expect("a long-lived VMM"))
        .collect();
    agent.assert_running("after the soak");

    // Counts of the long-lived tenants: exact, once the last samples are in.
    let mut mismatches = Vec::new();
    poll(Duration::from_secs(10), || {
        let (_, metrics) = http_get(port, "/metrics").ok()?;
        mismatches.clear();
        for (cgroup, report) in survivors.iter().zip(&reports) {
            let path = cgroup.agent_path();
            for (kind, &n) in &expected_agent_counts(std::slice::from_ref(report)) {
                let expected = Some(n);
                let got = count_of(&metrics, &path, kind);
                if got != expected {
                    mismatches.push(format!("{path} {kind}: agent {got:?}, VMM {n}"));
                }
            }
        }
        mismatches.is_empty().then_some(())
    });
    assert!(mismatches.is_empty(), "counts differ: {mismatches:#?}");

    let (end_fds, kept_open) = settled_descriptors(pid);
    let (_, metrics) = http_get(port, "/metrics").expect("GET /metrics");
    let sample_errors = metrics.lines().find_map(|line| {
        line.strip_prefix("vmtrace_agent_sample_errors_total ")
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    let quarter = |q: u64| {
        let (from, to) = (secs * q / 4, secs * (q + 1) / 4);
        #[allow(clippy::cast_precision_loss)]
        rss.iter()
            .filter(move |(t, _)| *t >= from as f64 && *t < to as f64)
            .map(|(_, kib)| *kib)
    };
    let settled = quarter(1).max().expect("RSS samples in the second quarter");
    let last = quarter(3).max().expect("RSS samples in the last quarter");
    let peak = rss.iter().map(|(_, kib)| *kib).max().unwrap_or_default();
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let allowed = RSS_GROWTH_KIB.max((settled as f64 * RSS_GROWTH_RATIO) as u64);
    let (ok, shed, failed) = (
        requests.ok.load(Ordering::Relaxed),
        requests.shed.load(Ordering::Relaxed),
        requests.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak of {secs} s: {} cgroup create/remove cycles, {} VMMs, {} doorbell cycles (16 \
         ioctls each); requests: {ok} ok, {shed} shed (503), {failed} failed; agent RSS: {} KiB \
         at the start, {settled} KiB in the second quarter, {last} KiB in the last, {peak} KiB at \
         most (allowed growth {allowed} KiB); descriptors: {start_fds:?} at the start, {end_fds:?} \
         and {} tenants' files at the end; sample errors: {sample_errors:?}",
        cycles[0],
        cycles[1],
        cycles[2],
        rss.first().map_or(0, |r| r.1),
        kept_open.len(),
    );

    assert!(
        last <= settled + allowed,
        "the agent's memory grew from {settled} KiB to {last} KiB (allowed {allowed} KiB): {rss:?}"
    );
    assert_eq!(
        end_fds, start_fds,
        "file descriptors at the end vs the start"
    );
    let gone: Vec<&String> = kept_open
        .iter()
        .filter(|file| !Path::new(file).exists())
        .collect();
    assert!(
        gone.is_empty(),
        "files held open for cgroups or threads that are gone: {gone:?}"
    );
    assert_eq!(failed, 0, "requests that failed");
    assert!(ok > shed, "{ok} requests answered, {shed} shed");
    assert!(cycles.iter().all(|&c| c > 0), "every churn ran: {cycles:?}");
}
