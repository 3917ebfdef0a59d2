//! A thread's or process's end: what the probes kept of it goes, so that a reused id starts afresh.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext,
};

use crate::{exits::forget_thread, memory::forget_process, vmm_process::forget_vmm};

/// `sched_process_exit(struct task_struct *p, ...)`: every thread's exit ends its pending VMM
/// service; when a process's main thread exits, the process is no longer a VMM, and its memory
/// ranges mean nothing any more.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    forget_thread(pid_tgid as u32);
    if pid_tgid as u32 == tgid {
        forget_vmm(tgid);
        forget_process(tgid);
    }
    0
}
