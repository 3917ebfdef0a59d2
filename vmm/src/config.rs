//! Command line and VM configuration. [`Cli`] is what the user typed; [`VmmConfig`] is the
//! validated description of the VM that [`crate::Vmm::try_from`] turns into live KVM objects.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::layout::MAX_VCPUS_BY_LAYOUT;

/// What the guest does once per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// `out 0x10, al`: one KVM_EXIT_IO to the VMM per operation.
    Pio,
    /// Byte write to the unbacked GPA 0xE0000: one KVM_EXIT_MMIO to the VMM per operation.
    Mmio,
    /// Byte write to GPA 0xE1000, an ioeventfd doorbell (KVM_IOEVENTFD, MMIO, len 1, no
    /// datamatch): completed in the kernel, no exit to the VMM; the eventfd counts the writes.
    Doorbell,
    /// `cpuid` with EAX=0: handled in the kernel, no exit to the VMM.
    Cpuid,
    /// `hlt`: one KVM_EXIT_HLT to the VMM per operation (there is no in-kernel irqchip).
    Hlt,
}

impl Scenario {
    /// Every scenario, in a fixed order.
    pub const ALL: [Scenario; 5] = [
        Scenario::Pio,
        Scenario::Mmio,
        Scenario::Doorbell,
        Scenario::Cpuid,
        Scenario::Hlt,
    ];

    /// The lowercase name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Pio => "pio",
            Scenario::Mmio => "mmio",
            Scenario::Doorbell => "doorbell",
            Scenario::Cpuid => "cpuid",
            Scenario::Hlt => "hlt",
        }
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const AFTER_HELP: &str = "\
Each vCPU runs the same real-mode loop at 0x1000: one operation, then `inc dword [edi]` (the
guest's own counter at 0x8000 + 4*vCPU), `dec esi`, loop; at the end it writes port 0x11 (DONE)
and the VMM stops that vCPU. With --rate the guest also writes port 0x12 (PACE) after every
operation and the VMM sleeps there to hold the rate.

REPORT (JSON, one line unless --pretty; written only if all ground truth agrees):
  scenario           the scenario name
  pid                the VMM's process id
  count, rate        the requested operations per vCPU and rate (ops/s per vCPU, or null)
  cgroup             {path, relative_path, id}: the cgroup v2 directory the VMM ran in, its path
                     inside the hierarchy and its id (the directory's inode number, what
                     bpf_get_current_cgroup_id() returns); null if no cgroup v2 is mounted
  vm_fd              the KVM VM file descriptor number in the VMM process
  ioeventfds         [{space, addr, len, datamatch}] registered with KVM_IOEVENTFD
  vcpus[]            {index, tid, guest_ops, vmm_observed_ops, exits}: tid is the vCPU thread's
                     id (it issues KVM_RUN), guest_ops the guest's own counter read back from
                     guest memory, vmm_observed_ops the operations the VMM saw as exits (null
                     where they are not visible to it: doorbell, cpuid), exits the count of
                     every KVM_RUN return by reason (io, mmio, hlt, intr, shutdown, ...),
                     including the DONE and PACE port writes
  total              {guest_ops, exits} summed over the vCPUs
  doorbell_signals   the doorbell eventfd's counter at the end (doorbell scenario), else null
  duration_secs      wall time from the first vCPU start to the last vCPU stop

The VMM fails (exit status 1, no report) if a guest counter differs from the requested count or
from what the VMM observed, or on an unexpected exit; usage errors exit with status 2.";

/// Reference VMM for vmtrace: runs a tiny real-mode KVM guest that performs a known number of
/// operations, then prints a JSON report of the ground truth (guest operations, exits by reason,
/// vCPU thread ids, cgroup id) for checking what a tracer saw.
#[derive(Debug, Clone, Parser)]
#[command(name = "vmtrace-vmm", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// What the guest does once per operation
    #[arg(long, value_enum)]
    pub scenario: Scenario,

    /// Number of vCPUs, each run by its own host thread
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u32,

    /// Operations per vCPU (1 to 4294967295); here each guest instruction costs about 1 µs
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub count: u64,

    /// Hold each vCPU to at most this many operations per second (adds one PACE port exit per
    /// operation, counted in the report like any other exit)
    #[arg(long, value_name = "OPS", allow_negative_numbers = true)]
    pub rate: Option<f64>,

    /// Run in this cgroup v2 cgroup, created if absent: an absolute directory inside the cgroup2
    /// mount, or a path relative to the cgroup2 mount point found in /proc/self/mountinfo. The
    /// VMM moves its whole process there before it creates the VM.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Write the JSON report to FILE instead of stdout
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// Indent the JSON report
    #[arg(long)]
    pub pretty: bool,

    /// Do not print the one-line summary on stderr
    #[arg(long, short)]
    pub quiet: bool,
}

/// Validated description of one VM run. Build it with [`VmmConfig::new`] and struct update
/// syntax, or from the command line with `VmmConfig::try_from(&cli)`.
#[derive(Debug, Clone, PartialEq)]
pub struct VmmConfig {
    /// What the guest does per operation.
    pub scenario: Scenario,
    /// Number of vCPUs (threads).
    pub vcpus: u32,
    /// Operations per vCPU.
    pub count: u64,
    /// Optional rate limit, operations per second per vCPU.
    pub rate: Option<f64>,
    /// Optional cgroup v2 path to move the process into (see [`Cli::cgroup`]).
    pub cgroup: Option<PathBuf>,
}

impl VmmConfig {
    /// The defaults of the command line: 1 vCPU, 10000 operations, no rate, no cgroup.
    pub fn new(scenario: Scenario) -> Self {
        VmmConfig {
            scenario,
            vcpus: 1,
            count: 10_000,
            rate: None,
            cgroup: None,
        }
    }

    /// Checks what can be checked without KVM.
    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 {
            return Err(Error::Config("--vcpus must be at least 1".into()));
        }
        if self.vcpus > MAX_VCPUS_BY_LAYOUT {
            return Err(Error::Config(format!(
                "--vcpus {} is too many: the guest layout has room for {MAX_VCPUS_BY_LAYOUT}",
                self.vcpus
            )));
        }
        if self.count == 0 {
            return Err(Error::Config("--count must be at least 1".into()));
        }
        if self.count > u64::from(u32::MAX) {
            return Err(Error::Config(format!(
                "--count {} is too large: the guest counts in 32 bits, use at most {}",
                self.count,
                u32::MAX
            )));
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(Error::Config(format!(
                "--rate {rate} is not a positive number of operations per second"
            )));
        }
        if let Some(path) = &self.cgroup
            && path.as_os_str().is_empty()
        {
            return Err(Error::Config("--cgroup must not be empty".into()));
        }
        Ok(())
    }
}

impl TryFrom<&Cli> for VmmConfig {
    type Error = Error;

    fn try_from(cli: &Cli) -> Result<Self, Error> {
        let config = VmmConfig {
            scenario: cli.scenario,
            vcpus: cli.vcpus,
            count: cli.count,
            rate: cli.rate,
            cgroup: cli.cgroup.clone(),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmmConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("vmtrace-vmm").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        VmmConfig::try_from(&cli).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(&["--scenario", "pio"]).unwrap();
        assert_eq!(c, VmmConfig::new(Scenario::Pio));
    }

    #[test]
    fn rejects_impossible_requests() {
        assert!(parse(&["--scenario", "pio", "--count", "0"]).is_err());
        assert!(parse(&["--scenario", "pio", "--count", "4294967296"]).is_err());
        assert!(parse(&["--scenario", "pio", "--vcpus", "0"]).is_err());
        assert!(parse(&["--scenario", "pio", "--rate", "0"]).is_err());
        assert!(parse(&["--scenario", "pio", "--rate", "NaN"]).is_err());
        assert!(parse(&["--scenario", "nope"]).is_err());
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
