//! Every probe the agent attaches, declared once. Attaching (`load`), the sampler's judgement of which
//! failures matter and `vmtrace doctor` all read [`PROBES`]; no other list of probe names exists.
//!
//! Raw tracepoints hand the program the tracepoint's `TP_PROTO` arguments: each entry names the
//! positions its program reads, and those names are checked against the kernel's BTF at load
//! (`probe::btf_args`). Classic tracepoints hand over the record the kernel builds: each entry names
//! the format-file fields its program reads, their widths and the program globals their offsets set
//! (checked against the format file, `probe::tracefs`).

use vmtrace_common::switches;

use crate::host::{IommuHost, KvmFlavour};

/// One probe: an eBPF program and the tracepoint it attaches to.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    /// The program's name in the eBPF object.
    pub program: &'static str,
    /// The tracepoint's category (only for people and classic attachment: raw tracepoints are found
    /// by event name).
    pub category: &'static str,
    pub event: &'static str,
    pub reads: Reads,
    pub when: When,
}

/// What the program reads of its tracepoint.
#[derive(Debug, Clone, Copy)]
pub enum Reads {
    /// A raw tracepoint: the `TP_PROTO` arguments it reads, as (position, the kernel's name).
    /// `classes` names the event class(es) it may be defined with (`DEFINE_EVENT(class, event)`),
    /// whose `__bpf_trace_<class>` carries the argument names when the event has none of its own.
    Raw {
        args: &'static [(usize, &'static str)],
        classes: &'static [&'static str],
    },
    /// A classic tracepoint: the record fields it reads.
    Classic { fields: &'static [FieldRead] },
}

/// One field of a classic tracepoint's record: its name in the format file, its width in bytes and
/// the program global that receives its offset. Probes that set the same global must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldRead {
    pub field: &'static str,
    pub width: u32,
    pub global: &'static str,
}

/// When a probe is expected to attach and to fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Always attached; a failure is worth a warning.
    Required,
    /// Attached only when `option` is on; `switch` is the bit of the program's switches
    /// ([`vmtrace_common::switches`]) set when it is.
    Optional { option: ProbeOption, switch: u32 },
    /// Always attached, but on some hosts it never fires (and may not attach): no warning there.
    Silent(Silence),
}

/// Options that turn optional probes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOption {
    /// `--kick-latency`.
    KickLatency,
    /// `--vm-ioctls`.
    VmIoctls,
    /// `--service-time`.
    ServiceTime,
}

impl ProbeOption {
    pub fn flag(self) -> &'static str {
        match self {
            Self::KickLatency => "--kick-latency",
            Self::VmIoctls => "--vm-ioctls",
            Self::ServiceTime => "--service-time",
        }
    }

    /// What the option gives and what it costs the host, for `doctor`.
    pub fn trade(self) -> &'static str {
        match self {
            Self::KickLatency => "kick service latency; runs on every read() of the host",
            Self::VmIoctls => {
                "doorbells and guest memory learnt from VM setup (port doorbells, kick.any, VM \
                 fds); runs on every ioctl of the host"
            }
            Self::ServiceTime => {
                "the VMMs' service time per exit (exit.<reason> latency); runs on every KVM_RUN, \
                 about 300 ns per exit an exit-heavy guest takes to its VMM (docs/latency.md)"
            }
        }
    }
}

/// The hosts where a probe never fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// KVM flavours that never emit the event.
    OnKvm(&'static [KvmFlavour]),
    /// Hosts without IOMMU groups (no device is translated by an IOMMU).
    WithoutIommu,
    /// Hosts without IOMMU groups, and Intel VT-d hosts, whose driver never reports a fault
    /// through `report_iommu_fault()` (drivers/iommu/intel/dmar.c, `dmar_fault()`).
    WithoutFaultReports,
}

/// What a host offers that decides whether a probe fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTraits {
    pub kvm: KvmFlavour,
    pub iommu: IommuHost,
}

impl Silence {
    /// Why the probe is silent on `host`, or `None` where it fires.
    pub fn reason(self, host: HostTraits) -> Option<String> {
        match self {
            Self::OnKvm(flavours) if flavours.contains(&host.kvm) => {
                Some(format!("{} never emits it", host.kvm.name()))
            }
            Self::WithoutIommu | Self::WithoutFaultReports if !host.iommu.present() => {
                Some("no IOMMU groups on this host".to_owned())
            }
            Self::WithoutFaultReports if host.iommu == IommuHost::IntelVtd => Some(
                "Intel VT-d reports IOMMU faults in the kernel log only; they are counted \
                 from its DMAR lines (/dev/kmsg, docs/iommu.md)"
                    .to_owned(),
            ),
            _ => None,
        }
    }
}

impl ProbeSpec {
    /// `category:event`.
    pub fn tracepoint(&self) -> String {
        format!("{}:{}", self.category, self.event)
    }

    /// `raw_tracepoint` or `tracepoint`, as aya and bpftool name them.
    pub fn attach_type(&self) -> &'static str {
        match self.reads {
            Reads::Raw { .. } => "raw_tracepoint",
            Reads::Classic { .. } => "tracepoint",
        }
    }

    /// Why this probe does not fire on `host`, if it does not.
    pub fn silent_on(&self, host: HostTraits) -> Option<String> {
        match self.when {
            When::Silent(silence) => silence.reason(host),
            When::Required | When::Optional { .. } => None,
        }
    }
}

/// The flavours that never emit `kvm_exit` and `kvm_entry`.
const NO_KVM_EXIT: &[KvmFlavour] = &[KvmFlavour::Pvm, KvmFlavour::None];

/// Where KVM has no fast MMIO bus path: only VMX completes MMIO writes without decoding them.
const NOT_VMX: &[KvmFlavour] = &[KvmFlavour::Svm, KvmFlavour::Pvm, KvmFlavour::None];

const fn raw(
    program: &'static str,
    category: &'static str,
    event: &'static str,
    args: &'static [(usize, &'static str)],
    when: When,
) -> ProbeSpec {
    ProbeSpec {
        program,
        category,
        event,
        reads: Reads::Raw { args, classes: &[] },
        when,
    }
}

const fn classic(
    category: &'static str,
    event: &'static str,
    fields: &'static [FieldRead],
    when: When,
) -> ProbeSpec {
    ProbeSpec {
        program: event,
        category,
        event,
        reads: Reads::Classic { fields },
        when,
    }
}

impl ProbeSpec {
    /// A raw tracepoint defined with `DEFINE_EVENT(class, event)`: its argument names are found
    /// under one of these classes.
    const fn of_class(mut self, classes: &'static [&'static str]) -> Self {
        if let Reads::Raw { args, .. } = self.reads {
            self.reads = Reads::Raw { args, classes };
        }
        self
    }
}

/// The x86 page fault events' class (arch/x86/include/asm/trace/exceptions.h): `exceptions` on this
/// project's 6.18 hosts, `x86_exceptions` in other kernels' sources.
const X86_EXCEPTIONS: &[&str] = &["exceptions", "x86_exceptions"];

const fn field(field: &'static str, width: u32, global: &'static str) -> FieldRead {
    FieldRead {
        field,
        width,
        global,
    }
}

use When::{Required, Silent};

/// `kvm:kvm_exit`: every exit with its hardware reason where the host emits it (VMX, SVM). The
/// reason is only in the record, so it is a classic tracepoint.
pub const KVM_EXIT: ProbeSpec = classic(
    "kvm",
    "kvm_exit",
    &[
        field("exit_reason", 4, "KVM_EXIT_REASON_OFFSET"),
        field("isa", 4, "KVM_EXIT_ISA_OFFSET"),
    ],
    Silent(Silence::OnKvm(NO_KVM_EXIT)),
);

/// The cgroup lifecycle events read `root`, `id` and `path`; `path` is a `__data_loc` (4 bytes).
/// The three share the root and id globals, so their records must agree on those offsets.
const CGROUP_FIELDS: &[FieldRead] = &[
    field("root", 4, "CGROUP_ROOT_OFFSET"),
    field("id", 8, "CGROUP_ID_OFFSET"),
    field("path", 4, "CGROUP_PATH_OFFSET"),
];

/// Every probe, in attach order (and the order `doctor` lists them). Raw tracepoints first: those
/// that see exits where `kvm:kvm_exit` is silent (and complement it where it is not), `kvm_entry`,
/// which ends an exit's latency where kvm_exit fires, then TLB, memory, IOMMU and VMM process
/// lifetime; then the classic ones.
#[rustfmt::skip]
pub static PROBES: &[ProbeSpec] = &[
    // The end of a VMM's service of an exit (the next KVM_RUN): its cost falls on every exit that
    // returns to the VMM, so it is off unless asked for. Without it a VMM is known from its
    // first return, at kvm_userspace_exit.
    raw("kvm_fpu", "kvm", "kvm_fpu", &[(0, "load")], When::Optional { option: ProbeOption::ServiceTime, switch: switches::SERVICE_TIME }),
    raw("kvm_userspace_exit", "kvm", "kvm_userspace_exit", &[(0, "reason"), (1, "errno")], Required),
    raw("kvm_pio", "kvm", "kvm_pio", &[(0, "rw"), (1, "port"), (2, "size"), (4, "data")], Required),
    raw("kvm_mmio", "kvm", "kvm_mmio", &[(0, "type"), (1, "len"), (2, "gpa"), (3, "val")], Required),
    raw("kvm_cpuid", "kvm", "kvm_cpuid", &[], Required),
    raw("kvm_fast_mmio", "kvm", "kvm_fast_mmio", &[(0, "gpa")], Silent(Silence::OnKvm(NOT_VMX))),
    raw("kvm_entry", "kvm", "kvm_entry", &[], Silent(Silence::OnKvm(NO_KVM_EXIT))),
    // A class of its own on 6.18 (it has `group_dead`); of `sched_process_template` on 6.1 and 6.12.
    raw("sched_process_exit", "sched", "sched_process_exit", &[], Required).of_class(&["sched_process_template"]),
    raw("tlb_flush", "tlb", "tlb_flush", &[(0, "reason"), (1, "pages")], Required),
    raw("kvm_pv_tlb_flush", "kvm", "kvm_pv_tlb_flush", &[(1, "need_flush_tlb")], Required),
    raw("kvm_hv_flush_tlb", "kvm", "kvm_hv_flush_tlb", &[], Required),
    raw("kvm_hv_flush_tlb_ex", "kvm", "kvm_hv_flush_tlb_ex", &[], Required),
    raw("page_fault_user", "exceptions", "page_fault_user", &[(0, "address")], Required).of_class(X86_EXCEPTIONS),
    raw("page_fault_kernel", "exceptions", "page_fault_kernel", &[(0, "address")], Required).of_class(X86_EXCEPTIONS),
    raw("kvm_page_fault", "kvm", "kvm_page_fault", &[], Silent(Silence::OnKvm(NO_KVM_EXIT))),
    raw("kvm_mmu_get_page", "kvmmmu", "kvm_mmu_get_page", &[(1, "created")], Required),
    raw("kvm_mmu_prepare_zap_page", "kvmmmu", "kvm_mmu_prepare_zap_page", &[], Required).of_class(&["kvm_mmu_page_class"]),
    raw("kvm_unmap_hva_range", "kvm", "kvm_unmap_hva_range", &[(0, "start"), (1, "end")], Required),
    raw("kvm_age_hva", "kvm", "kvm_age_hva", &[], Required),
    raw("kvm_test_age_hva", "kvm", "kvm_test_age_hva", &[], Required),
    raw("iommu_map", "iommu", "map", &[(2, "size")], Silent(Silence::WithoutIommu)),
    raw("iommu_unmap", "iommu", "unmap", &[(2, "unmapped_size")], Silent(Silence::WithoutIommu)),
    KVM_EXIT,
    // VM setup (doorbells, memory slots): runs on every ioctl of the host, KVM_RUN included, so it
    // is off unless asked for; a VMM is known from its returns, at kvm_userspace_exit.
    classic(
        "syscalls",
        "sys_enter_ioctl",
        &[
            field("fd", 8, "IOCTL_FD_OFFSET"),
            field("cmd", 8, "IOCTL_CMD_OFFSET"),
            field("arg", 8, "IOCTL_ARG_OFFSET"),
        ],
        When::Optional { option: ProbeOption::VmIoctls, switch: switches::DOORBELLS_LEARNT },
    ),
    // Kick service latency: runs on every read() of the host, to see VMMs read their doorbell
    // eventfds, so it is off unless asked for.
    classic(
        "syscalls",
        "sys_enter_read",
        &[field("fd", 8, "READ_FD_OFFSET")],
        When::Optional { option: ProbeOption::KickLatency, switch: switches::KICK_LATENCY },
    ),
    classic("cgroup", "cgroup_mkdir", CGROUP_FIELDS, Required),
    classic("cgroup", "cgroup_rmdir", CGROUP_FIELDS, Required),
    classic(
        "cgroup",
        "cgroup_attach_task",
        &[
            field("dst_root", 4, "CGROUP_ROOT_OFFSET"),
            field("dst_id", 8, "CGROUP_ID_OFFSET"),
            field("dst_path", 4, "CGROUP_ATTACH_PATH_OFFSET"),
        ],
        Required,
    ),
    // `device` is a `__data_loc` (4 bytes).
    classic(
        "iommu",
        "io_page_fault",
        &[
            field("device", 4, "IO_PAGE_FAULT_DEVICE_OFFSET"),
            field("flags", 4, "IO_PAGE_FAULT_FLAGS_OFFSET"),
        ],
        Silent(Silence::WithoutFaultReports),
    ),
];

#[cfg(test)]
/// The spec of `program`.
pub fn find(program: &str) -> Option<&'static ProbeSpec> {
    PROBES.iter().find(|p| p.program == program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_unique() {
        for (i, probe) in PROBES.iter().enumerate() {
            assert!(
                PROBES[..i].iter().all(|p| p.program != probe.program),
                "{} twice",
                probe.program
            );
        }
        assert!(find(KVM_EXIT.program).is_some());
    }

    #[test]
    fn silence_depends_on_the_host() {
        let pvm = HostTraits {
            kvm: KvmFlavour::Pvm,
            iommu: IommuHost::None,
        };
        let svm = HostTraits {
            kvm: KvmFlavour::Svm,
            iommu: IommuHost::Other,
        };
        let vtd = HostTraits {
            kvm: KvmFlavour::Vmx,
            iommu: IommuHost::IntelVtd,
        };
        assert_eq!(
            KVM_EXIT.silent_on(pvm).as_deref(),
            Some("PVM never emits it")
        );
        assert_eq!(KVM_EXIT.silent_on(svm), None);
        let io_page_fault = find("io_page_fault").unwrap();
        assert!(io_page_fault.silent_on(pvm).is_some());
        assert_eq!(io_page_fault.silent_on(svm), None);
        assert!(
            io_page_fault
                .silent_on(vtd)
                .unwrap()
                .contains("kernel log only")
        );
        assert_eq!(find("iommu_map").unwrap().silent_on(vtd), None);
    }
}
