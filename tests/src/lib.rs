//! Helpers for the end-to-end tests: the binaries under test, tenant cgroups, a running agent, and
//! what the agent should report for a set of reference-VMM runs; in the modules, the harnesses
//! (a real Prometheus, a pod as the DaemonSet runs it, deploy/'s manifests, an OTLP receiver) and
//! the clean-up and waiting every test shares.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{OnceLock, mpsc},
    time::Duration,
};

use vmtrace_common::mounts::MountTable;
use vmtrace_vmm::{Report, Scenario};

pub mod container;
pub mod dashboards;
pub mod doorbell;
pub mod expect;
pub mod manifests;
pub mod otlp_receiver;
pub mod pod;
pub mod process;
pub mod prometheus;
pub mod svm_host;
pub mod temp;
pub mod wait;

/// Set to 1 on machines that have every capability (CI): a test that would skip fails instead.
pub const REQUIRE_CAPS: &str = "VMTRACE_REQUIRE_CAPS";

/// Whether this machine can run tests that need root, /dev/kvm, BPF and cgroup v2. When it cannot,
/// says so and returns false, or panics when [`REQUIRE_CAPS`] is set.
pub fn privileged_host(test: &str) -> bool {
    let missing = missing_capability();
    let Some(missing) = missing else { return true };
    assert!(
        !std::env::var(REQUIRE_CAPS).is_ok_and(|v| v == "1"),
        "{test}: {missing}, and {REQUIRE_CAPS}=1 requires every capability"
    );
    eprintln!("SKIP: {test}: {missing}");
    false
}

/// Whether `ok`, the check that a test's tool or server (`what`) is here, passed. When it did
/// not, says so and returns false, or panics when [`REQUIRE_CAPS`] is set.
pub fn have(test: &str, ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    assert!(
        !std::env::var(REQUIRE_CAPS).is_ok_and(|v| v == "1"),
        "{test}: {what}"
    );
    eprintln!("SKIP: {test}: {what}");
    false
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn missing_capability() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (loading BPF programs and moving into cgroups need it)".to_owned());
    }
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm unavailable ({e})"));
    }
    if cgroup2_root().is_none() {
        return Some("no cgroup v2 hierarchy mounted".to_owned());
    }
    None
}

/// The cgroup v2 mount point.
pub fn cgroup2_root() -> Option<PathBuf> {
    let table = MountTable::read().ok()?;
    table.cgroup2().map(|mount| mount.mount_point.clone())
}

/// Path of a workspace binary (`vmtrace`, `vmtrace-vmm`), built first so that it is current.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // The test executable lives in target/<profile>/deps; the binaries one level up.
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_owned();
        let release = dir.file_name().is_some_and(|n| n == "release");
        // Not `--workspace --all-targets`, which would match `cargo test --workspace`'s features:
        // the eBPF crate's host build has a `vmtrace` binary too, which would overwrite the agent's.
        let mut build = workspace_cargo();
        build.args(["build", "-p", "vmtrace", "-p", "vmtrace-vmm"]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "building vmtrace and vmtrace-vmm failed");
        dir
    });
    dir.join(name)
}

/// The cargo that runs these tests, without the variables it set for this test process
/// (`CARGO_MANIFEST_DIR`, ...), which would make build scripts rerun.
pub fn workspace_cargo() -> Command {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    vmtrace_ebpf_toolchain::package_variables::remove(&mut cargo);
    cargo
}

/// A cgroup v2 directory for one test tenant, removed (with its children) on drop.
pub struct TenantCgroup {
    /// Path relative to the cgroup v2 root, without a leading slash, as `vmtrace-vmm --cgroup` takes it.
    pub relative: String,
    pub path: PathBuf,
}

impl TenantCgroup {
    pub fn new(relative: &str) -> Self {
        let path = cgroup2_root().expect("cgroup v2").join(relative);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self {
            relative: relative.to_owned(),
            path,
        }
    }

    /// The path the agent reports: relative to the cgroup v2 root, with a leading slash.
    pub fn agent_path(&self) -> String {
        format!("/{}", self.relative)
    }
}

impl Drop for TenantCgroup {
    fn drop(&mut self) {
        // The VMMs in it have exited by now; a cgroup can be removed once it has no tasks, and
        // after its children (such as the parents `new` made for a nested path).
        remove_cgroup_tree(&self.path);
        // On hybrid hosts `vmtrace-vmm --cgroup` also created the same path in the cgroup v1
        // memory hierarchy.
        if let Ok(Some(memory)) = vmtrace_vmm::cgroup::find_memory_v1_mount() {
            remove_cgroup_tree(&memory.mount_point.join(&self.relative));
        }
    }
}

/// Removes the cgroup at `path` and every cgroup below it, deepest first; a cgroup directory holds
/// only the kernel's files besides its children, and goes with `rmdir`.
fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

/// Runs a reference VMM to completion and returns its ground-truth report.
pub fn run_vmm(args: &[&str]) -> Report {
    let output = Command::new(binary("vmtrace-vmm"))
        .args(args)
        .arg("--quiet")
        .output()
        .expect("running vmtrace-vmm");
    assert!(
        output.status.success(),
        "vmtrace-vmm {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("vmtrace-vmm report")
}

/// A running `vmtrace watch --json`, stopped with SIGINT by [`Agent::stop`].
pub struct Agent {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Agent {
    /// Starts the agent and waits until its probes are attached.
    pub fn start(extra_args: &[&str]) -> Self {
        let mut child = Command::new(binary("vmtrace"))
            .args(["watch", "--json"])
            .args(if extra_args.contains(&"--interval") {
                &[][..]
            } else {
                &["--interval", "200ms"][..]
            })
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting vmtrace");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[vmtrace] {line}");
                let _ = tx.send(line);
            }
        });
        let mut agent = Self { child, stderr: rx };
        loop {
            match agent.stderr.recv_timeout(Duration::from_mins(1)) {
                Ok(line) if line.starts_with("vmtrace: watching") => return agent,
                Ok(_) => {}
                Err(e) => {
                    let _ = agent.child.kill();
                    panic!("vmtrace did not start watching ({e}); its stderr is above");
                }
            }
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's resident memory, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the agent's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// Stops the agent with SIGINT and returns its JSON reports, the final one last.
    pub fn stop(mut self) -> Vec<serde_json::Value> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout)
            .expect("reading vmtrace's output");
        let status = self.child.wait().expect("waiting for vmtrace");
        assert!(status.success(), "vmtrace exited with {status}");
        let reports: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        let last = reports.last().expect("at least one report");
        assert_eq!(last["last"], true, "the final report is marked last");
        reports
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The counts the agent must report, with its default probes, for a tenant whose guests produced
/// `reports`, by kind, derived from the VMM's ground truth: the exits it saw, the guests' own
/// operation counters and the doorbell eventfd. The doorbells are not learnt: a doorbell without
/// datamatch has its kicks inferred as kicks of the queue whose index the guest writes (0).
pub fn expected_agent_counts(reports: &[Report]) -> BTreeMap<String, u64> {
    expected_counts(reports, Doorbells::Inferred)
}

/// [`expected_agent_counts`] for an agent that learns doorbells from their registration
/// (`--vm-ioctls`, or `--kick-latency`, which implies it): a doorbell without datamatch has its
/// kicks counted as `kick.any`.
pub fn expected_agent_counts_learnt(reports: &[Report]) -> BTreeMap<String, u64> {
    expected_counts(reports, Doorbells::Learnt)
}

/// How the agent knows the VMMs' doorbells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doorbells {
    /// Default probes: kicks are inferred from the writes the kernel completes.
    Inferred,
    /// `--vm-ioctls`: doorbells are learnt from `KVM_IOEVENTFD`.
    Learnt,
}

fn expected_counts(reports: &[Report], doorbells: Doorbells) -> BTreeMap<String, u64> {
    let mut expected = BTreeMap::new();
    let mut add = |kind: &str, n: u64| {
        if n > 0 {
            *expected.entry(kind.to_owned()).or_insert(0) += n;
        }
    };
    for report in reports {
        for (reason, &n) in &report.total.exits {
            // KVM_RUN returned EINTR: an error, not an exit.
            if reason == "intr" {
                add("run_error.eintr", n);
            } else {
                add(&format!("exit.{reason}"), n);
            }
        }
        // Every port access of these guests exits to the VMM; all are OUTs (DONE, PACE, ...) but
        // the pio-in guest's operations.
        let port_exits = report.total.exits.get("io").copied().unwrap_or(0);
        let port_reads = if report.scenario == Scenario::PioIn {
            report.total.guest_ops
        } else {
            0
        };
        add("pio.in", port_reads);
        add("pio.out", port_exits - port_reads);
        match report.scenario {
            Scenario::Mmio | Scenario::MmioSweep => add("mmio.write", report.total.guest_ops),
            Scenario::Doorbell => {
                let signals = report.doorbell_signals.expect("doorbell signals");
                add("mmio.write", signals);
                add("mmio.write.kernel", signals);
                // The doorbell has no datamatch: learnt, its kicks are of no particular queue;
                // inferred, of the queue index written, which is the guest's AL, 0.
                match doorbells {
                    Doorbells::Learnt => add("kick.any", signals),
                    Doorbells::Inferred => add("kick.q0", signals),
                }
            }
            Scenario::Cpuid => add("cpuid", report.total.guest_ops),
            Scenario::Virtio => {
                let virtio = report.virtio.as_ref().expect("virtio report");
                let kicks: u64 = virtio.queues.iter().map(|q| q.kicks).sum();
                for queue in &virtio.queues {
                    add(&format!("kick.q{}", queue.index), queue.kicks);
                }
                // QueueNotify writes complete in the kernel. The driver's other device accesses are
                // its probe reads of the registers (the VMM initialises the device itself): each
                // exits to the VMM, logged once before the exit and once when it completes.
                let reads = report.total.exits.get("mmio").copied().unwrap_or(0);
                add("mmio.write.kernel", kicks);
                add("mmio.write", kicks);
                add("mmio.read_unsatisfied", reads);
                add("mmio.read", reads);
            }
            // Writes to guest RAM are not MMIO: their only exits are the port writes above.
            Scenario::Pio
            | Scenario::PioIn
            | Scenario::Hlt
            | Scenario::Signal
            | Scenario::Touch
            | Scenario::Balloon => {}
        }
    }
    expected
}

/// The agent's report of the tenant at `path` in one `watch --json` line.
pub fn agent_report<'a>(
    report: &'a serde_json::Value,
    path: &str,
) -> Option<&'a serde_json::Value> {
    report["tenants"]
        .as_array()?
        .iter()
        .find(|t| t["tenant"] == path)
}

/// The counts the agent reported for the tenant at `path` in `report`, by kind: everything it
/// reported, host-side kinds included.
pub fn all_agent_counts(report: &serde_json::Value, path: &str) -> Option<BTreeMap<String, u64>> {
    serde_json::from_value(agent_report(report, path)?["counts"].clone()).ok()
}

/// The guest-side counts the agent reported for the tenant at `path` in `report`, by kind: those
/// of the families [`expect::GUEST_SIDE_FAMILIES`] names, which [`expected_agent_counts`] derives
/// exactly from the VMM's ground truth. [`expect::Expectation`] checks the others.
pub fn agent_counts(report: &serde_json::Value, path: &str) -> Option<BTreeMap<String, u64>> {
    let mut counts = all_agent_counts(report, path)?;
    counts.retain(|kind, _| expect::is_guest_side(kind));
    Some(counts)
}

/// Whether this host lets a thread count its own dTLB load misses, asked of the kernel directly
/// (`perf_event_open` of PERF_TYPE_HW_CACHE, DTLB | OP_READ << 8 | RESULT_MISS << 16).
pub fn dtlb_counters() -> Result<(), std::io::Error> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&3u32.to_ne_bytes()); // PERF_TYPE_HW_CACHE
    attr[4..8].copy_from_slice(&128u32.to_ne_bytes()); // size
    attr[8..16].copy_from_slice(&0x1_0003u64.to_ne_bytes()); // config
    attr[40] = 0b0110_0001; // disabled, exclude_kernel, exclude_hv
    // SAFETY: attr is a zero-extended perf_event_attr of the size it declares.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by perf_event_open and is owned here.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// A GET over HTTP/1.0 to a loopback port (no chunked encoding; the server closes): status and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get_from(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// [`http_get`] from any address.
pub fn http_get_from(address: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// A free loopback port (bound and released, so nothing listens on it yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
