//! What each view takes from a kind: `top`'s column and short name, whether it is an exit, whether
//! it has a latency histogram, whether it is host-side. Every match here is exhaustive, so a new
//! kind does not compile until each view has decided what to do with it.

use super::{CpuMode, ExitReason, Kind, KvmExitReason, MmioAccess, TlbEvent, UnknownKind};

/// The column of `top` a kind's rate is summed into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopColumn {
    Exits,
    Kicks,
    Tlb,
    Faults,
    /// The virtualisation tax: ns of host CPU per second, a share of one CPU.
    Tax,
    /// Shown only on the tenant's detail screen.
    None,
}

/// What a kind's latency histogram measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// From a `kvm_exit` to the same vCPU's next entry (VMX, SVM).
    ExitToEntry,
    /// From KVM_RUN returning to the VMM to its next KVM_RUN.
    VmmService,
    /// From a queue's first unserved kick to the VMM reading its eventfd.
    KickService,
}

impl Latency {
    /// How `top` describes it.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::ExitToEntry => "exit→entry",
            Self::VmmService => "VMM service",
            Self::KickService => "kick service",
        }
    }
}

impl Kind {
    /// The column of `top` this kind counts in.
    pub fn top_column(&self) -> TopColumn {
        match self {
            Self::Exit(_) | Self::KvmExit(_) => TopColumn::Exits,
            Self::Kick(_) => TopColumn::Kicks,
            Self::Tlb(_) => TopColumn::Tlb,
            Self::Fault(_) => TopColumn::Faults,
            Self::Cpu(CpuMode::TaxKernel | CpuMode::TaxVmm) => TopColumn::Tax,
            Self::Cpu(CpuMode::Guest)
            | Self::RunError(_)
            | Self::Pio(_)
            | Self::Mmio(_)
            | Self::Cpuid
            | Self::MmuPage(_)
            | Self::Mem(_)
            | Self::Memcg(_)
            | Self::Iommu(_) => TopColumn::None,
            Self::Unknown(unknown) => unknown.top_column(),
        }
    }

    /// Whether this kind counts as an exit of a tenant. `hardware` is true when the tenant's exits
    /// come from kvm_exit, which already includes every other kind's exits; otherwise the exits are
    /// the returns to the VMM plus the exits the kernel served itself that the probes see
    /// (in-kernel MMIO writes, CPUID).
    pub fn counts_as_exit(&self, hardware: bool) -> bool {
        match self {
            Self::KvmExit(_) => hardware,
            Self::Exit(_) | Self::Mmio(MmioAccess::WriteKernel) | Self::Cpuid => !hardware,
            Self::Mmio(
                MmioAccess::Read
                | MmioAccess::Write
                | MmioAccess::ReadUnsatisfied
                | MmioAccess::Other(_),
            )
            | Self::RunError(_)
            | Self::Pio(_)
            | Self::Kick(_)
            | Self::Tlb(_)
            | Self::Fault(_)
            | Self::MmuPage(_)
            | Self::Mem(_)
            | Self::Memcg(_)
            | Self::Iommu(_)
            | Self::Cpu(_)
            | Self::Unknown(_) => false,
        }
    }

    /// The hardware exit reason of a kind from `kvm:kvm_exit`.
    pub fn kvm_exit_reason(&self) -> Option<&KvmExitReason> {
        match self {
            Self::KvmExit(reason) => Some(reason),
            Self::Exit(_)
            | Self::RunError(_)
            | Self::Pio(_)
            | Self::Mmio(_)
            | Self::Cpuid
            | Self::Kick(_)
            | Self::Tlb(_)
            | Self::Fault(_)
            | Self::MmuPage(_)
            | Self::Mem(_)
            | Self::Memcg(_)
            | Self::Iommu(_)
            | Self::Cpu(_)
            | Self::Unknown(_) => None,
        }
    }

    /// Whether this kind comes from `kvm:kvm_exit`: a tenant with one has hardware exit reasons.
    pub fn is_hardware_exit(&self) -> bool {
        self.kvm_exit_reason().is_some()
    }

    /// Whether this is a host TLB flush (`tlb.flush.<reason>`), as `watch` sums them.
    pub fn is_tlb_flush(&self) -> bool {
        match self {
            Self::Tlb(TlbEvent::Flush(_)) => true,
            Self::Tlb(
                TlbEvent::PvFlush
                | TlbEvent::PvFlushSkipped
                | TlbEvent::HvFlush
                | TlbEvent::HvFlushEx
                | TlbEvent::Exit
                | TlbEvent::DtlbLoadMiss
                | TlbEvent::DtlbStoreMiss,
            ) => false,
            Self::Exit(_)
            | Self::KvmExit(_)
            | Self::RunError(_)
            | Self::Pio(_)
            | Self::Mmio(_)
            | Self::Cpuid
            | Self::Kick(_)
            | Self::Fault(_)
            | Self::MmuPage(_)
            | Self::Mem(_)
            | Self::Memcg(_)
            | Self::Iommu(_)
            | Self::Cpu(_)
            | Self::Unknown(_) => false,
        }
    }

    /// The short name people read: `io` for `exit.io`, `EPT_VIOLATION` for
    /// `kvm_exit.EPT_VIOLATION`, `mmio.kern` for in-kernel MMIO writes, else the kind's name.
    pub fn reason_name(&self) -> String {
        match self {
            Self::Exit(reason) => ExitReason::to_string(reason),
            Self::KvmExit(KvmExitReason(name)) => name.clone(),
            Self::Mmio(MmioAccess::WriteKernel) => "mmio.kern".to_owned(),
            Self::RunError(_)
            | Self::Pio(_)
            | Self::Mmio(_)
            | Self::Cpuid
            | Self::Kick(_)
            | Self::Tlb(_)
            | Self::Fault(_)
            | Self::MmuPage(_)
            | Self::Mem(_)
            | Self::Memcg(_)
            | Self::Iommu(_)
            | Self::Cpu(_)
            | Self::Unknown(_) => self.to_string(),
        }
    }

    /// What this kind's latency histogram measures, if it has one.
    pub fn latency(&self) -> Option<Latency> {
        match self {
            Self::Exit(_) => Some(Latency::VmmService),
            Self::KvmExit(_) => Some(Latency::ExitToEntry),
            Self::Kick(_) => Some(Latency::KickService),
            Self::RunError(_)
            | Self::Pio(_)
            | Self::Mmio(_)
            | Self::Cpuid
            | Self::Tlb(_)
            | Self::Fault(_)
            | Self::MmuPage(_)
            | Self::Mem(_)
            | Self::Memcg(_)
            | Self::Iommu(_)
            | Self::Cpu(_)
            | Self::Unknown(_) => None,
        }
    }

    /// Whether this kind counts what the host does for a tenant (TLB, faults, memory, CPU,
    /// IOMMU), as opposed to what its guests do (exits, guest events, kicks).
    pub fn is_host_side(&self) -> bool {
        match self {
            Self::Tlb(_)
            | Self::Fault(_)
            | Self::MmuPage(_)
            | Self::Mem(_)
            | Self::Memcg(_)
            | Self::Iommu(_)
            | Self::Cpu(_) => true,
            Self::Exit(_)
            | Self::KvmExit(_)
            | Self::RunError(_)
            | Self::Pio(_)
            | Self::Mmio(_)
            | Self::Cpuid
            | Self::Kick(_) => false,
            Self::Unknown(unknown) => unknown.is_host_side(),
        }
    }
}

/// Families of kinds by the first part of their names, for kinds a newer vmtrace added: they are
/// shown in the column of their family, as the views did before kinds were typed.
const HOST_SIDE_PREFIXES: [&str; 8] = [
    "tlb.", "fault.", "mem.", "mmu.", "memcg.", "tax.", "cpu.", "iommu.",
];

impl UnknownKind {
    fn top_column(&self) -> TopColumn {
        let name = self.as_str();
        if name.starts_with("kick.") {
            TopColumn::Kicks
        } else if name.starts_with("tlb.") {
            TopColumn::Tlb
        } else if name.starts_with("fault.") {
            TopColumn::Faults
        } else if name == "tax" || name.starts_with("tax.") {
            TopColumn::Tax
        } else {
            TopColumn::None
        }
    }

    fn is_host_side(&self) -> bool {
        HOST_SIDE_PREFIXES
            .iter()
            .any(|p| self.as_str().starts_with(p))
    }
}
