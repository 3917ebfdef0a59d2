//! Guest RAM: one anonymous mapping at GPA 0, registered with KVM as memory slot 0.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::Error;

/// Creates `size` bytes of guest RAM at GPA 0 and registers them with `vm`
/// ([`crate::layout::MEM_SIZE`], or [`crate::layout::VIRTIO_MEM_SIZE`] for virtio).
///
/// The returned memory must outlive every vCPU of `vm` that may touch it; [`crate::Vmm`]
/// keeps it until the vCPU threads have been joined.
pub fn create(vm: &VmFd, size: usize) -> Result<GuestMemoryMmap, Error> {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|e| Error::Memory(format!("cannot map {size} bytes: {e}")))?;
    let host = memory
        .get_host_address(GuestAddress(0))
        .map_err(|e| Error::Memory(format!("no host address for GPA 0: {e}")))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `region` describes exactly the `size`-byte mapping owned by `memory`, which the
    // caller keeps alive for as long as the VM can run; the slot is not registered twice.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    Ok(memory)
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
