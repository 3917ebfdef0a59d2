//! A thread's or process's end: what the probes kept of it goes, so that a reused id starts afresh.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::{
    exits::forget_thread, memory::forget_process, thread_slot::Thread, vmm_process::forget_vmm,
};

/// `sched_process_exit(struct task_struct *p, ...)`: every thread's exit ends its pending VMM
/// service; when a process's main thread exits, the process is no longer a VMM, and its memory
/// ranges mean nothing any more.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    let Some(thread) = Thread::current() else {
        return 0;
    };
    forget_thread(&thread);
    if thread.tid == thread.tgid {
        forget_vmm(thread.tgid);
        forget_process(thread.tgid);
    }
    0
}
