//! Types shared by vmtrace's eBPF programs and its agent.
//!
//! Everything here crosses the kernel boundary through BPF maps, so every type is `#[repr(C)]`, `Copy`,
//! has explicit widths and no implicit padding. Enums cross as `u32` and are converted with `TryFrom`
//! on the agent side.
#![no_std]

/// Name of the per-CPU hash map of exit and exit-related event counts, keyed by [`ExitKey`].
pub const EXIT_COUNTS_MAP: &str = "EXIT_COUNTS";
/// Name of the per-CPU array of drop counters, indexed by [`Drop`].
pub const DROPS_MAP: &str = "DROPS";
/// Capacity of [`EXIT_COUNTS_MAP`]: distinct (cgroup, kind, detail) triples held at once.
pub const EXIT_COUNTS_CAPACITY: u32 = 16384;
/// Capacity of the per-thread "last MMIO access" map: vCPU threads tracked at once.
pub const LAST_MMIO_CAPACITY: u32 = 16384;

/// What a counter in [`EXIT_COUNTS_MAP`] counts. The meaning of [`ExitKey::detail`] depends on it.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    /// `kvm:kvm_userspace_exit`: KVM_RUN returned to the VMM. Detail: the `KVM_EXIT_*` reason.
    Userspace = 1,
    /// `kvm:kvm_pio`: a guest port access. Detail: 0 for IN, 1 for OUT.
    Pio = 2,
    /// `kvm:kvm_mmio`: a guest MMIO access, completed in the kernel or not. Detail: [`MmioType`].
    Mmio = 3,
    /// `kvm:kvm_cpuid`: a guest CPUID, always handled in the kernel. Detail: 0.
    Cpuid = 4,
    /// A `KVM_EXIT_MMIO` exit to the VMM, by the type of the vCPU's last MMIO access. Detail: [`MmioType`].
    /// Subtracting these from [`ExitKind::Mmio`] gives the accesses completed in the kernel (ioeventfd).
    MmioToUserspace = 5,
    /// `kvm:kvm_exit` on hosts that emit it (VMX, SVM). Detail: the ISA-specific exit reason.
    KvmExit = 6,
    /// `kvm:kvm_userspace_exit` with a negative errno: KVM_RUN failed (4 = EINTR, a signal). Detail: -errno.
    UserspaceError = 7,
}

impl TryFrom<u32> for ExitKind {
    type Error = u32;
    fn try_from(value: u32) -> Result<Self, u32> {
        Ok(match value {
            1 => Self::Userspace,
            2 => Self::Pio,
            3 => Self::Mmio,
            4 => Self::Cpuid,
            5 => Self::MmioToUserspace,
            6 => Self::KvmExit,
            7 => Self::UserspaceError,
            other => return Err(other),
        })
    }
}

/// `KVM_TRACE_MMIO_*`: the `type` argument of `kvm:kvm_mmio` (include/trace/events/kvm.h).
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MmioType {
    /// A read that must go to the VMM (logged before the exit).
    ReadUnsatisfied = 0,
    /// A read that completed, in the kernel or after the VMM answered.
    Read = 1,
    /// A write, logged before the kernel tries its in-kernel devices (ioeventfd, ...).
    Write = 2,
}

impl TryFrom<u32> for MmioType {
    type Error = u32;
    fn try_from(value: u32) -> Result<Self, u32> {
        Ok(match value {
            0 => Self::ReadUnsatisfied,
            1 => Self::Read,
            2 => Self::Write,
            other => return Err(other),
        })
    }
}

/// `KVM_EXIT_MMIO` from the KVM UAPI (include/uapi/linux/kvm.h).
pub const KVM_EXIT_MMIO: u32 = 6;

/// Key of [`EXIT_COUNTS_MAP`]: one counter per tenant cgroup, kind and detail.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitKey {
    /// cgroup v2 id of the task that caused the event (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
    /// An [`ExitKind`] as `u32`.
    pub kind: u32,
    /// Kind-specific detail, see [`ExitKind`].
    pub detail: u32,
}

/// Why an event could not be counted; the index into [`DROPS_MAP`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Drop {
    /// [`EXIT_COUNTS_MAP`] was full, so a new key could not be added.
    ExitCountsFull = 0,
    /// The per-thread last-MMIO map could not take an entry.
    LastMmioFull = 1,
    /// A `kvm:kvm_exit` record could not be read.
    KvmExitUnreadable = 2,
}

/// Number of [`Drop`] reasons, the size of [`DROPS_MAP`].
pub const DROP_REASONS: u32 = 3;

#[cfg(feature = "user")]
mod user {
    // SAFETY: ExitKey is repr(C), Copy, made of integers only, with no padding (8 + 4 + 4 bytes).
    unsafe impl aya::Pod for super::ExitKey {}
}
