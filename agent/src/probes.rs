//! Loading the embedded eBPF object and attaching its probes on this host.

use aya::{
    Ebpf, EbpfLoader,
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun, TracePoint},
};
use serde::Serialize;
use thiserror::Error;

use crate::{exit_reasons::ExitReasonNames, host::KvmDetection, tracefs};

/// The eBPF object built by build.rs from the `ebpf/` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmtrace.bpf.o"));

/// Raw tracepoints: those that see exits where `kvm:kvm_exit` is silent (and complement it where it
/// is not), and `kvm_entry`, which ends an exit's latency where kvm_exit fires.
const RAW_PROBES: [&str; 5] = [
    "kvm_userspace_exit",
    "kvm_pio",
    "kvm_mmio",
    "kvm_cpuid",
    "kvm_entry",
];

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
    #[error("replaying kvm_exit records")]
    Replay(#[source] aya::programs::ProgramError),
    #[error("the replay program rejected record {0:?}")]
    ReplayRejected([u64; 6]),
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
    /// Names of kvm_exit reasons, from this host's format file where it has them.
    pub reason_names: ExitReasonNames,
}

impl Probes {
    /// Loads the programs and attaches every probe this host supports.
    pub fn attach(kvm: &KvmDetection) -> Result<Self, ProbeError> {
        let tracefs = tracefs::find_or_mount();
        let kvm_exit_format = match &tracefs {
            Ok(dir) => {
                tracefs::EventFormat::read(dir, "kvm", "kvm_exit").map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        let kvm_exit_offsets = kvm_exit_format
            .as_ref()
            .map_err(Clone::clone)
            .and_then(kvm_exit_offsets);
        let reason_names = match &kvm_exit_format {
            Ok(format) => ExitReasonNames::from_print_fmt(&format.print_fmt),
            Err(_) => ExitReasonNames::builtin(),
        };
        let mut loader = EbpfLoader::new();
        if let Ok((reason, isa)) = &kvm_exit_offsets {
            loader.override_global("KVM_EXIT_REASON_OFFSET", reason, true);
            loader.override_global("KVM_EXIT_ISA_OFFSET", isa, true);
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
        let kvm_exit_result = kvm_exit_offsets.and_then(|_| {
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
            reason_names,
        })
    }

    /// Runs the in-kernel kvm_exit logic on synthetic records through `BPF_PROG_TEST_RUN`, exactly as
    /// the kvm_exit and kvm_entry probes would on a VMX or SVM host. Each record is
    /// `[op, cgroup_id, tid, time_ns, isa, reason]`, `op` 0 for an exit and 1 for an entry.
    pub fn replay_kvm_exit(&mut self, records: &[[u64; 6]]) -> Result<(), ProbeError> {
        let program: &mut RawTracePoint = program(&mut self.ebpf, "replay_kvm_exit")?;
        if program.fd().is_err() {
            program.load().map_err(ProbeError::Replay)?;
        }
        for record in records {
            let mut args = [0u64; 12];
            args[..6].copy_from_slice(record);
            let result = program
                .test_run(RawTracePointRunOptions { args, cpu: None })
                .map_err(ProbeError::Replay)?;
            if result.return_value != 0 {
                return Err(ProbeError::ReplayRejected(*record));
            }
        }
        Ok(())
    }
}

/// The offsets of `exit_reason` and `isa` in this host's `kvm:kvm_exit` record, checked against its
/// format file: a kernel whose record differs gets a clear error, not wrong numbers.
fn kvm_exit_offsets(format: &tracefs::EventFormat) -> Result<(u32, u32), String> {
    let reason = format
        .offset_of("exit_reason", 4)
        .map_err(|e| e.to_string())?;
    let isa = format.offset_of("isa", 4).map_err(|e| e.to_string())?;
    Ok((reason, isa))
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const LINUX_6_18: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/kvm_exit-format-linux-6.18-x86.txt"
    ));

    #[test]
    fn kvm_exit_offsets_come_from_the_format_file_and_are_checked() {
        let format = tracefs::EventFormat::parse(PathBuf::from("kvm_exit/format"), LINUX_6_18);
        assert_eq!(kvm_exit_offsets(&format), Ok((8, 24)));
        // A kernel whose record has a wider isa field is refused, not misread.
        let changed = LINUX_6_18.replace(
            "u32 isa;\toffset:24;\tsize:4;",
            "u64 isa;\toffset:24;\tsize:8;",
        );
        let format = tracefs::EventFormat::parse(PathBuf::from("kvm_exit/format"), &changed);
        let err = kvm_exit_offsets(&format).unwrap_err();
        assert!(err.contains("`isa` is 8 bytes wide, expected 4"), "{err}");
        let missing = LINUX_6_18.replace("exit_reason;", "reason;");
        let format = tracefs::EventFormat::parse(PathBuf::from("kvm_exit/format"), &missing);
        assert!(
            kvm_exit_offsets(&format)
                .unwrap_err()
                .contains("`exit_reason` not found")
        );
    }
}
