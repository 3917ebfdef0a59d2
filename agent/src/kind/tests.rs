//! Kinds against the names the agent wrote before they were typed: the kernel keys give the same
//! names, every name reads back as the kind that wrote it, and maps keep their key order.

use std::collections::BTreeMap;

use vmtrace_common::ExitKind;

use super::*;
use crate::probe::exit_reasons::ExitReasonNames;

/// The names as the agent made them from kernel keys before kinds were typed.
mod previous {
    use vmtrace_common::{ExitKind, FaultMode, HvaDetail, IommuDetail, MmioType, MmuPageEvent};

    use crate::probe::exit_reasons::ExitReasonNames;

    const KVM_EXIT_REASONS: [&str; 42] = [
        "unknown",
        "exception",
        "io",
        "hypercall",
        "debug",
        "hlt",
        "mmio",
        "irq_window_open",
        "shutdown",
        "fail_entry",
        "intr",
        "set_tpr",
        "tpr_access",
        "s390_sieic",
        "s390_reset",
        "dcr",
        "nmi",
        "internal_error",
        "osi",
        "papr_hcall",
        "s390_ucontrol",
        "watchdog",
        "s390_tsch",
        "epr",
        "system_event",
        "s390_stsi",
        "ioapic_eoi",
        "hyperv",
        "arm_nisv",
        "x86_rdmsr",
        "x86_wrmsr",
        "dirty_ring_full",
        "ap_reset_hold",
        "x86_bus_lock",
        "xen",
        "riscv_sbi",
        "riscv_csr",
        "notify",
        "loongarch_iocsr",
        "memory_fault",
        "tdx",
        "arm_sea",
    ];

    fn kvm_exit_reason(reason: u32) -> String {
        KVM_EXIT_REASONS
            .get(reason as usize)
            .map_or_else(|| format!("reason_{reason}"), |name| (*name).to_owned())
    }

    fn errno_name(errno: u32) -> String {
        match errno as i32 {
            libc::EINTR => "eintr".to_owned(),
            libc::EAGAIN => "eagain".to_owned(),
            libc::EFAULT => "efault".to_owned(),
            libc::EINVAL => "einval".to_owned(),
            other => format!("errno_{other}"),
        }
    }

    fn mmio_type(detail: u32) -> String {
        match MmioType::try_from(detail) {
            Ok(MmioType::Write) => "write".to_owned(),
            Ok(MmioType::Read) => "read".to_owned(),
            Ok(MmioType::ReadUnsatisfied) => "read_unsatisfied".to_owned(),
            Err(other) => format!("type_{other}"),
        }
    }

    fn tlb_flush_reason(reason: u32) -> String {
        match reason {
            0 => "task_switch".to_owned(),
            1 => "remote_shootdown".to_owned(),
            2 => "local_shootdown".to_owned(),
            3 => "local_mm_shootdown".to_owned(),
            4 => "remote_send_ipi".to_owned(),
            other => format!("reason_{other}"),
        }
    }

    pub fn kick_kind(queue: u32) -> String {
        if queue == vmtrace_common::ANY_QUEUE {
            "kick.any".to_owned()
        } else {
            format!("kick.q{queue}")
        }
    }

    pub fn kind_name(kind: ExitKind, isa: u32, detail: u32, names: &ExitReasonNames) -> String {
        match kind {
            ExitKind::Userspace => format!("exit.{}", kvm_exit_reason(detail)),
            ExitKind::UserspaceError => format!("run_error.{}", errno_name(detail)),
            ExitKind::Pio if detail == 0 => "pio.in".to_owned(),
            ExitKind::Pio => "pio.out".to_owned(),
            ExitKind::Mmio => format!("mmio.{}", mmio_type(detail)),
            ExitKind::Cpuid => "cpuid".to_owned(),
            ExitKind::KvmExit => format!("kvm_exit.{}", names.name(isa, detail)),
            ExitKind::TlbFlush => format!("tlb.flush.{}", tlb_flush_reason(detail)),
            ExitKind::TlbPvFlush if detail == 0 => "tlb.pv_flush.skipped".to_owned(),
            ExitKind::TlbPvFlush => "tlb.pv_flush".to_owned(),
            ExitKind::TlbHvFlush if detail == 0 => "tlb.hv_flush".to_owned(),
            ExitKind::TlbHvFlush => "tlb.hv_flush_ex".to_owned(),
            ExitKind::MmuPage => match detail {
                d if d == MmuPageEvent::Created as u32 => "mmu.page.created",
                d if d == MmuPageEvent::Zapped as u32 => "mmu.page.zapped",
                _ => "mmu.page.reused",
            }
            .to_owned(),
            ExitKind::HostFault if detail == FaultMode::Kernel as u32 => "fault.kernel".to_owned(),
            ExitKind::HostFault => "fault.user".to_owned(),
            ExitKind::GuestFault => "fault.guest".to_owned(),
            ExitKind::HvaUnmap => match detail {
                d if d == HvaDetail::Bytes as u32 => "mem.unmap_bytes",
                d if d == HvaDetail::ReturnedCalls as u32 => "mem.returned",
                d if d == HvaDetail::ReturnedBytes as u32 => "mem.returned_bytes",
                _ => "mem.unmap",
            }
            .to_owned(),
            ExitKind::HvaAge if detail == 0 => "mem.age".to_owned(),
            ExitKind::HvaAge => "mem.test_age".to_owned(),
            ExitKind::Refault => "mem.refault".to_owned(),
            ExitKind::GuestTime => "cpu.guest".to_owned(),
            ExitKind::Iommu => match detail {
                d if d == IommuDetail::MapBytes as u32 => "iommu.map_bytes",
                d if d == IommuDetail::Unmap as u32 => "iommu.unmap",
                d if d == IommuDetail::UnmapBytes as u32 => "iommu.unmap_bytes",
                _ => "iommu.map",
            }
            .to_owned(),
        }
    }
}

/// Kinds the agent makes outside the kernel keys (derived, cgroupfs, perf events), and a few
/// of the kernel's with fallback names.
const OTHER_NAMES: [&str; 17] = [
    "mmio.write.kernel",
    "tlb.exit",
    "tlb.dtlb_load_miss",
    "tlb.dtlb_store_miss",
    "tax.kernel",
    "tax.vmm",
    "memcg.pgfault",
    "memcg.pgmajfault",
    "memcg.limit_hits",
    "memcg.oom_kills",
    "kick.any",
    "kick.q0",
    "kick.q31",
    "exit.reason_99",
    "run_error.errno_5",
    "tlb.flush.reason_7",
    "kvm_exit.any name the host's format file has",
];

fn kind(text: &str) -> Kind {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"))
}

/// Every kind a kernel key can become, with the name the agent gave it before.
fn every_key_kind() -> Vec<(Kind, String)> {
    let names = ExitReasonNames::builtin();
    let mut kinds = Vec::new();
    for code in 0..64 {
        let Ok(exit_kind) = ExitKind::try_from(code) else {
            continue;
        };
        for isa in 0..3 {
            for detail in (0..80).chain([0x400, 0xffff, u32::MAX]) {
                kinds.push((
                    Kind::from_exit_key(exit_kind, isa, detail, &names),
                    previous::kind_name(exit_kind, isa, detail, &names),
                ));
            }
        }
    }
    for queue in [0, 1, 7, vmtrace_common::ANY_QUEUE] {
        kinds.push((Kind::kick(queue), previous::kick_kind(queue)));
    }
    kinds
}

#[test]
fn kernel_keys_give_the_names_they_always_had() {
    let names = ExitReasonNames::builtin();
    let name = |kind, isa, detail| Kind::from_exit_key(kind, isa, detail, &names).to_string();
    assert_eq!(name(ExitKind::Userspace, 0, 2), "exit.io");
    assert_eq!(name(ExitKind::Userspace, 0, 5), "exit.hlt");
    assert_eq!(name(ExitKind::Userspace, 0, 24), "exit.system_event");
    assert_eq!(name(ExitKind::Userspace, 0, 999), "exit.reason_999");
    assert_eq!(name(ExitKind::Pio, 0, 1), "pio.out");
    assert_eq!(name(ExitKind::Mmio, 0, 2), "mmio.write");
    assert_eq!(name(ExitKind::UserspaceError, 0, 4), "run_error.eintr");
    assert_eq!(name(ExitKind::KvmExit, 2, 0x400), "kvm_exit.npf");
    for (kind, previous) in every_key_kind() {
        assert_eq!(kind.to_string(), previous, "{kind:?}");
    }
}

#[test]
fn every_kind_reads_back_from_its_name() {
    let kinds = every_key_kind().into_iter().map(|(kind, _)| kind);
    let others = OTHER_NAMES.iter().map(|name| kind(name));
    for kind in kinds.chain(others) {
        assert_eq!(
            kind.to_string().parse::<Kind>(),
            Ok(kind.clone()),
            "{kind:?}"
        );
        assert_eq!(Kind::from_recorded(&kind.to_string()), kind);
    }
}

#[test]
fn every_name_reads_as_a_kind_that_writes_it_back() {
    let names = every_key_kind().into_iter().map(|(_, name)| name);
    let others = OTHER_NAMES.iter().map(|name| (*name).to_owned());
    for name in names.chain(others) {
        assert_eq!(kind(&name).to_string(), name);
        assert!(!matches!(kind(&name), Kind::Unknown(_)), "{name}");
    }
    for name in ["memory.usage_bytes", "tax.ratio"] {
        assert_eq!(name.parse::<Gauge>().unwrap().to_string(), name);
    }
}

#[test]
fn only_the_names_the_agent_writes_parse() {
    // Each known kind has one spelling, so that reading and writing a recording changes nothing.
    for name in [
        "",
        "exit.",
        "exit.reason_2",
        "exit.reason_099",
        "exit.bogus",
        "run_error.errno_4",
        "run_error.errno_+5",
        "mmio.type_x",
        "kick.q01",
        "kick.q",
        "kick.q4294967295",
        "tlb.flush",
        "tlb.flush.reason_0",
        "tax",
        "tax.ratio",
        "memory.usage_bytes",
        "cpuid.x",
    ] {
        assert!(name.parse::<Kind>().is_err(), "{name:?} parsed");
    }
    assert!("exit.io".parse::<Gauge>().is_err());
}

#[test]
fn kinds_from_newer_recordings_are_kept_and_shown_by_family() {
    let kind = Kind::from_recorded("tlb.flush");
    assert!(matches!(kind, Kind::Unknown(_)));
    assert_eq!(kind.to_string(), "tlb.flush");
    assert_eq!(kind.top_column(), TopColumn::Tlb);
    assert!(kind.is_host_side());
    assert_eq!(Kind::from_recorded("tax").top_column(), TopColumn::Tax);
    assert!(!Kind::from_recorded("virtio.new").is_host_side());
    assert_eq!(kind.metric(), None);
    assert_eq!(
        Gauge::from_recorded("memory.swap_bytes").to_string(),
        "memory.swap_bytes"
    );
}

#[test]
fn kinds_sort_and_serialise_as_their_names() {
    let mut kinds: Vec<Kind> = every_key_kind().into_iter().map(|(kind, _)| kind).collect();
    kinds.extend(OTHER_NAMES.iter().map(|name| kind(name)));
    kinds.push(Kind::from_recorded("a.kind.from.the.future"));
    // Numbers order as their digits do, and a name that is another's start comes first.
    for name in [
        "kick.q9",
        "kick.q10",
        "kick.q1",
        "kick.q100",
        "kick.any",
        "exit.reason_99",
        "exit.reason_100",
        "run_error.errno_5",
        "run_error.errno_50",
    ] {
        kinds.push(kind(name));
    }
    kinds.sort();
    kinds.dedup();
    let mut names: Vec<String> = kinds.iter().map(Kind::to_string).collect();
    let in_kind_order = names.clone();
    names.sort();
    names.dedup();
    assert_eq!(in_kind_order, names);

    let by_kind: BTreeMap<Kind, usize> = kinds.iter().cloned().zip(0..).collect();
    let by_name: BTreeMap<String, usize> = names.iter().cloned().zip(0..).collect();
    let json = serde_json::to_string(&by_kind).unwrap();
    assert_eq!(json, serde_json::to_string(&by_name).unwrap());
    assert_eq!(
        serde_json::from_str::<BTreeMap<Kind, usize>>(&json).unwrap(),
        by_kind
    );

    let gauges: BTreeMap<Gauge, f64> = [(Gauge::TaxRatio, 0.5), (Gauge::MemoryUsage, 1.0)].into();
    assert_eq!(
        serde_json::to_string(&gauges).unwrap(),
        r#"{"memory.usage_bytes":1.0,"tax.ratio":0.5}"#
    );
}

#[test]
fn each_kind_knows_its_metric_column_and_latency() {
    use crate::export::metrics::{
        CPU_TIME, TLB_EVENTS, VM_EVENTS, VM_EXITS, VMM_EXITS, VMM_SERVICE_DURATION,
    };
    use crate::probe::load::ExitSource::{Derived, KvmExit};
    let exit = |kind: &Kind, source| {
        kind.exit_metric(source)
            .map(|m| (m.def, m.attributes))
            .unwrap()
    };
    let io = kind("exit.io");
    let io_metric = io.metric().unwrap();
    assert_eq!(io_metric.def, VMM_EXITS);
    assert_eq!(io_metric.attributes, [("exit.reason", "io".to_owned())]);
    assert_eq!(
        exit(&io, Derived),
        (
            VM_EXITS,
            vec![
                ("exit.source", "derived".to_owned()),
                ("exit.reason", "io".to_owned())
            ]
        )
    );
    assert_eq!(io.exit_metric(KvmExit), None);
    let hlt = kind("kvm_exit.HLT");
    assert_eq!(hlt.metric(), None);
    assert_eq!(
        exit(&hlt, KvmExit).1,
        [
            ("exit.source", "kvm_exit".to_owned()),
            ("exit.reason", "HLT".to_owned())
        ]
    );
    assert_eq!(hlt.exit_metric(Derived), None);
    let cpuid = kind("cpuid");
    assert_eq!(cpuid.metric().unwrap().def, VM_EVENTS);
    assert_eq!(
        exit(&cpuid, Derived).1,
        [
            ("exit.source", "derived".to_owned()),
            ("exit.reason", "cpuid".to_owned())
        ]
    );
    assert_eq!(cpuid.exit_metric(KvmExit), None);
    assert_eq!(kind("pio.out").exit_metric(Derived), None);
    assert_eq!(
        io.latency_metric(),
        Some((VMM_SERVICE_DURATION, vec![("exit.reason", "io".to_owned())]))
    );
    assert_eq!(io.top_column(), TopColumn::Exits);
    assert!(io.counts_as_exit(false) && !io.counts_as_exit(true));
    assert_eq!(io.reason_name(), "io");

    let kernel = kind("tax.kernel").metric().unwrap();
    assert_eq!(
        (kernel.def, kernel.scale),
        (CPU_TIME, crate::export::kind_metric::Scale::NanosToSeconds)
    );
    let flush = kind("tlb.flush.task_switch").metric().unwrap();
    assert_eq!(flush.def, TLB_EVENTS);
    assert_eq!(
        flush.attributes,
        [("tlb.event", "flush.task_switch".to_owned())]
    );
    assert_eq!(
        kind("kick.q3").metric().unwrap().attributes,
        [("virtio.queue", "3".to_owned())]
    );
    assert_eq!(kind("mmio.write.kernel").reason_name(), "mmio.kern");
    assert!(kind("mmio.write.kernel").counts_as_exit(false));
    assert!(kind("kvm_exit.HLT").counts_as_exit(true));
    assert!(kind("memcg.pgfault").is_host_side());
    assert!(!kind("kick.any").is_host_side());
}

#[test]
fn the_metrics_reference_names_every_attribute_value_a_kind_gets() {
    use crate::probe::load::ExitSource;
    let reference = include_str!("../../../docs/metrics.md");
    let mut kinds: Vec<Kind> = every_key_kind().into_iter().map(|(kind, _)| kind).collect();
    kinds.extend(OTHER_NAMES.iter().map(|name| kind(name)));
    for kind in kinds {
        let metrics: Vec<_> = kind
            .metric()
            .into_iter()
            .chain(kind.exit_metric(ExitSource::KvmExit))
            .chain(kind.exit_metric(ExitSource::Derived))
            .collect();
        assert!(!metrics.is_empty(), "{kind} has no metric");
        for metric in &metrics {
            assert!(
                reference.contains(&format!("`{}`", metric.def.name)),
                "{kind}"
            );
        }
        // Reasons, errnos and queues are open-ended: the page names their form, not each value.
        let open_ended = match &kind {
            Kind::Exit(_) | Kind::KvmExit(_) | Kind::RunError(_) | Kind::Kick(_) => true,
            Kind::Mmio(access) => matches!(access, MmioAccess::Other(_)),
            Kind::Tlb(event) => matches!(event, TlbEvent::Flush(reason) if reason.0 > 4),
            Kind::Pio(_)
            | Kind::Cpuid
            | Kind::Fault(_)
            | Kind::MmuPage(_)
            | Kind::Mem(_)
            | Kind::Memcg(_)
            | Kind::Iommu(_)
            | Kind::Cpu(_)
            | Kind::Unknown(_) => false,
        };
        if open_ended {
            continue;
        }
        for (key, value) in metrics.iter().flat_map(|m| &m.attributes) {
            assert!(reference.contains(&format!("`{key}`")), "{kind}: {key}");
            let value = value.strip_prefix("flush.").unwrap_or(value);
            assert!(
                reference.contains(&format!("`{value}`")),
                "docs/metrics.md lacks {key}={value} ({kind})"
            );
        }
    }
    for gauge in [Gauge::MemoryUsage, Gauge::TaxRatio] {
        let def = gauge.metric().unwrap();
        assert!(reference.contains(&format!("`{}`", def.name)));
    }
}
