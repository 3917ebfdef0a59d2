//! Argument types shared by several commands.

use std::time::Duration;

use clap::Args;

use crate::probe::load::ProbeOptions;

/// Parses a sampling interval (`1s`, `500ms`), at least 10 ms.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if interval < Duration::from_millis(10) {
        return Err("the interval must be at least 10ms".to_owned());
    }
    Ok(interval)
}

/// Flags for the optional probes, for every command that runs the probes.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct ProbeArgs {
    /// Also measure kick service latency (a queue's first kick to its VMM's read of the doorbell
    /// eventfd), reported under `kick.q<N>`. Attaches syscalls:sys_enter_read, which runs on every
    /// read() of the host, so it is off by default.
    #[arg(long, env = "VMTRACE_KICK_LATENCY")]
    pub kick_latency: bool,
}

impl From<ProbeArgs> for ProbeOptions {
    fn from(args: ProbeArgs) -> Self {
        Self {
            kick_latency: args.kick_latency,
        }
    }
}
