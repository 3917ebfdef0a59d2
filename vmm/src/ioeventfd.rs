//! KVM_IOEVENTFD registrations, issued as the raw ioctl so the length and datamatch are exactly
//! what a device model registers.
//!
//! kvm-ioctls' `register_ioevent` ties the length to the datamatch type (no datamatch means
//! length 0, "any length"), which is why the ioctl is issued directly.

use std::os::fd::AsRawFd;

use kvm_bindings::{KVMIO, kvm_ioeventfd, kvm_ioeventfd_flag_nr_datamatch};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::error::Error;
use crate::report::IoEventFdReport;

ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

/// KVM_IOEVENTFD_FLAG_DATAMATCH: signal only writes of exactly `datamatch`.
const FLAG_DATAMATCH: u32 = 1 << kvm_ioeventfd_flag_nr_datamatch;

/// Registers `fd` as an ioeventfd for `len`-byte MMIO writes at `addr`, of value `datamatch`
/// only if given, and returns the registration as the report lists it.
pub fn register_mmio(
    vm: &VmFd,
    fd: &EventFd,
    addr: u64,
    len: u32,
    datamatch: Option<u64>,
) -> Result<IoEventFdReport, Error> {
    let request = kvm_ioeventfd {
        datamatch: datamatch.unwrap_or(0),
        addr,
        len,
        fd: fd.as_raw_fd(),
        flags: if datamatch.is_some() {
            FLAG_DATAMATCH
        } else {
            0
        },
        ..Default::default()
    };
    // SAFETY: `vm` is a KVM VM fd and `request` is a fully initialised kvm_ioeventfd that the
    // kernel only reads; the return value is checked.
    let ret = unsafe { ioctl_with_ref(vm, KVM_IOEVENTFD(), &request) };
    if ret != 0 {
        return Err(Error::Kvm("KVM_IOEVENTFD", kvm_ioctls::Error::last()));
    }
    Ok(IoEventFdReport {
        space: "mmio".into(),
        addr,
        len,
        datamatch,
    })
}
