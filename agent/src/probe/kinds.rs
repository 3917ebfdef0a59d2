//! Kernel keys to kinds: the typed fields of an `ExitKey` or `LatencyKey` become a [`Kind`].

use vmtrace_common::{
    ExitKind, FaultMode, HvaDetail, IommuDetail, LatencyKind, MmioType, MmuPageEvent,
};

use crate::kind::{
    CpuMode, Errno, ExitReason, FaultType, FlushReason, IommuOp, Kind, KvmExitReason, MemEvent,
    MmioAccess, MmuEvent, PioDirection, TlbEvent,
};
use crate::probe::exit_reasons::ExitReasonNames;

impl Kind {
    /// The kind of a counter key: its kind, the exit's ISA (kvm_exit) and its detail field.
    pub fn from_exit_key(kind: ExitKind, isa: u32, detail: u32, names: &ExitReasonNames) -> Self {
        match kind {
            ExitKind::Userspace => Self::Exit(ExitReason(detail)),
            ExitKind::UserspaceError => Self::RunError(Errno(detail as i32)),
            ExitKind::Pio if detail == 0 => Self::Pio(PioDirection::In),
            ExitKind::Pio => Self::Pio(PioDirection::Out),
            ExitKind::Mmio => Self::Mmio(match MmioType::try_from(detail) {
                Ok(MmioType::Write) => MmioAccess::Write,
                Ok(MmioType::Read) => MmioAccess::Read,
                Ok(MmioType::ReadUnsatisfied) => MmioAccess::ReadUnsatisfied,
                Err(other) => MmioAccess::Other(other),
            }),
            ExitKind::Cpuid => Self::Cpuid,
            ExitKind::KvmExit => Self::kvm_exit(isa, detail, names),
            ExitKind::TlbFlush => Self::Tlb(TlbEvent::Flush(FlushReason(detail))),
            ExitKind::TlbPvFlush if detail == 0 => Self::Tlb(TlbEvent::PvFlushSkipped),
            ExitKind::TlbPvFlush => Self::Tlb(TlbEvent::PvFlush),
            ExitKind::TlbHvFlush if detail == 0 => Self::Tlb(TlbEvent::HvFlush),
            ExitKind::TlbHvFlush => Self::Tlb(TlbEvent::HvFlushEx),
            ExitKind::MmuPage => Self::MmuPage(match detail {
                d if d == MmuPageEvent::Created as u32 => MmuEvent::Created,
                d if d == MmuPageEvent::Zapped as u32 => MmuEvent::Zapped,
                _ => MmuEvent::Reused,
            }),
            ExitKind::HostFault if detail == FaultMode::Kernel as u32 => {
                Self::Fault(FaultType::Kernel)
            }
            ExitKind::HostFault => Self::Fault(FaultType::User),
            ExitKind::GuestFault => Self::Fault(FaultType::Guest),
            ExitKind::HvaUnmap => Self::Mem(match detail {
                d if d == HvaDetail::Bytes as u32 => MemEvent::UnmapBytes,
                d if d == HvaDetail::ReturnedCalls as u32 => MemEvent::Returned,
                d if d == HvaDetail::ReturnedBytes as u32 => MemEvent::ReturnedBytes,
                _ => MemEvent::Unmap,
            }),
            ExitKind::HvaAge if detail == 0 => Self::Mem(MemEvent::Age),
            ExitKind::HvaAge => Self::Mem(MemEvent::TestAge),
            ExitKind::Refault => Self::Mem(MemEvent::Refault),
            ExitKind::GuestTime => Self::Cpu(CpuMode::Guest),
            ExitKind::Iommu => Self::Iommu(match detail {
                d if d == IommuDetail::MapBytes as u32 => IommuOp::MapBytes,
                d if d == IommuDetail::Unmap as u32 => IommuOp::Unmap,
                d if d == IommuDetail::UnmapBytes as u32 => IommuOp::UnmapBytes,
                _ => IommuOp::Map,
            }),
        }
    }

    /// The kind a latency histogram key is reported under: `kvm_exit.*` (exit to entry),
    /// `exit.*` (the VMM's service time) or `kick.*` (kick service time).
    pub fn from_latency_key(
        kind: LatencyKind,
        isa: u32,
        reason: u32,
        names: &ExitReasonNames,
    ) -> Self {
        match kind {
            LatencyKind::KvmExit => Self::kvm_exit(isa, reason, names),
            LatencyKind::ServiceTime => Self::Exit(ExitReason(reason)),
            LatencyKind::KickService => Self::kick(reason),
        }
    }

    /// A `kvm:kvm_exit` reason of an ISA, named as the host's format file names it.
    pub fn kvm_exit(isa: u32, reason: u32, names: &ExitReasonNames) -> Self {
        Self::KvmExit(KvmExitReason(names.name(isa, reason)))
    }
}

impl KvmExitReason {
    /// Whether this is a TLB-relevant exit: a control register access (CR3 writes switch address
    /// spaces) or a guest TLB invalidation instruction.
    pub fn touches_tlb(&self) -> bool {
        is_tlb_exit(&self.0)
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

impl ExitReason {
    /// `KVM_EXIT_MMIO`.
    pub const MMIO: Self = Self(6);

    /// The reason's name, e.g. 2 -> `io`; `None` for a code this vmtrace does not know.
    pub fn known_name(self) -> Option<&'static str> {
        KVM_EXIT_REASONS.get(self.0 as usize).copied()
    }

    /// The code of a reason name, e.g. `io` -> 2.
    pub fn from_name(name: &str) -> Option<Self> {
        let code = KVM_EXIT_REASONS.iter().position(|n| *n == name)?;
        Some(Self(code as u32))
    }
}
