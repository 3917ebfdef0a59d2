//! The maps shared by the probes, and the one place that counts into them.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
};
use vmtrace_common::{
    DROP_REASONS, Drop, EXIT_COUNTS_CAPACITY, ExitKey, ExitKind, LAST_MMIO_CAPACITY,
};

/// Hot counters, aggregated in the kernel per (cgroup, kind, detail) and per CPU so that the hot
/// path never contends on a cache line.
#[map]
static EXIT_COUNTS: PerCpuHashMap<ExitKey, u64> =
    PerCpuHashMap::with_max_entries(EXIT_COUNTS_CAPACITY, 0);

/// Events that could not be counted, by [`Drop`] reason.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASONS, 0);

/// The type of each vCPU thread's last MMIO access, so that an MMIO exit to the VMM can be told
/// apart from an access the kernel completed itself. Keyed by thread id.
#[map]
pub static LAST_MMIO: LruHashMap<u32, u32> = LruHashMap::with_max_entries(LAST_MMIO_CAPACITY, 0);

/// Adds one to the current task's counter for `kind` and `detail`.
#[inline(always)]
pub fn count(kind: ExitKind, detail: u32) {
    let key = ExitKey {
        // SAFETY: the helper only reads the current task's cgroup.
        cgroup_id: unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() },
        kind: kind as u32,
        detail,
    };
    if let Some(value) = EXIT_COUNTS.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU; tracepoint programs run with preemption disabled.
        unsafe { *value += 1 };
        return;
    }
    // First event of this key on this CPU. NOEXIST: if another CPU added the key meanwhile, the
    // insert fails and this CPU's (zeroed) slot of that entry is incremented instead.
    if EXIT_COUNTS.insert(key, 1, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    match EXIT_COUNTS.get_ptr_mut(key) {
        // SAFETY: as above.
        Some(value) => unsafe { *value += 1 },
        None => count_drop(Drop::ExitCountsFull),
    }
}

/// Counts an event that was lost, so that every loss is visible to the agent.
#[inline(always)]
pub fn count_drop(reason: Drop) {
    if let Some(value) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value of this CPU; tracepoint programs run with preemption disabled.
        unsafe { *value += 1 };
    }
}
