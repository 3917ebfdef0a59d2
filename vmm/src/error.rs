//! The library's error type.

use std::path::PathBuf;

/// Everything that can go wrong while setting up or running a VM.
///
/// Messages are short and say what to do; causes are chained through `source()` (print with
/// `{:#}` in anyhow to get the whole chain on one line).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration asks for something impossible.
    #[error("{0}")]
    Config(String),
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm (load the kvm module and run as root or as a member of the kvm group)"
    )]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the stable one (12).
    #[error("KVM API version is {0}, this VMM needs 12")]
    KvmApiVersion(i32),
    /// A KVM capability the VMM relies on is missing.
    #[error("KVM lacks the capability {0}, which this VMM needs")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest program could not be assembled.
    #[error("assembling the {0} guest program failed")]
    Assemble(&'static str, #[source] iced_x86::IcedError),
    /// An eventfd operation failed.
    #[error("eventfd {0} failed")]
    EventFd(&'static str, #[source] std::io::Error),
    /// A cgroup could not be found, created or joined.
    #[error("cgroup {}: {msg}", path.display())]
    Cgroup {
        /// The cgroup directory (or the file that was read).
        path: PathBuf,
        /// What went wrong and what to do.
        msg: String,
    },
    /// The guest did something the scenario does not allow (unexpected exit, port, address).
    #[error("vCPU {index}: {msg} at RIP {rip:#x}")]
    Guest {
        /// vCPU index.
        index: u32,
        /// Guest instruction pointer after the exit (as KVM reports it).
        rip: u64,
        /// What happened.
        msg: String,
    },
    /// The guest's counters disagree with the VMM's own observation or the requested count:
    /// a bug in the guest program, the VMM or KVM.
    #[error("ground truth mismatch: {0}")]
    Mismatch(String),
    /// The virtio device (its transport, queues or worker thread) failed.
    #[error("virtio-blk device: {0}")]
    Device(String),
    /// The passed-through device (`--vfio`) could not be opened, mapped or driven.
    #[error("VFIO: {0}")]
    Vfio(String),
    /// This process's own accounting could not be read.
    #[error("reading this process's own accounting: {0}")]
    Usage(String),
    /// A vCPU thread could not be started or died.
    #[error("vCPU thread {0}")]
    Thread(String),
    /// The vCPU was stopped because another vCPU failed.
    #[error("vCPU {0} stopped because another vCPU failed")]
    Aborted(u32),
}
