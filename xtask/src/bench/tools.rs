//! The programs the benchmark drives: vmtrace and its reference VMM (built here), bpftrace and perf
//! (installed from Debian when missing).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::setup;

/// bpftrace for the classic-tracepoint comparison, linux-perf for `perf stat`.
const PACKAGES: &[&str] = &["bpftrace", "linux-perf"];

pub struct Tools {
    pub vmtrace: PathBuf,
    pub vmm: PathBuf,
    pub bpftrace: PathBuf,
    pub perf: PathBuf,
    /// Where tracer outputs and VMM reports go (target/bench).
    pub logs: PathBuf,
}

pub fn prepare(build: bool) -> Result<Tools> {
    setup::run()?;
    setup::install_packages(PACKAGES)?;
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    if build {
        eprintln!("bench: building vmtrace and vmtrace-vmm (release)");
        setup::exec(
            crate::workspace::cargo(&crate::workspace::workspace_root()).args([
                "build",
                "--release",
                "-p",
                "vmtrace",
                "-p",
                "vmtrace-vmm",
            ]),
        )?;
    }
    let logs = target.join("bench");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let tools = Tools {
        vmtrace: target.join("release/vmtrace"),
        vmm: target.join("release/vmtrace-vmm"),
        bpftrace: PathBuf::from("bpftrace"),
        perf: find_perf()?,
        logs,
    };
    for bin in [&tools.vmtrace, &tools.vmm] {
        if !bin.is_file() {
            bail!(
                "{} is missing (build it, or drop --no-build)",
                bin.display()
            );
        }
    }
    Ok(tools)
}

/// `perf`, or where Debian's wrapper would not run on this kernel, the newest `/usr/bin/perf_*`.
fn find_perf() -> Result<PathBuf> {
    let mut candidates = vec![PathBuf::from("perf")];
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/bin")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("perf_"))
        })
        .collect();
    versioned.sort();
    candidates.extend(versioned.into_iter().rev());
    candidates
        .into_iter()
        .find(|perf| {
            Command::new(perf)
                .args(["stat", "-e", "kvm:kvm_mmio", "true"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("no perf binary here can count kvm:kvm_mmio (apt-get install linux-perf)")
}

/// The first line a tool prints for `--version`, or "unknown".
pub fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
