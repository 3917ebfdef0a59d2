//! The metric each kind and gauge is exported as: its definition, its attributes besides the
//! tenant's, and the conversion of its value to the metric's unit.

use crate::export::metrics::{
    CPU_TIME, IOMMU_MAPPED, IOMMU_MAPPINGS, KICK_SERVICE_DURATION, MEMORY_CGROUP_EVENTS,
    MEMORY_FAULTS, MEMORY_INVALIDATED, MEMORY_INVALIDATIONS, MEMORY_USAGE, MMU_PAGES, MetricDef,
    TAX_RATIO, TLB_EVENTS, VIRTIO_KICKS, VM_EVENTS, VM_EXIT_DURATION, VM_EXITS, VMM_EXITS,
    VMM_SERVICE_DURATION, Value,
};
use crate::kind::{
    CpuMode, FaultType, Gauge, IommuOp, Kind, KvmExitReason, Latency, MemEvent, MemcgEvent,
    MmuEvent, Queue, TlbEvent,
};
use crate::probe::load::ExitSource;

/// Attributes of a data point besides the tenant's.
pub type Attributes = Vec<(&'static str, String)>;

/// How a counter's value becomes the metric's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Events or bytes, as counted.
    Count,
    /// CPU time counted in ns, exported in s.
    NanosToSeconds,
}

impl Scale {
    pub fn value(self, count: u64) -> Value {
        match self {
            Self::Count => Value::Int(count),
            Self::NanosToSeconds => Value::Float(count as f64 / 1e9),
        }
    }
}

/// The metric a kind's count is exported as.
#[derive(Debug, Clone, PartialEq)]
pub struct KindMetric {
    pub def: MetricDef,
    pub attributes: Attributes,
    pub scale: Scale,
}

// Returns an Option like every arm of the kind-to-metric match it serves.
#[allow(clippy::unnecessary_wraps)]
fn counted(def: MetricDef, key: &'static str, value: impl Into<String>) -> Option<KindMetric> {
    Some(KindMetric {
        def,
        attributes: vec![(key, value.into())],
        scale: Scale::Count,
    })
}

/// The `virtio.queue` attribute: the queue's index, or `any`.
fn queue_label(queue: Queue) -> String {
    match queue {
        Queue::Index(index) => index.to_string(),
        Queue::Any => "any".to_owned(),
    }
}

impl Kind {
    /// The metric this kind is exported as on its own; `None` for a kind this vmtrace does not
    /// know, and for `kvm_exit.*`, which is only ever one of `vmtrace.vm.exits`' exits
    /// ([`Kind::exit_metric`]).
    pub fn metric(&self) -> Option<KindMetric> {
        match self {
            Self::Exit(reason) => counted(VMM_EXITS, "exit.reason", reason.to_string()),
            Self::KvmExit(_) => None,
            Self::RunError(_) | Self::Pio(_) | Self::Mmio(_) | Self::Cpuid => {
                counted(VM_EVENTS, "event", self.to_string())
            }
            Self::Kick(queue) => counted(VIRTIO_KICKS, "virtio.queue", queue_label(*queue)),
            Self::Tlb(event) => counted(TLB_EVENTS, "tlb.event", tlb_label(*event)),
            Self::Fault(fault) => counted(MEMORY_FAULTS, "fault.type", fault_label(*fault)),
            Self::MmuPage(event) => counted(MMU_PAGES, "mmu.event", mmu_label(*event)),
            Self::Mem(event) => mem_metric(*event),
            Self::Memcg(event) => {
                counted(MEMORY_CGROUP_EVENTS, "memory.event", memcg_label(*event))
            }
            Self::Iommu(op) => iommu_metric(*op),
            Self::Cpu(mode) => Some(KindMetric {
                def: CPU_TIME,
                attributes: vec![("cpu.mode", cpu_label(*mode).to_owned())],
                scale: Scale::NanosToSeconds,
            }),
            Self::Unknown(_) => None,
        }
    }

    /// The `vmtrace.vm.exits` point of this kind in a sample whose exits come from `source`: only
    /// where the kind is one of the tenant's exits by the views' rule ([`Kind::counts_as_exit`]),
    /// so that every sum of the metric counts each exit once and one host exports one source.
    pub fn exit_metric(&self, source: ExitSource) -> Option<KindMetric> {
        let reason = self.exit_reason(source)?;
        Some(KindMetric {
            def: VM_EXITS,
            attributes: vec![
                ("exit.source", source.short_name().to_owned()),
                ("exit.reason", reason),
            ],
            scale: Scale::Count,
        })
    }

    /// The exit reason this kind is counted under in `vmtrace.vm.exits` from `source`, if it is
    /// one of the tenant's exits there.
    pub fn exit_reason(&self, source: ExitSource) -> Option<String> {
        if !self.counts_as_exit(source == ExitSource::KvmExit) {
            return None;
        }
        Some(match self {
            Self::Exit(reason) => reason.to_string(),
            Self::KvmExit(KvmExitReason(name)) => name.clone(),
            // The exits KVM completes itself keep their kinds' names: `mmio.write.kernel`, `cpuid`.
            other => other.to_string(),
        })
    }

    /// The histogram metric of this kind's latency and its attribute, if it has a latency.
    pub fn latency_metric(&self) -> Option<(MetricDef, Attributes)> {
        let latency = self.latency()?;
        let attribute = match self {
            Self::Exit(reason) => ("exit.reason", reason.to_string()),
            Self::KvmExit(KvmExitReason(name)) => ("exit.reason", name.clone()),
            Self::Kick(queue) => ("virtio.queue", queue_label(*queue)),
            Self::RunError(_)
            | Self::Pio(_)
            | Self::Mmio(_)
            | Self::Cpuid
            | Self::Tlb(_)
            | Self::Fault(_)
            | Self::MmuPage(_)
            | Self::Mem(_)
            | Self::Memcg(_)
            | Self::Iommu(_)
            | Self::Cpu(_)
            | Self::Unknown(_) => return None,
        };
        let def = match latency {
            Latency::ExitToEntry => VM_EXIT_DURATION,
            Latency::VmmService => VMM_SERVICE_DURATION,
            Latency::KickService => KICK_SERVICE_DURATION,
        };
        Some((def, vec![attribute]))
    }
}

impl Gauge {
    /// The metric this gauge is exported as; `None` for a gauge this vmtrace does not know.
    pub fn metric(&self) -> Option<MetricDef> {
        match self {
            Self::MemoryUsage => Some(MEMORY_USAGE),
            Self::TaxRatio => Some(TAX_RATIO),
            Self::Unknown(_) => None,
        }
    }
}

fn tlb_label(event: TlbEvent) -> String {
    match event {
        TlbEvent::Flush(reason) => format!("flush.{reason}"),
        TlbEvent::PvFlush
        | TlbEvent::PvFlushSkipped
        | TlbEvent::HvFlush
        | TlbEvent::HvFlushEx
        | TlbEvent::Exit
        | TlbEvent::DtlbLoadMiss
        | TlbEvent::DtlbStoreMiss => event.name().unwrap_or_default().to_owned(),
    }
}

fn fault_label(fault: FaultType) -> &'static str {
    match fault {
        FaultType::User => "user",
        FaultType::Kernel => "kernel",
        FaultType::Guest => "guest",
    }
}

fn mmu_label(event: MmuEvent) -> &'static str {
    match event {
        MmuEvent::Created => "created",
        MmuEvent::Reused => "reused",
        MmuEvent::Zapped => "zapped",
    }
}

fn mem_metric(event: MemEvent) -> Option<KindMetric> {
    let (def, key, label) = match event {
        MemEvent::Refault => (MEMORY_FAULTS, "fault.type", "refault"),
        MemEvent::UnmapBytes => (MEMORY_INVALIDATED, "memory.event", "unmap"),
        MemEvent::ReturnedBytes => (MEMORY_INVALIDATED, "memory.event", "returned"),
        MemEvent::Unmap => (MEMORY_INVALIDATIONS, "memory.event", "unmap"),
        MemEvent::Returned => (MEMORY_INVALIDATIONS, "memory.event", "returned"),
        MemEvent::Age => (MEMORY_INVALIDATIONS, "memory.event", "age"),
        MemEvent::TestAge => (MEMORY_INVALIDATIONS, "memory.event", "test_age"),
    };
    counted(def, key, label)
}

fn memcg_label(event: MemcgEvent) -> &'static str {
    match event {
        MemcgEvent::Pgfault => "pgfault",
        MemcgEvent::Pgmajfault => "pgmajfault",
        MemcgEvent::LimitHits => "limit_hits",
        MemcgEvent::OomKills => "oom_kills",
    }
}

fn iommu_metric(op: IommuOp) -> Option<KindMetric> {
    let (def, label) = match op {
        IommuOp::Map => (IOMMU_MAPPINGS, "map"),
        IommuOp::Unmap => (IOMMU_MAPPINGS, "unmap"),
        IommuOp::MapBytes => (IOMMU_MAPPED, "map"),
        IommuOp::UnmapBytes => (IOMMU_MAPPED, "unmap"),
    };
    counted(def, "iommu.operation", label)
}

fn cpu_label(mode: CpuMode) -> &'static str {
    match mode {
        CpuMode::Guest => "guest",
        CpuMode::TaxKernel => "kernel",
        CpuMode::TaxVmm => "vmm",
    }
}
