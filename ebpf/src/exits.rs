//! Exits seen through the events that fire on every host, including those where `kvm:kvm_exit` is
//! silent (PVM): the return to the VMM (`kvm_userspace_exit`), the port, MMIO and CPUID handlers,
//! and, with `--service-time`, the entry into `KVM_RUN` (`kvm_fpu`) that ends the VMM's service.
//! `kvm_exit.rs` has the `kvm:kvm_exit` probes of VMX and SVM hosts.
//!
//! Raw tracepoints are used where the arguments suffice: they hand the tracepoint's arguments over
//! without building a trace record, which costs a guest far less per event.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::raw_tracepoint, programs::RawTracePointContext};
use vmtrace_common::{
    Drop, ExitKind, LatencyKey, LatencyKind, MmioType, SPACE_MMIO, SPACE_PIO, ServiceStart,
    switches,
};

use crate::{
    maps::{
        count, count_current_thread, count_drop, count_for, current_cgroup_id, record_latency,
        switch_on,
    },
    thread_slot::Thread,
    virtio::{keep_unknown_write, on_fast_mmio_write, on_guest_write, settle_pending_write},
    vmm_process::note_vmm,
};

/// `kvm_userspace_exit(__u32 reason, int errno)`: KVM_RUN is returning to the VMM.
#[raw_tracepoint(tracepoint = "kvm_userspace_exit")]
pub fn kvm_userspace_exit(ctx: RawTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(0);
    let errno: u64 = ctx.arg(1);
    on_userspace_exit(reason as u32, errno as i32);
    0
}

#[inline(always)]
fn on_userspace_exit(reason: u32, errno: i32) {
    let thread = Thread::current();
    if let Some(thread) = &thread {
        settle_pending_write(thread, (errno >= 0).then_some(reason));
    }
    if errno < 0 {
        count(ExitKind::UserspaceError, errno.unsigned_abs());
        count_current_thread(ExitKind::UserspaceError, errno.unsigned_abs());
        return;
    }
    count_current_thread(ExitKind::Userspace, reason);
    let cgroup_id = current_cgroup_id();
    count_for(cgroup_id, ExitKind::Userspace, reason);
    let Some(Thread { tid, slot, .. }) = thread else {
        return;
    };
    let timed = switch_on(switches::SERVICE_TIME);
    // SAFETY: an array slot of this map; only the thread whose id maps to it writes it, except
    // when two live threads' ids collide, which is detected (the other thread's pending start).
    let owned = unsafe {
        let service = &raw mut (*slot).service;
        let owned = (*service).tid == tid;
        if timed {
            if (*service).time_ns != 0 && !owned {
                count_drop(Drop::ServiceSlotTaken);
            }
            *service = ServiceStart {
                time_ns: bpf_ktime_get_ns(),
                cgroup_id,
                reason,
                tid,
            };
        } else if !owned {
            // Without service times the slot only says that this thread's process is noted, so
            // that the lookup in `note_vmm` is made once per thread, not once per exit.
            *service = ServiceStart {
                time_ns: 0,
                cgroup_id,
                reason,
                tid,
            };
        }
        owned
    };
    if !owned {
        // The thread's first return seen: it may have entered KVM_RUN, and its VM made its MMU
        // root, before the probes were attached, so nothing else may have noted its process.
        note_vmm();
    }
}

/// `kvm_fpu(int load)`: with `load` = 1, KVM loads the guest's FPU state, which it does once early in
/// every `KVM_RUN` (`kvm_arch_vcpu_ioctl_run()`, arch/x86/kvm/x86.c); with 0 it puts it back on the
/// way out. This raw tracepoint is how `KVM_RUN` is seen without a syscall tracepoint, which would
/// run (and build its record) on every ioctl of the host.
#[raw_tracepoint(tracepoint = "kvm_fpu")]
pub fn kvm_fpu(ctx: RawTracePointContext) -> i32 {
    let load: u64 = ctx.arg(0);
    if load as u32 == 1 {
        on_kvm_run();
    }
    0
}

/// The thread enters `KVM_RUN`: the VMM has served its last exit, if any. A thread that returned
/// to the VMM before is already known to be a VMM's; any other is noted as one.
#[inline(always)]
fn on_kvm_run() {
    let Some(Thread { tid, slot, .. }) = Thread::current() else {
        return;
    };
    // SAFETY: an array slot of this map, copied out and marked consumed at once.
    let start = unsafe {
        let service = &raw mut (*slot).service;
        let start = *service;
        if start.time_ns == 0 || start.tid != tid {
            // The vCPU's first KVM_RUN, or one after an exit the probes did not see.
            note_vmm();
            return;
        }
        (*service).time_ns = 0;
        start
    };
    let key = LatencyKey {
        cgroup_id: start.cgroup_id,
        kind: LatencyKind::ServiceTime as u32,
        isa: 0,
        reason: start.reason,
        reserved: 0,
    };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    record_latency(key, now.saturating_sub(start.time_ns));
}

/// The current thread exits: a service it left pending (a vCPU's last exit) never ends, and must
/// not be taken for the service of a later thread with the same id; nor may such a thread settle
/// its pending MMIO write, which did not exit and is settled now.
#[inline(always)]
pub fn forget_thread(thread: &Thread) {
    settle_pending_write(thread, None);
    // SAFETY: an array slot of this map; only this thread's own start is cleared.
    unsafe {
        let service = &raw mut (*thread.slot).service;
        if (*service).tid == thread.tid {
            *service = ServiceStart {
                time_ns: 0,
                cgroup_id: 0,
                reason: 0,
                tid: 0,
            };
        }
    }
}

/// `kvm_pio(unsigned int rw, unsigned int port, unsigned int size, unsigned int count, const void *data)`.
/// A write that hits a doorbell is counted as a kick on it alone; the agent adds kicks back into
/// `pio.out`.
#[raw_tracepoint(tracepoint = "kvm_pio")]
pub fn kvm_pio(ctx: RawTracePointContext) -> i32 {
    let rw: u64 = ctx.arg(0);
    // Per thread, a doorbell write is the write it is: the view shows exits, not kicks.
    count_current_thread(ExitKind::Pio, rw as u32);
    if rw == 1 {
        let port: u64 = ctx.arg(1);
        let size: u64 = ctx.arg(2);
        let data: u64 = ctx.arg(4);
        if on_guest_write(SPACE_PIO, port, size as u32, data) {
            return 0;
        }
    }
    count(ExitKind::Pio, rw as u32);
    0
}

/// `kvm_mmio(int type, int len, u64 gpa, void *val)`.
/// A write that hits a doorbell is counted as a kick on it alone, and one that may be a kick of an
/// unknown doorbell is counted once it is settled, as a kick or as a plain write; the agent adds
/// kicks back into `mmio.write`.
#[raw_tracepoint(tracepoint = "kvm_mmio")]
pub fn kvm_mmio(ctx: RawTracePointContext) -> i32 {
    let mmio_type: u64 = ctx.arg(0);
    let mmio_type = mmio_type as u32;
    count_current_thread(ExitKind::Mmio, mmio_type);
    let thread = Thread::current();
    // The thread's previous MMIO write, if one is pending, did not exit: this event would not be
    // here if it had. It is settled below, or by `keep_unknown_write` in the same slot access.
    if mmio_type == MmioType::Write as u32 {
        let len: u64 = ctx.arg(1);
        let gpa: u64 = ctx.arg(2);
        let data: u64 = ctx.arg(3);
        if on_guest_write(SPACE_MMIO, gpa, len as u32, data) {
            if let Some(thread) = &thread {
                settle_pending_write(thread, None);
            }
            return 0;
        }
        let cgroup_id = current_cgroup_id();
        if let Some(thread) = &thread {
            if keep_unknown_write(thread, cgroup_id, gpa, len as u32, data) {
                return 0;
            }
            settle_pending_write(thread, None);
        }
        count_for(cgroup_id, ExitKind::Mmio, mmio_type);
        return 0;
    }
    if let Some(thread) = &thread {
        settle_pending_write(thread, None);
    }
    count(ExitKind::Mmio, mmio_type);
    0
}

/// `kvm_fast_mmio(u64 gpa)`: on VMX, a write KVM completed on its fast MMIO bus without decoding
/// it (`handle_ept_misconfig()`): a doorbell of length 0 and without datamatch took it, and
/// `kvm_mmio` does not fire. Silent on SVM and PVM, which decode every MMIO write.
#[raw_tracepoint(tracepoint = "kvm_fast_mmio")]
pub fn kvm_fast_mmio(ctx: RawTracePointContext) -> i32 {
    let gpa: u64 = ctx.arg(0);
    count_current_thread(ExitKind::Mmio, MmioType::Write as u32);
    on_fast_mmio_write(gpa);
    0
}

/// `kvm_cpuid(function, index, rax, rbx, rcx, rdx, found, used_max_basic)`.
#[raw_tracepoint(tracepoint = "kvm_cpuid")]
pub fn kvm_cpuid(_ctx: RawTracePointContext) -> i32 {
    count(ExitKind::Cpuid, 0);
    count_current_thread(ExitKind::Cpuid, 0);
    0
}
