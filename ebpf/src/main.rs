//! vmtrace's kernel-side probes. Each probe family lives in its own module; the entry points are thin
//! adapters that decode their tracepoint's arguments and hand them to shared counting code.
//!
//! The agent finds maps by their statics' identifiers (aya-ebpf names them so), as
//! `vmtrace_common::names::maps` lists them, and programs and globals as its probe table
//! (agent/src/probe/spec.rs) names them: renaming one means renaming it there too, which the agent's
//! test of the built object (agent/src/probe/object_check.rs) checks.
//! Only the BPF target gets the probes' object; on the host the crate builds as an ordinary program
//! whose `main` does nothing, so that `cargo check` and `cargo clippy --workspace` cover it too.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

mod cgroup;
mod exits;
mod ioctl;
mod iommu;
mod kvm_exit;
mod maps;
mod memory;
mod process_exit;
mod thread_slot;
mod tlb;
mod virtio;
mod vmm_process;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this, so it is never executed.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
