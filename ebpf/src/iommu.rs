//! IOMMU activity: DMA mappings made and removed by a tenant's tasks (a VMM mapping guest memory for
//! a VFIO device), and IOMMU faults by device. Faults arrive in interrupt context, so they are keyed
//! by device name; the agent attributes a device to the tenant whose VMM holds it through VFIO.
//!
//! `io_page_fault` is a thin adapter over [`on_io_page_fault`], which [`replay_io_page_fault`] (never
//! attached) also reaches: tests drive it through `BPF_PROG_TEST_RUN` on hosts without an IOMMU.

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::{map, raw_tracepoint, tracepoint},
    maps::PerCpuHashMap,
    programs::{RawTracePointContext, TracePointContext},
};
use vmtrace_common::{
    DEVICE_NAME_LEN, Drop, ExitKind, IOMMU_FAULTS_CAPACITY, IommuDetail, IommuFaultKey,
};

use crate::maps::{add_for, count_drop, current_cgroup_id, increment};

/// IOMMU faults per (device, flags), per CPU.
#[map]
static IOMMU_FAULTS: PerCpuHashMap<IommuFaultKey, u64> =
    PerCpuHashMap::with_max_entries(IOMMU_FAULTS_CAPACITY, 0);

/// `iommu:map(unsigned long iova, phys_addr_t paddr, size_t size)`.
#[raw_tracepoint(tracepoint = "map")]
pub fn iommu_map(ctx: RawTracePointContext) -> i32 {
    let size: u64 = ctx.arg(2);
    let cgroup_id = current_cgroup_id();
    add_for(cgroup_id, ExitKind::Iommu, IommuDetail::Map as u32, 1);
    add_for(
        cgroup_id,
        ExitKind::Iommu,
        IommuDetail::MapBytes as u32,
        size,
    );
    0
}

/// `iommu:unmap(unsigned long iova, size_t size, size_t unmapped_size)`.
#[raw_tracepoint(tracepoint = "unmap")]
pub fn iommu_unmap(ctx: RawTracePointContext) -> i32 {
    let unmapped: u64 = ctx.arg(2);
    let cgroup_id = current_cgroup_id();
    add_for(cgroup_id, ExitKind::Iommu, IommuDetail::Unmap as u32, 1);
    add_for(
        cgroup_id,
        ExitKind::Iommu,
        IommuDetail::UnmapBytes as u32,
        unmapped,
    );
    0
}

/// Offsets of `device` (a `__data_loc` string) and `flags` in the `iommu:io_page_fault` record,
/// from the host's format file; the agent sets them at load.
#[unsafe(no_mangle)]
static IO_PAGE_FAULT_DEVICE_OFFSET: u32 = 8;
#[unsafe(no_mangle)]
static IO_PAGE_FAULT_FLAGS_OFFSET: u32 = 24;

/// `iommu:io_page_fault`, a classic tracepoint: the device name is only in the record.
#[tracepoint(category = "iommu", name = "io_page_fault")]
pub fn io_page_fault(ctx: TracePointContext) -> i32 {
    // SAFETY: volatile reads of constants the loader may have rewritten.
    let (device_offset, flags_offset) = unsafe {
        (
            core::ptr::read_volatile(&raw const IO_PAGE_FAULT_DEVICE_OFFSET),
            core::ptr::read_volatile(&raw const IO_PAGE_FAULT_FLAGS_OFFSET),
        )
    };
    // SAFETY: offsets checked against the format file; read_at fails rather than faults.
    let fields = unsafe {
        (
            ctx.read_at::<u32>(device_offset as usize),
            ctx.read_at::<i32>(flags_offset as usize),
        )
    };
    let (Ok(data_loc), Ok(flags)) = fields else {
        count_drop(Drop::IommuFaultLost);
        return 0;
    };
    let mut key = IommuFaultKey {
        device: [0; DEVICE_NAME_LEN],
        flags: flags as u32,
        reserved: 0,
    };
    // A __data_loc field: the string's offset in the record in the low 16 bits.
    let source = (ctx.as_ptr() as usize + (data_loc & 0xffff) as usize) as *const u8;
    // SAFETY: the kernel's bounded string helper reads the record.
    if unsafe { bpf_probe_read_kernel_str_bytes(source, &mut key.device) }.is_err() {
        count_drop(Drop::IommuFaultLost);
        return 0;
    }
    on_io_page_fault(key);
    0
}

/// Arguments of [`replay_io_page_fault`]: the device name as four little-endian u64 words (32 bytes,
/// NUL-padded), then the flags.
#[raw_tracepoint(tracepoint = "io_page_fault")]
pub fn replay_io_page_fault(ctx: RawTracePointContext) -> i32 {
    let mut key = IommuFaultKey {
        device: [0; DEVICE_NAME_LEN],
        flags: 0,
        reserved: 0,
    };
    let words: [u64; 4] = [ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3)];
    for (chunk, word) in key.device.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let flags: u64 = ctx.arg(4);
    key.flags = flags as u32;
    on_io_page_fault(key);
    0
}

#[inline(always)]
fn on_io_page_fault(key: IommuFaultKey) {
    increment(&IOMMU_FAULTS, key, Drop::IommuFaultLost, 1);
}
