//! Names of KVM_RUN exit reasons as they appear in reports: the kernel's `KVM_EXIT_*` name,
//! lowercase and without the prefix.

use std::borrow::Cow;
use std::collections::BTreeMap;

use kvm_ioctls::VcpuExit;

/// Count of KVM_RUN returns by exit reason name.
pub type ExitCounts = BTreeMap<String, u64>;

/// Name used for a KVM_RUN that returned EINTR (`KVM_EXIT_INTR`).
pub const INTR: &str = "intr";

/// The report name of `exit`, e.g. `io` for `KVM_EXIT_IO`; `unknown_<n>` for reasons this
/// crate does not know.
pub fn name(exit: &VcpuExit<'_>) -> Cow<'static, str> {
    let name = match exit {
        VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => "io",
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => "mmio",
        VcpuExit::Unknown => "unknown",
        VcpuExit::Exception => "exception",
        VcpuExit::Hypercall(..) => "hypercall",
        VcpuExit::Debug(..) => "debug",
        VcpuExit::Hlt => "hlt",
        VcpuExit::IrqWindowOpen => "irq_window_open",
        VcpuExit::Shutdown => "shutdown",
        VcpuExit::FailEntry(..) => "fail_entry",
        VcpuExit::Intr => INTR,
        VcpuExit::SetTpr => "set_tpr",
        VcpuExit::TprAccess => "tpr_access",
        VcpuExit::S390Sieic => "s390_sieic",
        VcpuExit::S390Reset => "s390_reset",
        VcpuExit::Dcr => "dcr",
        VcpuExit::Nmi => "nmi",
        VcpuExit::InternalError => "internal_error",
        VcpuExit::Osi => "osi",
        VcpuExit::PaprHcall => "papr_hcall",
        VcpuExit::S390Ucontrol => "s390_ucontrol",
        VcpuExit::Watchdog => "watchdog",
        VcpuExit::S390Tsch => "s390_tsch",
        VcpuExit::Epr => "epr",
        VcpuExit::SystemEvent(..) => "system_event",
        VcpuExit::S390Stsi => "s390_stsi",
        VcpuExit::IoapicEoi(..) => "ioapic_eoi",
        VcpuExit::Hyperv => "hyperv",
        VcpuExit::X86Rdmsr(..) => "x86_rdmsr",
        VcpuExit::X86Wrmsr(..) => "x86_wrmsr",
        VcpuExit::MemoryFault { .. } => "memory_fault",
        VcpuExit::Unsupported(n) => return Cow::Owned(format!("unknown_{n}")),
    };
    Cow::Borrowed(name)
}

/// Adds `other` into `into`.
pub fn add(into: &mut ExitCounts, other: &ExitCounts) {
    for (reason, n) in other {
        *into.entry(reason.clone()).or_default() += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name(&VcpuExit::Hlt), "hlt");
        assert_eq!(name(&VcpuExit::IoOut(0x10, &[0])), "io");
        assert_eq!(name(&VcpuExit::InternalError), "internal_error");
        assert_eq!(name(&VcpuExit::Unsupported(77)), "unknown_77");
    }

    #[test]
    fn adds() {
        let mut a = ExitCounts::from([("io".to_string(), 2)]);
        add(
            &mut a,
            &ExitCounts::from([("io".into(), 3), ("hlt".into(), 1)]),
        );
        assert_eq!(a, ExitCounts::from([("io".into(), 5), ("hlt".into(), 1)]));
    }
}
