//! The `vmtrace-vmm` binary: its report, its error lines, and `--cgroup` (run as a child
//! process, so the test process itself is never moved).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmtrace_vmm::caps::kvm_or_skip;
use vmtrace_vmm::report::Report;

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmtrace-vmm"))
        .args(args)
        .output()
        .expect("cannot run vmtrace-vmm")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The binary failed with exactly one `vmtrace-vmm: error: ...` line containing `needle`.
fn assert_one_error_line(args: &[&str], status: i32, needle: &str) {
    let out = vmm(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?} printed a report");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err:?}");
    assert!(err.starts_with("vmtrace-vmm: error: "), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn bad_flags_get_one_error_line() {
    assert_one_error_line(&["--scenario", "pio", "--bogus"], 2, "--bogus");
    assert_one_error_line(&["--scenario", "nope"], 2, "nope");
    assert_one_error_line(&[], 2, "--scenario");
    assert_one_error_line(&["--scenario", "pio", "--vcpus", "x"], 2, "--vcpus");
    assert_one_error_line(&["--scenario", "pio", "--count", "0"], 2, "--count");
    assert_one_error_line(&["--scenario", "pio", "--rate", "-1"], 2, "--rate");
    let v = |extra: &[&'static str]| {
        let mut args = vec!["--scenario", "virtio"];
        args.extend(extra);
        args
    };
    assert_one_error_line(&v(&["--queues", "0"]), 2, "--queues 0");
    assert_one_error_line(&v(&["--queues", "33"]), 2, "--queues 33");
    assert_one_error_line(&v(&["--queues", "x"]), 2, "--queues");
    assert_one_error_line(
        &v(&["--vcpus", "2", "--queues", "1"]),
        2,
        "every vCPU needs a queue",
    );
    assert_one_error_line(&v(&["--request-size", "1000"]), 2, "multiple of 512");
    assert_one_error_line(&v(&["--request-size", "0"]), 2, "--request-size 0");
    assert_one_error_line(&v(&["--request-size", "131072"]), 2, "65536");
    assert_one_error_line(
        &v(&["--vcpus", "8", "--queues", "8", "--request-size", "65536"]),
        2,
        "KiB of guest buffers",
    );
    assert_one_error_line(&["--scenario", "pio", "--queues", "2"], 2, "virtio only");
    assert_one_error_line(
        &["--scenario", "mmio", "--request-size", "512"],
        2,
        "virtio only",
    );
    assert_one_error_line(
        &["--scenario", "pio", "--exit-delay-us", "-5"],
        2,
        "--exit-delay-us",
    );
    assert_one_error_line(
        &["--scenario", "pio", "--exit-delay-us", "1000001"],
        2,
        "at most 1000000",
    );
    assert_one_error_line(
        &["--scenario", "pio", "--vm-setup-delay-ms", "soon"],
        2,
        "--vm-setup-delay-ms",
    );
    assert_one_error_line(
        &["--scenario", "pio", "--vm-setup-delay-ms", "3600001"],
        2,
        "--vm-setup-delay-ms",
    );
    assert_one_error_line(
        &["--scenario", "touch", "--count", "10"],
        2,
        "--count does not apply to --scenario touch",
    );
    assert_one_error_line(&["--scenario", "touch", "--mib", "0"], 2, "--mib 0");
    assert_one_error_line(&["--scenario", "touch", "--mib", "2048"], 2, "1 to 1024");
    assert_one_error_line(
        &["--scenario", "touch", "--mib", "1", "--vcpus", "3"],
        2,
        "cannot share evenly",
    );
    assert_one_error_line(
        &["--scenario", "pio", "--mib", "4"],
        2,
        "touch and balloon only",
    );
    assert_one_error_line(
        &["--scenario", "touch", "--balloon-mib", "1"],
        2,
        "balloon only",
    );
    assert_one_error_line(
        &["--scenario", "balloon", "--mib", "2", "--balloon-mib", "3"],
        2,
        "1 to --mib (2)",
    );
    assert_one_error_line(&["--scenario", "balloon", "--vcpus", "2"], 2, "one vCPU");
}

#[test]
fn impossible_requests_get_one_error_line() {
    if !kvm_or_skip("impossible_requests_get_one_error_line") {
        return;
    }
    assert_one_error_line(
        &[
            "--scenario",
            "pio",
            "--report",
            "/nonexistent/dir/report.json",
        ],
        1,
        "report file",
    );
    assert_one_error_line(
        &["--scenario", "pio", "--cgroup", "/tmp/not-a-cgroup"],
        1,
        "cgroup",
    );
}

#[test]
fn help_documents_every_flag() {
    let out = vmm(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--scenario",
        "--vcpus",
        "--count",
        "--rate",
        "--cgroup",
        "--report",
        "--quiet",
        "doorbell",
        "guest_ops",
        "doorbell_signals",
        "--queues",
        "--request-size",
        "--exit-delay-us",
        "--vm-setup-delay-ms",
        "virtio",
        "VIRTIO SCENARIO",
        "datamatch = queue index",
        "guest_kicks",
        "exit_delay_us",
        "vm_setup_delay_ms",
        "--mib",
        "--balloon-mib",
        "touch",
        "balloon",
        "TOUCH AND BALLOON SCENARIOS",
        "MADV_NOHUGEPAGE",
        "pages_touched",
        "bytes_returned",
        "returned_hva",
        "pages_retouched",
        "madvise_calls",
        "memory_v1_path",
    ] {
        assert!(help.contains(word), "--help lacks {word}");
    }
}

#[test]
fn writes_the_report_file() {
    if !kvm_or_skip("writes_the_report_file") {
        return;
    }
    let path = std::env::temp_dir().join(format!("vmtrace-vmm-report-{}.json", std::process::id()));
    let p = path.to_str().unwrap();
    let out = vmm(&[
        "--scenario",
        "mmio",
        "--vcpus",
        "2",
        "--count",
        "100",
        "--quiet",
        "--report",
        p,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(out.stderr.is_empty(), "--quiet printed {}", stderr(&out));
    let report = Report::from_json(&fs::read_to_string(&path).unwrap()).unwrap();
    fs::remove_file(&path).unwrap();
    assert_eq!(report.total.guest_ops, 200);
    assert_eq!(report.total.exits.get("mmio"), Some(&200));
    assert_eq!(report.total.exits.get("io"), Some(&2));
    assert_ne!(report.pid, std::process::id());
}

/// Removes the cgroup directories (deepest first) when dropped, after the child has exited.
struct CgroupDirs(Vec<PathBuf>);

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            if let Err(e) = fs::remove_dir(dir) {
                eprintln!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

fn cgroup_or_skip(test: &str) -> Option<vmtrace_vmm::cgroup::Cgroup2Mount> {
    let reason = match vmtrace_vmm::cgroup::find_mount() {
        Ok(Some(mount)) => {
            let probe = mount
                .mount_point
                .join(format!("vmtrace-probe-{}", std::process::id()));
            match fs::create_dir(&probe) {
                Ok(()) => {
                    let _ = fs::remove_dir(&probe);
                    return Some(mount);
                }
                Err(e) => format!(
                    "cannot create a cgroup under {}: {e}",
                    mount.mount_point.display()
                ),
            }
        }
        Ok(None) => "no cgroup2 mount".to_string(),
        Err(e) => e.to_string(),
    };
    assert!(
        std::env::var("VMTRACE_REQUIRE_CAPS").as_deref() != Ok("1"),
        "{test}: cgroup v2 unavailable ({reason}) and VMTRACE_REQUIRE_CAPS=1 requires it"
    );
    eprintln!("SKIP: {test}: cgroup v2 unavailable ({reason})");
    None
}

fn own_cgroup() -> String {
    fs::read_to_string("/proc/self/cgroup").unwrap()
}

#[test]
fn runs_in_the_requested_cgroup() {
    if !kvm_or_skip("runs_in_the_requested_cgroup") {
        return;
    }
    let Some(mount) = cgroup_or_skip("runs_in_the_requested_cgroup") else {
        return;
    };
    let before = own_cgroup();
    let parent_name = format!("vmtrace-test-{}", std::process::id());
    let parent = mount.mount_point.join(&parent_name);
    let child = parent.join("tenant-a");
    let _cleanup = CgroupDirs(vec![parent.clone(), child.clone()]);
    // On hybrid hosts the VMM also joins the same path in the cgroup v1 memory hierarchy.
    let memory_v1 = vmtrace_vmm::cgroup::find_memory_v1_mount().unwrap();
    let v1_child = memory_v1
        .as_ref()
        .map(|m| m.mount_point.join(&parent_name).join("tenant-a"));
    let _cleanup_v1 = CgroupDirs(match &v1_child {
        Some(c) => vec![c.parent().unwrap().to_path_buf(), c.clone()],
        None => vec![],
    });

    // Absolute path, parent created on the way (mkdir -p).
    let out = vmm(&[
        "--scenario",
        "pio",
        "--count",
        "50",
        "--quiet",
        "--cgroup",
        child.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = Report::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let cgroup = report.cgroup.expect("no cgroup in the report");
    assert_eq!(cgroup.path, child);
    assert_eq!(cgroup.id, fs::metadata(&child).unwrap().ino());
    assert_eq!(
        cgroup.relative_path,
        Path::new("/").join(&parent_name).join("tenant-a")
    );
    assert_eq!(cgroup.memory_v1_path, v1_child);
    assert_eq!(report.total.guest_ops, 50);

    // The same cgroup named relative to the mount point.
    let relative = format!("{parent_name}/tenant-a");
    let out = vmm(&[
        "--scenario",
        "cpuid",
        "--count",
        "10",
        "--quiet",
        "--cgroup",
        &relative,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = Report::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(report.cgroup.unwrap().id, cgroup.id);

    // 16 MiB touched in the tenant are charged to its cgroup v1 memory cgroup.
    let out = vmm(&[
        "--scenario",
        "touch",
        "--mib",
        "16",
        "--quiet",
        "--cgroup",
        &relative,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = Report::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(report.cgroup.unwrap().memory_v1_path, v1_child);
    assert_eq!(report.memory.unwrap().resident_pages_end, 16 * 256);
    if let Some(dir) = &v1_child {
        let peak: u64 = fs::read_to_string(dir.join("memory.max_usage_in_bytes"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(peak >= 16 << 20, "{}: peak usage {peak}", dir.display());
    }

    // Without --cgroup the report names the cgroup the VMM inherited, here the test's own.
    let out = vmm(&["--scenario", "cpuid", "--count", "10", "--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = Report::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let inherited = report.cgroup.unwrap();
    let own = vmtrace_vmm::cgroup::current().unwrap().unwrap();
    assert_eq!(inherited, own);

    assert_eq!(own_cgroup(), before, "the test process itself was moved");
}

/// The virtio scenario through the binary, with a setup delay: the line announcing the delay
/// comes after the VM and its ioeventfds exist, and the report carries both delays.
#[test]
fn virtio_through_the_binary() {
    if !kvm_or_skip("virtio_through_the_binary") {
        return;
    }
    let out = vmm(&[
        "--scenario",
        "virtio",
        "--vcpus",
        "2",
        "--queues",
        "4",
        "--count",
        "40",
        "--request-size",
        "2048",
        "--exit-delay-us",
        "30",
        "--vm-setup-delay-ms",
        "50",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let mut lines = err.lines();
    let ready = lines.next().unwrap();
    assert!(
        ready.starts_with("vmtrace-vmm: VM set up (pid ")
            && ready.contains("4 ioeventfd(s)")
            && ready.ends_with("starting the vCPUs in 50 ms"),
        "{err}"
    );
    assert!(
        lines
            .next()
            .unwrap()
            .contains("kicks per queue [20, 20, 20, 20]"),
        "{err}"
    );
    let report = Report::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!((report.exit_delay_us, report.vm_setup_delay_ms), (30, 50));
    let v = report.virtio.unwrap();
    assert_eq!(v.request_size, 2048);
    assert!(
        v.queues
            .iter()
            .all(|q| q.kicks == 20 && q.bytes == 20 * 2048)
    );
    assert_eq!(report.total.guest_ops, 80);
}

/// The balloon scenario through the binary: the summary names the region, the returned MiB and
/// the retouched pages; the report's memory section agrees.
#[test]
fn balloon_through_the_binary() {
    if !kvm_or_skip("balloon_through_the_binary") {
        return;
    }
    let out = vmm(&["--scenario", "balloon", "--mib", "2", "--balloon-mib", "1"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("vmtrace-vmm: balloon: 1 vCPU(s) x 768 ops"),
        "{err}"
    );
    assert_eq!(
        lines[1],
        "vmtrace-vmm: balloon: 2 MiB region, 512 pages touched, 1 MiB returned to the host and \
         256 pages touched again; resident pages 0 before, 512 at the end"
    );
    let report = Report::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let m = report.memory.unwrap();
    assert_eq!(
        (
            m.pages_touched,
            m.bytes_returned,
            m.madvise_calls,
            m.pages_retouched
        ),
        (512, 1 << 20, 1, 256)
    );
    assert_eq!(m.resident_pages_after_return, Some(256));
    assert_eq!(report.total.guest_ops, 768);
    assert_eq!(report.total.exits.get("io"), Some(&2));
}
