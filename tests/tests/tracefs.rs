//! tracefs where the host's tree does not have it, in a private mount namespace of the agent's own:
//! mounted at another path only (the classic probes still attach, through the place the agent found,
//! and kicks are counted exactly), and not mounted at all with no right to mount it (every output
//! says the agent is degraded).

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use vmtrace_tests::{
    TenantCgroup, agent_counts, binary, expect, expected_agent_counts, free_port, have, http_get,
    on_path, privileged_host, process::Proc, run_vmm, temp::TempDir, wait::wait_for,
};

/// Shell that unmounts every tracefs and debugfs of the (private) mount namespace it runs in, deepest
/// first, and checks that the places aya 0.14 looks at are empty.
const UNMOUNT_TRACEFS: &str = r#"
set -e
for m in $(awk '$3 == "tracefs" || $3 == "debugfs" { print $2 }' /proc/self/mounts | sort -r); do
    umount -l "$m"
done
for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do
    if [ -d "$d" ] && [ -n "$(ls -A "$d")" ]; then echo "$d is not empty" >&2; exit 3; fi
done
"#;

/// The classic tracepoints the probe table requires, written out here: with no tracefs, exactly
/// these cannot attach on this host (kvm_exit is silent on PVM, io_page_fault without an IOMMU,
/// sys_enter_ioctl and sys_enter_read optional and off).
const REQUIRED_CLASSIC: [&str; 3] = [
    "cgroup:cgroup_mkdir",
    "cgroup:cgroup_rmdir",
    "cgroup:cgroup_attach_task",
];

/// `vmtrace ARGS` in a private mount namespace prepared by `script` (run by `sh` before the agent).
fn in_namespace(script: &str, args: &[&str]) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("{script}\nexec \"$@\""))
        .arg("sh")
        .arg(binary("vmtrace"))
        .args(args);
    command
}

/// Script: tracefs unmounted everywhere, then mounted at `dir` only.
fn relocated(dir: &Path) -> String {
    format!(
        "{UNMOUNT_TRACEFS}\nmkdir -p '{0}'\nmount -t tracefs nodev '{0}'",
        dir.display()
    )
}

/// Script: tracefs unmounted everywhere, and the agent run without CAP_SYS_ADMIN, so that it
/// cannot mount it.
fn no_tracefs_and_no_right_to_mount() -> String {
    format!(
        "{UNMOUNT_TRACEFS}\nset -- setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin \"$@\""
    )
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

fn doctor(script: &str) -> serde_json::Value {
    let text = output(
        in_namespace(script, &["doctor", "--json"]),
        "vmtrace doctor",
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("doctor --json: {e}: {text}"))
}

fn probe_error<'a>(doctor: &'a serde_json::Value, tracepoint: &str) -> &'a serde_json::Value {
    let probe = doctor["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tracepoint"] == tracepoint)
        .unwrap_or_else(|| panic!("doctor lists no {tracepoint}: {doctor}"));
    &probe["error"]
}

/// `vmtrace watch --json` in a namespace, stopped with SIGINT.
struct Watch {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Watch {
    fn start(script: &str) -> Self {
        let mut child = in_namespace(script, &["watch", "--json", "--interval", "200ms"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting vmtrace watch");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[vmtrace] {line}");
                let _ = tx.send(line);
            }
        });
        let watch = Self { child, stderr: rx };
        loop {
            match watch.stderr.recv_timeout(Duration::from_mins(1)) {
                Ok(line) if line.starts_with("vmtrace: watching") => return watch,
                Ok(_) => {}
                Err(e) => panic!("vmtrace did not start watching ({e}); its stderr is above"),
            }
        }
    }

    /// Stops it and returns its last JSON line.
    fn stop(mut self) -> serde_json::Value {
        // `unshare` and `sh` exec the agent: the child's pid is the agent's.
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
        let last = stdout.lines().last().expect("at least one report");
        serde_json::from_str(last).expect("a JSON report")
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn classic_probes_attach_through_a_tracefs_mounted_elsewhere_and_kicks_are_exact() {
    let test = "classic_probes_attach_through_a_tracefs_mounted_elsewhere_and_kicks_are_exact";
    if !privileged_host(test) || !have(test, on_path("unshare"), "unshare is not installed") {
        return;
    }
    let dir = TempDir::new("tracefs-elsewhere");
    let mount = dir.join("tracing");
    let script = relocated(&mount);

    let doctor = doctor(&script);
    let tracefs = doctor["tracefs"]["Ok"]
        .as_str()
        .unwrap_or_else(|| panic!("doctor found no tracefs: {}", doctor["tracefs"]));
    assert!(
        tracefs.starts_with(&mount.display().to_string()) && tracefs.contains("mount table"),
        "{tracefs}"
    );
    for tracepoint in REQUIRED_CLASSIC {
        assert!(
            probe_error(&doctor, tracepoint).is_null(),
            "{tracepoint} not attached: {}",
            probe_error(&doctor, tracepoint)
        );
    }
    assert_eq!(doctor["probes_not_attached"], serde_json::json!([]));

    let base = format!("vmtrace-test-tracefs-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenant = TenantCgroup::new(&format!("{base}/doorbell"));
    let watch = Watch::start(&script);
    let report = run_vmm(&[
        "--scenario",
        "doorbell",
        "--count",
        "3000",
        "--cgroup",
        &tenant.relative,
    ]);
    thread::sleep(Duration::from_millis(400));
    let last = watch.stop();
    let counts = agent_counts(&last, &tenant.agent_path()).expect("tenant reported");
    let expected = expected_agent_counts(std::slice::from_ref(&report));
    assert!(expected.contains_key("kick.q0"), "{expected:?}");
    assert_eq!(counts, expected, "agent (left) vs VMM (right)");
    eprintln!("{}: {counts:?}", tenant.agent_path());
    let runs = [report];
    expect::assert_tenants(&last, &format!("/{base}"), &[(tenant.agent_path(), &runs)]);
    assert!(last.get("probes_not_attached").is_none(), "{last}");
    // The namespace, and the tracefs in it, went with the agent: the host's own is untouched.
    assert!(
        Path::new("/sys/kernel/tracing/events").is_dir()
            || !Path::new("/sys/kernel/tracing").exists()
    );
}

/// The `vmtrace_agent_probe_attached` sample of `probe` in an exposition: its value and its labels.
fn probe_metric<'a>(metrics: &'a str, probe: &str) -> Option<(f64, &'a str)> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix("vmtrace_agent_probe_attached{")?;
        let (labels, value) = rest.rsplit_once("} ")?;
        labels
            .contains(&format!("probe=\"{probe}\""))
            .then(|| (value.trim().parse().ok(), labels))
            .and_then(|(v, l)| Some((v?, l)))
    })
}

#[test]
fn with_tracefs_missing_and_unmountable_every_output_says_degraded() {
    let test = "with_tracefs_missing_and_unmountable_every_output_says_degraded";
    if !privileged_host(test)
        || !have(test, on_path("unshare"), "unshare is not installed")
        || !have(test, on_path("setpriv"), "setpriv is not installed")
    {
        return;
    }
    let script = no_tracefs_and_no_right_to_mount();

    // doctor: tracefs unavailable, the classic probes not attached and summed up.
    let doctor = doctor(&script);
    let why = doctor["tracefs"]["Err"].as_str().unwrap_or_default();
    assert!(why.contains("mounting it"), "{}", doctor["tracefs"]);
    let listed: Vec<String> =
        serde_json::from_value(doctor["probes_not_attached"].clone()).unwrap();
    for tracepoint in REQUIRED_CLASSIC {
        assert!(listed.iter().any(|l| l == tracepoint), "{listed:?}");
    }
    assert!(probe_error(&doctor, "kvm:kvm_mmio").is_null());

    // watch: the table's header carries the marker.
    let table = output(
        in_namespace(
            &script,
            &["watch", "--interval", "200ms", "--duration", "1s"],
        ),
        "vmtrace watch",
    );
    let header = table
        .lines()
        .find(|l| l.starts_with("── vmtrace"))
        .unwrap_or_else(|| panic!("no header: {table}"));
    let marker = format!("degraded: {} probes not attached (", listed.len());
    assert!(header.contains(&marker), "{header}");
    for tracepoint in REQUIRED_CLASSIC {
        assert!(header.contains(tracepoint), "{header}");
    }
    eprintln!("watch: {header}");

    // top -b: the status line carries it.
    let frames = output(
        in_namespace(&script, &["top", "-b", "-n", "1", "--interval", "200ms"]),
        "vmtrace top -b",
    );
    let status = frames.lines().next().unwrap_or_default();
    assert!(
        status.starts_with("vmtrace top") && status.contains(&marker),
        "{frames}"
    );
    eprintln!("top: {status}");

    // record: the header lists the probes and why; a replay still shows the marker.
    let dir = TempDir::new("degraded-record");
    let file = dir.join("degraded.jsonl");
    let file_arg = file.display().to_string();
    output(
        in_namespace(
            &script,
            &[
                "record",
                "--interval",
                "200ms",
                "--duration",
                "1s",
                "-o",
                &file_arg,
            ],
        ),
        "vmtrace record",
    );
    let recording = std::fs::read_to_string(&file).unwrap();
    let header: serde_json::Value =
        serde_json::from_str(recording.lines().next().unwrap()).unwrap();
    let failures = header["probes_not_attached"]
        .as_array()
        .unwrap_or_else(|| panic!("no probes_not_attached in the header: {header}"));
    for tracepoint in REQUIRED_CLASSIC {
        let failure = failures
            .iter()
            .find(|f| f["probe"] == tracepoint)
            .unwrap_or_else(|| panic!("{tracepoint} not in {failures:?}"));
        assert!(
            !failure["reason"].as_str().unwrap_or_default().is_empty(),
            "{failure}"
        );
    }
    eprintln!("record header: {header}");
    let replayed = output(
        {
            let mut command = Command::new(binary("vmtrace"));
            command.args(["top", "-b", "--replay", &file_arg, "--no-delay"]);
            command
        },
        "vmtrace top --replay",
    );
    assert!(replayed.contains(&marker), "{replayed}");

    // The agent: a metric per probe, /readyz 503 with the reasons, /healthz 200.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _agent = Proc::spawn(
        "vmtrace agent",
        in_namespace(
            &script,
            &["agent", "--interval", "200ms", "--listen", &listen],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit()),
    );
    let metrics = wait_for(
        "the first metrics",
        Duration::from_mins(1),
        || match http_get(port, "/metrics") {
            Ok((200, body)) => Some(body),
            _ => None,
        },
    );
    let (value, _) = probe_metric(&metrics, "kvm:kvm_mmio").expect("kvm_mmio's metric");
    assert!((value - 1.0).abs() < f64::EPSILON);
    for tracepoint in REQUIRED_CLASSIC {
        let (value, labels) = probe_metric(&metrics, tracepoint)
            .unwrap_or_else(|| panic!("no metric for {tracepoint}"));
        assert!(value.abs() < f64::EPSILON, "{tracepoint}: {value}");
        assert!(labels.contains("reason=\""), "{labels}");
    }
    // Probes expected to fail here (silent on PVM, optional and off) are not listed.
    assert!(probe_metric(&metrics, "syscalls:sys_enter_read").is_none());
    eprintln!(
        "metrics:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("vmtrace_agent_probe_attached{"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (status, body) = http_get(port, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with(&format!("degraded: {} probes not attached", listed.len())),
        "{body}"
    );
    for tracepoint in REQUIRED_CLASSIC {
        assert!(body.contains(&format!("{tracepoint}: ")), "{body}");
    }
    eprintln!("readyz: {body}");
    let (status, _) = http_get(port, "/healthz").unwrap();
    assert_eq!(status, 200);
}
