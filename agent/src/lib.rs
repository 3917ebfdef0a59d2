//! vmtrace: an eBPF observability agent for KVM hosts. It counts every tenant's VM exits in the kernel,
//! attributes them to tenants (cgroups resolved to pods, VMs, units) and reports them.

pub mod accounting;
pub mod cgroup_stats;
pub mod cgroups;
pub mod cli;
pub mod config;
pub mod counts;
pub mod daemon;
pub mod doctor;
pub mod dtlb;
pub mod exit_names;
pub mod exit_reasons;
pub mod export;
pub mod guest_time;
pub mod health;
pub mod host;
pub mod k8s;
pub mod latency;
pub mod lifecycle;
pub mod metrics;
pub mod probes;
pub mod procfs;
pub mod record;
pub mod replay;
pub mod report;
pub mod sampler;
pub mod tenant;
pub mod tenants;
pub mod ticks;
pub mod timeline;
pub mod top;
pub mod tracefs;
pub mod vfio;
pub mod watch;
