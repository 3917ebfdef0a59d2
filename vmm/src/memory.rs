//! Guest RAM: one anonymous mapping at GPA 0, registered with KVM as memory slot 0, and for the
//! touch and balloon scenarios a second one, the touch region, as slot 1.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::Error;
use crate::layout::{TOUCH_REGION_GPA, TOUCH_REGION_SLOT};
use crate::region;
use crate::usage::Usage;

/// Creates `size` bytes of guest RAM at GPA 0 and registers them with `vm`
/// ([`crate::layout::MEM_SIZE`], or [`crate::layout::VIRTIO_MEM_SIZE`] for virtio). With
/// `region_bytes` it also creates the touch region: that many bytes at
/// [`TOUCH_REGION_GPA`] in a mapping of their own, never touched, with transparent huge pages
/// off (see [`region::no_huge_pages`]), registered as slot [`TOUCH_REGION_SLOT`].
///
/// The returned memory must outlive every vCPU of `vm` that may touch it; [`crate::Vmm`]
/// keeps it until the vCPU threads have been joined. Also returns the process's accounting just
/// before the first slot was registered: from that ioctl on, a tracer counts it as a VMM.
pub fn create(
    vm: &VmFd,
    size: usize,
    region_bytes: Option<u64>,
) -> Result<(GuestMemoryMmap, Usage), Error> {
    let mut ranges = vec![(GuestAddress(0), size)];
    if let Some(bytes) = region_bytes {
        ranges.push((GuestAddress(TOUCH_REGION_GPA), bytes as usize));
    }
    // from_ranges maps each range on its own (anonymous, private, MAP_NORESERVE): one region
    // per range, in GPA order.
    let memory = GuestMemoryMmap::<()>::from_ranges(&ranges)
        .map_err(|e| Error::Memory(format!("cannot map {ranges:x?} (GPA, bytes): {e}")))?;
    let before_first_slot = Usage::of_process()?;
    for (slot, region) in (0u32..).zip(memory.iter()) {
        let gpa = region.start_addr();
        let len = region.len();
        let host = memory
            .get_host_address(gpa)
            .map_err(|e| Error::Memory(format!("no host address for GPA {:#x}: {e}", gpa.0)))?;
        if slot == TOUCH_REGION_SLOT {
            region::no_huge_pages(host as u64, len)?;
        }
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa.0,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: `kvm_region` describes exactly one mapping owned by `memory`, which the
        // caller keeps alive for as long as the VM can run; each slot is registered once and
        // the ranges do not overlap.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok((memory, before_first_slot))
}

/// The host virtual address of guest-physical address `gpa`.
pub fn host_address(memory: &GuestMemoryMmap, gpa: u64) -> Result<u64, Error> {
    memory
        .get_host_address(GuestAddress(gpa))
        .map(|p| p as u64)
        .map_err(|e| Error::Memory(format!("no host address for GPA {gpa:#x}: {e}")))
}

/// Copies `bytes` into guest memory at `gpa`.
pub fn load(memory: &GuestMemoryMmap, gpa: u64, bytes: &[u8]) -> Result<(), Error> {
    memory.write_slice(bytes, GuestAddress(gpa)).map_err(|e| {
        Error::Memory(format!(
            "cannot load {} bytes at {gpa:#x}: {e}",
            bytes.len()
        ))
    })
}

/// Reads the little-endian `u32` at `gpa`.
pub fn read_u32(memory: &GuestMemoryMmap, gpa: u64) -> Result<u32, Error> {
    memory
        .read_obj::<u32>(GuestAddress(gpa))
        .map(u32::from_le)
        .map_err(|e| Error::Memory(format!("cannot read the counter at {gpa:#x}: {e}")))
}
