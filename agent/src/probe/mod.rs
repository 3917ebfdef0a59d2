//! The kernel side as the agent sees it: the embedded eBPF object loaded and its probes attached
//! (`load`), the counters read back (`counters`), cgroup lifecycle events (`lifecycle`), tracefs and
//! the kernel's names for exit reasons (`tracefs`, `exit_reasons`).

pub mod counters;
pub mod exit_reasons;
pub mod lifecycle;
pub mod load;
#[cfg(test)]
mod object_check;
pub mod tracefs;
