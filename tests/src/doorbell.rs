//! Doorbells registered straight with KVM, without a guest: what a VMM does at setup and again
//! after every virtio reset, for tests that churn the kernel's ioeventfds.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `struct kvm_ioeventfd` of <linux/kvm.h>.
#[repr(C)]
struct KvmIoeventfd {
    datamatch: u64,
    addr: u64,
    len: u32,
    fd: i32,
    flags: u32,
    pad: [u8; 36],
}

/// `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
/// `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`, the struct being 64 bytes.
const KVM_IOEVENTFD: libc::c_ulong = 0x4040_AE79;
const KVM_IOEVENTFD_FLAG_DATAMATCH: u32 = 1 << 0;
const KVM_IOEVENTFD_FLAG_DEASSIGN: u32 = 1 << 2;
const _: () = assert!(std::mem::size_of::<KvmIoeventfd>() == 64);

/// A VM with no memory and no vCPU: enough to register doorbells, as a VMM does at setup and
/// again after every virtio reset.
pub struct DoorbellVm {
    vm: OwnedFd,
    eventfd: OwnedFd,
}

impl DoorbellVm {
    pub fn new() -> Self {
        let kvm = std::fs::File::open("/dev/kvm").expect("/dev/kvm");
        // SAFETY: KVM_CREATE_VM takes the machine type (0) by value; the result is checked.
        let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
        assert!(
            vm >= 0,
            "KVM_CREATE_VM: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(eventfd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just created and are owned by nothing else.
        unsafe {
            Self {
                vm: OwnedFd::from_raw_fd(vm),
                eventfd: OwnedFd::from_raw_fd(eventfd),
            }
        }
    }

    /// Registers (or with `deassign`, removes) the doorbell of `queue` at `addr`.
    pub fn doorbell(&self, addr: u64, queue: u64, deassign: bool) {
        let request = KvmIoeventfd {
            datamatch: queue,
            addr,
            len: 4,
            fd: self.eventfd.as_raw_fd(),
            flags: KVM_IOEVENTFD_FLAG_DATAMATCH
                | if deassign {
                    KVM_IOEVENTFD_FLAG_DEASSIGN
                } else {
                    0
                },
            pad: [0; 36],
        };
        // SAFETY: the VM fd is live and `request` is a complete kvm_ioeventfd the kernel only
        // reads; the result is checked.
        let ret = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_IOEVENTFD, &raw const request) };
        assert_eq!(
            ret,
            0,
            "KVM_IOEVENTFD (deassign: {deassign}): {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Default for DoorbellVm {
    fn default() -> Self {
        Self::new()
    }
}
