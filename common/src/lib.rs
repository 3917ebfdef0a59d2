//! Types shared by vmtrace's eBPF programs and its agent.
//!
//! Everything here crosses the kernel boundary through BPF maps, so every type is `#[repr(C)]`, `Copy`,
//! has explicit widths and no implicit padding. Enums cross as `u32` and are converted with `TryFrom`
//! on the agent side.
//!
//! Each such type's size and alignment are asserted at compile time right after it (kernel and
//! agent compile this crate for different targets, and both builds check them), so a field that
//! changes the layout, or adds padding, fails to build until its numbers are restated.
#![no_std]

// Parsing of the host's mount table and cgroup membership, shared by the agent, the reference VMM,
// xtask and the tests; the eBPF programs build without it.
#[cfg(feature = "std")]
extern crate std;
#[cfg(feature = "std")]
pub mod cgroup;
#[cfg(feature = "std")]
pub mod mounts;

pub mod names;

// The names of the maps the agent reads, under the names it has always used for them.
pub use names::maps::{
    CGROUP_EVENTS as CGROUP_EVENTS_MAP, DOORBELL_ADDRS as DOORBELL_ADDRS_MAP,
    DOORBELLS as DOORBELLS_MAP, DROPS as DROPS_MAP, EXIT_COUNTS as EXIT_COUNTS_MAP,
    EXIT_LATENCY as EXIT_LATENCY_MAP, INFERRED_KICKS as INFERRED_KICKS_MAP,
    IOMMU_FAULTS as IOMMU_FAULTS_MAP, KICKS as KICKS_MAP,
    REMOVED_DOORBELLS as REMOVED_DOORBELLS_MAP, THREAD_EXITS as THREAD_EXITS_MAP,
    THREAD_NAMES as THREAD_NAMES_MAP, VMM_PROCESSES as VMM_PROCESSES_MAP,
};

/// Fails the build unless `$type` is `$size` bytes with alignment `$align`: the layout the kernel
/// side writes and the agent reads. The numbers are stated, not computed, so that any change to them
/// is a deliberate edit here.
macro_rules! assert_layout {
    ($type:ty, size $size:literal, align $align:literal) => {
        const _: () = assert!(
            core::mem::size_of::<$type>() == $size,
            concat!(
                stringify!($type),
                " is not ",
                stringify!($size),
                " bytes: a field changed the layout shared with the kernel or added padding"
            )
        );
        const _: () = assert!(
            core::mem::align_of::<$type>() == $align,
            concat!(
                stringify!($type),
                " is not aligned to ",
                stringify!($align),
                " bytes: a field changed the layout shared with the kernel"
            )
        );
    };
}

/// Capacity of [`EXIT_COUNTS_MAP`]: distinct (cgroup, kind, detail) triples held at once.
pub const EXIT_COUNTS_CAPACITY: u32 = 16384;

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
    /// `kvm:kvm_exit` on hosts that emit it (VMX, SVM). Detail: the ISA-specific exit reason.
    KvmExit = 6,
    /// `kvm:kvm_userspace_exit` with a negative errno: KVM_RUN failed (4 = EINTR, a signal). Detail: -errno.
    UserspaceError = 7,
    /// `tlb:tlb_flush` by a VMM process. Detail: the kernel's `enum tlb_flush_reason`.
    TlbFlush = 8,
    /// `kvm:kvm_pv_tlb_flush`: a guest's paravirtual TLB flush request. Detail: `need_flush_tlb`.
    TlbPvFlush = 9,
    /// `kvm:kvm_hv_flush_tlb` (detail 0) and `kvm_hv_flush_tlb_ex` (detail 1): Hyper-V flush hypercalls.
    TlbHvFlush = 10,
    /// kvmmmu shadow/TDP page table pages of the VM. Detail: [`MmuPageEvent`].
    MmuPage = 11,
    /// `exceptions:page_fault_user` / `page_fault_kernel` (on a user address) of a VMM process.
    /// Detail: [`FaultMode`].
    HostFault = 12,
    /// `kvm:kvm_page_fault`: a guest access the hardware could not translate (EPT/NPT violation). Detail: 0.
    GuestFault = 13,
    /// `kvm:kvm_unmap_hva_range`: the host invalidates part of a VMM's address space. Detail: [`HvaDetail`].
    HvaUnmap = 14,
    /// Host reclaim ageing guest memory: `kvm_age_hva` (detail 0), `kvm_test_age_hva` (detail 1).
    HvaAge = 15,
    /// A host page fault on memory the VMM had returned to the host (a balloon refault). Detail: 0.
    Refault = 16,
    /// IOMMU mappings made or removed by the tenant's tasks (VFIO DMA maps). Detail: [`IommuDetail`].
    Iommu = 17,
    /// Time in guest mode, ns: a vCPU thread's `kvm_entry` to its next `kvm_exit` (VMX, SVM). The
    /// counter adds the time instead of one. Detail: 0.
    GuestTime = 18,
}

impl TryFrom<u32> for ExitKind {
    type Error = u32;
    fn try_from(value: u32) -> Result<Self, u32> {
        Ok(match value {
            1 => Self::Userspace,
            2 => Self::Pio,
            3 => Self::Mmio,
            4 => Self::Cpuid,
            6 => Self::KvmExit,
            7 => Self::UserspaceError,
            8 => Self::TlbFlush,
            9 => Self::TlbPvFlush,
            10 => Self::TlbHvFlush,
            11 => Self::MmuPage,
            12 => Self::HostFault,
            13 => Self::GuestFault,
            14 => Self::HvaUnmap,
            15 => Self::HvaAge,
            16 => Self::Refault,
            17 => Self::Iommu,
            18 => Self::GuestTime,
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

/// Detail of [`ExitKind::MmuPage`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MmuPageEvent {
    /// `kvmmmu:kvm_mmu_get_page` found an existing page.
    Reused = 0,
    /// `kvmmmu:kvm_mmu_get_page` allocated a new page.
    Created = 1,
    /// `kvmmmu:kvm_mmu_prepare_zap_page`: a page is being zapped.
    Zapped = 2,
}

/// Detail of [`ExitKind::HostFault`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// The VMM's own code touched the page.
    User = 0,
    /// The kernel touched the VMM's memory on its behalf (KVM's instruction emulator, copy_to_user).
    Kernel = 1,
}

/// Detail of [`ExitKind::HvaUnmap`]. The bytes counters add the range size instead of one.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HvaDetail {
    /// Every invalidation.
    Calls = 0,
    /// Bytes of every invalidation.
    Bytes = 1,
    /// Invalidations made by the VMM's own `madvise` discarding memory (a balloon returning pages).
    ReturnedCalls = 2,
    /// Bytes of those.
    ReturnedBytes = 3,
}

/// Detail of [`ExitKind::Iommu`]. The bytes counters add the size instead of one.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IommuDetail {
    Map = 0,
    MapBytes = 1,
    Unmap = 2,
    UnmapBytes = 3,
}

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
    /// For [`ExitKind::KvmExit`], the `isa` of the record (1 VMX, 2 SVM, 3 PVM); else 0.
    pub isa: u32,
    /// Keeps the size a multiple of 8 without implicit padding; always 0.
    pub reserved: u32,
}

// 8 + 4 * 4 bytes, no padding.
assert_layout!(ExitKey, size 24, align 8);

/// Capacity of [`THREAD_EXITS_MAP`]: (thread, kind, detail) triples held at once. The agent
/// removes the entries of threads that have ended, so this bounds the live vCPU threads times
/// their exit reasons; beyond it, a thread's new reason is a counted drop.
pub const THREAD_EXITS_CAPACITY: u32 = 8192;

/// Key of [`THREAD_EXITS_MAP`]: the exit events of one VMM thread (a vCPU), as [`ExitKey`] has
/// them per cgroup. Only the kinds that make up exits are counted: [`ExitKind::Userspace`],
/// [`ExitKind::UserspaceError`], [`ExitKind::Pio`], [`ExitKind::Mmio`] (doorbell writes
/// included), [`ExitKind::Cpuid`] and [`ExitKind::KvmExit`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThreadExitKey {
    /// The thread's cgroup v2 id, its tenant.
    pub cgroup_id: u64,
    /// Thread id (the low half of pid_tgid).
    pub tid: u32,
    /// An [`ExitKind`] as `u32`.
    pub kind: u32,
    pub detail: u32,
    /// As [`ExitKey::isa`].
    pub isa: u32,
}

// 8 + 4 * 4 bytes, no padding.
assert_layout!(ThreadExitKey, size 24, align 8);

/// Capacity of [`EXIT_LATENCY_MAP`].
pub const EXIT_LATENCY_CAPACITY: u32 = 4096;
/// Number of log2 buckets: bucket `i` counts latencies in [2^i, 2^(i+1)) ns (bucket 0 also holds 0
/// and 1 ns); the last bucket holds everything from 2^39 ns (about 9 minutes) on.
pub const LATENCY_BUCKETS: usize = 40;

/// What a latency histogram measures; [`LatencyKey::kind`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LatencyKind {
    /// `kvm:kvm_exit` to the same vCPU thread's next `kvm:kvm_entry` (VMX, SVM). Reason: the ISA's.
    KvmExit = 1,
    /// A return to the VMM (`kvm_userspace_exit`) to the same thread's next `KVM_RUN` (`kvm_fpu` with
    /// load = 1): the time the VMM took to serve the exit. Reason: the `KVM_EXIT_*` value.
    ServiceTime = 2,
    /// A queue's first unserved kick to the VMM's next read of that queue's eventfd: how long the
    /// VMM took to pick the kick up. Reason: the queue ([`ANY_QUEUE`] without datamatch).
    KickService = 3,
}

impl TryFrom<u32> for LatencyKind {
    type Error = u32;
    fn try_from(value: u32) -> Result<Self, u32> {
        match value {
            1 => Ok(Self::KvmExit),
            2 => Ok(Self::ServiceTime),
            3 => Ok(Self::KickService),
            other => Err(other),
        }
    }
}

/// Key of [`EXIT_LATENCY_MAP`]: one histogram per tenant cgroup, kind, ISA and reason.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LatencyKey {
    pub cgroup_id: u64,
    /// A [`LatencyKind`] as `u32`.
    pub kind: u32,
    /// 1 VMX, 2 SVM, 3 PVM, as in `kvm:kvm_exit`; 0 for [`LatencyKind::ServiceTime`].
    pub isa: u32,
    pub reason: u32,
    /// Keeps the size a multiple of 8 without implicit padding; always 0.
    pub reserved: u32,
}

// 8 + 4 * 4 bytes, no padding.
assert_layout!(LatencyKey, size 24, align 8);

/// A log2 histogram of exit latencies (exit to the next entry of the same vCPU thread), in ns.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    pub buckets: [u64; LATENCY_BUCKETS],
    pub count: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
}

// (40 + 3) * 8 bytes, no padding.
assert_layout!(LatencyHistogram, size 344, align 8);

impl LatencyHistogram {
    pub const EMPTY: Self = Self {
        buckets: [0; LATENCY_BUCKETS],
        count: 0,
        sum_ns: 0,
        max_ns: 0,
    };

    /// The bucket of a latency: floor(log2(ns)), clamped to the last bucket.
    #[inline(always)]
    pub fn bucket(ns: u64) -> usize {
        let log2 = 63 - (ns | 1).leading_zeros() as usize;
        if log2 < LATENCY_BUCKETS {
            log2
        } else {
            LATENCY_BUCKETS - 1
        }
    }

    #[inline(always)]
    pub fn record(&mut self, ns: u64) {
        let bucket = Self::bucket(ns);
        if let Some(slot) = self.buckets.get_mut(bucket) {
            *slot += 1;
        }
        self.count += 1;
        self.sum_ns += ns;
        if ns > self.max_ns {
            self.max_ns = ns;
        }
    }
}

/// `KVM_IOEVENTFD`, `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)` (64 bytes): a VMM (de)registers a doorbell.
pub const KVM_IOEVENTFD: u32 = 0x4040_AE79;
/// `struct kvm_ioeventfd` flags (include/uapi/linux/kvm.h).
pub const KVM_IOEVENTFD_FLAG_DATAMATCH: u32 = 1 << 0;
pub const KVM_IOEVENTFD_FLAG_PIO: u32 = 1 << 1;
pub const KVM_IOEVENTFD_FLAG_DEASSIGN: u32 = 1 << 2;

/// `struct kvm_ioeventfd` from include/uapi/linux/kvm.h, as the VMM passes it to `KVM_IOEVENTFD`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KvmIoeventfd {
    pub datamatch: u64,
    pub addr: u64,
    pub len: u32,
    pub fd: i32,
    pub flags: u32,
    pub pad: [u8; 36],
}

// 8 + 8 + 4 * 3 + 36 bytes, no padding.
assert_layout!(KvmIoeventfd, size 64, align 8);
// And the size the ioctl number encodes (its bits 16 to 29).
const _: () =
    assert!(core::mem::size_of::<KvmIoeventfd>() == ((KVM_IOEVENTFD >> 16) & 0x3fff) as usize);

/// Capacity of [`DOORBELLS_MAP`], [`KICKS_MAP`] and [`DOORBELL_ADDRS_MAP`].
pub const DOORBELLS_CAPACITY: u32 = 16384;

/// A guest address of one VMM process that has at least one doorbell.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct DoorbellAddr {
    pub tgid: u32,
    /// [`SPACE_MMIO`] or [`SPACE_PIO`].
    pub space: u32,
    pub addr: u64,
}

// 4 + 4 + 8 bytes, no padding.
assert_layout!(DoorbellAddr, size 16, align 8);

/// Capacity of [`REMOVED_DOORBELLS_MAP`].
pub const REMOVED_DOORBELLS_CAPACITY: u32 = 4096;
/// Address spaces of doorbells.
pub const SPACE_MMIO: u32 = 0;
pub const SPACE_PIO: u32 = 1;
/// [`Doorbell::queue`] of a doorbell registered without datamatch.
pub const ANY_QUEUE: u32 = u32::MAX;

/// A doorbell of one VMM process: a guest write here is completed in the kernel by an ioeventfd.
/// Doorbells with datamatch are keyed by their value; those without by `wildcard` = 1 and value 0.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DoorbellKey {
    /// Process id (tgid) of the VMM that registered it: the VM's owner.
    pub tgid: u32,
    /// [`SPACE_MMIO`] or [`SPACE_PIO`].
    pub space: u32,
    pub addr: u64,
    pub datamatch: u64,
    pub wildcard: u32,
    /// The access length the ioeventfd matches; 0 matches any (as KVM does).
    pub len: u32,
}

// 4 + 4 + 8 + 8 + 4 + 4 bytes, no padding.
assert_layout!(DoorbellKey, size 32, align 8);

impl DoorbellKey {
    /// The address of the doorbell, as [`DOORBELL_ADDRS_MAP`] keys it.
    #[inline(always)]
    pub fn address(&self) -> DoorbellAddr {
        DoorbellAddr {
            tgid: self.tgid,
            space: self.space,
            addr: self.addr,
        }
    }
}

/// What is known of a doorbell.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Doorbell {
    /// The queue it kicks (its datamatch), or [`ANY_QUEUE`].
    pub queue: u32,
    /// The VM's file descriptor in the VMM, for people.
    pub vm_fd: u32,
    /// The eventfd KVM signals, as a file descriptor of the VMM: its reads mark the kick served.
    pub eventfd: u32,
    pub reserved: u32,
    /// The cgroup of the thread that registered it: the tenant its kicks are counted for.
    pub cgroup_id: u64,
}

// 4 * 4 + 8 bytes, no padding.
assert_layout!(Doorbell, size 24, align 8);

/// Key of the pending-kick map: an eventfd of a VMM process.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventfdKey {
    pub tgid: u32,
    pub fd: u32,
}

// 4 + 4 bytes, no padding.
assert_layout!(EventfdKey, size 8, align 4);

/// The first kick of a queue that its VMM has not read from the eventfd yet.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PendingKick {
    pub time_ns: u64,
    pub cgroup_id: u64,
    pub queue: u32,
    pub reserved: u32,
}

// 8 + 8 + 4 + 4 bytes, no padding.
assert_layout!(PendingKick, size 24, align 8);

/// Capacity of the pending-kick map: eventfds tracked at once.
pub const PENDING_KICKS_CAPACITY: u32 = 16384;

/// Kicks are reported per tenant, VM (VMM process and VM fd), doorbell and queue.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KickKey {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub space: u32,
    pub addr: u64,
    pub queue: u32,
    /// The VM's file descriptor in the VMM process; 0 for a kick inferred from an in-kernel
    /// write (no VM fd is 0: it is the VMM's standard input).
    pub vm_fd: u32,
}

// 8 + 4 + 4 + 8 + 4 + 4 bytes, no padding.
assert_layout!(KickKey, size 32, align 8);

/// A guest MMIO write that hit no known doorbell, kept in its [`ThreadSlot`] until the thread's
/// next MMIO event or return to the VMM tells whether the VMM served it (a `KVM_EXIT_MMIO`
/// follows at once) or the kernel completed it (anything else follows).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PendingWrite {
    pub addr: u64,
    /// The value written: a virtqueue index, for a doorbell.
    pub value: u64,
    pub cgroup_id: u64,
    /// The thread the slot holds a write of; 0 when it holds none.
    pub tid: u32,
    /// Its process, the VMM an inferred kick is counted for.
    pub tgid: u32,
}

// 8 + 8 + 8 + 4 + 4 bytes, no padding.
assert_layout!(PendingWrite, size 32, align 8);

/// `KVM_EXIT_MMIO`: the VMM is to serve an MMIO access.
pub const KVM_EXIT_MMIO: u32 = 6;

/// A thread's return to the VMM that has not seen its next `KVM_RUN` yet; part of its [`ThreadSlot`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ServiceStart {
    /// When KVM_RUN returned to the VMM; 0 once the next KVM_RUN consumed it.
    pub time_ns: u64,
    pub cgroup_id: u64,
    pub reason: u32,
    /// The thread the slot belongs to (slots are indexed by thread id modulo [`THREAD_SLOTS`]).
    pub tid: u32,
}

// 8 + 8 + 4 + 4 bytes, no padding.
assert_layout!(ServiceStart, size 24, align 8);

/// What a thread left pending between its events, in the slot of its id modulo [`THREAD_SLOTS`]:
/// its return to the VMM and its MMIO write that hit no known doorbell. The two are one cache line
/// (the array is page-aligned, `BPF_F_MMAPABLE`), read once by each event of the hot path.
#[repr(C, align(64))]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ThreadSlot {
    pub service: ServiceStart,
    pub write: PendingWrite,
}

// 24 + 32 bytes, padded to the cache line.
assert_layout!(ThreadSlot, size 64, align 64);

/// Bits of the probes' `SWITCHES` global, which the agent sets at load. They are one word so that
/// a hot probe reads one cache line for all of them; the verifier knows the loaded value (the
/// global is read-only) and drops the branches it rules out.
pub mod switches {
    /// Count every VMM thread's exits in [`crate::names::maps::THREAD_EXITS`] (the per-vCPU view
    /// of `vmtrace top`).
    pub const THREAD_EXITS: u32 = 1;
    /// Doorbells are learnt from `KVM_IOEVENTFD` (`--vm-ioctls`). Without that none is ever
    /// known, so a guest write skips the lookups and goes straight to inference.
    pub const DOORBELLS_LEARNT: u32 = 1 << 1;
    /// Kick service latency (`--kick-latency`), which needs `sys_enter_read`.
    pub const KICK_LATENCY: u32 = 1 << 2;
    /// The VMMs' service time (`--service-time`), which attaches `kvm_fpu`; without it a return
    /// to the VMM reads no clock.
    pub const SERVICE_TIME: u32 = 1 << 3;
}

/// Slots of the per-thread arrays ([`ThreadSlot`], and the exit and entry starts of VMX and SVM). A thread's slot is its id modulo this; two live
/// vCPU threads whose ids collide share one, and the loser's service time is counted as lost.
pub const THREAD_SLOTS: u32 = 65536;

/// Longest cgroup path carried by a [`CgroupEvent`]; longer ones are cut.
pub const CGROUP_PATH_LEN: usize = 256;

/// What happened to a cgroup; [`CgroupEvent::kind`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CgroupEventKind {
    Mkdir = 1,
    Rmdir = 2,
    /// A task moved into the cgroup.
    Attach = 3,
}

impl TryFrom<u32> for CgroupEventKind {
    type Error = u32;
    fn try_from(value: u32) -> Result<Self, u32> {
        match value {
            1 => Ok(Self::Mkdir),
            2 => Ok(Self::Rmdir),
            3 => Ok(Self::Attach),
            other => Err(other),
        }
    }
}

/// A cgroup v2 lifecycle event, streamed to the agent so that a tenant that lives for a moment is
/// still named, and a removed one's series end.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct CgroupEvent {
    /// The cgroup's id, as `bpf_get_current_cgroup_id` returns it.
    pub id: u64,
    /// A [`CgroupEventKind`] as `u32`.
    pub kind: u32,
    /// Bytes of `path` used, without the terminating NUL.
    pub path_len: u32,
    /// Path below the cgroup v2 root, e.g. `/kubepods/burstable/pod…`, NUL-terminated.
    pub path: [u8; CGROUP_PATH_LEN],
}

// 8 + 4 + 4 + 256 bytes, no padding.
assert_layout!(CgroupEvent, size 272, align 8);

/// A vCPU thread's entry into the guest that has not seen its exit yet, in the slot of its thread id
/// modulo [`THREAD_SLOTS`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GuestEntry {
    /// When the vCPU entered the guest; 0 once its exit consumed it.
    pub time_ns: u64,
    pub tid: u32,
    pub reserved: u32,
}

// 8 + 4 + 4 bytes, no padding.
assert_layout!(GuestEntry, size 16, align 8);

/// A vCPU thread's exit that has not seen its entry yet, in the slot of its thread id modulo
/// [`THREAD_SLOTS`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ExitStart {
    /// When the exit began; 0 once the thread's next entry consumed it.
    pub time_ns: u64,
    pub cgroup_id: u64,
    pub isa: u32,
    pub reason: u32,
    pub tid: u32,
    pub reserved: u32,
}

// 8 + 8 + 4 * 4 bytes, no padding.
assert_layout!(ExitStart, size 32, align 8);

/// Capacity of [`VMM_PROCESSES_MAP`].
pub const VMM_PROCESSES_CAPACITY: u32 = 16384;
/// VMMs whose guest memory slots and returned ranges are kept at once (their values are a few
/// hundred bytes, preallocated: 4096 VMMs take about 1.6 MiB).
pub const VMM_MEMORY_CAPACITY: u32 = 4096;

/// `madvise` advice values that give memory back to the host (include/uapi/asm-generic/mman-common.h).
pub const MADV_DONTNEED: u32 = 4;
pub const MADV_FREE: u32 = 8;
pub const MADV_REMOVE: u32 = 9;
pub const MADV_DONTNEED_LOCKED: u32 = 24;

/// `KVM_SET_USER_MEMORY_REGION`, `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)` (32 bytes).
pub const KVM_SET_USER_MEMORY_REGION: u32 = 0x4020_AE46;
/// `KVM_SET_USER_MEMORY_REGION2`, `_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)` (160
/// bytes, starting like the first).
pub const KVM_SET_USER_MEMORY_REGION2: u32 = 0x40A0_AE49;

/// The first 32 bytes of `struct kvm_userspace_memory_region` and `..._region2`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KvmUserspaceMemoryRegion {
    /// Address space id in the high 16 bits, slot id in the low 16.
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    /// 0 deletes the slot.
    pub memory_size: u64,
    pub userspace_addr: u64,
}

// 4 + 4 + 8 * 3 bytes, no padding.
assert_layout!(KvmUserspaceMemoryRegion, size 32, align 8);
// And the size the first ioctl number encodes (its bits 16 to 29).
const _: () = assert!(
    core::mem::size_of::<KvmUserspaceMemoryRegion>()
        == ((KVM_SET_USER_MEMORY_REGION >> 16) & 0x3fff) as usize
);

/// Memory slots remembered per VMM; slot `s` is kept at index `s % GUEST_SLOTS`, so a VMM with
/// more slots than this (or two slots that collide) has some of its guest memory unknown.
pub const GUEST_SLOTS: usize = 16;

/// A VMM's guest memory as host virtual address ranges `[start, end)`, by slot; `[0, 0)` is unused.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GuestMemory {
    pub ranges: [[u64; 2]; GUEST_SLOTS],
}

// 16 * 2 * 8 bytes, no padding.
assert_layout!(GuestMemory, size 256, align 8);

/// Host virtual address ranges a VMM returned to the host, most recent first, kept to count the
/// faults that take them back.
pub const RETURNED_RANGES: usize = 8;

/// A VMM's recently returned ranges; slot `next % RETURNED_RANGES` is overwritten next.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ReturnedRanges {
    /// `[start, end)` pairs; unused slots are `[0, 0)`.
    pub ranges: [[u64; 2]; RETURNED_RANGES],
    pub next: u64,
}

// 8 * 2 * 8 + 8 bytes, no padding.
assert_layout!(ReturnedRanges, size 136, align 8);

/// Capacity of [`IOMMU_FAULTS_MAP`].
pub const IOMMU_FAULTS_CAPACITY: u32 = 1024;
/// Longest device name an [`IommuFaultKey`] holds (PCI names such as `0000:65:00.0` need 13).
pub const DEVICE_NAME_LEN: usize = 32;

/// Key of [`IOMMU_FAULTS_MAP`]. An IOMMU fault is reported from interrupt context, so it is keyed by
/// the device; the agent attributes the device to the tenant whose VMM owns it through VFIO.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct IommuFaultKey {
    /// The device name (`dev_name()`), NUL-padded.
    pub device: [u8; DEVICE_NAME_LEN],
    /// `IOMMU_FAULT_READ` (1) / `IOMMU_FAULT_WRITE` (2) flags of the fault.
    pub flags: u32,
    pub reserved: u32,
}

// 32 + 4 + 4 bytes, no padding.
assert_layout!(IommuFaultKey, size 40, align 4);

/// Why an event could not be counted; the index into [`DROPS_MAP`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Drop {
    /// [`EXIT_COUNTS_MAP`] was full, so a new key could not be added.
    ExitCountsFull = 0,
    /// A `kvm:kvm_exit` record could not be read.
    KvmExitUnreadable = 1,
    /// [`EXIT_LATENCY_MAP`] was full, so a latency could not be recorded.
    ExitLatencyFull = 2,
    /// Another thread's exit held the thread's exit-start slot (their ids are equal modulo
    /// [`THREAD_SLOTS`]), so that exit's latency is unknown.
    ExitStartsFull = 3,
    /// Another thread's return to the VMM held the thread's slot (their ids are equal modulo
    /// [`THREAD_SLOTS`]), so one service time is unknown.
    ServiceSlotTaken = 4,
    /// The doorbell map was full, so a doorbell was not learnt and its kicks will not be counted.
    DoorbellsFull = 5,
    /// A `struct kvm_ioeventfd` could not be read from the VMM's memory.
    IoeventfdUnreadable = 6,
    /// [`KICKS_MAP`] was full, so a doorbell was learnt but its kicks are not counted.
    KicksFull = 7,
    /// The pending-kick map could not take an entry, so that kick's service latency is unknown.
    PendingKicksFull = 8,
    /// The cgroup event ring buffer was full, so a lifecycle event was lost.
    CgroupEventsFull = 9,
    /// The VMM process map was full, so a VMM's faults and TLB flushes are not counted.
    VmmProcessesFull = 10,
    /// The returned-range map was full, so refaults of one VMM are not counted.
    ReturnedRangesFull = 11,
    /// An IOMMU fault record could not be read, or the fault map was full.
    IommuFaultLost = 12,
    /// A memory slot could not be read or remembered, so memory returned from it counts whole.
    GuestMemoryLost = 13,
    /// [`REMOVED_DOORBELLS_MAP`] was full, so a removed doorbell's last kicks are not reported.
    RemovedDoorbellsFull = 14,
    /// [`THREAD_EXITS_MAP`] was full, so a thread's exit is missing from the per-vCPU view (the
    /// tenant's own counts have it).
    ThreadExitsFull = 15,
    /// [`INFERRED_KICKS_MAP`] was full, or another thread held the thread's pending-write slot,
    /// so a kick to a doorbell registered before the probes were attached was not counted (it
    /// still counts as an in-kernel MMIO write).
    InferredKickLost = 16,
}

impl Drop {
    /// Every reason, in index order.
    pub const ALL: &[Self] = &[
        Self::ExitCountsFull,
        Self::KvmExitUnreadable,
        Self::ExitLatencyFull,
        Self::ExitStartsFull,
        Self::ServiceSlotTaken,
        Self::DoorbellsFull,
        Self::IoeventfdUnreadable,
        Self::KicksFull,
        Self::PendingKicksFull,
        Self::CgroupEventsFull,
        Self::VmmProcessesFull,
        Self::ReturnedRangesFull,
        Self::IommuFaultLost,
        Self::GuestMemoryLost,
        Self::RemovedDoorbellsFull,
        Self::ThreadExitsFull,
        Self::InferredKickLost,
    ];

    /// The reason as the agent exports it (a metric label, a recording's key).
    pub const fn name(self) -> &'static str {
        match self {
            Self::ExitCountsFull => "exit_counts_full",
            Self::KvmExitUnreadable => "kvm_exit_unreadable",
            Self::ExitLatencyFull => "exit_latency_full",
            Self::ExitStartsFull => "exit_starts_full",
            Self::ServiceSlotTaken => "service_slot_taken",
            Self::DoorbellsFull => "doorbells_full",
            Self::IoeventfdUnreadable => "ioeventfd_unreadable",
            Self::KicksFull => "kicks_full",
            Self::PendingKicksFull => "pending_kicks_full",
            Self::CgroupEventsFull => "cgroup_events_full",
            Self::VmmProcessesFull => "vmm_processes_full",
            Self::ReturnedRangesFull => "returned_ranges_full",
            Self::IommuFaultLost => "iommu_fault_lost",
            Self::GuestMemoryLost => "guest_memory_lost",
            Self::RemovedDoorbellsFull => "removed_doorbells_full",
            Self::ThreadExitsFull => "thread_exits_full",
            Self::InferredKickLost => "inferred_kick_lost",
        }
    }
}

// Each reason sits at its own index in `Drop::ALL`, so `DROP_REASONS` slots hold them all.
const _: () = {
    let mut index = 0;
    while index < Drop::ALL.len() {
        assert!(
            Drop::ALL[index] as usize == index,
            "Drop::ALL must list every reason at the index of its value"
        );
        index += 1;
    }
};

/// Number of [`Drop`] reasons, the size of [`DROPS_MAP`].
pub const DROP_REASONS: u32 = Drop::ALL.len() as u32;

/// The types the agent reads through maps. Every byte of each is a field of integers (any bit pattern
/// is valid) and none is padding: its `assert_layout!` above fails the build if its size stops being
/// the sum of its fields.
#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), Copy, integers only; 24 bytes = 8 + 4 * 4, no padding (assert_layout! above).
    unsafe impl aya::Pod for super::ExitKey {}
    // SAFETY: repr(C), Copy, integers only; 24 bytes = 8 + 4 * 4, no padding (assert_layout! above).
    unsafe impl aya::Pod for super::ThreadExitKey {}
    // SAFETY: repr(C), Copy, integers only; 24 bytes = 8 + 4 * 4, no padding (assert_layout! above).
    unsafe impl aya::Pod for super::LatencyKey {}
    // SAFETY: repr(C), Copy, u64s only; 344 bytes = 43 * 8, no padding (assert_layout! above).
    unsafe impl aya::Pod for super::LatencyHistogram {}
    // SAFETY: repr(C), Copy, integers only; 32 bytes = 4 + 4 + 8 + 8 + 4 + 4, no padding
    // (assert_layout! above).
    unsafe impl aya::Pod for super::DoorbellKey {}
    // SAFETY: repr(C), Copy, four u32s then a u64; 24 bytes, no padding (assert_layout! above).
    unsafe impl aya::Pod for super::Doorbell {}
    // SAFETY: repr(C), Copy, two u32s then a u64; 16 bytes, no padding (assert_layout! above).
    unsafe impl aya::Pod for super::DoorbellAddr {}
    // SAFETY: repr(C), Copy, 32 bytes then two u32s; 40 bytes, no padding (assert_layout! above).
    unsafe impl aya::Pod for super::IommuFaultKey {}
    // SAFETY: repr(C), Copy, integers only; 32 bytes = 8 + 4 + 4 + 8 + 4 + 4, no padding
    // (assert_layout! above).
    unsafe impl aya::Pod for super::KickKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reasons given, checked by an exhaustive match (no `_` arm) to be every variant: a new
    /// reason fails to compile here until it is listed, and then the test below fails until
    /// `Drop::ALL` has it.
    macro_rules! every_reason {
        ($($reason:ident),* $(,)?) => {{
            fn exhaustive(reason: Drop) {
                match reason {
                    $(Drop::$reason)|* => {}
                }
            }
            let _ = exhaustive;
            [$(Drop::$reason),*]
        }};
    }

    #[test]
    fn drop_reasons_are_all_listed_at_their_indexes_with_their_exported_names() {
        let every = every_reason!(
            ExitCountsFull,
            KvmExitUnreadable,
            ExitLatencyFull,
            ExitStartsFull,
            ServiceSlotTaken,
            DoorbellsFull,
            IoeventfdUnreadable,
            KicksFull,
            PendingKicksFull,
            CgroupEventsFull,
            VmmProcessesFull,
            ReturnedRangesFull,
            IommuFaultLost,
            GuestMemoryLost,
            RemovedDoorbellsFull,
            ThreadExitsFull,
            InferredKickLost,
        );
        assert_eq!(Drop::ALL.len(), every.len());
        for reason in every {
            assert!(Drop::ALL.contains(&reason), "Drop::ALL lacks {reason:?}");
        }
        for (index, reason) in Drop::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{reason:?}");
        }
        assert_eq!(DROP_REASONS as usize, every.len());
        // The names are exported (metric labels, recordings): they never change.
        let names: [&str; 17] = core::array::from_fn(|i| Drop::ALL[i].name());
        assert_eq!(
            names,
            [
                "exit_counts_full",
                "kvm_exit_unreadable",
                "exit_latency_full",
                "exit_starts_full",
                "service_slot_taken",
                "doorbells_full",
                "ioeventfd_unreadable",
                "kicks_full",
                "pending_kicks_full",
                "cgroup_events_full",
                "vmm_processes_full",
                "returned_ranges_full",
                "iommu_fault_lost",
                "guest_memory_lost",
                "removed_doorbells_full",
                "thread_exits_full",
                "inferred_kick_lost",
            ]
        );
    }

    #[test]
    fn buckets_are_floor_log2_clamped() {
        assert_eq!(LatencyHistogram::bucket(0), 0);
        assert_eq!(LatencyHistogram::bucket(1), 0);
        assert_eq!(LatencyHistogram::bucket(2), 1);
        assert_eq!(LatencyHistogram::bucket(1023), 9);
        assert_eq!(LatencyHistogram::bucket(1024), 10);
        assert_eq!(LatencyHistogram::bucket(u64::MAX), LATENCY_BUCKETS - 1);
        let mut h = LatencyHistogram::EMPTY;
        h.record(1500);
        h.record(700);
        assert_eq!(
            (h.count, h.sum_ns, h.max_ns, h.buckets[10], h.buckets[9]),
            (2, 2200, 1500, 1, 1)
        );
    }
}
