//! `kvm:kvm_exit` and `kvm:kvm_entry` on hosts that emit them (VMX, SVM): every exit counted by ISA and
//! reason, its latency (exit to the same vCPU thread's next entry) in a log2 histogram, and the time
//! in the guest (entry to the next exit) per tenant.
//!
//! The tracepoint handlers only decode their inputs and call [`on_exit`] and [`on_entry`]. The same
//! functions are reachable through [`replay_kvm_exit`], a raw tracepoint program that is never attached:
//! tests run it with `BPF_PROG_TEST_RUN` and synthetic VMX, SVM and PVM records, which proves the
//! in-kernel logic on hosts where kvm_exit never fires.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use vmtrace_common::{
    Drop, ExitKey, ExitKind, ExitStart, GuestEntry, LatencyKey, LatencyKind, THREAD_SLOTS,
    ThreadExitKey,
};

use crate::maps::{
    EXIT_STARTS, GUEST_ENTRIES, add_for, count_drop, count_key, count_thread, current_cgroup_id,
    current_tid, record_latency, thread_exits_on,
};

/// Offsets of `exit_reason` and `isa` in the `kvm:kvm_exit` record, from the host's format file; the
/// agent sets them at load after checking the fields' widths.
#[unsafe(no_mangle)]
static KVM_EXIT_REASON_OFFSET: u32 = 8;
#[unsafe(no_mangle)]
static KVM_EXIT_ISA_OFFSET: u32 = 24;

/// `kvm:kvm_exit`, a classic tracepoint: its arguments are the vCPU and ISA only, while the reason is
/// in the record the kernel builds.
#[tracepoint(category = "kvm", name = "kvm_exit")]
pub fn kvm_exit(ctx: TracePointContext) -> i32 {
    // SAFETY: volatile reads of constants the loader may have rewritten.
    let (reason_offset, isa_offset) = unsafe {
        (
            core::ptr::read_volatile(&raw const KVM_EXIT_REASON_OFFSET),
            core::ptr::read_volatile(&raw const KVM_EXIT_ISA_OFFSET),
        )
    };
    // SAFETY: the offsets were checked against the host's format file; read_at goes through the
    // kernel's probe-read helper, which fails rather than faults.
    let fields = unsafe {
        (
            ctx.read_at::<u32>(reason_offset as usize),
            ctx.read_at::<u32>(isa_offset as usize),
        )
    };
    match fields {
        (Ok(reason), Ok(isa)) => on_exit(current_cgroup_id(), current_tid(), now_ns(), isa, reason),
        _ => count_drop(Drop::KvmExitUnreadable),
    }
    0
}

/// `kvm_entry(struct kvm_vcpu *vcpu, bool immediate_exit)`: the vCPU enters the guest again.
#[raw_tracepoint(tracepoint = "kvm_entry")]
pub fn kvm_entry(_ctx: RawTracePointContext) -> i32 {
    on_entry(current_tid(), now_ns());
    0
}

/// Arguments of [`replay_kvm_exit`]: `[op, cgroup_id, tid, time_ns, isa, reason]`, `op` 0 for an exit
/// and 1 for an entry.
#[raw_tracepoint(tracepoint = "kvm_exit")]
pub fn replay_kvm_exit(ctx: RawTracePointContext) -> i32 {
    let op: u64 = ctx.arg(0);
    let cgroup_id: u64 = ctx.arg(1);
    let tid: u64 = ctx.arg(2);
    let time_ns: u64 = ctx.arg(3);
    let isa: u64 = ctx.arg(4);
    let reason: u64 = ctx.arg(5);
    match op {
        0 => on_exit(cgroup_id, tid as u32, time_ns, isa as u32, reason as u32),
        1 => on_entry(tid as u32, time_ns),
        _ => return 1,
    }
    0
}

/// Monotonic time in ns.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// An exit: count it, add the time in the guest since the thread's entry, and remember when it
/// began for its latency.
#[inline(always)]
fn on_exit(cgroup_id: u64, tid: u32, time_ns: u64, isa: u32, reason: u32) {
    count_key(ExitKey {
        cgroup_id,
        kind: ExitKind::KvmExit as u32,
        detail: reason,
        isa,
        reserved: 0,
    });
    if thread_exits_on() {
        count_thread(ThreadExitKey {
            cgroup_id,
            tid,
            kind: ExitKind::KvmExit as u32,
            detail: reason,
            isa,
        });
    }
    if let Some(entry) = GUEST_ENTRIES.get_ptr_mut(tid % THREAD_SLOTS) {
        // SAFETY: an array slot of this map, read and marked consumed at once; only the thread
        // whose id maps to it writes it (two live vCPU threads whose ids collide lose some guest
        // time, never count another's).
        let entered = unsafe {
            let entered = *entry;
            (*entry).time_ns = 0;
            entered
        };
        if entered.time_ns != 0 && entered.tid == tid && time_ns > entered.time_ns {
            add_for(cgroup_id, ExitKind::GuestTime, 0, time_ns - entered.time_ns);
        }
    }
    if let Some(slot) = EXIT_STARTS.get_ptr_mut(tid % THREAD_SLOTS) {
        // SAFETY: an array slot of this map; only the thread whose id maps to it writes it. A
        // colliding thread's exit still in progress there loses its latency, counted.
        unsafe {
            if (*slot).time_ns != 0 && (*slot).tid != tid {
                count_drop(Drop::ExitStartsFull);
            }
            *slot = ExitStart {
                time_ns,
                cgroup_id,
                isa,
                reason,
                tid,
                reserved: 0,
            };
        }
    }
}

/// An entry: the thread is in the guest from now, and its exit in progress, if any, has ended.
#[inline(always)]
fn on_entry(tid: u32, time_ns: u64) {
    if let Some(entry) = GUEST_ENTRIES.get_ptr_mut(tid % THREAD_SLOTS) {
        // SAFETY: as in `on_exit`.
        unsafe {
            *entry = GuestEntry {
                time_ns,
                tid,
                reserved: 0,
            }
        };
    }
    let Some(slot) = EXIT_STARTS.get_ptr_mut(tid % THREAD_SLOTS) else {
        return;
    };
    // SAFETY: as in `on_exit`; the start is copied out and marked consumed at once.
    let start = unsafe {
        let start = *slot;
        (*slot).time_ns = 0;
        start
    };
    if start.time_ns == 0 || start.tid != tid {
        // The first entry of a vCPU, or one whose exit was seen before the probes were attached.
        return;
    }
    let key = LatencyKey {
        cgroup_id: start.cgroup_id,
        kind: LatencyKind::KvmExit as u32,
        isa: start.isa,
        reason: start.reason,
        reserved: 0,
    };
    record_latency(key, time_ns.saturating_sub(start.time_ns));
}
