//! The maps shared by the probes, and the one place that counts into them.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use vmtrace_common::{
    DOORBELLS_CAPACITY, DROP_REASONS, Doorbell, DoorbellAddr, DoorbellKey, Drop,
    EXIT_COUNTS_CAPACITY, EXIT_LATENCY_CAPACITY, EventfdKey, ExitKey, ExitKind, ExitStart,
    GuestEntry, KickKey, LatencyHistogram, LatencyKey, PENDING_KICKS_CAPACITY, PendingKick,
    REMOVED_DOORBELLS_CAPACITY, THREAD_EXITS_CAPACITY, THREAD_SLOTS, ThreadExitKey, switches,
};

/// Hot counters, aggregated in the kernel per (cgroup, kind, detail) and per CPU so that the hot
/// path never contends on a cache line.
#[map]
static EXIT_COUNTS: PerCpuHashMap<ExitKey, u64> =
    PerCpuHashMap::with_max_entries(EXIT_COUNTS_CAPACITY, 0);

/// Exit latency histograms per (cgroup, ISA, reason), per CPU.
#[map]
static EXIT_LATENCY: PerCpuHashMap<LatencyKey, LatencyHistogram> =
    PerCpuHashMap::with_max_entries(EXIT_LATENCY_CAPACITY, 0);

/// Events that could not be counted, by [`Drop`] reason.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASONS, 0);

/// Each vCPU thread's exit in progress (VMX, SVM), until its next entry: the exit's latency. In
/// the slot of its thread id modulo [`THREAD_SLOTS`], as the others: this runs on every exit.
#[map]
pub static EXIT_STARTS: Array<ExitStart> = Array::with_max_entries(THREAD_SLOTS, 0);

/// Each vCPU thread's entry into the guest (VMX, SVM), until its next exit: the guest time.
#[map]
pub static GUEST_ENTRIES: Array<GuestEntry> = Array::with_max_entries(THREAD_SLOTS, 0);

/// Doorbells learnt from the VMMs' `KVM_IOEVENTFD` calls. Written only on (de)registration, read on
/// every guest write, so a plain hash map.
#[map]
pub static DOORBELLS: HashMap<DoorbellKey, Doorbell> =
    HashMap::with_max_entries(DOORBELLS_CAPACITY, 0);

/// Each doorbell eventfd's first kick not yet read by its VMM, for kick service latency.
#[map]
pub static PENDING_KICKS: LruHashMap<EventfdKey, PendingKick> =
    LruHashMap::with_max_entries(PENDING_KICKS_CAPACITY, 0);

/// Kicks per doorbell, per CPU; an entry is made with its doorbell.
#[map]
pub static KICKS: PerCpuHashMap<DoorbellKey, u64> =
    PerCpuHashMap::with_max_entries(DOORBELLS_CAPACITY, 0);

/// How many doorbells each address has.
#[map]
pub static DOORBELL_ADDRS: HashMap<DoorbellAddr, u32> =
    HashMap::with_max_entries(DOORBELLS_CAPACITY, 0);

/// Removed doorbells whose kicks the agent has yet to collect.
#[map]
pub static REMOVED_DOORBELLS: HashMap<DoorbellKey, Doorbell> =
    HashMap::with_max_entries(REMOVED_DOORBELLS_CAPACITY, 0);

/// Kicks to doorbells registered before the probes were attached, per CPU: in-kernel MMIO writes
/// by (tenant, VMM, address, value written).
#[map]
pub static INFERRED_KICKS: PerCpuHashMap<KickKey, u64> =
    PerCpuHashMap::with_max_entries(DOORBELLS_CAPACITY, 0);

/// Exits per VMM thread, for `vmtrace top`'s per-vCPU view; written only when the agent sets
/// the switch [`switches::THREAD_EXITS`].
#[map]
static THREAD_EXITS: PerCpuHashMap<ThreadExitKey, u64> =
    PerCpuHashMap::with_max_entries(THREAD_EXITS_CAPACITY, 0);

/// The name (`comm`) of each thread in [`THREAD_EXITS`], noted at its first exit of a kind on a
/// CPU: a vCPU thread that ends before the agent reads /proc would otherwise be nameless.
#[map]
static THREAD_NAMES: HashMap<u32, [u8; 16]> = HashMap::with_max_entries(THREAD_EXITS_CAPACITY, 0);

/// The [`switches`] the agent turned on at load.
#[unsafe(no_mangle)]
static SWITCHES: u32 = 0;

/// Whether the switch `bit` of [`switches`] is on.
#[inline(always)]
pub fn switch_on(bit: u32) -> bool {
    // SAFETY: a volatile read of a constant the loader may have rewritten.
    unsafe { core::ptr::read_volatile(&raw const SWITCHES) & bit != 0 }
}

/// Whether per-thread exit counts are wanted (`vmtrace top`); callers check it before gathering
/// a thread's key, so that the helpers' cost is only paid while they are.
#[inline(always)]
pub fn thread_exits_on() -> bool {
    switch_on(switches::THREAD_EXITS)
}

/// Adds one to thread `tid`'s counter for `kind` and `detail`.
#[inline(always)]
pub fn count_thread(key: ThreadExitKey) {
    if let Some(value) = THREAD_EXITS.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU; tracepoint programs run with preemption disabled.
        unsafe { *value += 1 };
        return;
    }
    // A new entry: note the thread's name, if the event is the current thread's (a replayed
    // one is not). A full name map leaves the agent /proc, while the thread lives.
    if key.tid == current_tid()
        && let Ok(comm) = aya_ebpf::helpers::bpf_get_current_comm()
    {
        let _ = THREAD_NAMES.insert(key.tid, comm, 0);
    }
    increment(&THREAD_EXITS, key, Drop::ThreadExitsFull, 1);
}

/// Counts an exit event of the current thread, if per-thread counts are on.
#[inline(always)]
pub fn count_current_thread(kind: ExitKind, detail: u32) {
    if thread_exits_on() {
        count_thread(ThreadExitKey {
            cgroup_id: current_cgroup_id(),
            tid: current_tid(),
            kind: kind as u32,
            detail,
            isa: 0,
        });
    }
}

/// The current thread's id (the low half of pid_tgid).
#[inline(always)]
pub fn current_tid() -> u32 {
    aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32
}

/// The current process id, its thread group (the high half of pid_tgid).
#[inline(always)]
pub fn current_tgid() -> u32 {
    (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32
}

/// The current task's cgroup v2 id, the tenant key.
#[inline(always)]
pub fn current_cgroup_id() -> u64 {
    // SAFETY: the helper only reads the current task's cgroup.
    unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() }
}

/// Adds one to the current task's counter for `kind` and `detail`.
#[inline(always)]
pub fn count(kind: ExitKind, detail: u32) {
    count_for(current_cgroup_id(), kind, detail);
}

/// Adds one to `cgroup_id`'s counter for `kind` and `detail`, for probes that need the cgroup id
/// more than once (the helper call is not free on the hot path).
#[inline(always)]
pub fn count_for(cgroup_id: u64, kind: ExitKind, detail: u32) {
    count_key(ExitKey {
        cgroup_id,
        kind: kind as u32,
        detail,
        isa: 0,
        reserved: 0,
    });
}

/// Adds one to the counter of `key`.
#[inline(always)]
pub fn count_key(key: ExitKey) {
    increment(&EXIT_COUNTS, key, Drop::ExitCountsFull, 1);
}

/// Adds `amount` (bytes, for the byte counters) to `cgroup_id`'s counter for `kind` and `detail`.
#[inline(always)]
pub fn add_for(cgroup_id: u64, kind: ExitKind, detail: u32, amount: u64) {
    let key = ExitKey {
        cgroup_id,
        kind: kind as u32,
        detail,
        isa: 0,
        reserved: 0,
    };
    increment(&EXIT_COUNTS, key, Drop::ExitCountsFull, amount);
}

/// Adds `amount` to this CPU's slot of `key` in `map`, adding the key if needed.
#[inline(always)]
pub fn increment<K>(map: &PerCpuHashMap<K, u64>, key: K, full: Drop, amount: u64) {
    if let Some(value) = map.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU; tracepoint programs run with preemption disabled.
        unsafe { *value += amount };
        return;
    }
    // First event of this key on this CPU. NOEXIST: if another CPU added the key meanwhile, the
    // insert fails and this CPU's (zeroed) slot of that entry is incremented instead.
    if map.insert(&key, amount, u64::from(BPF_NOEXIST)).is_ok() {
        return;
    }
    match map.get_ptr_mut(&key) {
        // SAFETY: as above.
        Some(value) => unsafe { *value += amount },
        None => count_drop(full),
    }
}

/// Records one latency in the histogram of `key`.
#[inline(always)]
pub fn record_latency(key: LatencyKey, ns: u64) {
    // One lookup once the key exists, which is every time but the first.
    let histogram = if let Some(histogram) = EXIT_LATENCY.get_ptr_mut(key) {
        histogram
    } else {
        // NOEXIST: if another CPU added the key meanwhile, this CPU's slot of it is used.
        let _ = EXIT_LATENCY.insert(key, LatencyHistogram::EMPTY, u64::from(BPF_NOEXIST));
        let Some(histogram) = EXIT_LATENCY.get_ptr_mut(key) else {
            count_drop(Drop::ExitLatencyFull);
            return;
        };
        histogram
    };
    // SAFETY: per-CPU value of this CPU; tracepoint programs run with preemption disabled.
    unsafe { (*histogram).record(ns) };
}

/// Counts an event that was lost, so that every loss is visible to the agent.
#[inline(always)]
pub fn count_drop(reason: Drop) {
    if let Some(value) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value of this CPU; tracepoint programs run with preemption disabled.
        unsafe { *value += 1 };
    }
}
