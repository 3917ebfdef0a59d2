//! System call probes, attached only with `--vm-ioctls`. `syscalls:sys_enter_ioctl`, for the VM
//! setup ioctls vmtrace follows: `KVM_IOEVENTFD` (a doorbell is registered or removed) and
//! `KVM_SET_USER_MEMORY_REGION(2)` (guest memory is mapped). It runs, and the kernel builds its
//! record, on every ioctl of the host, `KVM_RUN` included, which is why it is not attached by
//! default: a VMM is known from its returns (`kvm_userspace_exit`, exits.rs), and doorbells
//! registered unseen are inferred (virtio.rs). A raw `sys_enter` probe would run on every system call of the host.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use vmtrace_common::{KVM_IOEVENTFD, KVM_SET_USER_MEMORY_REGION, KVM_SET_USER_MEMORY_REGION2};

use crate::{
    memory::on_set_memory_region,
    virtio::{on_ioeventfd, on_read},
    vmm_process::note_vmm,
};

/// Offsets of `fd`, `cmd` and `arg` in the `syscalls:sys_enter_ioctl` record, from the host's format
/// file; the agent sets them at load after checking the fields' widths.
#[unsafe(no_mangle)]
static IOCTL_FD_OFFSET: u32 = 16;
#[unsafe(no_mangle)]
static IOCTL_CMD_OFFSET: u32 = 24;
#[unsafe(no_mangle)]
static IOCTL_ARG_OFFSET: u32 = 32;

#[tracepoint(category = "syscalls", name = "sys_enter_ioctl")]
pub fn sys_enter_ioctl(ctx: TracePointContext) -> i32 {
    // SAFETY: volatile reads of constants the loader may have rewritten.
    let (fd_offset, cmd_offset, arg_offset) = unsafe {
        (
            core::ptr::read_volatile(&raw const IOCTL_FD_OFFSET),
            core::ptr::read_volatile(&raw const IOCTL_CMD_OFFSET),
            core::ptr::read_volatile(&raw const IOCTL_ARG_OFFSET),
        )
    };
    // SAFETY: offsets checked against the format file; read_at fails rather than faults.
    let Ok(cmd) = (unsafe { ctx.read_at::<u64>(cmd_offset as usize) }) else {
        return 0;
    };
    match cmd as u32 {
        KVM_SET_USER_MEMORY_REGION | KVM_SET_USER_MEMORY_REGION2 => {
            note_vmm();
            // SAFETY: as above.
            if let Ok(arg) = unsafe { ctx.read_at::<u64>(arg_offset as usize) } {
                on_set_memory_region(arg);
            }
        }
        KVM_IOEVENTFD => {
            note_vmm();
            // SAFETY: as above.
            let fields = unsafe {
                (
                    ctx.read_at::<u64>(fd_offset as usize),
                    ctx.read_at::<u64>(arg_offset as usize),
                )
            };
            if let (Ok(fd), Ok(arg)) = fields {
                on_ioeventfd(fd as u32, arg);
            }
        }
        _ => {}
    }
    0
}

/// Offset of `fd` in the `syscalls:sys_enter_read` record; set by the agent from the format file.
#[unsafe(no_mangle)]
static READ_FD_OFFSET: u32 = 16;

/// `syscalls:sys_enter_read`, attached only when kick service latency is wanted: a VMM reading a
/// doorbell's eventfd has picked up the kicks signalled on it.
#[tracepoint(category = "syscalls", name = "sys_enter_read")]
pub fn sys_enter_read(ctx: TracePointContext) -> i32 {
    // SAFETY: a volatile read of a constant the loader may have rewritten.
    let offset = unsafe { core::ptr::read_volatile(&raw const READ_FD_OFFSET) };
    // SAFETY: offset checked against the format file; read_at fails rather than faults.
    if let Ok(fd) = unsafe { ctx.read_at::<u64>(offset as usize) } {
        on_read(fd as u32);
    }
    0
}
