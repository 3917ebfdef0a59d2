//! Virtio doorbells and kicks, for any VMM. A VMM registers each queue's doorbell with
//! `KVM_IOEVENTFD` (address, length, PIO or MMIO, datamatch = queue index); vmtrace learns them from
//! that ioctl and counts each guest write that matches one as a kick of that queue.
//!
//! Doorbells registered before the probes were attached are unknown: writes to them are still
//! counted as in-kernel MMIO writes (`mmio.write.kernel`), but not as kicks.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user};
use vmtrace_common::{
    ANY_QUEUE, Doorbell, DoorbellKey, Drop, KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN, KVM_IOEVENTFD_FLAG_PIO, KickKey, KvmIoeventfd, SPACE_MMIO,
    SPACE_PIO,
};

use crate::maps::{DOORBELLS, count_drop, count_kick, current_cgroup_id};

/// The VMM process (thread group) of the current thread.
#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

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
        reserved: 0,
    };
    if request.flags & KVM_IOEVENTFD_FLAG_DEASSIGN != 0 {
        let _ = DOORBELLS.remove(key);
        return;
    }
    let doorbell = Doorbell {
        len: request.len,
        queue: if has_datamatch {
            request.datamatch as u32
        } else {
            ANY_QUEUE
        },
        vm_fd,
        reserved: 0,
    };
    if DOORBELLS.insert(key, doorbell, 0).is_err() {
        count_drop(Drop::DoorbellsFull);
    }
}

/// A guest write of `len` bytes at `addr` in `space`, whose value is at the kernel address `data`:
/// counts a kick when it hits a known doorbell.
#[inline(always)]
pub fn on_guest_write(space: u32, addr: u64, len: u32, data: u64) {
    let Some(value) = read_value(data, len) else {
        return;
    };
    let mut key = DoorbellKey {
        tgid: current_tgid(),
        space,
        addr,
        datamatch: value,
        wildcard: 0,
        reserved: 0,
    };
    // SAFETY: the value is copied out at once.
    let mut doorbell = unsafe { DOORBELLS.get(key) }.copied();
    if doorbell.is_none() {
        key.datamatch = 0;
        key.wildcard = 1;
        // SAFETY: as above.
        doorbell = unsafe { DOORBELLS.get(key) }.copied();
    }
    let Some(doorbell) = doorbell else { return };
    // As KVM does: an ioeventfd of length 0 matches any access, others only their own length.
    if doorbell.len != 0 && doorbell.len != len {
        return;
    }
    count_kick(KickKey {
        cgroup_id: current_cgroup_id(),
        tgid: key.tgid,
        space,
        addr,
        queue: doorbell.queue,
        vm_fd: doorbell.vm_fd,
    });
}

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
