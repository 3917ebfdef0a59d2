//! Loading the embedded eBPF object and attaching its probes on this host.

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun, TracePoint},
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{host::KvmDetection, probe::exit_reasons::ExitReasonNames, probe::tracefs};

/// The eBPF object built by build.rs from the `ebpf/` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmtrace.bpf.o"));

/// Raw tracepoints as (program, tracepoint, category): those that see exits where `kvm:kvm_exit` is
/// silent (and complement it where it is not), `kvm_entry`, which ends an exit's latency where
/// kvm_exit fires, then TLB, memory, IOMMU and VMM process lifetime. The category is only for people:
/// raw tracepoints are found by event name.
const RAW_PROBES: [(&str, &str, &str); 20] = [
    ("kvm_userspace_exit", "kvm_userspace_exit", "kvm"),
    ("kvm_pio", "kvm_pio", "kvm"),
    ("kvm_mmio", "kvm_mmio", "kvm"),
    ("kvm_cpuid", "kvm_cpuid", "kvm"),
    ("kvm_entry", "kvm_entry", "kvm"),
    ("sched_process_exit", "sched_process_exit", "sched"),
    ("tlb_flush", "tlb_flush", "tlb"),
    ("kvm_pv_tlb_flush", "kvm_pv_tlb_flush", "kvm"),
    ("kvm_hv_flush_tlb", "kvm_hv_flush_tlb", "kvm"),
    ("kvm_hv_flush_tlb_ex", "kvm_hv_flush_tlb_ex", "kvm"),
    ("page_fault_user", "page_fault_user", "exceptions"),
    ("page_fault_kernel", "page_fault_kernel", "exceptions"),
    ("kvm_page_fault", "kvm_page_fault", "kvm"),
    ("kvm_mmu_get_page", "kvm_mmu_get_page", "kvmmmu"),
    (
        "kvm_mmu_prepare_zap_page",
        "kvm_mmu_prepare_zap_page",
        "kvmmmu",
    ),
    ("kvm_unmap_hva_range", "kvm_unmap_hva_range", "kvm"),
    ("kvm_age_hva", "kvm_age_hva", "kvm"),
    ("kvm_test_age_hva", "kvm_test_age_hva", "kvm"),
    ("iommu_map", "map", "iommu"),
    ("iommu_unmap", "unmap", "iommu"),
];

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "loading the eBPF programs failed (vmtrace needs root, or CAP_BPF and CAP_PERFMON; `vmtrace doctor` checks the host)"
    )]
    Load(#[from] aya::EbpfError),
    #[error(
        "this vmtrace was built with VMTRACE_EBPF_STUB=1 and has no eBPF programs: rebuild it without (docs/building.md)"
    )]
    BuiltWithStub,
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("no exit probe could be attached: {0}")]
    NothingAttached(String),
    #[error("replaying kvm_exit records")]
    Replay(#[source] aya::programs::ProgramError),
    #[error("the replay program rejected record {0:?}")]
    ReplayRejected([u64; 6]),
    #[error("device name `{0}` is longer than {max} bytes", max = vmtrace_common::DEVICE_NAME_LEN - 1)]
    DeviceNameTooLong(String),
}

/// Where the agent's exit counts come from on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// Optional probes, off by default for what they cost the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProbeOptions {
    /// Kick service latency: attaches `syscalls:sys_enter_read`, which runs on every read() of the
    /// host, to see VMMs read their doorbell eventfds.
    pub kick_latency: bool,
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
    pub fn attach(kvm: &KvmDetection, options: &ProbeOptions) -> Result<Self, ProbeError> {
        let tracefs = tracefs::find_or_mount().map_err(|e| e.to_string());
        let kvm_exit_format = read_format(&tracefs, "kvm", "kvm_exit");
        let reason_names = match &kvm_exit_format {
            Ok(format) => ExitReasonNames::from_print_fmt(&format.print_fmt),
            Err(_) => ExitReasonNames::builtin(),
        };
        let kvm_exit_offsets = kvm_exit_format.and_then(|f| offsets(&f, KVM_EXIT_FIELDS));
        let ioctl_offsets = read_format(&tracefs, "syscalls", "sys_enter_ioctl")
            .and_then(|f| offsets(&f, IOCTL_FIELDS));
        let read_offsets = if options.kick_latency {
            read_format(&tracefs, "syscalls", "sys_enter_read")
                .and_then(|f| offsets(&f, READ_FIELDS))
        } else {
            Err("off (enable with --kick-latency)".to_owned())
        };
        let cgroup_offsets = cgroup_offsets(&tracefs);
        let madvise_offsets = read_format(&tracefs, "syscalls", "sys_enter_madvise")
            .and_then(|f| offsets(&f, MADVISE_FIELDS));
        let io_page_fault_offsets = read_format(&tracefs, "iommu", "io_page_fault")
            .and_then(|f| offsets(&f, IO_PAGE_FAULT_FIELDS));
        let kick_latency = u32::from(read_offsets.is_ok());
        let mut loader = EbpfLoader::new();
        loader.override_global("KICK_LATENCY", &kick_latency, true);
        let all_offsets = [
            &kvm_exit_offsets,
            &ioctl_offsets,
            &read_offsets,
            &cgroup_offsets,
            &madvise_offsets,
            &io_page_fault_offsets,
        ];
        for (global, offset) in all_offsets.into_iter().flatten().flatten() {
            loader.override_global(global, offset, true);
        }
        if OBJECT.is_empty() {
            return Err(ProbeError::BuiltWithStub);
        }
        let mut ebpf = loader.load(OBJECT)?;
        let mut status = Vec::new();
        for (name, event, category) in RAW_PROBES {
            let program: &mut RawTracePoint = program(&mut ebpf, name)?;
            let result = program
                .load()
                .and_then(|()| program.attach(event).map(drop));
            status.push(ProbeStatus {
                tracepoint: format!("{category}:{event}"),
                attach_type: "raw_tracepoint",
                error: result.err().map(|e| error_chain(&e)),
            });
        }
        status.push(attach_classic(
            &mut ebpf,
            "kvm",
            "kvm_exit",
            kvm_exit_offsets.map(drop),
        ));
        let kvm_exit_attached = status.last().is_some_and(|s| s.error.is_none());
        status.push(attach_classic(
            &mut ebpf,
            "syscalls",
            "sys_enter_ioctl",
            ioctl_offsets.map(drop),
        ));
        status.push(attach_classic(
            &mut ebpf,
            "syscalls",
            "sys_enter_read",
            read_offsets.map(drop),
        ));
        for event in ["cgroup_mkdir", "cgroup_rmdir", "cgroup_attach_task"] {
            let offsets = cgroup_offsets.as_ref().map(drop).map_err(Clone::clone);
            status.push(attach_classic(&mut ebpf, "cgroup", event, offsets));
        }
        // The exit probe first: an entry without its call is harmless, a call whose exit is
        // missed would count that thread's later unmaps as returned memory.
        let madvise_exit = madvise_offsets.as_ref().map(drop).map_err(Clone::clone);
        status.push(attach_classic(
            &mut ebpf,
            "syscalls",
            "sys_exit_madvise",
            madvise_exit,
        ));
        let madvise_exit_attached = status.last().is_some_and(|s| s.error.is_none());
        let madvise_enter = if madvise_exit_attached {
            madvise_offsets.map(drop)
        } else {
            Err("sys_exit_madvise could not be attached".to_owned())
        };
        status.push(attach_classic(
            &mut ebpf,
            "syscalls",
            "sys_enter_madvise",
            madvise_enter,
        ));
        status.push(attach_classic(
            &mut ebpf,
            "iommu",
            "io_page_fault",
            io_page_fault_offsets.map(drop),
        ));
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

    /// Runs the in-kernel IOMMU fault logic through `BPF_PROG_TEST_RUN`, exactly as the
    /// `iommu:io_page_fault` probe would for a fault of `device` with `flags`.
    pub fn replay_io_page_fault(&mut self, device: &str, flags: u32) -> Result<(), ProbeError> {
        let name = device.as_bytes();
        if name.len() >= vmtrace_common::DEVICE_NAME_LEN {
            return Err(ProbeError::DeviceNameTooLong(device.to_owned()));
        }
        let mut padded = [0u8; vmtrace_common::DEVICE_NAME_LEN];
        padded[..name.len()].copy_from_slice(name);
        let mut args = [0u64; 12];
        for (arg, chunk) in args.iter_mut().zip(padded.chunks_exact(8)) {
            *arg = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        }
        args[4] = u64::from(flags);
        let program: &mut RawTracePoint = program(&mut self.ebpf, "replay_io_page_fault")?;
        if program.fd().is_err() {
            program.load().map_err(ProbeError::Replay)?;
        }
        let result = program
            .test_run(RawTracePointRunOptions { args, cpu: None })
            .map_err(ProbeError::Replay)?;
        if result.return_value != 0 {
            return Err(ProbeError::ReplayRejected([
                args[0], args[1], args[2], args[3], args[4], 0,
            ]));
        }
        Ok(())
    }
}

/// Fields the `syscalls:sys_enter_madvise` program reads.
const MADVISE_FIELDS: &[(&str, u32, &str)] = &[("behavior", 8, "MADVISE_BEHAVIOR_OFFSET")];
/// Fields the `iommu:io_page_fault` program reads; `device` is a `__data_loc` (4 bytes).
const IO_PAGE_FAULT_FIELDS: &[(&str, u32, &str)] = &[
    ("device", 4, "IO_PAGE_FAULT_DEVICE_OFFSET"),
    ("flags", 4, "IO_PAGE_FAULT_FLAGS_OFFSET"),
];

/// Fields the `kvm:kvm_exit` program reads: (field, width, the program's offset global).
const KVM_EXIT_FIELDS: &[(&str, u32, &str)] = &[
    ("exit_reason", 4, "KVM_EXIT_REASON_OFFSET"),
    ("isa", 4, "KVM_EXIT_ISA_OFFSET"),
];
/// The offsets the cgroup lifecycle programs read. They share `root` and `id` offsets, so the three
/// formats must agree on them; `path` is a `__data_loc` (4 bytes).
fn cgroup_offsets(tracefs: &Result<PathBuf, String>) -> Result<Vec<(&'static str, u32)>, String> {
    let mkdir = read_format(tracefs, "cgroup", "cgroup_mkdir")?;
    let rmdir = read_format(tracefs, "cgroup", "cgroup_rmdir")?;
    let attach = read_format(tracefs, "cgroup", "cgroup_attach_task")?;
    let fields = [
        ("root", 4, "CGROUP_ROOT_OFFSET"),
        ("id", 8, "CGROUP_ID_OFFSET"),
        ("path", 4, "CGROUP_PATH_OFFSET"),
    ];
    let mut offsets = offsets(&mkdir, &fields)?;
    if self::offsets(&rmdir, &fields)? != offsets {
        return Err("cgroup_rmdir's record differs from cgroup_mkdir's".to_owned());
    }
    let attached = self::offsets(
        &attach,
        &[
            ("dst_root", 4, "CGROUP_ROOT_OFFSET"),
            ("dst_id", 8, "CGROUP_ID_OFFSET"),
            ("dst_path", 4, "CGROUP_ATTACH_PATH_OFFSET"),
        ],
    )?;
    if attached[..2] != offsets[..2] {
        return Err(
            "cgroup_attach_task's root and id are not where cgroup_mkdir has them".to_owned(),
        );
    }
    offsets.push(attached[2]);
    Ok(offsets)
}

/// Fields the `syscalls:sys_enter_read` program reads.
const READ_FIELDS: &[(&str, u32, &str)] = &[("fd", 8, "READ_FD_OFFSET")];
/// Fields the `syscalls:sys_enter_ioctl` program reads.
const IOCTL_FIELDS: &[(&str, u32, &str)] = &[
    ("fd", 8, "IOCTL_FD_OFFSET"),
    ("cmd", 8, "IOCTL_CMD_OFFSET"),
    ("arg", 8, "IOCTL_ARG_OFFSET"),
];

fn read_format(
    tracefs: &Result<PathBuf, String>,
    category: &str,
    event: &str,
) -> Result<tracefs::EventFormat, String> {
    let dir = tracefs.as_ref().map_err(Clone::clone)?;
    tracefs::EventFormat::read(dir, category, event).map_err(|e| e.to_string())
}

/// The offsets of `fields` in a classic tracepoint's record, checked against its format file: a
/// kernel whose record differs gets a clear error, not wrong numbers.
fn offsets(
    format: &tracefs::EventFormat,
    fields: &[(&str, u32, &'static str)],
) -> Result<Vec<(&'static str, u32)>, String> {
    fields
        .iter()
        .map(|&(field, width, global)| {
            let offset = format.offset_of(field, width).map_err(|e| e.to_string())?;
            Ok((global, offset))
        })
        .collect()
}

/// Loads and attaches the classic tracepoint program named like its event, once its offsets are known.
fn attach_classic(
    ebpf: &mut Ebpf,
    category: &str,
    event: &'static str,
    offsets: Result<(), String>,
) -> ProbeStatus {
    let result = offsets.and_then(|()| {
        let program: &mut TracePoint = program(ebpf, event).map_err(|e| e.to_string())?;
        program
            .load()
            .and_then(|()| program.attach(category, event).map(drop))
            .map_err(|e| error_chain(&e))
    });
    ProbeStatus {
        tracepoint: format!("{category}:{event}"),
        attach_type: "tracepoint",
        error: result.err(),
    }
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
    use super::*;

    const LINUX_6_18: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/kvm_exit-format-linux-6.18-x86.txt"
    ));

    #[test]
    fn kvm_exit_offsets_come_from_the_format_file_and_are_checked() {
        let format = tracefs::EventFormat::parse(PathBuf::from("kvm_exit/format"), LINUX_6_18);
        let offsets = |f: &tracefs::EventFormat| offsets(f, KVM_EXIT_FIELDS);
        assert_eq!(
            offsets(&format),
            Ok(vec![
                ("KVM_EXIT_REASON_OFFSET", 8),
                ("KVM_EXIT_ISA_OFFSET", 24)
            ])
        );
        // A kernel whose record has a wider isa field is refused, not misread.
        let changed = LINUX_6_18.replace(
            "u32 isa;\toffset:24;\tsize:4;",
            "u64 isa;\toffset:24;\tsize:8;",
        );
        let format = tracefs::EventFormat::parse(PathBuf::from("kvm_exit/format"), &changed);
        let err = offsets(&format).unwrap_err();
        assert!(err.contains("`isa` is 8 bytes wide, expected 4"), "{err}");
        let missing = LINUX_6_18.replace("exit_reason;", "reason;");
        let format = tracefs::EventFormat::parse(PathBuf::from("kvm_exit/format"), &missing);
        assert!(
            offsets(&format)
                .unwrap_err()
                .contains("`exit_reason` not found")
        );
    }
}
