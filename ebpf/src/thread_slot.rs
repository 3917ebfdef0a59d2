//! Each thread's slot: what it left pending between two of its events (its return to the VMM, its
//! MMIO write of unknown fate). The hot path reads it once per event, so it is one array slot of
//! one cache line, found from the thread id alone.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE, helpers::bpf_get_current_pid_tgid, macros::map, maps::Array,
};
use vmtrace_common::{THREAD_SLOTS, ThreadSlot};

/// The slots, by thread id modulo [`THREAD_SLOTS`]: an array lookup is far cheaper on the hot path
/// than a hash map's. Mappable arrays are page-aligned (kernel/bpf/arraymap.c:
/// `array_map_alloc()`), so no 64-byte slot straddles two cache lines.
#[map]
static THREAD_STATE: Array<ThreadSlot> = Array::with_max_entries(THREAD_SLOTS, BPF_F_MMAPABLE);

/// The current thread, with its slot.
#[derive(Clone, Copy)]
pub struct Thread {
    pub tid: u32,
    pub tgid: u32,
    pub slot: *mut ThreadSlot,
}

impl Thread {
    /// The current thread; `None` only if the verifier's bounds were not met, which the modulo
    /// rules out.
    #[inline(always)]
    pub fn current() -> Option<Self> {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tid = pid_tgid as u32;
        let slot = THREAD_STATE.get_ptr_mut(tid % THREAD_SLOTS)?;
        Some(Self {
            tid,
            tgid: (pid_tgid >> 32) as u32,
            slot,
        })
    }
}
