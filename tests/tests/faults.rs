//! Faults provoked for real on this host, one test each, and what the agent does about them
//! (docs/faults.md lists them): tracefs unmounted while the agent runs, one classic tracepoint
//! missing, the kernel's BTF unreadable, a VMM killed mid-run, SIGTERM (every program and map
//! gone within a second), a map filled to its capacity, and the cgroup event ring overrun.
//!
//! The tests run one at a time: a map filled or a ring overrun here would be seen by every other
//! agent on the host, the other tests' included.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, MutexGuard, mpsc},
    thread,
    time::{Duration, Instant},
};

use vmtrace_common::{DOORBELLS_CAPACITY, DoorbellKey};
use vmtrace_tests::{
    TenantCgroup, agent_counts, all_agent_counts, binary,
    expect::{Expectation, HostKvm},
    expected_agent_counts, expected_agent_counts_learnt, free_port, have, http_get, on_path,
    privileged_host,
    process::Proc,
    prometheus::sample,
    run_vmm,
    temp::TempDir,
    wait::wait_for,
};

/// One fault at a time (see the module's comment).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `vmtrace ARGS` in a private mount namespace prepared by `script` (run by `sh` before the
/// agent, which `exec` makes the child's own pid).
fn in_namespace(script: &str, args: &[&str]) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("set -e\n{script}\nexec \"$@\""))
        .arg("sh")
        .arg(binary("vmtrace"))
        .args(args);
    command
}

/// `vmtrace ARGS`, in the host's own namespaces.
fn vmtrace(args: &[&str]) -> Command {
    let mut command = Command::new(binary("vmtrace"));
    command.args(args);
    command
}

fn output(mut command: Command, what: &str) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn doctor(command: Command) -> serde_json::Value {
    let text = output(command, "vmtrace doctor --json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("doctor --json: {e}: {text}"))
}

/// A running `vmtrace watch --json`: its reports as they come, its stderr kept.
struct Watch {
    child: Child,
    reports: mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Watch {
    /// Starts `command` (a `vmtrace watch --json`) and waits until its probes are attached.
    fn start(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting vmtrace watch");
        let (started_tx, started) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let pipe = child.stderr.take().expect("stderr");
            let stderr = stderr.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("[vmtrace] {line}");
                    if line.starts_with("vmtrace: watching") {
                        let _ = started_tx.send(());
                    }
                    stderr.lock().unwrap().push(line);
                }
            });
        }
        let (tx, reports) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let report = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
                if tx.send(report).is_err() {
                    break;
                }
            }
        });
        let mut watch = Self {
            child,
            reports,
            seen: Vec::new(),
            stderr,
        };
        if started.recv_timeout(Duration::from_mins(1)).is_err() {
            let _ = watch.child.kill();
            panic!("vmtrace did not start watching; its stderr is above");
        }
        watch
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next report (panics after a minute without one).
    fn next(&mut self) -> serde_json::Value {
        let report = self
            .reports
            .recv_timeout(Duration::from_mins(1))
            .expect("a report within a minute");
        self.seen.push(report.clone());
        report
    }

    /// Reads reports until `check` accepts one (for at most `timeout`).
    fn until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&serde_json::Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let report = self.next();
            if let Some(value) = check(&report) {
                return value;
            }
        }
        panic!("timed out after {timeout:?} waiting for {what}");
    }

    fn assert_running(&mut self, context: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("vmtrace watch exited with {status} {context}");
        }
    }

    /// Stops it with SIGINT; returns every report, the final one last.
    fn stop(mut self) -> Vec<serde_json::Value> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("waiting for vmtrace");
        assert!(status.success(), "vmtrace exited with {status}");
        while let Ok(report) = self.reports.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(report);
        }
        let last = self.seen.last().expect("at least one report");
        assert_eq!(last["last"], true, "the final report is marked last");
        std::mem::take(&mut self.seen)
    }

    /// The stderr lines that say a sample was skipped.
    fn skipped_samples(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("sample skipped"))
            .cloned()
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `vmtrace agent` with its Prometheus endpoint.
struct Daemon {
    proc: Proc,
    port: u16,
}

impl Daemon {
    /// Starts the agent (with `command` from [`vmtrace`] or [`in_namespace`], given `agent` and
    /// its flags but not `--listen`) and waits for its first metrics.
    fn start(mut command: Command) -> Self {
        let port = free_port();
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("VMTRACE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let proc = Proc::spawn("vmtrace agent", &mut command);
        let daemon = Self { proc, port };
        wait_for("the agent's first metrics", Duration::from_mins(1), || {
            daemon.metrics()
        });
        daemon
    }

    fn metrics(&self) -> Option<String> {
        match http_get(self.port, "/metrics") {
            Ok((200, body)) if body.contains("vmtrace_agent_map_entries") => Some(body),
            _ => None,
        }
    }

    fn pid(&self) -> u32 {
        self.proc.id()
    }
}

/// The value of `name{labels}` in the agent's metrics, 0 if absent.
fn value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(metrics, name, labels).unwrap_or(0.0)
}

fn dropped(metrics: &str, reason: &str) -> f64 {
    value(
        metrics,
        "vmtrace_agent_events_dropped_total",
        &[("reason", reason)],
    )
}

fn map_entries(metrics: &str, map: &str) -> f64 {
    value(metrics, "vmtrace_agent_map_entries", &[("map", map)])
}

/// Shell that unmounts every tracefs and debugfs of the (private) mount namespace it runs in,
/// deepest first.
const UNMOUNT_TRACEFS: &str = r#"for m in $(awk '$3 == "tracefs" || $3 == "debugfs" { print $2 }' /proc/self/mounts | sort -r); do
    umount -l "$m"
done"#;

/// Shell that mounts tracefs where the host has none mounted, so that the namespace has one.
const ENSURE_TRACEFS: &str = r#"if ! awk '$3 == "tracefs" { found = 1 } END { exit !found }' /proc/self/mounts; then
    mount -t tracefs nodev /sys/kernel/tracing
fi"#;

/// The tenants the agent reported in `report`, by path.
fn tenant_paths(report: &serde_json::Value) -> BTreeSet<String> {
    report["tenants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["tenant"].as_str().map(str::to_owned))
        .collect()
}

/// Runs a doorbell guest (kicks through the classic ioctl probe, exits through the raw ones)
/// and a port-write guest in `tenant`, then returns their reports.
fn doorbell_and_pio(tenant: &TenantCgroup) -> [vmtrace_vmm::Report; 2] {
    let reports = [
        run_vmm(&[
            "--scenario",
            "doorbell",
            "--count",
            "2000",
            "--cgroup",
            &tenant.relative,
        ]),
        run_vmm(&[
            "--scenario",
            "pio",
            "--count",
            "1000",
            "--cgroup",
            &tenant.relative,
        ]),
    ];
    assert!(
        expected_agent_counts(&reports).contains_key("kick.q0"),
        "{reports:?}"
    );
    reports
}

/// Waits until a report has `tenant`'s guest-side counts equal to those of `reports`, then stops
/// the agent and checks every kind of its final report too; returns the final report.
fn counts_become_exact(
    mut watch: Watch,
    tenant: &TenantCgroup,
    reports: &[vmtrace_vmm::Report],
) -> serde_json::Value {
    let path = tenant.agent_path();
    let expectation = Expectation::of_vmms(reports, HostKvm::of_this_host());
    let expected = expectation.exact();
    let mut last_seen = None;
    let found = std::iter::repeat_with(|| watch.next())
        .take(50)
        .any(|report| {
            let counts = agent_counts(&report, &path);
            let exact = counts.as_ref() == Some(expected);
            last_seen = counts;
            exact
        });
    let reports = watch.stop();
    let last = reports.last().unwrap().clone();
    assert!(
        found,
        "{path}: agent {last_seen:?} never equalled the VMM's {expected:?}"
    );
    assert_eq!(
        agent_counts(&last, &path).as_ref(),
        Some(expected),
        "final report, agent (left) vs VMM (right)"
    );
    expectation.assert_matches(&path, &all_agent_counts(&last, &path).unwrap_or_default());
    last
}

#[test]
fn tracefs_unmounted_while_the_agent_runs_leaves_the_classic_probes_counting() {
    let test = "tracefs_unmounted_while_the_agent_runs_leaves_the_classic_probes_counting";
    if !privileged_host(test)
        || !have(test, on_path("unshare"), "unshare is not installed")
        || !have(test, on_path("nsenter"), "nsenter is not installed")
    {
        return;
    }
    let _one = one_at_a_time();
    let started = Instant::now();
    let base = format!("vmtrace-test-faults-unmount-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenant = TenantCgroup::new(&format!("{base}/guest"));
    let mut watch = Watch::start(in_namespace(
        ENSURE_TRACEFS,
        &["watch", "--json", "--interval", "200ms"],
    ));
    watch.next();
    // Every tracefs of the agent's namespace goes, after the probes were attached through it.
    let pid = watch.pid().to_string();
    let unmount = Command::new("nsenter")
        .args(["-t", &pid, "-m", "sh", "-c"])
        .arg(format!("set -e\n{UNMOUNT_TRACEFS}\ncat /proc/self/mounts"))
        .output()
        .expect("nsenter");
    let mounts = String::from_utf8_lossy(&unmount.stdout);
    assert!(
        unmount.status.success(),
        "unmounting: {}",
        String::from_utf8_lossy(&unmount.stderr)
    );
    assert!(
        !mounts.lines().any(|l| l.contains(" tracefs ")),
        "tracefs still mounted in the agent's namespace:\n{mounts}"
    );
    watch.next();
    watch.assert_running("after tracefs was unmounted under it");

    // A perf event holds its tracepoint, not the filesystem: the tenant's name (cgroup_mkdir,
    // cgroup_attach_task) still comes through the classic probes.
    let reports = doorbell_and_pio(&tenant);
    let skipped = watch.skipped_samples();
    let last = counts_become_exact(watch, &tenant, &reports);
    assert!(skipped.is_empty(), "samples failed: {skipped:?}");
    assert!(
        last.get("probes_not_attached").is_none(),
        "the probes stayed attached, and the agent says so: {last}"
    );
    eprintln!(
        "{}: {test} took {:?}",
        tenant.agent_path(),
        started.elapsed()
    );
}

/// The classic tracepoint hidden in [`a_missing_tracepoint_degrades_the_agent_naming_exactly_that_probe`]:
/// the removal of cgroups, which the counts of a live tenant do not need.
const HIDDEN: &str = "cgroup:cgroup_rmdir";

/// Script: the host's tracefs with `events/cgroup/cgroup_rmdir` replaced by an empty directory,
/// as on a kernel built without that event.
fn hide_one_event(empty: &Path) -> String {
    format!(
        "{ENSURE_TRACEFS}\n\
         tracefs=$(awk '$3 == \"tracefs\" {{ print $2; exit }}' /proc/self/mounts)\n\
         mount --bind '{}' \"$tracefs/events/cgroup/cgroup_rmdir\"\n\
         test ! -e \"$tracefs/events/cgroup/cgroup_rmdir/id\"",
        empty.display()
    )
}

#[test]
fn a_missing_tracepoint_degrades_the_agent_naming_exactly_that_probe() {
    let test = "a_missing_tracepoint_degrades_the_agent_naming_exactly_that_probe";
    if !privileged_host(test) || !have(test, on_path("unshare"), "unshare is not installed") {
        return;
    }
    let _one = one_at_a_time();
    let started = Instant::now();
    let dir = TempDir::new("faults-missing-event");
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let script = hide_one_event(&empty);

    // doctor: that probe, and only it, is missing, with why.
    let doctor = doctor(in_namespace(&script, &["doctor", "--json"]));
    assert_eq!(
        doctor["probes_not_attached"],
        serde_json::json!([HIDDEN]),
        "{doctor}"
    );
    let probe = doctor["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tracepoint"] == HIDDEN)
        .unwrap_or_else(|| panic!("doctor lists no {HIDDEN}: {doctor}"));
    let why = probe["error"].as_str().unwrap_or_default().to_owned();
    assert!(!why.is_empty(), "{probe}");
    eprintln!("doctor: {HIDDEN}: {why}");

    // watch: the header's marker names it.
    let table = output(
        in_namespace(
            &script,
            &["watch", "--interval", "200ms", "--duration", "600ms"],
        ),
        "vmtrace watch",
    );
    let header = table
        .lines()
        .find(|l| l.starts_with("── vmtrace"))
        .unwrap_or_else(|| panic!("no header: {table}"));
    assert!(
        header.contains(&format!("degraded: 1 probe not attached ({HIDDEN}")),
        "{header}"
    );

    // The agent: the probe's metric is 0 with the reason, /readyz is 503 and says which.
    let daemon = Daemon::start(in_namespace(&script, &["agent", "--interval", "200ms"]));
    let metrics = daemon.metrics().expect("metrics");
    let missing: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("vmtrace_agent_probe_attached{") && l.ends_with("} 0"))
        .collect();
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].contains(&format!("probe=\"{HIDDEN}\"")) && missing[0].contains("reason=\""),
        "{}",
        missing[0]
    );
    let (status, body) = http_get(daemon.port, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("degraded: 1 probe not attached") && body.contains(HIDDEN),
        "{body}"
    );
    drop(daemon);

    // The rest counts exactly.
    let base = format!("vmtrace-test-faults-missing-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenant = TenantCgroup::new(&format!("{base}/guest"));
    let watch = Watch::start(in_namespace(
        &script,
        &["watch", "--json", "--interval", "200ms"],
    ));
    let reports = doorbell_and_pio(&tenant);
    let last = counts_become_exact(watch, &tenant, &reports);
    let failures = last["probes_not_attached"].as_array().cloned();
    assert_eq!(
        failures.map(|f| f.iter().map(|p| p["probe"].clone()).collect::<Vec<_>>()),
        Some(vec![serde_json::json!(HIDDEN)]),
        "{last}"
    );
    eprintln!("{test} took {:?}", started.elapsed());
}

#[test]
fn unreadable_btf_leaves_raw_probes_attached_unchecked_and_counts_exact() {
    let test = "unreadable_btf_leaves_raw_probes_attached_unchecked_and_counts_exact";
    if !privileged_host(test)
        || !have(test, on_path("unshare"), "unshare is not installed")
        || !have(
            test,
            Path::new("/sys/kernel/btf/vmlinux").exists(),
            "no /sys/kernel/btf/vmlinux to hide",
        )
    {
        return;
    }
    let _one = one_at_a_time();
    let started = Instant::now();
    let dir = TempDir::new("faults-btf");
    let garbage = dir.join("vmlinux");
    std::fs::write(&garbage, b"this is not BTF\n").unwrap();
    let script = format!(
        "{ENSURE_TRACEFS}\nmount --bind '{}' /sys/kernel/btf/vmlinux",
        garbage.display()
    );

    let doctor = doctor(in_namespace(&script, &["doctor", "--json"]));
    let btf = doctor["btf_arguments"].as_str().unwrap_or_default();
    assert!(btf.contains("BTF"), "doctor says nothing of BTF: {doctor}");
    eprintln!("doctor: btf_arguments: {btf}");
    assert_eq!(
        doctor["probes_not_attached"],
        serde_json::json!([]),
        "{doctor}"
    );
    let raw: Vec<&serde_json::Value> = doctor["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["attach_type"] == "raw_tracepoint" && p["error"].is_null())
        .collect();
    assert!(!raw.is_empty(), "{doctor}");
    for probe in &raw {
        assert!(
            probe["btf_args"]["unchecked"].is_string(),
            "{}: arguments not marked unchecked: {probe}",
            probe["tracepoint"]
        );
    }

    let base = format!("vmtrace-test-faults-btf-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenant = TenantCgroup::new(&format!("{base}/guest"));
    let watch = Watch::start(in_namespace(
        &script,
        &["watch", "--json", "--interval", "200ms"],
    ));
    let reports = doorbell_and_pio(&tenant);
    counts_become_exact(watch, &tenant, &reports);
    eprintln!(
        "{} raw probes attached unchecked; {test} took {:?}",
        raw.len(),
        started.elapsed()
    );
}

/// The raw `bpf(2)` calls the tests use to look at the kernel's programs and maps by id.
mod bpf {
    use super::*;

    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

    /// `union bpf_attr`, zeroed: larger than any of the commands' parts used here.
    type Attr = [u64; 16];

    fn call(cmd: libc::c_long, attr: &mut Attr) -> libc::c_long {
        // SAFETY: `attr` is a zeroed bpf_attr of the size passed; the kernel reads and writes
        // only within it and the buffers its fields point at, which outlive the call.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<Attr>()) }
    }

    fn fd_by_id(cmd: libc::c_long, id: u32) -> Option<OwnedFd> {
        let mut attr: Attr = [0; 16];
        attr[0] = u64::from(id);
        let fd = call(cmd, &mut attr);
        // SAFETY: a new descriptor the kernel just returned, owned by nothing else.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// The programs, maps and links whose ids `pid` holds descriptors of.
    #[derive(Debug, Default)]
    pub struct Held {
        pub programs: BTreeSet<u32>,
        pub maps: BTreeSet<u32>,
        pub links: BTreeSet<u32>,
    }

    pub fn held_by(pid: u32) -> Held {
        let mut held = Held::default();
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
            let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
                continue;
            };
            for line in info.lines() {
                let Some((key, value)) = line.split_once(':') else {
                    continue;
                };
                let Ok(id) = value.trim().parse::<u32>() else {
                    continue;
                };
                match key {
                    "prog_id" => held.programs.insert(id),
                    "map_id" => held.maps.insert(id),
                    "link_id" => held.links.insert(id),
                    _ => false,
                };
            }
        }
        held
    }

    /// Those of `held` the kernel still has.
    pub fn still_loaded(held: &Held) -> Vec<String> {
        let kinds = [
            ("program", BPF_PROG_GET_FD_BY_ID, &held.programs),
            ("map", BPF_MAP_GET_FD_BY_ID, &held.maps),
            ("link", BPF_LINK_GET_FD_BY_ID, &held.links),
        ];
        kinds
            .iter()
            .flat_map(|(kind, cmd, ids)| {
                ids.iter()
                    .filter(|&&id| fd_by_id(*cmd, id).is_some())
                    .map(move |id| format!("{kind} {id}"))
            })
            .collect()
    }

    /// The name of the map `fd`.
    fn map_name(fd: &OwnedFd) -> String {
        // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name[16].
        let mut info = [0u8; 128];
        let mut attr: Attr = [0; 16];
        attr[0] = fd.as_raw_fd() as u64 | ((info.len() as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        assert_eq!(
            call(BPF_OBJ_GET_INFO_BY_FD, &mut attr),
            0,
            "BPF_OBJ_GET_INFO_BY_FD: {}",
            std::io::Error::last_os_error()
        );
        let name = &info[24..40];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(&name[..end]).into_owned()
    }

    /// The map named `name` among those `pid` holds (names are cut to 15 bytes by the kernel).
    pub fn map_of(pid: u32, name: &str) -> OwnedFd {
        let short = &name[..name.len().min(15)];
        held_by(pid)
            .maps
            .iter()
            .filter_map(|&id| fd_by_id(BPF_MAP_GET_FD_BY_ID, id))
            .find(|fd| map_name(fd) == short)
            .unwrap_or_else(|| panic!("process {pid} holds no map {name}"))
    }

    /// The keys of the map `fd`, whose keys are `K`.
    pub fn keys<K: Copy>(fd: &OwnedFd) -> Vec<K> {
        let mut keys = Vec::new();
        let mut next = std::mem::MaybeUninit::<K>::zeroed();
        let mut previous: Option<K> = None;
        loop {
            let mut attr: Attr = [0; 16];
            attr[0] = fd.as_raw_fd() as u64;
            attr[1] = previous
                .as_ref()
                .map_or(0, |k| std::ptr::from_ref(k) as u64);
            attr[2] = next.as_mut_ptr() as u64;
            if call(BPF_MAP_GET_NEXT_KEY, &mut attr) != 0 {
                return keys;
            }
            // SAFETY: the kernel wrote a whole key (the map's key size is K's) into `next`.
            let key = unsafe { next.assume_init() };
            keys.push(key);
            previous = Some(key);
        }
    }
}

#[test]
fn a_vmm_killed_mid_run_keeps_its_counts_and_leaves_no_doorbell() {
    let test = "a_vmm_killed_mid_run_keeps_its_counts_and_leaves_no_doorbell";
    if !privileged_host(test) {
        return;
    }
    let _one = one_at_a_time();
    let started = Instant::now();
    let base = format!("vmtrace-test-faults-kill-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let killed = TenantCgroup::new(&format!("{base}/killed"));
    let survivor = TenantCgroup::new(&format!("{base}/survivor"));
    // Doorbells learnt from their registration, so that the killed VMM's can be seen to go.
    let mut watch = Watch::start(vmtrace(&[
        "watch",
        "--json",
        "--vm-ioctls",
        "--interval",
        "200ms",
    ]));

    // A doorbell guest far from done...
    let mut vmm = Proc::spawn(
        "vmtrace-vmm (to be killed)",
        Command::new(binary("vmtrace-vmm"))
            .args(["--scenario", "doorbell", "--count", &PLANNED.to_string()])
            .args(["--cgroup", &killed.relative, "--quiet"])
            .stdout(Stdio::null()),
    );
    let vmm_pid = vmm.id();
    let path = killed.agent_path();
    let kicks = |report: &serde_json::Value| {
        agent_counts(report, &path).and_then(|c| c.get("kick.any").copied())
    };
    watch.until("the guest's first kicks", Duration::from_mins(1), |r| {
        kicks(r).filter(|&k| k > 1000)
    });
    let doorbells = bpf::map_of(watch.pid(), vmtrace_common::DOORBELLS_MAP);
    let registered = |pid: u32| {
        bpf::keys::<DoorbellKey>(&doorbells)
            .iter()
            .filter(|k| k.tgid == pid)
            .count()
    };
    assert!(registered(vmm_pid) > 0, "the VMM's doorbell was not learnt");
    // ... killed mid-run.
    vmm.child.kill().expect("SIGKILL");
    let status = vmm.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    // Its doorbell goes with it: the agent removes what the VMM never deassigned.
    wait_for(
        "the killed VMM's doorbells to be removed",
        Duration::from_secs(30),
        || (registered(vmm_pid) == 0).then_some(()),
    );

    // Another tenant's guest, run to completion meanwhile, is counted exactly.
    let report = run_vmm(&[
        "--scenario",
        "doorbell",
        "--count",
        "3000",
        "--cgroup",
        &survivor.relative,
    ]);
    let expected = expected_agent_counts_learnt(std::slice::from_ref(&report));
    let survivor_path = survivor.agent_path();
    watch.until("the survivor's exact counts", Duration::from_mins(1), |r| {
        (agent_counts(r, &survivor_path).as_ref() == Some(&expected)).then_some(())
    });
    watch.next();
    watch.assert_running("after a VMM was killed");
    let skipped = watch.skipped_samples();
    let reports = watch.stop();
    assert!(skipped.is_empty(), "samples failed: {skipped:?}");

    // The killed tenant's counts never went down, and stayed once it was gone.
    let mut previous: BTreeMap<String, u64> = BTreeMap::new();
    for report in &reports {
        let Some(counts) = agent_counts(report, &path) else {
            assert!(
                previous.is_empty(),
                "{path} vanished from a report: {report}"
            );
            continue;
        };
        for (kind, &before) in &previous {
            let now = counts.get(kind).copied().unwrap_or(0);
            assert!(now >= before, "{path} {kind} went from {before} to {now}");
        }
        previous = counts;
    }
    let last = reports.last().unwrap();
    let final_kicks = kicks(last).expect("the killed tenant in the final report");
    assert!(
        (1000..PLANNED).contains(&final_kicks),
        "{final_kicks} kicks of {PLANNED} planned"
    );
    assert_eq!(
        agent_counts(last, &survivor_path).as_ref(),
        Some(&expected),
        "survivor: agent (left) vs VMM (right)"
    );
    Expectation::of_vmms(std::slice::from_ref(&report), HostKvm::of_this_host())
        .with_learnt_doorbells(std::slice::from_ref(&report))
        .assert_matches(
            &survivor_path,
            &all_agent_counts(last, &survivor_path).unwrap_or_default(),
        );
    eprintln!(
        "killed after {final_kicks} of {PLANNED} kicks ({previous:?}); survivor exact; \
         {test} took {:?}",
        started.elapsed()
    );
}

#[test]
fn sigterm_detaches_every_program_and_frees_every_map_within_a_second() {
    let test = "sigterm_detaches_every_program_and_frees_every_map_within_a_second";
    if !privileged_host(test) {
        return;
    }
    let _one = one_at_a_time();
    let started = Instant::now();
    let mut daemon = Daemon::start(vmtrace(&["agent", "--interval", "200ms"]));
    let held = bpf::held_by(daemon.pid());
    assert!(
        held.programs.len() > 10 && held.maps.len() > 10,
        "the agent holds too few programs or maps: {held:?}"
    );
    assert!(bpf::still_loaded(&held).len() >= held.programs.len() + held.maps.len());

    let signalled = Instant::now();
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGTERM) };
    let status = daemon.proc.child.wait().expect("waiting for the agent");
    let exited = signalled.elapsed();
    let mut left = bpf::still_loaded(&held);
    while !left.is_empty() && signalled.elapsed() < Duration::from_secs(1) {
        thread::sleep(Duration::from_millis(5));
        left = bpf::still_loaded(&held);
    }
    let gone = signalled.elapsed();
    assert!(status.success(), "the agent exited with {status}");
    assert!(
        left.is_empty(),
        "1 s after SIGTERM the kernel still has {left:?}"
    );
    assert!(gone <= Duration::from_secs(1), "took {gone:?}");
    eprintln!(
        "SIGTERM: exited after {exited:?}, {} programs, {} maps and {} links gone after \
         {gone:?}; {test} took {:?}",
        held.programs.len(),
        held.maps.len(),
        held.links.len(),
        started.elapsed()
    );
}

/// Kicks the killed VMM's guest would make if it ran to the end (about a minute here).
const PLANNED: u64 = 20_000_000;
/// Doorbells registered beyond the doorbell map's capacity.
const OVER: u64 = 500;
/// `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
/// `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`.
const KVM_IOEVENTFD: libc::c_ulong = 0x4040_AE79;

/// `struct kvm_ioeventfd` of <linux/kvm.h>.
#[repr(C)]
struct KvmIoeventfd {
    datamatch: u64,
    addr: u64,
    len: u32,
    fd: i32,
    flags: u32,
    pad: [u8; 36],
}
const _: () = assert!(size_of::<KvmIoeventfd>() == 64);

/// Environment variable that makes [`doorbell_filler`] run: how many doorbells to register.
const FILL_DOORBELLS: &str = "VMTRACE_FAULTS_FILL_DOORBELLS";

/// Not a test: a process of its own (started by
/// [`a_full_doorbell_map_counts_every_doorbell_it_refuses`]) that registers the given number of
/// real doorbells, each at its own MMIO address of one VM, says `ready` and waits for its stdin
/// to close, as a VMM with that many virtqueues would.
#[test]
#[ignore = "a helper process, started by a_full_doorbell_map_counts_every_doorbell_it_refuses"]
fn doorbell_filler() {
    let Some(count) = std::env::var(FILL_DOORBELLS)
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    else {
        return;
    };
    let kvm = std::fs::File::open("/dev/kvm").expect("/dev/kvm");
    // SAFETY: KVM_CREATE_VM takes the machine type (0) by value; the result is checked.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    assert!(
        vm >= 0,
        "KVM_CREATE_VM: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
    let eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(eventfd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    for i in 0..count {
        let request = KvmIoeventfd {
            datamatch: 0,
            addr: 0x1_0000_0000 + 8 * i,
            len: 4,
            fd: eventfd,
            flags: 0,
            pad: [0; 36],
        };
        // SAFETY: the VM fd is live and `request` is a complete kvm_ioeventfd the kernel only
        // reads; the result is checked.
        let ret = unsafe { libc::ioctl(vm, KVM_IOEVENTFD, &raw const request) };
        assert_eq!(
            ret,
            0,
            "KVM_IOEVENTFD {i}: {}",
            std::io::Error::last_os_error()
        );
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn a_full_doorbell_map_counts_every_doorbell_it_refuses() {
    let test = "a_full_doorbell_map_counts_every_doorbell_it_refuses";
    if !privileged_host(test) {
        return;
    }
    let _one = one_at_a_time();
    let started = Instant::now();
    let daemon = Daemon::start(vmtrace(&["agent", "--vm-ioctls", "--interval", "200ms"]));
    let before = daemon.metrics().unwrap();
    let capacity = value(
        &before,
        "vmtrace_agent_map_capacity",
        &[("map", "DOORBELLS")],
    );
    assert_eq!(capacity, f64::from(DOORBELLS_CAPACITY), "{before}");
    let refused_before = dropped(&before, "doorbells_full");

    let count = u64::from(DOORBELLS_CAPACITY) + OVER;
    let mut filler = Proc::spawn(
        "doorbell filler",
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "doorbell_filler", "--ignored", "--nocapture"])
            .env(FILL_DOORBELLS, count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let registering = Instant::now();
    let mut out = BufReader::new(filler.child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("ready") {
        line.clear();
        let n = out.read_line(&mut line).expect("the filler's output");
        assert!(n > 0, "the doorbell filler ended before it was ready");
    }
    let registered_in = registering.elapsed();
    let full = wait_for(
        "the doorbell map to fill and the refusals to be counted",
        Duration::from_mins(1),
        || {
            let m = daemon.metrics()?;
            (map_entries(&m, "DOORBELLS") >= capacity
                && dropped(&m, "doorbells_full") - refused_before >= OVER as f64)
                .then_some(m)
        },
    );
    let refused = dropped(&full, "doorbells_full") - refused_before;
    let kicks_full = dropped(&full, "kicks_full");
    let fills: Vec<String> = full
        .lines()
        .filter(|l| l.starts_with("vmtrace_agent_map_"))
        .map(str::to_owned)
        .collect();
    // Every map the agent reads has both gauges.
    for map in [
        "EXIT_COUNTS",
        "EXIT_LATENCY",
        "DOORBELLS",
        "KICKS",
        "DOORBELL_ADDRS",
        "REMOVED_DOORBELLS",
        "VMM_PROCESSES",
        "IOMMU_FAULTS",
    ] {
        for gauge in ["vmtrace_agent_map_entries", "vmtrace_agent_map_capacity"] {
            assert!(
                sample(&full, gauge, &[("map", map)]).is_some(),
                "no {gauge} for {map}: {fills:?}"
            );
        }
    }
    assert_eq!(map_entries(&full, "DOORBELLS"), capacity);

    // The VMM goes: its doorbells leave every map.
    drop(filler.child.stdin.take());
    filler.child.wait().unwrap();
    let doorbell_maps = ["DOORBELLS", "KICKS", "DOORBELL_ADDRS", "REMOVED_DOORBELLS"];
    let emptied = wait_for(
        "the filler's doorbells to leave the maps",
        Duration::from_mins(1),
        || {
            let m = daemon.metrics()?;
            // Other VMMs of the host may hold a few doorbells of their own meanwhile.
            doorbell_maps
                .iter()
                .all(|map| map_entries(&m, map) < 100.0)
                .then_some(m)
        },
    );
    eprintln!(
        "{count} doorbells registered in {registered_in:?}; DOORBELLS {capacity} of {capacity}, \
         {refused} refused and counted as doorbells_full (kicks_full {kicks_full}); after the VMM went: {:?}; {test} \
         took {:?}",
        doorbell_maps.map(|m| map_entries(&emptied, m)),
        started.elapsed()
    );
    eprintln!("{}", fills.join("\n"));
}

#[test]
fn a_cgroup_event_ring_overrun_is_counted_and_tenants_are_still_named() {
    let test = "a_cgroup_event_ring_overrun_is_counted_and_tenants_are_still_named";
    if !privileged_host(test) {
        return;
    }
    let _one = one_at_a_time();
    let started = Instant::now();
    let base = format!("vmtrace-test-faults-ring-{}", std::process::id());
    let base_cgroup = TenantCgroup::new(&base);
    let tenant = TenantCgroup::new(&format!("{base}/named-after-the-overrun"));
    std::fs::remove_dir(&tenant.path).unwrap();
    // The ring is read once a sample: a long interval lets a burst overrun it.
    let mut watch = Watch::start(vmtrace(&["watch", "--json", "--interval", "3s"]));
    let first = watch.next();
    let lost_before = first["drops"]["cgroup_events_full"].as_u64().unwrap_or(0);

    // Right after a sample: 1500 cgroups made and removed (3000 events; the ring holds about
    // 900), then the tenant's cgroup and its guest, whose own events find the ring full.
    let burst = Instant::now();
    for i in 0..1500 {
        let dir = base_cgroup.path.join(format!("burst-{i}"));
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::remove_dir(&dir).expect("rmdir");
    }
    let report = run_vmm(&[
        "--scenario",
        "pio",
        "--count",
        "2000",
        "--cgroup",
        &tenant.relative,
    ]);
    let burst_took = burst.elapsed();
    let tenant_id = report.cgroup.as_ref().expect("the guest's cgroup").id;
    let expected = expected_agent_counts(std::slice::from_ref(&report));
    let path = tenant.agent_path();
    let (lost, named_in) = watch.until(
        "the tenant's counts under its name",
        Duration::from_secs(30),
        |r| {
            let counts = agent_counts(r, &path)?;
            let lost = r["drops"]["cgroup_events_full"].as_u64()? - lost_before;
            (counts == expected).then(|| (lost, tenant_paths(r)))
        },
    );
    let reports = watch.stop();
    assert!(
        lost > 0,
        "no cgroup_events_full counted after {burst_took:?}"
    );
    assert!(named_in.contains(&path), "{named_in:?}");
    // None of this test's tenants is reported by a bare cgroup id (`cgroup-id/N`, the agent's
    // name for a cgroup it could not find).
    let last = reports.last().unwrap();
    let unnamed: Vec<String> = tenant_paths(last)
        .into_iter()
        .filter(|name| name.starts_with("cgroup-id/"))
        .collect();
    let ours = |id: &str| {
        id.strip_prefix("cgroup-id/")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n == tenant_id)
    };
    assert!(!unnamed.iter().any(|n| ours(n)), "{unnamed:?}");
    Expectation::of_vmms(std::slice::from_ref(&report), HostKvm::of_this_host())
        .assert_matches(&path, &all_agent_counts(last, &path).unwrap_or_default());
    vmtrace_tests::expect::assert_only_tenants(
        last,
        &format!("/{base}"),
        std::slice::from_ref(&path),
    );
    eprintln!(
        "burst and guest in {burst_took:?}: {lost} cgroup events lost, counted; {path} named \
         and exact; {test} took {:?}",
        started.elapsed()
    );
}
