//! The emulated SVM host of the tests (the `vmtrace-emulated-host` crate): a Debian kernel under
//! QEMU/TCG with AMD-V, holding the workspace's release builds of vmtrace and the reference VMM,
//! its downloads cached in `<target>/svm-host/`.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

pub use vmtrace_emulated_host::{Iommu, KernelPackage, Run, offered_kernels, qemu_available};

/// Boots `kernel` with `/bin/vmtrace`, `/bin/vmtrace-vmm` and `job`; what the guest emitted.
pub fn boot(kernel: &KernelPackage, job: &str) -> Run {
    guest(None).boot(kernel, job)
}

/// Boots `kernel` as [`boot`] does, on a machine with `iommu` and QEMU's edu device, with the
/// VFIO modules loaded.
pub fn boot_with_iommu(kernel: &KernelPackage, iommu: Iommu, job: &str) -> Run {
    guest(Some(iommu)).boot(kernel, job)
}

fn guest(iommu: Option<Iommu>) -> vmtrace_emulated_host::Guest {
    vmtrace_emulated_host::Guest {
        cache: target_dir().join("svm-host"),
        executables: ["vmtrace", "vmtrace-vmm"]
            .iter()
            .map(|name| (format!("bin/{name}"), release_binary(name)))
            .collect(),
        timeout: vmtrace_emulated_host::BOOT_TIMEOUT,
        attempts: 2,
        stall: vmtrace_emulated_host::STALL,
        iommu,
    }
}

fn target_dir() -> PathBuf {
    crate::binary("vmtrace")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned()
}

/// The workspace's release build of `name`, built once per test process: the guest gets what
/// people deploy.
pub fn release_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = crate::workspace_cargo()
            .args(["build", "--release", "-p", "vmtrace", "-p", "vmtrace-vmm"])
            .status()
            .expect("running cargo build --release");
        assert!(status.success(), "building the release binaries failed");
    });
    target_dir().join("release").join(name)
}
