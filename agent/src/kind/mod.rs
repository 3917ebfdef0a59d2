//! Names of what the probes count, as the agent reports them: `exit.io`, `pio.out`, `mmio.write`, ...

use vmtrace_common::{ExitKind, FaultMode, HvaDetail, IommuDetail, MmioType, MmuPageEvent};

use crate::probe::exit_reasons::ExitReasonNames;

/// Name of the derived kind: MMIO writes the kernel completed itself (ioeventfd doorbells and other
/// in-kernel devices), i.e. `mmio.write` minus the writes that exited to the VMM.
pub const MMIO_WRITE_IN_KERNEL: &str = "mmio.write.kernel";

/// Prefixes of the kinds that count what the host does for a tenant (TLB, faults, memory, CPU,
/// IOMMU), as opposed to what its guests do (exits, guest events, kicks).
pub const HOST_SIDE_PREFIXES: [&str; 8] = [
    "tlb.", "fault.", "mem.", "mmu.", "memcg.", "tax.", "cpu.", "iommu.",
];

/// Whether `kind` counts what the host does for a tenant rather than what its guests do.
pub fn is_host_side(kind: &str) -> bool {
    HOST_SIDE_PREFIXES.iter().any(|p| kind.starts_with(p))
}

/// Name of the derived kind: `kvm_exit` reasons that touch the guest's TLB (see [`is_tlb_exit`]).
pub const TLB_EXITS: &str = "tlb.exit";

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
        ExitKind::TlbFlush => format!("tlb.flush.{}", tlb_flush_reason(detail)),
        ExitKind::TlbPvFlush if detail == 0 => "tlb.pv_flush.skipped".to_owned(),
        ExitKind::TlbPvFlush => "tlb.pv_flush".to_owned(),
        ExitKind::TlbHvFlush if detail == 0 => "tlb.hv_flush".to_owned(),
        ExitKind::TlbHvFlush => "tlb.hv_flush_ex".to_owned(),
        ExitKind::MmuPage => match detail {
            d if d == MmuPageEvent::Created as u32 => "mmu.page.created",
            d if d == MmuPageEvent::Zapped as u32 => "mmu.page.zapped",
            _ => "mmu.page.reused",
        }
        .to_owned(),
        ExitKind::HostFault if detail == FaultMode::Kernel as u32 => "fault.kernel".to_owned(),
        ExitKind::HostFault => "fault.user".to_owned(),
        ExitKind::GuestFault => "fault.guest".to_owned(),
        ExitKind::HvaUnmap => match detail {
            d if d == HvaDetail::Bytes as u32 => "mem.unmap_bytes",
            d if d == HvaDetail::ReturnedCalls as u32 => "mem.returned",
            d if d == HvaDetail::ReturnedBytes as u32 => "mem.returned_bytes",
            _ => "mem.unmap",
        }
        .to_owned(),
        ExitKind::HvaAge if detail == 0 => "mem.age".to_owned(),
        ExitKind::HvaAge => "mem.test_age".to_owned(),
        ExitKind::Refault => "mem.refault".to_owned(),
        ExitKind::GuestTime => "cpu.guest".to_owned(),
        ExitKind::Iommu => match detail {
            d if d == IommuDetail::MapBytes as u32 => "iommu.map_bytes",
            d if d == IommuDetail::Unmap as u32 => "iommu.unmap",
            d if d == IommuDetail::UnmapBytes as u32 => "iommu.unmap_bytes",
            _ => "iommu.map",
        }
        .to_owned(),
    }
}

/// `enum tlb_flush_reason` (include/linux/mm_types.h).
fn tlb_flush_reason(reason: u32) -> String {
    match reason {
        0 => "task_switch".to_owned(),
        1 => "remote_shootdown".to_owned(),
        2 => "local_shootdown".to_owned(),
        3 => "local_mm_shootdown".to_owned(),
        4 => "remote_send_ipi".to_owned(),
        other => format!("reason_{other}"),
    }
}

/// Whether a `kvm_exit` reason name is a TLB-relevant exit: a control register access (CR3 writes
/// switch address spaces) or a guest TLB invalidation instruction.
pub fn is_tlb_exit(reason_name: &str) -> bool {
    matches!(
        reason_name,
        "CR_ACCESS" | "INVLPG" | "INVPCID" | "write_cr3" | "invlpg" | "invlpga" | "invpcid"
    )
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
