//! Loading the embedded eBPF object and attaching its probes on this host.

use aya::{
    Ebpf, EbpfLoader,
    programs::{RawTracePoint, TracePoint},
};
use serde::Serialize;
use thiserror::Error;

use crate::{host::KvmDetection, tracefs};

/// The eBPF object built by build.rs from the `ebpf/` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmtrace.bpf.o"));

/// Raw tracepoints that see exits where `kvm:kvm_exit` is silent (and complement it where it is not).
const RAW_PROBES: [&str; 4] = ["kvm_userspace_exit", "kvm_pio", "kvm_mmio", "kvm_cpuid"];

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "loading the eBPF programs failed (vmtrace needs root, or CAP_BPF and CAP_PERFMON; `vmtrace doctor` checks the host)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("no exit probe could be attached: {0}")]
    NothingAttached(String),
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
}

/// Where the agent's exit counts come from on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitSource {
    /// `kvm:kvm_exit`, every exit with its hardware reason (VMX, SVM).
    KvmExit,
    /// Derived from kvm_userspace_exit, kvm_pio, kvm_mmio and kvm_cpuid (hosts where kvm_exit is silent).
    Derived,
}

impl ExitSource {
    pub fn short_name(self) -> &'static str {
        match self {
            Self::KvmExit => "kvm_exit",
            Self::Derived => "derived",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::KvmExit => "kvm:kvm_exit (every exit, with its hardware reason)",
            Self::Derived => {
                "derived: kvm_userspace_exit (exits to the VMM), kvm_pio, kvm_mmio, kvm_cpuid (in-kernel exits)"
            }
        }
    }
}

/// How one probe fared on this host.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    /// The tracepoint, as `category:event`.
    pub tracepoint: String,
    /// `raw_tracepoint` or `tracepoint`.
    pub attach_type: &'static str,
    /// `None` when attached, else why not.
    pub error: Option<String>,
}

/// The loaded, attached probes. Dropping this detaches them.
pub struct Probes {
    pub ebpf: Ebpf,
    pub status: Vec<ProbeStatus>,
    pub exit_source: ExitSource,
}

impl Probes {
    /// Loads the programs and attaches every probe this host supports.
    pub fn attach(kvm: &KvmDetection) -> Result<Self, ProbeError> {
        let tracefs = tracefs::find_or_mount();
        let kvm_exit_offset = match &tracefs {
            Ok(dir) => kvm_exit_reason_offset(dir),
            Err(e) => Err(e.to_string()),
        };
        let mut loader = EbpfLoader::new();
        if let Ok(offset) = &kvm_exit_offset {
            loader.override_global("KVM_EXIT_REASON_OFFSET", offset, true);
        }
        let mut ebpf = loader.load(OBJECT)?;
        let mut status = Vec::new();
        for name in RAW_PROBES {
            let program: &mut RawTracePoint = program(&mut ebpf, name)?;
            let result = program.load().and_then(|()| program.attach(name).map(drop));
            status.push(ProbeStatus {
                tracepoint: format!("kvm:{name}"),
                attach_type: "raw_tracepoint",
                error: result.err().map(|e| error_chain(&e)),
            });
        }
        let kvm_exit_result = kvm_exit_offset.and_then(|_| {
            let program: &mut TracePoint =
                program(&mut ebpf, "kvm_exit").map_err(|e| e.to_string())?;
            program
                .load()
                .and_then(|()| program.attach("kvm", "kvm_exit").map(drop))
                .map_err(|e| error_chain(&e))
        });
        let kvm_exit_attached = kvm_exit_result.is_ok();
        status.push(ProbeStatus {
            tracepoint: "kvm:kvm_exit".to_owned(),
            attach_type: "tracepoint",
            error: kvm_exit_result.err(),
        });
        if status.iter().all(|s| s.error.is_some()) {
            let reasons: Vec<String> = status
                .iter()
                .map(|s| format!("{}: {}", s.tracepoint, s.error.as_deref().unwrap_or("")))
                .collect();
            return Err(ProbeError::NothingAttached(reasons.join("; ")));
        }
        let exit_source = if kvm.flavour.emits_kvm_exit() && kvm_exit_attached {
            ExitSource::KvmExit
        } else {
            ExitSource::Derived
        };
        Ok(Self {
            ebpf,
            status,
            exit_source,
        })
    }
}

/// The offset of `exit_reason` in this host's `kvm:kvm_exit` record, checked against its format file.
fn kvm_exit_reason_offset(tracefs: &std::path::Path) -> Result<u32, String> {
    let format =
        tracefs::EventFormat::read(tracefs, "kvm", "kvm_exit").map_err(|e| e.to_string())?;
    format
        .offset_of("exit_reason", 4)
        .map_err(|e| e.to_string())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(ProbeError::MissingProgram(name))
}

/// An error with its causes, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
