//! The kernel side as the agent sees it: every probe declared once (`spec`), the embedded eBPF object
//! loaded and those probes attached (`load`), their arguments checked against the kernel's BTF
//! (`btf_args`), the counters read back (`counters`, in batches: `batch`, failing as `map_access` says) with their keys turned into kinds
//! (`kinds`) and exit entries into named counts (`exit_counts`) and
//! their histograms summarised (`latency`), exits per VMM thread (`threads`), how full the maps are
//! (`map_fill`), cgroup lifecycle
//! events (`lifecycle`), tracefs and the kernel's names for exit reasons (`tracefs`,
//! `exit_reasons`), and the learnt doorbells kept across restarts (`doorbell_state`).

pub(crate) mod batch;
pub(crate) mod btf_args;
pub mod counters;
pub(crate) mod doorbell_state;
pub mod exit_counts;
pub(crate) mod exit_reasons;
pub(crate) mod kinds;
pub mod latency;
pub(crate) mod lifecycle;
pub mod load;
pub mod map_access;
pub mod map_fill;
#[cfg(test)]
mod object_check;
pub(crate) mod spec;
pub mod threads;
pub(crate) mod tracefs;
