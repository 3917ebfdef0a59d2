//! Virtio doorbells and kicks, for any VMM. A VMM registers each queue's doorbell with
//! `KVM_IOEVENTFD` (address, length, PIO or MMIO, datamatch = queue index); vmtrace learns them from
//! that ioctl and counts each guest write that matches one as a kick of that queue.
//!
//! Doorbells registered before the probes were attached are unknown. Their kicks are inferred: an
//! MMIO write that hits no known doorbell waits in its thread's slot until the thread's next MMIO
//! event or return to the VMM; if that is not the `KVM_EXIT_MMIO` the write itself would cause,
//! the kernel completed the write, and a virtio driver's in-kernel write is a kick whose value is
//! the queue index (virtio 1.x, 4.1.4.4 and 4.2.2.2).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user},
};
use vmtrace_common::{
    ANY_QUEUE, Doorbell, DoorbellKey, Drop, EventfdKey, ExitKind, KVM_EXIT_MMIO,
    KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_IOEVENTFD_FLAG_DEASSIGN, KVM_IOEVENTFD_FLAG_PIO, KickKey,
    KvmIoeventfd, LatencyKey, LatencyKind, MmioType, PendingKick, PendingWrite, SPACE_MMIO,
    SPACE_PIO, switches,
};

use crate::{
    maps::{
        DOORBELL_ADDRS, DOORBELLS, INFERRED_KICKS, KICKS, PENDING_KICKS, REMOVED_DOORBELLS,
        count_drop, count_for, current_cgroup_id, current_tgid, increment, record_latency,
        switch_on,
    },
    thread_slot::Thread,
};

/// `ioctl(vm_fd, KVM_IOEVENTFD, arg)`: learn or forget a doorbell of the calling VMM.
#[inline(always)]
pub fn on_ioeventfd(vm_fd: u32, arg: u64) {
    // SAFETY: `arg` is the VMM's user pointer to its struct kvm_ioeventfd; the helper copies it and
    // fails rather than faults on a bad address.
    let Ok(request) = (unsafe { bpf_probe_read_user(arg as *const KvmIoeventfd) }) else {
        count_drop(Drop::IoeventfdUnreadable);
        return;
    };
    let has_datamatch = request.flags & KVM_IOEVENTFD_FLAG_DATAMATCH != 0;
    let key = DoorbellKey {
        tgid: current_tgid(),
        space: if request.flags & KVM_IOEVENTFD_FLAG_PIO != 0 {
            SPACE_PIO
        } else {
            SPACE_MMIO
        },
        addr: request.addr,
        datamatch: if has_datamatch { request.datamatch } else { 0 },
        wildcard: u32::from(!has_datamatch),
        len: request.len,
    };
    if request.flags & KVM_IOEVENTFD_FLAG_DEASSIGN != 0 {
        // The kicks stay counted under the key until the agent has collected them; it finds the
        // doorbell among the removed ones and then deletes both.
        // SAFETY: the value is copied out at once.
        if let Some(doorbell) = unsafe { DOORBELLS.get(key) }.copied() {
            if REMOVED_DOORBELLS.insert(key, doorbell, 0).is_err() {
                count_drop(Drop::RemovedDoorbellsFull);
            }
            let _ = DOORBELLS.remove(key);
            forget_address(&key);
        }
        return;
    }
    // SAFETY: only the presence of the entry is used.
    let known = unsafe { DOORBELLS.get(key) }.is_some();
    let doorbell = Doorbell {
        queue: if has_datamatch {
            request.datamatch as u32
        } else {
            ANY_QUEUE
        },
        vm_fd,
        eventfd: request.fd as u32,
        reserved: 0,
        cgroup_id: current_cgroup_id(),
    };
    if DOORBELLS.insert(key, doorbell, 0).is_err() {
        count_drop(Drop::DoorbellsFull);
        return;
    }
    if !known {
        remember_address(&key);
    }
    // Registered again: its counter goes on. NOEXIST leaves an existing one as it is.
    if let Err(err) = KICKS.insert(key, 0, u64::from(BPF_NOEXIST))
        && err != -EEXIST
    {
        count_drop(Drop::KicksFull);
    }
    let _ = REMOVED_DOORBELLS.remove(key);
}

/// One more doorbell at the address of `key`.
#[inline(always)]
fn remember_address(key: &DoorbellKey) {
    let address = key.address();
    match DOORBELL_ADDRS.get_ptr_mut(address) {
        // SAFETY: the entry of this address; doorbells are set by the VMM's (serialised) ioctls.
        Some(count) => unsafe { *count += 1 },
        None => {
            if DOORBELL_ADDRS.insert(address, 1, 0).is_err() {
                count_drop(Drop::DoorbellsFull);
            }
        }
    }
}

/// One doorbell fewer at the address of `key`.
#[inline(always)]
fn forget_address(key: &DoorbellKey) {
    let address = key.address();
    if let Some(count) = DOORBELL_ADDRS.get_ptr_mut(address) {
        // SAFETY: as above.
        let left = unsafe {
            *count = (*count).saturating_sub(1);
            *count
        };
        if left == 0 {
            let _ = DOORBELL_ADDRS.remove(address);
        }
    }
}

/// A guest write of `len` bytes at `addr` in `space`, whose value is at the kernel address `data`:
/// if it hits a known doorbell, counts the kick and returns true (the write is then not counted as
/// a plain MMIO or port write too: the agent adds the kicks back).
///
/// Matching is KVM's: a doorbell without datamatch matches any value, one with datamatch only its
/// own; a doorbell of length 0 matches any access length, others only their own. A doorbell without
/// datamatch of the access's length is tried first: that kick costs one lookup in a per-CPU map and
/// an increment there. Then one lookup dismisses an address without doorbells; the other kinds of
/// doorbell are tried only at addresses that have some.
#[inline(always)]
pub fn on_guest_write(space: u32, addr: u64, len: u32, data: u64) -> bool {
    if !doorbells_learnt() {
        return false;
    }
    let mut key = DoorbellKey {
        tgid: current_tgid(),
        space,
        addr,
        datamatch: 0,
        wildcard: 1,
        len,
    };
    let mut kicks = KICKS.get_ptr_mut(key);
    if kicks.is_none() {
        // SAFETY: only the presence of the entry is used.
        if unsafe { DOORBELL_ADDRS.get(key.address()) }.is_none() {
            return false;
        }
        key.len = 0;
        kicks = KICKS.get_ptr_mut(key);
    }
    if kicks.is_none() {
        let Some(value) = read_value(data, len) else {
            return false;
        };
        key.datamatch = value;
        key.wildcard = 0;
        key.len = len;
        kicks = KICKS.get_ptr_mut(key);
        if kicks.is_none() {
            key.len = 0;
            kicks = KICKS.get_ptr_mut(key);
        }
    }
    let Some(kicks) = kicks else {
        return false;
    };
    count_kick(kicks, &key);
    true
}

/// One more kick of the known doorbell `key`, whose counter on this CPU is `kicks`.
#[inline(always)]
fn count_kick(kicks: *mut u64, key: &DoorbellKey) {
    // SAFETY: this CPU's value of the entry; tracepoint programs run with preemption disabled.
    unsafe { *kicks += 1 };
    if switch_on(switches::KICK_LATENCY) {
        // SAFETY: the value is copied out at once.
        if let Some(doorbell) = unsafe { DOORBELLS.get(key) }.copied() {
            remember_kick(key.tgid, doorbell);
        }
    }
}

/// One more kick inferred for a doorbell registered before the probes were attached, by the VMM
/// `tgid`.
#[inline(always)]
fn count_inferred_kick(cgroup_id: u64, tgid: u32, gpa: u64, queue: u32) {
    let key = KickKey {
        cgroup_id,
        tgid,
        space: SPACE_MMIO,
        addr: gpa,
        queue,
        vm_fd: 0,
    };
    increment(&INFERRED_KICKS, key, Drop::InferredKickLost, 1);
}

/// An MMIO write of `len` bytes at `gpa` (value at the kernel address `data`) by a task of
/// `cgroup_id` that hit no known doorbell: kept in the thread's slot until the thread's next event
/// learns where it went, and counted then, as a kick or as a plain MMIO write (true). The write the
/// slot held before, if it is this thread's, is settled in the same access: it did not exit, or this
/// event would not be here. Writes to the interrupt controllers KVM emulates, and values too large
/// for a queue index, are no doorbell's: they are not kept (false), and the caller counts them and
/// settles the thread's pending write.
#[inline(always)]
pub fn keep_unknown_write(thread: &Thread, cgroup_id: u64, gpa: u64, len: u32, data: u64) -> bool {
    if (LAPIC_AND_MSI..LAPIC_AND_MSI_END).contains(&gpa) || (IOAPIC..IOAPIC_END).contains(&gpa) {
        return false;
    }
    let Some(value) = read_value(data, len) else {
        return false;
    };
    if value > u64::from(u16::MAX) {
        return false;
    }
    let tid = thread.tid;
    // SAFETY: the thread's slot; only the thread whose id maps to it writes it, except when two
    // live threads' ids collide, which is detected (the other thread's pending write).
    let taken = unsafe {
        let write = &raw mut (*thread.slot).write;
        let taken = *write;
        *write = PendingWrite {
            addr: gpa,
            value,
            cgroup_id,
            tid,
            tgid: thread.tgid,
        };
        taken
    };
    if taken.tid == tid {
        count_inferred_kick(taken.cgroup_id, taken.tgid, taken.addr, taken.value as u32);
    } else if taken.tid != 0 {
        // The other thread's write is still a write; whether it was a kick is lost.
        count_drop(Drop::InferredKickLost);
        count_mmio_write(taken.cgroup_id);
    }
    true
}

/// One guest MMIO write, counted for `cgroup_id`.
#[inline(always)]
fn count_mmio_write(cgroup_id: u64) {
    count_for(cgroup_id, ExitKind::Mmio, MmioType::Write as u32);
}

/// The current thread's next MMIO event (`exit` = None), return to the VMM (`exit` = its
/// `KVM_EXIT_*` reason, or None for an error) or end (None): its pending write, if any, went to the VMM if this
/// is a `KVM_EXIT_MMIO`, and is counted as an MMIO write; else the kernel completed it, and it is
/// counted as an inferred kick alone (the agent adds inferred kicks back into the MMIO writes).
#[inline(always)]
pub fn settle_pending_write(thread: &Thread, exit: Option<u32>) {
    // SAFETY: as in `keep_unknown_write`; the write is copied out and the slot freed at once.
    let pending = unsafe {
        let write = &raw mut (*thread.slot).write;
        if (*write).tid != thread.tid {
            return;
        }
        (*write).tid = 0;
        *write
    };
    if exit == Some(KVM_EXIT_MMIO) {
        count_mmio_write(pending.cgroup_id);
    } else {
        count_inferred_kick(
            pending.cgroup_id,
            pending.tgid,
            pending.addr,
            pending.value as u32,
        );
    }
}

/// A write KVM completed on its fast MMIO bus, which holds only doorbells of length 0 without
/// datamatch: a kick of the known one at `gpa`, else of one the probes did not see registered, of
/// an unknown queue. Either is counted as a kick alone; the agent adds kicks back into the MMIO
/// writes.
#[inline(always)]
pub fn on_fast_mmio_write(gpa: u64) {
    if !doorbells_learnt() {
        count_inferred_kick(current_cgroup_id(), current_tgid(), gpa, ANY_QUEUE);
        return;
    }
    let key = DoorbellKey {
        tgid: current_tgid(),
        space: SPACE_MMIO,
        addr: gpa,
        datamatch: 0,
        wildcard: 1,
        len: 0,
    };
    if let Some(kicks) = KICKS.get_ptr_mut(key) {
        count_kick(kicks, &key);
        return;
    }
    count_inferred_kick(current_cgroup_id(), key.tgid, gpa, ANY_QUEUE);
}

/// The local APICs' page and the MSI window above it (0xFEE00000, 1 MiB), and the I/O APIC's
/// registers (0xFEC00000): the MMIO KVM's own interrupt controllers complete.
const LAPIC_AND_MSI: u64 = 0xfee0_0000;
const LAPIC_AND_MSI_END: u64 = 0xfef0_0000;
const IOAPIC: u64 = 0xfec0_0000;
const IOAPIC_END: u64 = 0xfec0_1000;

#[inline(always)]
fn doorbells_learnt() -> bool {
    switch_on(switches::DOORBELLS_LEARNT)
}

/// Keeps the time of a queue's first kick that its VMM has not read yet.
#[inline(always)]
fn remember_kick(tgid: u32, doorbell: Doorbell) {
    let key = EventfdKey {
        tgid,
        fd: doorbell.eventfd,
    };
    let pending = PendingKick {
        // SAFETY: the helper has no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: doorbell.cgroup_id,
        queue: doorbell.queue,
        reserved: 0,
    };
    // NOEXIST keeps the first unserved kick: later kicks before the read are served by that read.
    if let Err(err) = PENDING_KICKS.insert(key, pending, u64::from(BPF_NOEXIST))
        && err != -EEXIST
    {
        count_drop(Drop::PendingKicksFull);
    }
}

/// `read(fd)` by a VMM thread: if `fd` is a doorbell's eventfd with a kick pending, the kick is served.
#[inline(always)]
pub fn on_read(fd: u32) {
    let key = EventfdKey {
        tgid: current_tgid(),
        fd,
    };
    // SAFETY: the value is copied out at once.
    let Some(pending) = (unsafe { PENDING_KICKS.get(key) }).copied() else {
        return;
    };
    let _ = PENDING_KICKS.remove(key);
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let latency = LatencyKey {
        cgroup_id: pending.cgroup_id,
        kind: LatencyKind::KickService as u32,
        isa: 0,
        reason: pending.queue,
        reserved: 0,
    };
    record_latency(latency, now.saturating_sub(pending.time_ns));
}

/// errno EEXIST: the key is already in the map.
const EEXIST: i32 = 17;

/// The value written, zero-extended, as KVM compares it with a doorbell's datamatch.
#[inline(always)]
fn read_value(data: u64, len: u32) -> Option<u64> {
    // SAFETY: `data` points to the write's bytes in the kernel; the helper fails rather than faults,
    // and each arm reads exactly the access length.
    unsafe {
        match len {
            1 => bpf_probe_read_kernel(data as *const u8).ok().map(u64::from),
            2 => bpf_probe_read_kernel(data as *const u16)
                .ok()
                .map(u64::from),
            4 => bpf_probe_read_kernel(data as *const u32)
                .ok()
                .map(u64::from),
            8 => bpf_probe_read_kernel(data as *const u64).ok(),
            _ => None,
        }
    }
}
