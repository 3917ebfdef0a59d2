//! Names of what the probes count, as the agent reports them: `exit.io`, `pio.out`, `mmio.write`, ...

use vmtrace_common::{ExitKind, MmioType};

use crate::exit_reasons::ExitReasonNames;

/// Name of the derived kind: MMIO writes the kernel completed itself (ioeventfd doorbells and other
/// in-kernel devices), i.e. `mmio.write` minus the writes that exited to the VMM.
pub const MMIO_WRITE_IN_KERNEL: &str = "mmio.write.kernel";

/// `KVM_EXIT_*` reasons from include/uapi/linux/kvm.h, indexed by value.
const KVM_EXIT_REASONS: [&str; 42] = [
    "unknown",
    "exception",
    "io",
    "hypercall",
    "debug",
    "hlt",
    "mmio",
    "irq_window_open",
    "shutdown",
    "fail_entry",
    "intr",
    "set_tpr",
    "tpr_access",
    "s390_sieic",
    "s390_reset",
    "dcr",
    "nmi",
    "internal_error",
    "osi",
    "papr_hcall",
    "s390_ucontrol",
    "watchdog",
    "s390_tsch",
    "epr",
    "system_event",
    "s390_stsi",
    "ioapic_eoi",
    "hyperv",
    "arm_nisv",
    "x86_rdmsr",
    "x86_wrmsr",
    "dirty_ring_full",
    "ap_reset_hold",
    "x86_bus_lock",
    "xen",
    "riscv_sbi",
    "riscv_csr",
    "notify",
    "loongarch_iocsr",
    "memory_fault",
    "tdx",
    "arm_sea",
];

/// The name of a `KVM_EXIT_*` reason, e.g. 2 -> "io".
pub fn kvm_exit_reason(reason: u32) -> String {
    KVM_EXIT_REASONS
        .get(reason as usize)
        .map_or_else(|| format!("reason_{reason}"), |name| (*name).to_owned())
}

fn errno_name(errno: u32) -> String {
    match errno as i32 {
        libc::EINTR => "eintr".to_owned(),
        libc::EAGAIN => "eagain".to_owned(),
        libc::EFAULT => "efault".to_owned(),
        libc::EINVAL => "einval".to_owned(),
        other => format!("errno_{other}"),
    }
}

fn mmio_type(detail: u32) -> String {
    match MmioType::try_from(detail) {
        Ok(MmioType::Write) => "write".to_owned(),
        Ok(MmioType::Read) => "read".to_owned(),
        Ok(MmioType::ReadUnsatisfied) => "read_unsatisfied".to_owned(),
        Err(other) => format!("type_{other}"),
    }
}

/// The kind name of a queue's kicks, e.g. `kick.q1`; `kick.any` for doorbells without datamatch.
pub fn kick_kind(queue: u32) -> String {
    if queue == vmtrace_common::ANY_QUEUE {
        "kick.any".to_owned()
    } else {
        format!("kick.q{queue}")
    }
}

/// The kind name of a return to the VMM with a `KVM_EXIT_*` reason, e.g. `exit.io`.
pub fn userspace_exit_kind(reason: u32) -> String {
    format!("exit.{}", kvm_exit_reason(reason))
}

/// The kind name of a `kvm:kvm_exit` reason, e.g. `kvm_exit.IO_INSTRUCTION`.
pub fn kvm_exit_kind(isa: u32, reason: u32, names: &ExitReasonNames) -> String {
    format!("kvm_exit.{}", names.name(isa, reason))
}

/// The reported name of a counter.
pub fn kind_name(kind: ExitKind, isa: u32, detail: u32, names: &ExitReasonNames) -> String {
    match kind {
        ExitKind::Userspace => userspace_exit_kind(detail),
        ExitKind::UserspaceError => format!("run_error.{}", errno_name(detail)),
        ExitKind::Pio if detail == 0 => "pio.in".to_owned(),
        ExitKind::Pio => "pio.out".to_owned(),
        ExitKind::Mmio => format!("mmio.{}", mmio_type(detail)),
        ExitKind::Cpuid => "cpuid".to_owned(),
        ExitKind::KvmExit => kvm_exit_kind(isa, detail, names),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_uapi_values() {
        assert_eq!(kvm_exit_reason(2), "io");
        assert_eq!(kvm_exit_reason(5), "hlt");
        assert_eq!(kvm_exit_reason(6), "mmio");
        assert_eq!(kvm_exit_reason(17), "internal_error");
        assert_eq!(kvm_exit_reason(24), "system_event");
        assert_eq!(kvm_exit_reason(999), "reason_999");
        let reason = ExitReasonNames::builtin();
        assert_eq!(kind_name(ExitKind::Userspace, 0, 2, &reason), "exit.io");
        assert_eq!(kind_name(ExitKind::Pio, 0, 1, &reason), "pio.out");
        assert_eq!(kind_name(ExitKind::Mmio, 0, 2, &reason), "mmio.write");
        assert_eq!(
            kind_name(ExitKind::UserspaceError, 0, 4, &reason),
            "run_error.eintr"
        );
        assert_eq!(
            kind_name(ExitKind::KvmExit, 2, 0x400, &reason),
            "kvm_exit.npf"
        );
    }
}
