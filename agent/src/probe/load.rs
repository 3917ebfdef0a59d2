//! Loading the embedded eBPF object and attaching its probes on this host.

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun, TracePoint},
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmtrace_common::names::programs;

use crate::{
    host::{KvmDetection, heap},
    probe::btf_args::{ArgCheck, KernelBtf},
    probe::exit_reasons::ExitReasonNames,
    probe::spec::{FieldRead, HostTraits, KVM_EXIT, PROBES, ProbeOption, ProbeSpec, Reads, When},
    probe::tracefs,
};

/// The eBPF object built by build.rs from the `ebpf/` crate.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmtrace.bpf.o"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "loading the eBPF programs failed (vmtrace needs root, or CAP_BPF and CAP_PERFMON; `vmtrace doctor` checks the host)"
    )]
    Load(#[from] aya::EbpfError),
    #[error(
        "bpf() was refused (EPERM) although vmtrace holds CAP_BPF and CAP_PERFMON: a seccomp filter \
         blocks it, as the default profile of CRI-O and podman (containers-common) does without \
         CAP_SYS_ADMIN; run the agent with the seccomp profile deploy/seccomp/vmtrace.json \
         (Localhost, docs/deploy.md)"
    )]
    SeccompRefusesBpf(#[source] aya::EbpfError),
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
    /// The program in the eBPF object.
    pub program: &'static str,
    /// Why this probe never fires on this host, where it does not: a failure to attach is expected
    /// there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silent: Option<String>,
    /// For an optional probe left off, the flag that turns it on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_until: Option<&'static str>,
    /// For raw tracepoints, how the arguments the program reads compare with the kernel's BTF.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub btf_args: Option<BtfArgs>,
}

/// The outcome of a raw tracepoint's BTF argument check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BtfArgs {
    /// Every argument read has the expected name.
    Checked,
    /// The check could not be made (why): the probe was attached without it.
    Unchecked(String),
    /// The kernel's arguments differ: the probe was not attached (the error says how).
    Mismatch,
}

impl ProbeStatus {
    /// How `spec` fared on `host` with `options`: `error` is why it is not attached, if it is not.
    pub fn new(
        spec: &ProbeSpec,
        host: HostTraits,
        options: &ProbeOptions,
        error: Option<String>,
        btf_args: Option<BtfArgs>,
    ) -> Self {
        Self {
            tracepoint: spec.tracepoint(),
            attach_type: spec.attach_type(),
            error,
            program: spec.program,
            silent: spec.silent_on(host),
            off_until: match spec.when {
                When::Optional { option, .. } if !options.is_on(option) => Some(option.flag()),
                _ => None,
            },
            btf_args,
        }
    }

    /// Whether this probe is missing where it should be attached: it failed, and the table does
    /// not expect it to (neither silent on this host nor optional and off).
    pub fn degraded(&self) -> bool {
        self.error.is_some() && !self.failure_expected()
    }

    /// Whether a failure of this probe is expected here: optional and off, or never firing anyway;
    /// never when its arguments differ from the kernel's.
    pub fn failure_expected(&self) -> bool {
        self.btf_args != Some(BtfArgs::Mismatch)
            && (self.off_until.is_some() || self.silent.is_some())
    }
}

/// Optional probes, off by default for what they cost the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProbeOptions {
    /// Kick service latency: attaches the probe table's read() tracepoint, which runs on every
    /// read() of the host, to see VMMs read their doorbell eventfds.
    pub kick_latency: bool,
    /// VM setup ioctls (doorbells, memory slots): attaches the probe table's ioctl() tracepoint,
    /// which runs on every ioctl of the host. Kick latency needs it (the doorbells' eventfds).
    pub vm_ioctls: bool,
    /// The VMMs' service time per exit: attaches the probe table's `kvm_fpu` raw tracepoint, which
    /// runs on every KVM_RUN, and a clock read at every return to the VMM.
    pub service_time: bool,
    /// Exits per VMM thread (`vmtrace top`'s per-vCPU view): one more map update per exit event.
    pub thread_exits: bool,
}

impl ProbeOptions {
    pub fn is_on(&self, option: ProbeOption) -> bool {
        match option {
            ProbeOption::KickLatency => self.kick_latency,
            ProbeOption::VmIoctls => self.vm_ioctls || self.kick_latency,
            ProbeOption::ServiceTime => self.service_time,
        }
    }
}

/// The loaded, attached probes. Dropping this detaches them.
pub struct Probes {
    pub ebpf: Ebpf,
    pub status: Vec<ProbeStatus>,
    pub exit_source: ExitSource,
    /// Names of kvm_exit reasons, from this host's format file where it has them.
    pub reason_names: ExitReasonNames,
    /// Whether the kernel's BTF could be read to check the raw tracepoints' arguments, and why not.
    pub btf: Result<(), String>,
    /// Where tracefs was found (or mounted), or why there is none.
    pub tracefs: Result<tracefs::Location, String>,
    /// The perf events the classic tracepoints are attached through; closing one detaches its
    /// program.
    _classic_links: ClassicLinks,
}

/// The classic tracepoints' perf events, closed all at once when the probes are dropped. The
/// kernel waits for an RCU grace period on each close (about 80 ms here), so closing them one
/// after another would take most of a second; closed from a thread each, the waits overlap.
struct ClassicLinks(Vec<OwnedFd>);

impl Drop for ClassicLinks {
    fn drop(&mut self) {
        let links = std::mem::take(&mut self.0);
        std::thread::scope(|scope| {
            for link in links {
                // A thread that cannot be started leaves its link to be closed right here.
                if let Err(e) = std::thread::Builder::new().spawn_scoped(scope, move || drop(link))
                {
                    tracing::debug!("closing a tracepoint link inline: {e}");
                }
            }
        });
    }
}

/// What a probe needs before the object is loaded: the globals its offsets set, or why it cannot be
/// attached; and, for raw tracepoints, how the BTF check went.
struct Prepared {
    globals: Result<Vec<(&'static str, u32)>, String>,
    btf_args: Option<BtfArgs>,
}

impl Probes {
    /// Loads the programs and attaches every probe of the probe table (`probe::spec::PROBES`) this host supports.
    pub fn attach(kvm: &KvmDetection, options: &ProbeOptions) -> Result<Self, ProbeError> {
        let host = HostTraits {
            kvm: kvm.flavour,
            iommu: crate::host::detect_iommu(),
        };
        let location = tracefs::find_or_mount().map_err(|e| e.to_string());
        let tracefs = location
            .as_ref()
            .map(|l| l.path.clone())
            .map_err(Clone::clone);
        let btf = KernelBtf::open();
        let reason_names = match read_format(&tracefs, KVM_EXIT.category, KVM_EXIT.event) {
            Ok(format) => ExitReasonNames::from_print_fmt(&format.print_fmt),
            Err(_) => ExitReasonNames::builtin(),
        };
        let mut prepared: Vec<Prepared> = PROBES
            .iter()
            .map(|spec| prepare(spec, *options, &tracefs, &btf))
            .collect();
        agree_on_shared_globals(PROBES, &mut prepared);
        // Optional probes' switches: on where the probe is to be attached.
        let probe_switches = PROBES
            .iter()
            .zip(&prepared)
            .filter_map(|(spec, prepared)| match spec.when {
                When::Optional { switch, .. } if prepared.globals.is_ok() => Some(switch),
                _ => None,
            });
        let thread_exits = if options.thread_exits {
            vmtrace_common::switches::THREAD_EXITS
        } else {
            0
        };
        let switches = probe_switches.fold(thread_exits, |all, switch| all | switch);
        // The loader parses the kernel's BTF again (`EbpfLoader::new`, some 18 MiB): the checks'
        // mapping goes first, so that the two are never held at once.
        let btf = btf.map(drop);
        // Parsing the kernel's BTF takes some 20 MiB in many small allocations, freed by now.
        heap::return_freed_memory();
        let mut loader = EbpfLoader::new();
        loader.override_global(vmtrace_common::names::globals::SWITCHES, &switches, true);
        for (global, offset) in prepared.iter().flat_map(|p| p.globals.iter().flatten()) {
            loader.override_global(global, offset, true);
        }
        if OBJECT.is_empty() {
            return Err(ProbeError::BuiltWithStub);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| {
            let privileges = crate::host::privileges();
            if privileges.can_trace() && privileges.seccomp_filter && is_eperm(&e) {
                ProbeError::SeccompRefusesBpf(e)
            } else {
                ProbeError::Load(e)
            }
        })?;
        drop(loader);
        heap::return_freed_memory();
        let mut status: Vec<ProbeStatus> = Vec::with_capacity(PROBES.len());
        let mut classic_links = Vec::new();
        for (spec, prepared) in PROBES.iter().zip(prepared) {
            let result = prepared
                .globals
                .map(drop)
                .and_then(|()| attach_one(&mut ebpf, spec, &tracefs));
            let error = match result {
                Ok(link) => {
                    classic_links.extend(link);
                    None
                }
                Err(e) => Some(e),
            };
            status.push(ProbeStatus::new(
                spec,
                host,
                options,
                error,
                prepared.btf_args,
            ));
        }
        if status.iter().all(|s| s.error.is_some()) {
            return Err(ProbeError::NothingAttached(grouped_errors(&status)));
        }
        let exit_source = if kvm.flavour.emits_kvm_exit() && is_attached(&status, KVM_EXIT.program)
        {
            ExitSource::KvmExit
        } else {
            ExitSource::Derived
        };
        Ok(Self {
            ebpf,
            status,
            exit_source,
            reason_names,
            btf,
            tracefs: location,
            _classic_links: ClassicLinks(classic_links),
        })
    }

    /// The probes that failed to attach where the probe table expects them to: the agent is
    /// degraded while any is missing.
    pub fn not_attached(&self) -> impl Iterator<Item = &ProbeStatus> {
        self.status.iter().filter(|s| s.degraded())
    }

    /// Runs the in-kernel kvm_exit logic on synthetic records through `BPF_PROG_TEST_RUN`, exactly as
    /// the kvm_exit and kvm_entry probes would on a VMX or SVM host. Each record is
    /// `[op, cgroup_id, tid, time_ns, isa, reason]`, `op` 0 for an exit and 1 for an entry.
    pub fn replay_kvm_exit(&mut self, records: &[[u64; 6]]) -> Result<(), ProbeError> {
        let program: &mut RawTracePoint = program(&mut self.ebpf, programs::REPLAY_KVM_EXIT)?;
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

    /// Runs the `kvm_fast_mmio` probe through `BPF_PROG_TEST_RUN`, in this thread, as VMX would on
    /// a write to `gpa` that its fast MMIO bus completed.
    pub fn replay_fast_mmio(&mut self, gpa: u64) -> Result<(), ProbeError> {
        let program: &mut RawTracePoint = program(&mut self.ebpf, "kvm_fast_mmio")?;
        let mut args = [0u64; 12];
        args[0] = gpa;
        let result = program
            .test_run(RawTracePointRunOptions { args, cpu: None })
            .map_err(ProbeError::Replay)?;
        if result.return_value != 0 {
            return Err(ProbeError::ReplayRejected([gpa, 0, 0, 0, 0, 0]));
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
        let program: &mut RawTracePoint = program(&mut self.ebpf, programs::REPLAY_IO_PAGE_FAULT)?;
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

/// Whether `program` is among the attached probes.
/// Each distinct error once, after the tracepoints it stopped (every program refused alike, as
/// without CAP_PERFMON, is one line, not one per probe).
fn grouped_errors(status: &[ProbeStatus]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for probe in status {
        let error = probe.error.as_deref().unwrap_or_default();
        match groups.iter_mut().find(|(e, _)| *e == error) {
            Some((_, tracepoints)) => tracepoints.push(&probe.tracepoint),
            None => groups.push((error, vec![&probe.tracepoint])),
        }
    }
    groups
        .iter()
        .map(|(error, tracepoints)| match tracepoints.as_slice() {
            [one] => format!("{one}: {error}"),
            many => format!("{} probes ({}): {error}", many.len(), many.join(", ")),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether an error, or one of its sources, is the kernel's EPERM.
fn is_eperm(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    })
}

fn is_attached(status: &[ProbeStatus], program: &str) -> bool {
    status
        .iter()
        .any(|s| s.program == program && s.error.is_none())
}

/// What `spec` needs before the object is loaded, on this host with these options.
fn prepare(
    spec: &ProbeSpec,
    options: ProbeOptions,
    tracefs: &Result<PathBuf, String>,
    btf: &Result<KernelBtf, String>,
) -> Prepared {
    if let When::Optional { option, .. } = spec.when
        && !options.is_on(option)
    {
        return Prepared {
            globals: Err(format!(
                "off (enable with {}: {})",
                option.flag(),
                option.trade()
            )),
            btf_args: None,
        };
    }
    match spec.reads {
        Reads::Raw { args, classes } => {
            let (globals, note) = match btf.as_ref().map(|b| b.check(spec.event, classes, args)) {
                Ok(Ok(ArgCheck::Checked)) => (Ok(Vec::new()), BtfArgs::Checked),
                Ok(Ok(ArgCheck::Unchecked(why))) => (Ok(Vec::new()), BtfArgs::Unchecked(why)),
                Ok(Err(mismatch)) => (Err(mismatch.to_string()), BtfArgs::Mismatch),
                // Why, once for all probes, is in `Probes::btf`.
                Err(_) => (
                    Ok(Vec::new()),
                    BtfArgs::Unchecked("the kernel's BTF could not be read".to_owned()),
                ),
            };
            Prepared {
                globals,
                btf_args: Some(note),
            }
        }
        Reads::Classic { fields } => {
            let globals = if fields.is_empty() {
                Ok(Vec::new())
            } else {
                read_format(tracefs, spec.category, spec.event).and_then(|f| offsets(&f, fields))
            };
            Prepared {
                globals,
                btf_args: None,
            }
        }
    }
}

/// Probes that set the same global (the cgroup events' root and id) must have found it at the same
/// offset: the first to set it wins, a later one that disagrees is not attached.
fn agree_on_shared_globals(specs: &[ProbeSpec], prepared: &mut [Prepared]) {
    let mut set: Vec<(&'static str, u32, &'static str)> = Vec::new();
    for (spec, prepared) in specs.iter().zip(prepared.iter_mut()) {
        let Ok(globals) = &prepared.globals else {
            continue;
        };
        let conflict = globals.iter().find_map(|&(global, offset)| {
            set.iter()
                .find(|&&(g, o, _)| g == global && o != offset)
                .map(|&(_, o, by)| {
                    format!(
                        "{}'s record has {global} at offset {offset}, {by}'s at {o}: they share it",
                        spec.event
                    )
                })
        });
        match conflict {
            Some(error) => prepared.globals = Err(error),
            None => set.extend(globals.iter().map(|&(g, o)| (g, o, spec.event))),
        }
    }
}

/// Loads and attaches one probe's program. A classic tracepoint's link is returned: the perf event
/// it is attached through.
fn attach_one(
    ebpf: &mut Ebpf,
    spec: &ProbeSpec,
    tracefs: &Result<PathBuf, String>,
) -> Result<Option<OwnedFd>, String> {
    match spec.reads {
        Reads::Raw { .. } => {
            let program: &mut RawTracePoint =
                program(ebpf, spec.program).map_err(|e| e.to_string())?;
            program
                .load()
                .and_then(|()| program.attach(spec.event).map(drop))
                .map(|()| None)
                .map_err(|e| error_chain(&e))
        }
        Reads::Classic { .. } => {
            let program: &mut TracePoint =
                program(ebpf, spec.program).map_err(|e| e.to_string())?;
            program.load().map_err(|e| error_chain(&e))?;
            let dir = tracefs.as_ref().map_err(Clone::clone)?;
            let fd = program.fd().map_err(|e| error_chain(&e))?;
            attach_classic(fd.as_fd(), dir, spec.category, spec.event).map(Some)
        }
    }
}

/// Attaches a loaded tracepoint program to `category:event` through the tracefs at `tracefs`.
///
/// aya 0.14's `TracePoint::attach` finds the event id only under `/sys/kernel/tracing` or
/// `/sys/kernel/debug/tracing` (and caches the first answer for the life of the process), and its
/// `PerfEvent` programs, which take an event id, are another program type that the kernel does not
/// run on tracepoints. So the agent does what `TracePoint::attach` does, with the tracefs it found
/// in the mount table: it reads the event id, opens the tracepoint's perf event, sets the program
/// on it and enables it. A tracefs mounted anywhere serves, and nothing needs mounting.
fn attach_classic(
    program: std::os::fd::BorrowedFd<'_>,
    tracefs: &Path,
    category: &str,
    event: &str,
) -> Result<OwnedFd, String> {
    let id = tracefs::event_id(tracefs, category, event).map_err(|e| e.to_string())?;
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: u32::try_from(std::mem::size_of::<PerfEventAttr>()).unwrap_or(u32::MAX),
        config: id,
        sample_period: 0,
        sample_type: 0,
        read_format: 0,
        flags: PERF_ATTR_DISABLED,
        wakeup_events: 1,
        bp_type: 0,
        config1: 0,
    };
    // SAFETY: `attr` is a valid perf_event_attr of the size it declares (PERF_ATTR_SIZE_VER0);
    // pid -1 with cpu 0 is the form the kernel takes for a tracepoint seen on every task (the
    // program runs on every CPU regardless).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            -1,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "perf_event_open of {category}:{event} (id {id}): {}",
            std::io::Error::last_os_error()
        ));
    }
    let fd = i32::try_from(fd).map_err(|_| "perf_event_open returned no fd".to_owned())?;
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    let perf = unsafe { OwnedFd::from_raw_fd(fd) };
    for (request, arg, what) in [
        (
            PERF_EVENT_IOC_SET_BPF,
            program.as_raw_fd(),
            "setting the program",
        ),
        (PERF_EVENT_IOC_ENABLE, 0, "enabling the event"),
    ] {
        // SAFETY: both requests take an int argument; `perf` is an open perf event fd.
        if unsafe { libc::ioctl(perf.as_raw_fd(), request, arg) } != 0 {
            return Err(format!(
                "{what} on {category}:{event}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(perf)
}

/// `struct perf_event_attr` up to `config1` (`PERF_ATTR_SIZE_VER0`, 64 bytes): all a tracepoint
/// needs; the kernel zero-extends the rest.
#[repr(C)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// The bit field that starts with `disabled`.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 64);
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_ATTR_DISABLED: u64 = 1;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::Ioctl = 0x2400;
/// `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::Ioctl = 0x4004_2408;

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
    fields: &[FieldRead],
) -> Result<Vec<(&'static str, u32)>, String> {
    fields
        .iter()
        .map(|f| {
            let offset = format
                .offset_of(f.field, f.width)
                .map_err(|e| e.to_string())?;
            Ok((f.global, offset))
        })
        .collect()
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
        let Reads::Classic { fields } = KVM_EXIT.reads else {
            panic!("kvm_exit is a classic tracepoint");
        };
        let offsets = |f: &tracefs::EventFormat| offsets(f, fields);
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

    #[test]
    fn only_failures_the_table_does_not_expect_degrade_the_agent() {
        use crate::host::KvmFlavour::{Pvm, Svm};
        let failed = |event: &str, kvm: crate::host::KvmFlavour, options: &ProbeOptions| {
            let spec = PROBES.iter().find(|p| p.event == event).unwrap();
            let host = HostTraits {
                kvm,
                iommu: crate::host::IommuHost::None,
            };
            ProbeStatus::new(spec, host, options, Some("ENOENT".to_owned()), None)
        };
        let off = ProbeOptions::default();
        let on = ProbeOptions {
            kick_latency: true,
            ..ProbeOptions::default()
        };
        // Silent on this flavour: expected. Where it fires: degraded.
        assert!(!failed("kvm_exit", Pvm, &off).degraded());
        assert!(failed("kvm_exit", Svm, &off).degraded());
        // Silent without IOMMU groups.
        assert!(!failed("io_page_fault", Pvm, &off).degraded());
        // Optional: expected while off, degraded once asked for.
        assert!(!failed("sys_enter_read", Pvm, &off).degraded());
        assert!(failed("sys_enter_read", Pvm, &on).degraded());
        // The ioctl probe is off by default, and on with its flag or kick latency.
        assert!(!failed("sys_enter_ioctl", Pvm, &off).degraded());
        assert!(failed("sys_enter_ioctl", Pvm, &on).degraded());
        // The service time's probe is off by default, and on with its flag.
        let timed = ProbeOptions {
            service_time: true,
            ..ProbeOptions::default()
        };
        assert!(!failed("kvm_fpu", Pvm, &off).degraded());
        assert!(failed("kvm_fpu", Pvm, &timed).degraded());
        // Required, raw or classic.
        assert!(failed("kvm_mmio", Pvm, &off).degraded());
        assert!(failed("cgroup_rmdir", Pvm, &off).degraded());
        assert!(failed("cgroup_attach_task", Pvm, &off).degraded());
        // A silent probe whose arguments differ from the kernel's is not excused.
        let mismatch = ProbeStatus {
            btf_args: Some(BtfArgs::Mismatch),
            ..failed("kvm_entry", Pvm, &off)
        };
        assert!(mismatch.degraded());
        // Attached: never degraded.
        let spec = PROBES.iter().find(|p| p.event == "kvm_mmio").unwrap();
        let host = HostTraits {
            kvm: Pvm,
            iommu: crate::host::IommuHost::None,
        };
        assert!(!ProbeStatus::new(spec, host, &off, None, None).degraded());
    }

    #[test]
    fn probes_sharing_a_global_must_agree_on_its_offset() {
        let cgroup: Vec<ProbeSpec> = PROBES
            .iter()
            .filter(|p| p.category == "cgroup")
            .copied()
            .collect();
        let found = |id: u32, attach_id: u32| -> Vec<Prepared> {
            [("mkdir", id), ("rmdir", id), ("attach", attach_id)]
                .into_iter()
                .map(|(_, id)| Prepared {
                    globals: Ok(vec![
                        ("CGROUP_ROOT_OFFSET", 8),
                        ("CGROUP_ID_OFFSET", id),
                        ("CGROUP_PATH_OFFSET", 24),
                    ]),
                    btf_args: None,
                })
                .collect()
        };
        let mut agreeing = found(16, 16);
        agree_on_shared_globals(&cgroup, &mut agreeing);
        assert!(agreeing.iter().all(|p| p.globals.is_ok()));
        let mut differing = found(16, 20);
        agree_on_shared_globals(&cgroup, &mut differing);
        assert!(differing[..2].iter().all(|p| p.globals.is_ok()));
        let err = differing[2].globals.as_ref().unwrap_err();
        assert!(
            err.contains("cgroup_attach_task") && err.contains("CGROUP_ID_OFFSET"),
            "{err}"
        );
    }

    #[test]
    fn a_btf_mismatch_keeps_the_probe_off_and_unreadable_btf_does_not() {
        let Ok(btf) = KernelBtf::open() else {
            eprintln!("skipped: no readable BTF here");
            return;
        };
        let no_tracefs: Result<PathBuf, String> = Err("no tracefs".to_owned());
        let wrong = ProbeSpec {
            reads: Reads::Raw {
                args: &[(1, "gpa")],
                classes: &[],
            },
            ..*crate::probe::spec::find("kvm_mmio").unwrap()
        };
        let prepared = prepare(&wrong, ProbeOptions::default(), &no_tracefs, &Ok(btf));
        assert_eq!(prepared.btf_args, Some(BtfArgs::Mismatch));
        let err = prepared.globals.unwrap_err();
        assert!(
            err.contains("kvm_mmio") && err.contains("argument 1") && err.contains("`gpa`"),
            "{err}"
        );
        let unreadable: Result<KernelBtf, String> = Err("cannot read BTF".to_owned());
        let prepared = prepare(&wrong, ProbeOptions::default(), &no_tracefs, &unreadable);
        assert!(prepared.globals.is_ok());
        assert!(matches!(prepared.btf_args, Some(BtfArgs::Unchecked(_))));
    }
}
