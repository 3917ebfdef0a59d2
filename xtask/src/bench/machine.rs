//! What the numbers were measured on.

use std::{path::Path, process::Command};

use super::tools::{self, Tools};

pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub kvm: &'static str,
    pub date: String,
    pub commit: String,
    pub bpftrace: String,
    pub perf: String,
}

pub fn describe(tools: &Tools) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".to_owned()),
        memory_gib: field(&meminfo, "MemTotal")
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0)),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
        kvm: kvm_flavour(),
        date: date(),
        commit: commit(),
        bpftrace: tools::version(&tools.bpftrace),
        perf: tools::version(&tools.perf),
    }
}

/// Now, to the minute, in UTC.
pub fn date() -> String {
    output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
}

/// The commit measured (`-dirty` with uncommitted changes).
pub fn commit() -> String {
    output(
        Command::new("git")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["describe", "--always", "--dirty"]),
    )
}

/// `key : value` lines of /proc/cpuinfo and /proc/meminfo.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

fn kvm_flavour() -> &'static str {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    if module("kvm_pvm") {
        "PVM"
    } else if module("kvm_intel") {
        "VMX (kvm_intel)"
    } else if module("kvm_amd") {
        "SVM (kvm_amd)"
    } else {
        "unknown"
    }
}

fn output(command: &mut Command) -> String {
    command
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}
