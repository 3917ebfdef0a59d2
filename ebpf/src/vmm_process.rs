//! Which processes are VMMs. A process becomes one at its vCPUs' first `KVM_RUN`, where KVM makes
//! the root page of the guest's MMU (`kvm_mmu_get_page`, before the guest runs); at its first
//! return from `KVM_RUN` (a VM already running when the probes were attached); with
//! `--service-time`, at any `KVM_RUN`; and at its first memory slot or doorbell with
//! `--vm-ioctls`. It stops being one when it exits (the agent also forgets the doorbells and
//! collects the inferred kicks of processes no longer here, so a VMM must be noted before its
//! first kick). Host page faults and TLB flushes happen in every process of the host; they are counted
//! for VMMs only, so that tenants are the VMs, not every cgroup that takes a page fault.

use aya_ebpf::{macros::map, maps::HashMap};
use vmtrace_common::{Drop, VMM_PROCESSES_CAPACITY};

use crate::maps::{count_drop, current_cgroup_id, current_tgid};

/// VMM processes: tgid to the cgroup id it had when first seen.
#[map]
static VMM_PROCESSES: HashMap<u32, u64> = HashMap::with_max_entries(VMM_PROCESSES_CAPACITY, 0);

/// Whether the current task belongs to a VMM process.
#[inline(always)]
pub fn in_vmm() -> bool {
    // SAFETY: only the presence of the entry is used.
    unsafe { VMM_PROCESSES.get(current_tgid()) }.is_some()
}

/// The current thread runs a vCPU (`KVM_RUN`) or sets up a VM (memory, doorbells): its process is
/// a VMM.
#[inline(always)]
pub fn note_vmm() {
    let tgid = current_tgid();
    // SAFETY: only the presence of the entry is used.
    if unsafe { VMM_PROCESSES.get(tgid) }.is_none()
        && VMM_PROCESSES.insert(tgid, current_cgroup_id(), 0).is_err()
    {
        count_drop(Drop::VmmProcessesFull);
    }
}

/// The process `tgid` exited: it is no longer a VMM (and its pid may be reused).
#[inline(always)]
pub fn forget_vmm(tgid: u32) {
    let _ = VMM_PROCESSES.remove(tgid);
}
