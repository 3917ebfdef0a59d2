//! vmtrace's kernel-side probes. Each probe family lives in its own module; the entry points are thin
//! adapters that decode their tracepoint's arguments and hand them to shared counting code.
//!
//! The agent finds maps, programs and globals by their identifiers here (aya-ebpf names them after
//! their statics and functions), as `vmtrace_common::names` lists them: renaming one means renaming
//! it there too, which the agent's test of the built object (agent/src/probe/object_check.rs) checks.
#![no_std]
#![no_main]

mod cgroup;
mod exits;
mod ioctl;
mod iommu;
mod kvm_exit;
mod maps;
mod memory;
mod tlb;
mod virtio;
mod vmm_process;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this, so it is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
