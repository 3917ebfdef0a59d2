//! The names by which the agent finds the eBPF object's maps and its replay programs. (Attached
//! programs and the globals they read are named in the agent's probe table.)
//!
//! On the kernel side a map is named by its static, a program by its function and a global by its
//! `#[no_mangle]` static: aya-ebpf takes the identifier or a literal, never a constant. So the
//! compiler cannot tie the two sides together; the agent's object test (agent/src/probe/
//! object_check.rs) opens the built object and checks every name here and in the probe table,
//! with each map's type, key and value sizes.

/// Maps, by the names of their statics in `ebpf/src/`.
pub mod maps {
    /// Per-CPU hash map of exit and exit-related event counts, [`crate::ExitKey`] to `u64`.
    pub const EXIT_COUNTS: &str = "EXIT_COUNTS";
    /// Per-CPU hash map of latency histograms, [`crate::LatencyKey`] to
    /// [`crate::LatencyHistogram`].
    pub const EXIT_LATENCY: &str = "EXIT_LATENCY";
    /// Per-CPU array of drop counters, indexed by [`crate::Drop`].
    pub const DROPS: &str = "DROPS";
    /// Hash map of doorbells learnt from `KVM_IOEVENTFD`, [`crate::DoorbellKey`] to
    /// [`crate::Doorbell`].
    pub const DOORBELLS: &str = "DOORBELLS";
    /// Per-CPU hash map of kicks per doorbell, keyed by [`crate::DoorbellKey`]: an entry is made
    /// with the doorbell, so a guest write needs one lookup here to be found and counted as a kick.
    pub const KICKS: &str = "KICKS";
    /// Hash map of addresses that have doorbells ([`crate::DoorbellAddr`] to how many), which lets
    /// a write to any other address be dismissed with one lookup.
    pub const DOORBELL_ADDRS: &str = "DOORBELL_ADDRS";
    /// Hash map of removed doorbells ([`crate::DoorbellKey`] to [`crate::Doorbell`]) whose kicks
    /// the agent has not collected yet; it removes both entries once it has.
    pub const REMOVED_DOORBELLS: &str = "REMOVED_DOORBELLS";
    /// Per-CPU hash map of kicks to doorbells the probes never saw registered, inferred from MMIO
    /// writes the kernel completed itself: [`crate::KickKey`] (VM fd 0, queue = the value
    /// written) to `u64`.
    pub const INFERRED_KICKS: &str = "INFERRED_KICKS";
    /// Ring buffer of cgroup lifecycle events ([`crate::CgroupEvent`]).
    pub const CGROUP_EVENTS: &str = "CGROUP_EVENTS";
    /// Hash map of VMM processes (tgid to the cgroup id of its last `KVM_RUN`), kept by the
    /// probes: host page faults and TLB flushes are counted for these processes only.
    pub const VMM_PROCESSES: &str = "VMM_PROCESSES";
    /// Per-CPU hash map of IOMMU faults per device, [`crate::IommuFaultKey`] to `u64`.
    pub const IOMMU_FAULTS: &str = "IOMMU_FAULTS";
    /// Per-CPU hash map of exits per VMM thread, [`crate::ThreadExitKey`] to `u64`, filled only
    /// while `vmtrace top` (the per-vCPU view) runs.
    pub const THREAD_EXITS: &str = "THREAD_EXITS";
    /// Hash map of the names of [`THREAD_EXITS`]'s threads, thread id to `comm` (`[u8; 16]`,
    /// NUL-padded), noted by the probes so that a thread that has ended keeps its name.
    pub const THREAD_NAMES: &str = "THREAD_NAMES";

    // Maps only the kernel side uses; named here so that the object test covers every map.

    /// LRU hash map of exits in progress, thread id to [`crate::ExitStart`].
    pub const EXIT_STARTS: &str = "EXIT_STARTS";
    /// Array of what each thread left pending (its return to the VMM, its MMIO write of unknown
    /// fate), by thread slot, of [`crate::ThreadSlot`].
    pub const THREAD_STATE: &str = "THREAD_STATE";
    /// Array of guest entries in progress, by thread slot, of [`crate::GuestEntry`].
    pub const GUEST_ENTRIES: &str = "GUEST_ENTRIES";
    /// LRU hash map of unserved kicks, [`crate::EventfdKey`] to [`crate::PendingKick`].
    pub const PENDING_KICKS: &str = "PENDING_KICKS";
    /// Hash map of memory each VMM returned to the host, tgid to [`crate::ReturnedRanges`].
    pub const RETURNED: &str = "RETURNED";
    /// Hash map of each VMM's guest memory, tgid to [`crate::GuestMemory`].
    pub const GUEST_MEMORY: &str = "GUEST_MEMORY";
}

/// Programs the agent runs through `BPF_PROG_TEST_RUN` without attaching them, to drive the
/// in-kernel logic of probes whose events do not fire on every host. The attached programs are
/// named in the agent's probe table (agent/src/probe/spec.rs), the one list of probes.
pub mod programs {
    /// Replays `kvm:kvm_exit` / `kvm:kvm_entry` records through the kvm_exit logic.
    pub const REPLAY_KVM_EXIT: &str = "replay_kvm_exit";
    /// Replays `iommu:io_page_fault` records through the IOMMU fault logic.
    pub const REPLAY_IO_PAGE_FAULT: &str = "replay_io_page_fault";
}

/// Globals the agent sets at load beyond the probe table's field offsets and probe switches.
pub mod globals {
    /// `u32`: the bits of [`crate::switches`] that are on.
    pub const SWITCHES: &str = "SWITCHES";
}
