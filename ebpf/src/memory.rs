//! Memory seen from the host: page faults of VMM processes, kvmmmu page-table pages, guest faults the
//! hardware reports (EPT/NPT violations), host invalidations and ageing of guest memory, and the
//! memory a VMM returns to the host with `madvise` (a balloon) and the faults that take it back.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::{map, raw_tracepoint},
    maps::HashMap,
    programs::RawTracePointContext,
};
use vmtrace_common::{
    Drop, ExitKind, FaultMode, GUEST_SLOTS, GuestMemory, HvaDetail, KvmUserspaceMemoryRegion,
    MADV_DONTNEED, MADV_DONTNEED_LOCKED, MADV_FREE, MADV_REMOVE, MmuPageEvent, RETURNED_RANGES,
    ReturnedRanges, VMM_MEMORY_CAPACITY,
};

use crate::{
    maps::{add_for, count, count_drop, count_for, current_cgroup_id, current_tgid},
    vmm_process::{in_vmm, note_vmm},
};

/// Each VMM's most recently returned ranges, by tgid.
#[map]
static RETURNED: HashMap<u32, ReturnedRanges> = HashMap::with_max_entries(VMM_MEMORY_CAPACITY, 0);

/// Each VMM's guest memory, from its `KVM_SET_USER_MEMORY_REGION` calls, by tgid.
#[map]
static GUEST_MEMORY: HashMap<u32, GuestMemory> = HashMap::with_max_entries(VMM_MEMORY_CAPACITY, 0);

/// First address above user space on x86-64 (4-level paging; 5-level starts higher, and kernel
/// addresses are far above both).
const USER_SPACE_END: u64 = 0x0000_8000_0000_0000;

/// `page_fault_user(unsigned long address, struct pt_regs *regs, unsigned long error_code)`.
#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    on_fault(ctx.arg(0), FaultMode::User);
    0
}

/// `page_fault_kernel(...)`, same arguments: the kernel faulted, here only on a user address, i.e. on
/// the task's own memory (KVM's emulator writing guest memory, a copy to user space).
#[raw_tracepoint(tracepoint = "page_fault_kernel")]
pub fn page_fault_kernel(ctx: RawTracePointContext) -> i32 {
    let address: u64 = ctx.arg(0);
    if address < USER_SPACE_END {
        on_fault(address, FaultMode::Kernel);
    }
    0
}

#[inline(always)]
fn on_fault(address: u64, mode: FaultMode) {
    if !in_vmm() {
        return;
    }
    let cgroup_id = current_cgroup_id();
    count_for(cgroup_id, ExitKind::HostFault, mode as u32);
    // SAFETY: the value is only read.
    let Some(returned) = (unsafe { RETURNED.get(current_tgid()) }) else {
        return;
    };
    for [start, end] in returned.ranges {
        if address >= start && address < end {
            count_for(cgroup_id, ExitKind::Refault, 0);
            return;
        }
    }
}

/// `kvm_mmu_get_page(struct kvm_mmu_page *sp, bool created)`. A vCPU's first `KVM_RUN` makes its
/// root page (shadow paging: `mmu_alloc_shadow_roots()`; TDP: `tdp_mmu_alloc_sp()`), before the
/// guest runs: the process is noted as a VMM here, so that its faults and flushes count from the
/// start, without a probe on every `KVM_RUN`. The event is rare (dozens per VM), so the lookup is.
#[raw_tracepoint(tracepoint = "kvm_mmu_get_page")]
pub fn kvm_mmu_get_page(ctx: RawTracePointContext) -> i32 {
    note_vmm();
    let created: u64 = ctx.arg(1);
    let event = if created & 1 == 1 {
        MmuPageEvent::Created
    } else {
        MmuPageEvent::Reused
    };
    count(ExitKind::MmuPage, event as u32);
    0
}

/// `kvm_mmu_prepare_zap_page(struct kvm_mmu_page *sp)`.
#[raw_tracepoint(tracepoint = "kvm_mmu_prepare_zap_page")]
pub fn kvm_mmu_prepare_zap_page(_ctx: RawTracePointContext) -> i32 {
    count(ExitKind::MmuPage, MmuPageEvent::Zapped as u32);
    0
}

/// `kvm_page_fault(struct kvm_vcpu *vcpu, u64 fault_address, u64 error_code)`: VMX and SVM only.
#[raw_tracepoint(tracepoint = "kvm_page_fault")]
pub fn kvm_page_fault(_ctx: RawTracePointContext) -> i32 {
    count(ExitKind::GuestFault, 0);
    0
}

/// `kvm_age_hva(unsigned long start, unsigned long end)`: reclaim ageing guest memory.
#[raw_tracepoint(tracepoint = "kvm_age_hva")]
pub fn kvm_age_hva(_ctx: RawTracePointContext) -> i32 {
    count(ExitKind::HvaAge, 0);
    0
}

/// `kvm_test_age_hva(unsigned long hva)`.
#[raw_tracepoint(tracepoint = "kvm_test_age_hva")]
pub fn kvm_test_age_hva(_ctx: RawTracePointContext) -> i32 {
    count(ExitKind::HvaAge, 1);
    0
}

/// `kvm_unmap_hva_range(unsigned long start, unsigned long end)`: part of a VMM's address space is
/// invalidated, so KVM drops its mappings of the guest memory there.
#[raw_tracepoint(tracepoint = "kvm_unmap_hva_range")]
pub fn kvm_unmap_hva_range(ctx: RawTracePointContext) -> i32 {
    let start: u64 = ctx.arg(0);
    let end: u64 = ctx.arg(1);
    let bytes = end.saturating_sub(start);
    let cgroup_id = current_cgroup_id();
    add_for(cgroup_id, ExitKind::HvaUnmap, HvaDetail::Calls as u32, 1);
    add_for(
        cgroup_id,
        ExitKind::HvaUnmap,
        HvaDetail::Bytes as u32,
        bytes,
    );
    if discarding_madvise() && in_vmm() {
        on_returned(cgroup_id, start, end);
    }
    0
}

/// The VMM discarded `[start, end)`: the part that is guest memory went back to the host. Without
/// the VMM's memory slots (set before the probes were attached) the whole range counts.
#[inline(always)]
fn on_returned(cgroup_id: u64, start: u64, end: u64) {
    let tgid = current_tgid();
    let mut returned = 0u64;
    // SAFETY: the value is only read.
    if let Some(memory) = unsafe { GUEST_MEMORY.get(tgid) } {
        for [slot_start, slot_end] in memory.ranges {
            let from = if start > slot_start {
                start
            } else {
                slot_start
            };
            let to = if end < slot_end { end } else { slot_end };
            if from < to {
                returned += to - from;
                remember_returned(tgid, from, to);
            }
        }
    } else {
        returned = end.saturating_sub(start);
        remember_returned(tgid, start, end);
    }
    if returned == 0 {
        return;
    }
    add_for(
        cgroup_id,
        ExitKind::HvaUnmap,
        HvaDetail::ReturnedCalls as u32,
        1,
    );
    add_for(
        cgroup_id,
        ExitKind::HvaUnmap,
        HvaDetail::ReturnedBytes as u32,
        returned,
    );
}

/// `KVM_SET_USER_MEMORY_REGION(2)`: remembers (or, with size 0, forgets) a slot of guest memory.
#[inline(always)]
pub fn on_set_memory_region(arg: u64) {
    // SAFETY: the helper copies from the VMM's memory and fails rather than faults.
    let Ok(region) = (unsafe { bpf_probe_read_user(arg as *const KvmUserspaceMemoryRegion) })
    else {
        count_drop(Drop::GuestMemoryLost);
        return;
    };
    let tgid = current_tgid();
    let index = (region.slot as usize) % GUEST_SLOTS;
    let range = if region.memory_size == 0 {
        [0, 0]
    } else {
        [
            region.userspace_addr,
            region.userspace_addr + region.memory_size,
        ]
    };
    // A new process's slots start from an all-unused value in read-only data: a 256-byte value
    // built (or copied) on the stack would not fit beside the ioctl probe's other locals, so the
    // static is passed by reference.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let _ = GUEST_MEMORY.insert(tgid, &NO_GUEST_MEMORY, u64::from(BPF_NOEXIST));
    let Some(memory) = GUEST_MEMORY.get_ptr_mut(tgid) else {
        count_drop(Drop::GuestMemoryLost);
        return;
    };
    // SAFETY: the entry of this process; slots are set by the VMM's (serialised) ioctls.
    unsafe {
        if let Some(slot) = (*memory).ranges.get_mut(index) {
            *slot = range;
        }
    }
}

static NO_GUEST_MEMORY: GuestMemory = GuestMemory {
    ranges: [[0; 2]; GUEST_SLOTS],
};

/// Keeps `[start, end)` among the process's returned ranges, replacing the oldest.
#[inline(always)]
fn remember_returned(tgid: u32, start: u64, end: u64) {
    if let Some(returned) = RETURNED.get_ptr_mut(tgid) {
        // SAFETY: the entry of this process; concurrent updates can at worst lose one range.
        unsafe {
            let slot = ((*returned).next % RETURNED_RANGES as u64) as usize;
            if let Some(range) = (*returned).ranges.get_mut(slot) {
                *range = [start, end];
            }
            (*returned).next += 1;
        }
        return;
    }
    let mut returned = ReturnedRanges {
        ranges: [[0; 2]; RETURNED_RANGES],
        next: 1,
    };
    returned.ranges[0] = [start, end];
    if RETURNED.insert(tgid, returned, 0).is_err() {
        count_drop(Drop::ReturnedRangesFull);
    }
}

/// The process exited: its ranges mean nothing any more.
#[inline(always)]
pub fn forget_process(tgid: u32) {
    let _ = RETURNED.remove(tgid);
    let _ = GUEST_MEMORY.remove(tgid);
}

/// `madvise`'s number in x86-64's system call table (arch/x86/entry/syscalls/syscall_64.tbl), part
/// of the kernel's user ABI.
const NR_MADVISE: u64 = 28;

/// How far below a thread's stack pointer a release of its own stack ends: glibc's
/// `advise_stack_range()` (nptl/nptl-stack.c), called by every exiting thread, discards its stack
/// up to `PTHREAD_STACK_MIN` (16 KiB) and a page below the stack pointer.
const OWN_STACK_MARGIN: u64 = 64 * 1024;

/// The registers a system call leaves in x86-64's `struct pt_regs` (arch/x86/include/asm/ptrace.h,
/// the same layout as the user ABI's `user_regs_struct`), from `dx` (index 12) to `sp` (19): the
/// first three arguments, the system call's number and the user stack pointer.
#[repr(C)]
struct SyscallRegs {
    dx: u64,
    si: u64,
    di: u64,
    orig_ax: u64,
    _ip: u64,
    _cs: u64,
    _flags: u64,
    sp: u64,
}

/// Offset of `dx` in `struct pt_regs`.
const PT_REGS_DX: u64 = 12 * 8;

/// Whether the current thread is inside a `madvise` that gives memory back to the host, read from
/// the registers its system call saved on entry (they stay as the user left them until it
/// returns), unless it is discarding its own stack on its way out. No tracepoint on `madvise`
/// is needed: a syscall tracepoint, once enabled, puts every system call of the host on the traced
/// slow path (docs/probes.md).
#[inline(always)]
fn discarding_madvise() -> bool {
    // SAFETY: the helpers return the current task and its saved user registers; the read fails
    // rather than faults.
    let Ok(regs) = (unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as u64;
        bpf_probe_read_kernel((regs + PT_REGS_DX) as *const SyscallRegs)
    }) else {
        return false;
    };
    // Outside a system call `orig_ax` holds an exception's error code or -1.
    if regs.orig_ax != NR_MADVISE {
        return false;
    }
    // The advice is an `int`: only the register's low half is the argument.
    let discards = matches!(
        regs.dx as u32,
        MADV_DONTNEED | MADV_FREE | MADV_REMOVE | MADV_DONTNEED_LOCKED
    );
    discards && !releases_own_stack(regs.di.saturating_add(regs.si), regs.sp)
}

/// Whether a discard ending at `end` is the calling thread freeing its own stack: it ends just
/// below the thread's user stack pointer `sp`. A VMM's guest memory is a mapping of its own, never
/// the stack the thread runs on.
#[inline(always)]
fn releases_own_stack(end: u64, sp: u64) -> bool {
    end <= sp && sp - end <= OWN_STACK_MARGIN
}
