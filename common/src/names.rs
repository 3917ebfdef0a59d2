//! The names by which the agent finds the eBPF object's maps, programs and globals.
//!
//! On the kernel side a map is named by its static, a program by its function and a global by its
//! `#[no_mangle]` static: aya-ebpf takes the identifier or a literal, never a constant. So the
//! compiler cannot tie the two sides together; the agent's object test (agent/src/probe/
//! object_check.rs) opens the built object and checks every name here, with each map's type, key
//! and value sizes.

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
    /// Ring buffer of cgroup lifecycle events ([`crate::CgroupEvent`]).
    pub const CGROUP_EVENTS: &str = "CGROUP_EVENTS";
    /// Hash map of VMM processes (tgid to the cgroup id of its last `KVM_RUN`), kept by the
    /// probes: host page faults and TLB flushes are counted for these processes only.
    pub const VMM_PROCESSES: &str = "VMM_PROCESSES";
    /// Per-CPU hash map of IOMMU faults per device, [`crate::IommuFaultKey`] to `u64`.
    pub const IOMMU_FAULTS: &str = "IOMMU_FAULTS";

    // Maps only the kernel side uses; named here so that the object test covers every map.

    /// LRU hash map of exits in progress, thread id to [`crate::ExitStart`].
    pub const EXIT_STARTS: &str = "EXIT_STARTS";
    /// Array of returns to the VMM in progress, by thread slot, of [`crate::ServiceStart`].
    pub const SERVICE_STARTS: &str = "SERVICE_STARTS";
    /// Array of guest entries in progress, by thread slot, of [`crate::GuestEntry`].
    pub const GUEST_ENTRIES: &str = "GUEST_ENTRIES";
    /// LRU hash map of unserved kicks, [`crate::EventfdKey`] to [`crate::PendingKick`].
    pub const PENDING_KICKS: &str = "PENDING_KICKS";
    /// Hash map of `madvise` calls in progress, thread id to advice.
    pub const MADVISE_CALLS: &str = "MADVISE_CALLS";
    /// Hash map of memory each VMM returned to the host, tgid to [`crate::ReturnedRanges`].
    pub const RETURNED: &str = "RETURNED";
    /// Hash map of each VMM's guest memory, tgid to [`crate::GuestMemory`].
    pub const GUEST_MEMORY: &str = "GUEST_MEMORY";
}

/// Programs, by the names of their functions in `ebpf/src/`.
pub mod programs {
    // Raw tracepoints.
    pub const KVM_USERSPACE_EXIT: &str = "kvm_userspace_exit";
    pub const KVM_PIO: &str = "kvm_pio";
    pub const KVM_MMIO: &str = "kvm_mmio";
    pub const KVM_CPUID: &str = "kvm_cpuid";
    pub const KVM_ENTRY: &str = "kvm_entry";
    pub const SCHED_PROCESS_EXIT: &str = "sched_process_exit";
    pub const TLB_FLUSH: &str = "tlb_flush";
    pub const KVM_PV_TLB_FLUSH: &str = "kvm_pv_tlb_flush";
    pub const KVM_HV_FLUSH_TLB: &str = "kvm_hv_flush_tlb";
    pub const KVM_HV_FLUSH_TLB_EX: &str = "kvm_hv_flush_tlb_ex";
    pub const PAGE_FAULT_USER: &str = "page_fault_user";
    pub const PAGE_FAULT_KERNEL: &str = "page_fault_kernel";
    pub const KVM_PAGE_FAULT: &str = "kvm_page_fault";
    pub const KVM_MMU_GET_PAGE: &str = "kvm_mmu_get_page";
    pub const KVM_MMU_PREPARE_ZAP_PAGE: &str = "kvm_mmu_prepare_zap_page";
    pub const KVM_UNMAP_HVA_RANGE: &str = "kvm_unmap_hva_range";
    pub const KVM_AGE_HVA: &str = "kvm_age_hva";
    pub const KVM_TEST_AGE_HVA: &str = "kvm_test_age_hva";
    /// On `iommu:map`.
    pub const IOMMU_MAP: &str = "iommu_map";
    /// On `iommu:unmap`.
    pub const IOMMU_UNMAP: &str = "iommu_unmap";
    /// The kvm_exit logic, driven by `BPF_PROG_TEST_RUN` with synthetic records.
    pub const REPLAY_KVM_EXIT: &str = "replay_kvm_exit";
    /// The IOMMU fault logic, driven by `BPF_PROG_TEST_RUN`.
    pub const REPLAY_IO_PAGE_FAULT: &str = "replay_io_page_fault";

    // Classic tracepoints, named like their events.
    pub const KVM_EXIT: &str = "kvm_exit";
    pub const SYS_ENTER_IOCTL: &str = "sys_enter_ioctl";
    pub const SYS_ENTER_READ: &str = "sys_enter_read";
    pub const CGROUP_MKDIR: &str = "cgroup_mkdir";
    pub const CGROUP_RMDIR: &str = "cgroup_rmdir";
    pub const CGROUP_ATTACH_TASK: &str = "cgroup_attach_task";
    pub const SYS_ENTER_MADVISE: &str = "sys_enter_madvise";
    pub const SYS_EXIT_MADVISE: &str = "sys_exit_madvise";
    pub const IO_PAGE_FAULT: &str = "io_page_fault";
}

/// Globals the agent sets at load (`EbpfLoader::override_global`), all `u32`, by the names of their
/// `#[no_mangle]` statics in `ebpf/src/`.
pub mod globals {
    /// 1 when kick service latency is wanted.
    pub const KICK_LATENCY: &str = "KICK_LATENCY";
    // Offsets of the fields the classic tracepoint programs read, from the host's format files.
    pub const KVM_EXIT_REASON_OFFSET: &str = "KVM_EXIT_REASON_OFFSET";
    pub const KVM_EXIT_ISA_OFFSET: &str = "KVM_EXIT_ISA_OFFSET";
    pub const IOCTL_FD_OFFSET: &str = "IOCTL_FD_OFFSET";
    pub const IOCTL_CMD_OFFSET: &str = "IOCTL_CMD_OFFSET";
    pub const IOCTL_ARG_OFFSET: &str = "IOCTL_ARG_OFFSET";
    pub const READ_FD_OFFSET: &str = "READ_FD_OFFSET";
    pub const CGROUP_ROOT_OFFSET: &str = "CGROUP_ROOT_OFFSET";
    pub const CGROUP_ID_OFFSET: &str = "CGROUP_ID_OFFSET";
    pub const CGROUP_PATH_OFFSET: &str = "CGROUP_PATH_OFFSET";
    pub const CGROUP_ATTACH_PATH_OFFSET: &str = "CGROUP_ATTACH_PATH_OFFSET";
    pub const MADVISE_BEHAVIOR_OFFSET: &str = "MADVISE_BEHAVIOR_OFFSET";
    pub const IO_PAGE_FAULT_DEVICE_OFFSET: &str = "IO_PAGE_FAULT_DEVICE_OFFSET";
    pub const IO_PAGE_FAULT_FLAGS_OFFSET: &str = "IO_PAGE_FAULT_FLAGS_OFFSET";
}
