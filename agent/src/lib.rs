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

/// The parsers of input that comes from outside the agent, by their input alone: cgroup paths,
/// tracefs format files, the configuration file and recordings. The fuzz targets (fuzz/) drive
/// them; nothing else should need this.
#[doc(hidden)]
pub mod input {
    pub use crate::cmd::agent::config::AgentConfig;
    pub use crate::probe::exit_reasons::ExitReasonNames;
    pub use crate::probe::tracefs::{EventFormat, Field};
    pub use crate::sample::recording::{RecordingError, RecordingReader};
    pub use crate::tenant::resolve::Tenant;

    /// The agent's settings from a configuration file's text alone, or the one-line error
    /// `vmtrace agent --config fuzz.toml` would print after `vmtrace: error: `.
    pub fn agent_config(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::resolve_file_text(std::path::Path::new("fuzz.toml"), text)
            .map_err(|e| format!("{e:#}"))
    }
}
