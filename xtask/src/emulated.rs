//! The emulated AMD-V host (the vmtrace-emulated-host crate) as the project's tasks boot it: the
//! release builds of vmtrace and the reference VMM inside, with this machine's bpftool (for the
//! kernel's BPF run statistics) and this xtask binary (for its raw-tracepoint counters).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use vmtrace_emulated_host::Guest;

use crate::{
    setup,
    workspace::{cargo, target_dir, workspace_root},
};

/// Sets up (QEMU, bpftool), builds the release binaries and says what the guest holds.
pub fn guest() -> Result<Guest> {
    setup::run()?;
    if !vmtrace_emulated_host::qemu_available() {
        bail!(
            "qemu-system-x86_64, apt-get and dpkg-deb are needed (cargo xtask setup installs them)"
        );
    }
    eprintln!("emulated host: building vmtrace and vmtrace-vmm (release)");
    setup::exec(cargo(&workspace_root()).args([
        "build",
        "--release",
        "-p",
        "vmtrace",
        "-p",
        "vmtrace-vmm",
    ]))?;
    let release = target_dir().join("release");
    let xtask = std::env::current_exe().context("finding this xtask binary")?;
    Ok(Guest {
        cache: target_dir().join("svm-host"),
        executables: vec![
            ("bin/vmtrace".to_owned(), release.join("vmtrace")),
            ("bin/vmtrace-vmm".to_owned(), release.join("vmtrace-vmm")),
            ("bin/bpftool".to_owned(), PathBuf::from(BPFTOOL)),
            ("bin/xtask".to_owned(), xtask),
        ],
        timeout: vmtrace_emulated_host::BOOT_TIMEOUT,
        attempts: 2,
        stall: vmtrace_emulated_host::STALL,
        iommu: None,
    })
}

/// Where Debian's bpftool package puts it (`cargo xtask setup` installs it).
pub const BPFTOOL: &str = "/usr/sbin/bpftool";
