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
    if std::env::var("VMTRACE_REQUIRE_CAPS").as_deref() == Ok("1") {
        panic!("{test}: cgroup v2 unavailable ({reason}) and VMTRACE_REQUIRE_CAPS=1 requires it");
    }
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

    // Without --cgroup the report names the cgroup the VMM inherited, here the test's own.
    let out = vmm(&["--scenario", "cpuid", "--count", "10", "--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = Report::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let inherited = report.cgroup.unwrap();
    let own = vmtrace_vmm::cgroup::current().unwrap().unwrap();
    assert_eq!(inherited, own);

    assert_eq!(own_cgroup(), before, "the test process itself was moved");
}
