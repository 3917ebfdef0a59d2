//! vmtrace: an eBPF observability agent for KVM hosts. It counts every tenant's VM exits in the kernel,
//! attributes them to tenants (cgroups resolved to pods, VMs, units) and reports them.
//!
//! The data flows through the modules in this order (ARCHITECTURE.md draws it):
//! `probe` (kernel counters) -> `tenant` (cgroups to tenants) -> `sample` (one sample per tick, with
//! `host` figures added) -> `export`, and the views in `cmd`. `kind` names what is counted.

pub mod cmd;
pub mod export;
pub mod host;
pub mod kind;
pub mod probe;
pub mod sample;
pub mod tenant;
