//! Facts about the host that decide what the agent can do here: kernel, BTF, KVM flavour, privileges.
//! Everything is detected at run time; nothing is assumed from the build machine.

pub(crate) mod agent_usage;
pub(crate) mod capabilities;
pub mod cgroup_index;
pub(crate) mod cgroupfs;
pub(crate) mod dtlb;
pub(crate) mod figures;
pub(crate) mod guest_time;
pub(crate) mod heap;
pub(crate) mod kept_files;
pub(crate) mod kernel_log;
pub(crate) mod procfs;
pub(crate) mod vfio;

use std::{fs, path::Path};

use serde::{Deserialize, Serialize};

/// Which KVM backend runs guests here, which decides whether `kvm:kvm_exit` fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvmFlavour {
    /// Intel VT-x (kvm_intel): kvm_exit fires on every exit, VMX reason codes.
    Vmx,
    /// AMD-V (kvm_amd): kvm_exit fires on every exit, SVM exit codes.
    Svm,
    /// Pagetable-based virtual machine (kvm_pvm): kvm_exit and kvm_entry never fire.
    Pvm,
    /// No KVM backend module is present.
    None,
}

impl KvmFlavour {
    /// The name people know it by: VMX, SVM, PVM, none.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vmx => "VMX",
            Self::Svm => "SVM",
            Self::Pvm => "PVM",
            Self::None => "none",
        }
    }

    /// Whether this flavour emits `kvm:kvm_exit` for guest exits.
    pub fn emits_kvm_exit(self) -> bool {
        matches!(self, Self::Vmx | Self::Svm)
    }

    /// Why the host cannot know how much CPU its guests ran in guest mode, if it cannot: then no
    /// tenant's tax can be given as a share of its CPU (docs/tax.md).
    pub fn guest_time_unknown(self) -> Option<&'static str> {
        match self {
            // PVM runs a guest in host user mode through its switcher: the kernel never marks
            // the vCPU thread as in a guest (PF_VCPU), so it accounts no guest_time, and
            // kvm_entry/kvm_exit, which would bracket guest execution, never fire.
            Self::Pvm => Some(
                "PVM accounts next to no guest time (kvm_entry/kvm_exit never fire, guest_time stays at or near 0)",
            ),
            Self::Vmx | Self::Svm | Self::None => None,
        }
    }
}

/// The KVM flavour and the evidence it was read from.
#[derive(Debug, Clone, Serialize)]
pub struct KvmDetection {
    pub flavour: KvmFlavour,
    pub evidence: String,
    pub dev_kvm: bool,
}

/// Detects the KVM backend from the modules present in /sys/module (built-in modules with parameters
/// appear there too, as kvm_pvm does on PVM hosts).
pub fn detect_kvm() -> KvmDetection {
    detect_kvm_in(Path::new("/sys/module"), Path::new("/dev/kvm").exists())
}

fn detect_kvm_in(modules: &Path, dev_kvm: bool) -> KvmDetection {
    let present = |name: &str| modules.join(name).exists();
    let (flavour, module) = if present("kvm_intel") {
        (KvmFlavour::Vmx, "kvm_intel")
    } else if present("kvm_amd") {
        (KvmFlavour::Svm, "kvm_amd")
    } else if present("kvm_pvm") {
        (KvmFlavour::Pvm, "kvm_pvm")
    } else {
        return KvmDetection {
            flavour: KvmFlavour::None,
            evidence: format!(
                "none of kvm_intel, kvm_amd, kvm_pvm in {}",
                modules.display()
            ),
            dev_kvm,
        };
    };
    KvmDetection {
        flavour,
        evidence: format!("module {module} present in {}", modules.display()),
        dev_kvm,
    }
}

/// The host's IOMMU, as far as it decides which IOMMU events fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuHost {
    /// No IOMMU groups: no device is translated by an IOMMU, no `iommu:*` event fires.
    None,
    /// Intel VT-d (`/sys/class/iommu/dmar*`): maps and unmaps are traced, but its driver reports
    /// faults in the kernel log only, never through `iommu:io_page_fault` (docs/iommu.md).
    IntelVtd,
    /// Another IOMMU (AMD-Vi, an Arm SMMU, ...), whose driver may report faults through
    /// `report_iommu_fault()`.
    Other,
}

impl IommuHost {
    pub fn present(self) -> bool {
        self != Self::None
    }
}

/// The host's IOMMU, from sysfs.
pub fn detect_iommu() -> IommuHost {
    detect_iommu_in(Path::new("/sys"))
}

fn detect_iommu_in(sys: &Path) -> IommuHost {
    let entries = |dir: &str| -> Vec<String> {
        fs::read_dir(sys.join(dir))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    if entries("kernel/iommu_groups").is_empty() {
        IommuHost::None
    } else if entries("class/iommu").iter().any(|n| n.starts_with("dmar")) {
        IommuHost::IntelVtd
    } else {
        IommuHost::Other
    }
}

/// The running kernel's release, e.g. "6.18.44".
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

/// Whether the kernel exposes its BTF, which CO-RE relocations need.
pub fn has_btf() -> bool {
    Path::new("/sys/kernel/btf/vmlinux").exists()
}

/// The capabilities BPF tracing needs, from the effective set of this process.
#[derive(Debug, Clone, Serialize)]
pub struct Privileges {
    pub euid: u32,
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    pub cap_sys_admin: bool,
    /// A seccomp filter confines this process (`Seccomp: 2`): a container runtime's profile.
    pub seccomp_filter: bool,
}

impl Privileges {
    /// Loading tracing programs needs CAP_BPF with CAP_PERFMON, or CAP_SYS_ADMIN.
    pub fn can_trace(&self) -> bool {
        self.cap_sys_admin || (self.cap_bpf && self.cap_perfmon)
    }
}

pub fn privileges() -> Privileges {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    // This thread's: capabilities are per thread, and /proc/self is the main thread's.
    let status = fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let effective = field("CapEff:")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    Privileges {
        // SAFETY: geteuid has no preconditions and cannot fail.
        euid: unsafe { libc::geteuid() },
        cap_bpf: has(CAP_BPF),
        cap_perfmon: has(CAP_PERFMON),
        cap_sys_admin: has(CAP_SYS_ADMIN),
        seccomp_filter: field("Seccomp:") == Some("2"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_follows_the_modules_present() {
        let dir = std::env::temp_dir().join(format!("vmtrace-host-{}", std::process::id()));
        fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(detect_kvm_in(&dir, false).flavour, KvmFlavour::None);
        fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(detect_kvm_in(&dir, true).flavour, KvmFlavour::Pvm);
        fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        assert_eq!(detect_kvm_in(&dir, true).flavour, KvmFlavour::Svm);
        fs::create_dir_all(dir.join("kvm_intel")).unwrap();
        let vmx = detect_kvm_in(&dir, true);
        assert_eq!(vmx.flavour, KvmFlavour::Vmx);
        assert!(vmx.evidence.contains("kvm_intel"));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_iommu_is_told_from_its_groups_and_its_class() {
        let sys = std::env::temp_dir().join(format!("vmtrace-iommu-{}", std::process::id()));
        fs::create_dir_all(sys.join("kernel/iommu_groups")).unwrap();
        fs::create_dir_all(sys.join("class/iommu")).unwrap();
        assert_eq!(detect_iommu_in(&sys), IommuHost::None);
        fs::create_dir_all(sys.join("kernel/iommu_groups/3")).unwrap();
        fs::create_dir_all(sys.join("class/iommu/ivhd0")).unwrap();
        assert_eq!(detect_iommu_in(&sys), IommuHost::Other);
        fs::create_dir_all(sys.join("class/iommu/dmar0")).unwrap();
        assert_eq!(detect_iommu_in(&sys), IommuHost::IntelVtd);
        fs::remove_dir_all(sys).unwrap();
    }
}
