//! cgroup v2 lifecycle: `cgroup:cgroup_mkdir`, `cgroup_rmdir` and `cgroup_attach_task`, streamed to
//! the agent through a ring buffer (rare events, unlike the aggregated hot ones). With them a tenant
//! that lives for 200 ms is named before it vanishes, and a removed tenant's series end.

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::{map, tracepoint},
    maps::RingBuf,
    programs::TracePointContext,
};
use vmtrace_common::{CGROUP_PATH_LEN, CgroupEvent, CgroupEventKind, Drop};

use crate::maps::count_drop;

/// Lifecycle events; 256 KiB holds about 900 of them between two agent ticks.
#[map]
static CGROUP_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Offsets in the records, from the host's format files; the agent sets them at load. The attach
/// record has the same `root`, `id` layout under `dst_` names, and its path elsewhere.
#[unsafe(no_mangle)]
static CGROUP_ROOT_OFFSET: u32 = 8;
#[unsafe(no_mangle)]
static CGROUP_ID_OFFSET: u32 = 16;
#[unsafe(no_mangle)]
static CGROUP_PATH_OFFSET: u32 = 24;
#[unsafe(no_mangle)]
static CGROUP_ATTACH_PATH_OFFSET: u32 = 28;

#[tracepoint(category = "cgroup", name = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: TracePointContext) -> i32 {
    // SAFETY: a volatile read of a constant the loader may have rewritten.
    let path = unsafe { core::ptr::read_volatile(&raw const CGROUP_PATH_OFFSET) };
    emit(&ctx, CgroupEventKind::Mkdir, path);
    0
}

#[tracepoint(category = "cgroup", name = "cgroup_rmdir")]
pub fn cgroup_rmdir(ctx: TracePointContext) -> i32 {
    // SAFETY: as above.
    let path = unsafe { core::ptr::read_volatile(&raw const CGROUP_PATH_OFFSET) };
    emit(&ctx, CgroupEventKind::Rmdir, path);
    0
}

#[tracepoint(category = "cgroup", name = "cgroup_attach_task")]
pub fn cgroup_attach_task(ctx: TracePointContext) -> i32 {
    // SAFETY: as above.
    let path = unsafe { core::ptr::read_volatile(&raw const CGROUP_ATTACH_PATH_OFFSET) };
    emit(&ctx, CgroupEventKind::Attach, path);
    0
}

/// Sends the event of a cgroup of the v2 hierarchy (hierarchy id 0); v1 hierarchies are not tenants.
#[inline(always)]
fn emit(ctx: &TracePointContext, kind: CgroupEventKind, path_field: u32) {
    // SAFETY: volatile reads of constants the loader may have rewritten.
    let (root_offset, id_offset) = unsafe {
        (
            core::ptr::read_volatile(&raw const CGROUP_ROOT_OFFSET),
            core::ptr::read_volatile(&raw const CGROUP_ID_OFFSET),
        )
    };
    // SAFETY: offsets checked against the format files; read_at fails rather than faults.
    let fields = unsafe {
        (
            ctx.read_at::<i32>(root_offset as usize),
            ctx.read_at::<u64>(id_offset as usize),
            ctx.read_at::<u32>(path_field as usize),
        )
    };
    let (Ok(0), Ok(id), Ok(data_loc)) = fields else {
        return;
    };
    let Some(mut entry) = CGROUP_EVENTS.reserve::<CgroupEvent>(0) else {
        count_drop(Drop::CgroupEventsFull);
        return;
    };
    let event = entry.as_mut_ptr();
    // A __data_loc field: the string's offset in the record in the low 16 bits.
    let source = (ctx.as_ptr() as usize + (data_loc & 0xffff) as usize) as *const u8;
    // SAFETY: `event` points to the reserved entry, which this program owns until it submits; the
    // string is read with the kernel's bounded string helper.
    let path_len = unsafe {
        (*event).id = id;
        (*event).kind = kind as u32;
        let path: &mut [u8; CGROUP_PATH_LEN] = &mut (*event).path;
        bpf_probe_read_kernel_str_bytes(source, path).map_or(0, |s| s.len() as u32)
    };
    // SAFETY: as above.
    unsafe { (*event).path_len = path_len };
    entry.submit(0);
}
