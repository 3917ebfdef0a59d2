//! The vmtrace reference VMM: a minimal KVM virtual machine monitor whose guest performs a known
//! number of operations of one kind (port I/O, MMIO, ioeventfd doorbell writes, CPUID, HLT,
//! virtio-blk requests on a virtio-mmio device served by a worker thread, first touches of fresh
//! guest memory, memory returned to the host and touched again), so that everything a tracer
//! observes about it can be checked against ground truth.
//!
//! The guest is a few real-mode (16-bit) instructions assembled in-process ([`guest`]), loaded
//! at [`layout::CODE_GPA`] in 64 KiB of guest memory (832 KiB for virtio, see [`virtio`]; plus
//! the touch region in a second memory slot for touch and balloon, see [`region`]), and run on
//! one host thread per vCPU ([`vcpu`]). At the end the VMM reads the guest's own operation
//! counters back from guest memory, cross-checks them against what it saw itself and returns a
//! [`report::Report`].
//!
//! ```no_run
//! use vmtrace_vmm::{Scenario, Vmm, VmmConfig};
//!
//! let config = VmmConfig { vcpus: 2, count: 200, ..VmmConfig::new(Scenario::Pio) };
//! let report = Vmm::try_from(config)?.run()?;
//! assert_eq!(report.total.guest_ops, 400);
//! # Ok::<(), vmtrace_vmm::Error>(())
//! ```

pub mod caps;
pub mod cgroup;
pub mod config;
pub mod error;
pub mod exits;
pub mod guest;
mod ioeventfd;
mod kick;
pub mod layout;
pub mod memory;
mod pace;
pub mod protect;
pub mod region;
pub mod report;
pub mod usage;
pub mod vcpu;
pub mod vfio;
pub mod virtio;
pub mod vmm;

pub use config::{Cli, Scenario, VmmConfig};
pub use error::Error;
pub use report::Report;
pub use vmm::Vmm;

/// Runs one scenario to completion: `Vmm::try_from(config)?.run()`.
///
/// With `config.cgroup` set this moves the whole calling process into that cgroup.
pub fn run(config: VmmConfig) -> Result<Report, Error> {
    Vmm::try_from(config)?.run()
}
