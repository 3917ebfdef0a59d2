//! What the agent counts, as one type from probe to view: [`Kind`] for counters (`exit.io`,
//! `pio.out`, `mmio.write`, `tlb.flush.task_switch`, ...) and [`Gauge`] for values that go up and
//! down. A kernel key becomes a `Kind` in one place (`probe::kinds`), every view asks the `Kind`
//! what it needs (`view` here, the exported metric in `export::kind_metric`), and strings exist only
//! at the edges: recordings and labels (`text`).

mod text;
pub mod view;

pub use text::{ParseKindError, UnknownKind, name_matches};
pub use view::{Latency, TopColumn};

/// One thing the agent counts, per tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A return of KVM_RUN to the VMM: `exit.<KVM_EXIT reason>`.
    Exit(ExitReason),
    /// A `kvm:kvm_exit` event (VMX and SVM hosts): `kvm_exit.<the host's reason name>`.
    KvmExit(KvmExitReason),
    /// KVM_RUN failing: `run_error.<errno>`.
    RunError(Errno),
    /// A port access KVM handled: `pio.in`, `pio.out`.
    Pio(PioDirection),
    /// An MMIO access KVM handled: `mmio.read`, `mmio.write`, ...
    Mmio(MmioAccess),
    /// A CPUID the kernel served: `cpuid`.
    Cpuid,
    /// A virtio queue kick: `kick.q<N>`, `kick.any`.
    Kick(Queue),
    /// TLB activity: `tlb.*`.
    Tlb(TlbEvent),
    /// A page fault: `fault.*`.
    Fault(FaultType),
    /// A KVM MMU page-table page: `mmu.page.*`.
    MmuPage(MmuEvent),
    /// A host change to a VMM's memory: `mem.*`.
    Mem(MemEvent),
    /// A memory event the cgroup counted: `memcg.*`.
    Memcg(MemcgEvent),
    /// An IOMMU mapping operation: `iommu.*`.
    Iommu(IommuOp),
    /// CPU time in ns by mode: `cpu.guest`, `tax.kernel`, `tax.vmm`.
    Cpu(CpuMode),
    /// A kind this vmtrace does not know, read from a recording a newer one wrote.
    Unknown(UnknownKind),
}

/// A `KVM_EXIT_*` reason code (include/uapi/linux/kvm.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitReason(pub u32);

/// A `kvm_exit` reason as the host's tracepoint format file names it, e.g. `EPT_VIOLATION`, `npf`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvmExitReason(pub String);

/// The errno of a failed KVM_RUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PioDirection {
    In,
    Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MmioAccess {
    Read,
    Write,
    /// A read KVM could not complete itself: it exits to the VMM.
    ReadUnsatisfied,
    /// Derived: MMIO writes the kernel completed itself (ioeventfd doorbells and other in-kernel
    /// devices), i.e. `mmio.write` minus the writes that exited to the VMM.
    WriteKernel,
    /// A `kvm_mmio` type this vmtrace does not know.
    Other(u32),
}

/// A virtio queue: the datamatch of its doorbell, or any for a doorbell without datamatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    Index(u32),
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlbEvent {
    /// A host TLB flush by a VMM process, by `enum tlb_flush_reason`.
    Flush(FlushReason),
    /// A paravirtual flush request; `skipped` when the vCPU was preempted and the flush deferred.
    PvFlush,
    PvFlushSkipped,
    /// Hyper-V flush hypercalls.
    HvFlush,
    HvFlushEx,
    /// Derived: `kvm_exit` reasons that touch the guest's TLB (see `probe::kinds::is_tlb_exit`).
    Exit,
    /// Hardware dTLB misses of the VMM threads, where the host has the counters.
    DtlbLoadMiss,
    DtlbStoreMiss,
}

/// `enum tlb_flush_reason` (include/linux/mm_types.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlushReason(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultType {
    /// A fault in a VMM's own code.
    User,
    /// The kernel faulting on a VMM's memory (e.g. KVM's instruction emulator).
    Kernel,
    /// An EPT/NPT violation (VMX and SVM hosts).
    Guest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MmuEvent {
    Created,
    Reused,
    Zapped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemEvent {
    /// `kvm_unmap_hva_range` calls and their bytes.
    Unmap,
    UnmapBytes,
    /// The guest-memory part of a VMM's madvise discards (a balloon), calls and bytes.
    Returned,
    ReturnedBytes,
    /// Reclaim ageing guest memory.
    Age,
    TestAge,
    /// Faults on memory the VMM had returned.
    Refault,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemcgEvent {
    Pgfault,
    Pgmajfault,
    LimitHits,
    OomKills,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IommuOp {
    Map,
    MapBytes,
    Unmap,
    UnmapBytes,
}

/// CPU time of a tenant's cgroups, in ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuMode {
    /// In guest mode.
    Guest,
    /// Tax: in the kernel.
    TaxKernel,
    /// Tax: in user space outside guest mode.
    TaxVmm,
}

/// A value that goes up and down, per tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Gauge {
    /// Memory charged to the tenant's cgroups now (bytes): `memory.usage_bytes`.
    MemoryUsage,
    /// Share of the tenant's CPU time over the last interval that was tax (0 to 1): `tax.ratio`.
    TaxRatio,
    /// A gauge this vmtrace does not know, read from a recording a newer one wrote.
    Unknown(UnknownKind),
}

/// One series of a tenant's timeline: a kind's rate, or a gauge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Series {
    Rate(Kind),
    Gauge(Gauge),
}

impl Kind {
    /// The kind of a queue's kicks; `kick.any` for doorbells without datamatch.
    pub fn kick(queue: u32) -> Self {
        Self::Kick(if queue == vmtrace_common::ANY_QUEUE {
            Queue::Any
        } else {
            Queue::Index(queue)
        })
    }

    /// A kind read from a recording: a known kind, or [`Kind::Unknown`] for one a newer vmtrace
    /// added.
    pub fn from_recorded(text: &str) -> Self {
        text.parse()
            .unwrap_or_else(|_| Self::Unknown(UnknownKind::new(text)))
    }
}

impl Gauge {
    /// A gauge read from a recording: a known gauge, or [`Gauge::Unknown`].
    pub fn from_recorded(text: &str) -> Self {
        text.parse()
            .unwrap_or_else(|_| Self::Unknown(UnknownKind::new(text)))
    }
}

#[cfg(test)]
mod tests;
