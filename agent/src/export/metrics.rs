//! The metrics vmtrace exports, defined once: names (OpenTelemetry, dot-separated), units (UCUM),
//! descriptions, and how a [`Sample`] becomes data points. The OTLP exporter sends these as they are;
//! the Prometheus endpoint shows them under the usual translation (`vmtrace.vm.exits` with unit
//! `{exit}` becomes `vmtrace_vm_exits_total`; a histogram in `s` becomes `..._seconds`).

use serde::Serialize;
use vmtrace_common::LatencyHistogram;

use crate::{sample::sampler::Sample, tenant::aggregate::TenantCounts, tenant::resolve::Tenant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    /// Monotonic, cumulative since the agent started.
    Counter,
    Gauge,
    /// Cumulative explicit-bucket histogram.
    Histogram,
}

/// One metric's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MetricDef {
    pub name: &'static str,
    pub unit: &'static str,
    pub kind: MetricKind,
    pub description: &'static str,
}

pub const VM_EXITS: MetricDef = MetricDef {
    name: "vmtrace.vm.exits",
    unit: "{exit}",
    kind: MetricKind::Counter,
    description: "Every exit of the tenant's guests, once, by source and reason, from the host's one \
                  exit source. Source `kvm_exit` (VMX and SVM hosts): every exit with its hardware \
                  reason. Source `derived` (hosts without kvm_exit, e.g. PVM): the returns to the \
                  VMM by `KVM_EXIT_*` reason, and the exits KVM completes itself, reasons \
                  `mmio.write.kernel` and `cpuid`.",
};
pub const VMM_EXITS: MetricDef = MetricDef {
    name: "vmtrace.vmm.exits",
    unit: "{exit}",
    kind: MetricKind::Counter,
    description: "Returns of KVM_RUN to the VMM, by tenant and `KVM_EXIT_*` reason (every host).",
};
pub const VM_EVENTS: MetricDef = MetricDef {
    name: "vmtrace.vm.events",
    unit: "{event}",
    kind: MetricKind::Counter,
    description: "Guest events KVM handled, by tenant and event: pio.in, pio.out, mmio.read, \
                  mmio.write, mmio.write.kernel (MMIO writes completed in the kernel, e.g. ioeventfd \
                  doorbells), cpuid, run_error.<errno>.",
};
pub const VIRTIO_KICKS: MetricDef = MetricDef {
    name: "vmtrace.virtio.kicks",
    unit: "{kick}",
    kind: MetricKind::Counter,
    description: "Virtio queue kicks (guest writes to doorbells registered with KVM_IOEVENTFD), by \
                  tenant and queue (`any` for doorbells without datamatch).",
};
pub const VM_EXIT_DURATION: MetricDef = MetricDef {
    name: "vmtrace.vm.exit.duration",
    unit: "s",
    kind: MetricKind::Histogram,
    description: "Time from a VM exit to the same vCPU's next entry, by tenant and reason (VMX and \
                  SVM hosts). Buckets are powers of two of nanoseconds.",
};
pub const VMM_SERVICE_DURATION: MetricDef = MetricDef {
    name: "vmtrace.vmm.service.duration",
    unit: "s",
    kind: MetricKind::Histogram,
    description: "Time the VMM took to serve an exit: from KVM_RUN returning to it to its next \
                  KVM_RUN on that vCPU thread, by tenant and reason. Buckets are powers of two of \
                  nanoseconds.",
};
pub const KICK_SERVICE_DURATION: MetricDef = MetricDef {
    name: "vmtrace.virtio.kick.service.duration",
    unit: "s",
    kind: MetricKind::Histogram,
    description: "Time from a queue's first unserved kick to the VMM reading that queue's eventfd, \
                  by tenant and queue (only with --kick-latency).",
};
pub const TLB_EVENTS: MetricDef = MetricDef {
    name: "vmtrace.tlb.events",
    unit: "{event}",
    kind: MetricKind::Counter,
    description: "TLB activity by tenant and event: flush.<reason> (host TLB flushes by VMM \
                  processes, `tlb:tlb_flush` reasons), pv_flush (paravirtual flush requests), \
                  hv_flush, hv_flush_ex (Hyper-V flush hypercalls), exit (kvm_exit reasons that \
                  touch the TLB: CR accesses, INVLPG, INVPCID; VMX and SVM hosts).",
};
pub const MEMORY_FAULTS: MetricDef = MetricDef {
    name: "vmtrace.memory.faults",
    unit: "{fault}",
    kind: MetricKind::Counter,
    description: "Page faults by tenant and type: user (a VMM's own code), kernel (the kernel on a \
                  VMM's memory, e.g. KVM's instruction emulator writing guest memory), guest (EPT/NPT \
                  violations, VMX and SVM hosts), refault (faults on memory the VMM had returned to \
                  the host).",
};
pub const MMU_PAGES: MetricDef = MetricDef {
    name: "vmtrace.kvm.mmu.pages",
    unit: "{page}",
    kind: MetricKind::Counter,
    description: "KVM shadow/TDP page-table pages by tenant and event: created, reused, zapped.",
};
pub const MEMORY_INVALIDATIONS: MetricDef = MetricDef {
    name: "vmtrace.memory.invalidations",
    unit: "{invalidation}",
    kind: MetricKind::Counter,
    description: "Host changes to a VMM's memory by tenant and event: unmap (kvm_unmap_hva_range), \
                  returned (the part of a VMM's madvise discard that was guest memory: a balloon), \
                  age, test_age (reclaim ageing guest memory).",
};
pub const MEMORY_INVALIDATED: MetricDef = MetricDef {
    name: "vmtrace.memory.invalidated",
    unit: "By",
    kind: MetricKind::Counter,
    description: "Bytes of those invalidations by tenant and event: unmap, returned.",
};
pub const MEMORY_USAGE: MetricDef = MetricDef {
    name: "vmtrace.memory.usage",
    unit: "By",
    kind: MetricKind::Gauge,
    description: "Memory charged to the tenant's cgroups (cgroup v2 memory.current, or the v1 \
                  memory controller's usage on hybrid hosts).",
};
pub const MEMORY_CGROUP_EVENTS: MetricDef = MetricDef {
    name: "vmtrace.memory.cgroup.events",
    unit: "{event}",
    kind: MetricKind::Counter,
    description: "Memory events the kernel counted for the tenant's cgroups since they were created: \
                  pgfault (every page fault, including KVM's on a guest's behalf), pgmajfault, \
                  limit_hits, oom_kills.",
};
pub const IOMMU_MAPPINGS: MetricDef = MetricDef {
    name: "vmtrace.iommu.mappings",
    unit: "{mapping}",
    kind: MetricKind::Counter,
    description: "IOMMU mappings made (map) and removed (unmap) by the tenant's tasks (VFIO DMA maps).",
};
pub const IOMMU_MAPPED: MetricDef = MetricDef {
    name: "vmtrace.iommu.mapped",
    unit: "By",
    kind: MetricKind::Counter,
    description: "Bytes of those mappings, by operation (map, unmap).",
};
pub const IOMMU_FAULTS: MetricDef = MetricDef {
    name: "vmtrace.iommu.faults",
    unit: "{fault}",
    kind: MetricKind::Counter,
    description: "IOMMU faults by device and flags, with the tenant whose VMM holds the device \
                  through VFIO (`unattributed` if none does).",
};
pub const CPU_TIME: MetricDef = MetricDef {
    name: "vmtrace.cpu.time",
    unit: "s",
    kind: MetricKind::Counter,
    description: "CPU time of the tenant's cgroups since they were created, by mode: guest (VMM \
                  threads in guest mode), kernel, vmm (user space outside guest mode). kernel + vmm \
                  is the virtualisation tax.",
};
pub const TAX_RATIO: MetricDef = MetricDef {
    name: "vmtrace.virtualization.tax.ratio",
    unit: "1",
    kind: MetricKind::Gauge,
    description: "Share of the tenant's CPU time over the last interval spent outside guest mode.",
};
pub const AGENT_DROPPED: MetricDef = MetricDef {
    name: "vmtrace.agent.events.dropped",
    unit: "{event}",
    kind: MetricKind::Counter,
    description: "Events the probes could not count, by reason (a full map, an unreadable record).",
};
pub const AGENT_TENANTS: MetricDef = MetricDef {
    name: "vmtrace.agent.tenants",
    unit: "{tenant}",
    kind: MetricKind::Gauge,
    description: "Tenants with KVM activity since the agent started.",
};
pub const AGENT_CPU_TIME: MetricDef = MetricDef {
    name: "vmtrace.agent.cpu.time",
    unit: "s",
    kind: MetricKind::Counter,
    description: "CPU time the agent process used, by mode (user, system).",
};
pub const AGENT_MEMORY: MetricDef = MetricDef {
    name: "vmtrace.agent.memory.rss",
    unit: "By",
    kind: MetricKind::Gauge,
    description: "Resident memory of the agent process.",
};
pub const AGENT_EXPORT_DROPPED: MetricDef = MetricDef {
    name: "vmtrace.agent.export.dropped",
    unit: "{export}",
    kind: MetricKind::Counter,
    description: "OTLP export attempts that did not go through (the collector unreachable, slow or \
                  refusing), retried or not; counters are cumulative, so the next export that \
                  succeeds carries everything counted meanwhile.",
};
pub const AGENT_EXPORT_RETRIES: MetricDef = MetricDef {
    name: "vmtrace.agent.export.retries",
    unit: "{export}",
    kind: MetricKind::Counter,
    description: "OTLP exports tried again after a retryable answer (unreachable, UNAVAILABLE, \
                  RESOURCE_EXHAUSTED with RetryInfo, HTTP 429/502/503/504), after a jittered \
                  backoff or the delay the collector asked for.",
};
pub const AGENT_EXPORT_REJECTED_POINTS: MetricDef = MetricDef {
    name: "vmtrace.agent.export.rejected_points",
    unit: "{data_point}",
    kind: MetricKind::Counter,
    description: "Data points the collector accepted the request of but refused \
                  (partial_success.rejected_data_points).",
};
pub const AGENT_SAMPLE_ERRORS: MetricDef = MetricDef {
    name: "vmtrace.agent.sample.errors",
    unit: "{error}",
    kind: MetricKind::Counter,
    description: "Samples the agent could not take (a probe map the kernel refused to read or \
                  delete from); each is skipped and the next interval samples again, so counts since \
                  are still whole.",
};

pub const AGENT_PROBE_ATTACHED: MetricDef = MetricDef {
    name: "vmtrace.agent.probe.attached",
    unit: "1",
    kind: MetricKind::Gauge,
    description: "1 for each probe attached, 0 for each probe that should be attached on this host \
                  and is not (attribute `reason` says why; the agent is then degraded and /readyz \
                  answers 503), by `probe` (category:event). A probe silent on this host or optional \
                  and off is not listed when it is not attached.",
};
pub const BUILD_INFO: MetricDef = MetricDef {
    name: "vmtrace.build.info",
    unit: "1",
    kind: MetricKind::Gauge,
    description: "1, with what the agent is and where it runs as attributes: `version`, \
                  `revision` (the commit it was built from, `unknown` when the build was not told), \
                  `kernel` (the release), `kvm` (vmx, svm, pvm or none) and `exit_source` \
                  (kvm_exit or derived).",
};
pub const AGENT_FIGURE_AVAILABLE: MetricDef = MetricDef {
    name: "vmtrace.agent.figure.available",
    unit: "1",
    kind: MetricKind::Gauge,
    description: "1 for each figure beyond the probes that the agent gives on this host, 0 for \
                  each it cannot (attribute `reason` says why), by `figure`: cpu.guest (the VMM \
                  threads' guest time, so the tax ratio), tlb.dtlb_misses (hardware counters per \
                  VMM thread), iommu.fault.owner (the tenant holding a faulting device). A \
                  container without hostPID cannot give any of the three.",
};
pub const AGENT_MAP_ENTRIES: MetricDef = MetricDef {
    name: "vmtrace.agent.map.entries",
    unit: "{entry}",
    kind: MetricKind::Gauge,
    description: "Entries in each of the probes' hash maps, by `map` (EXIT_COUNTS, DOORBELLS, ...). \
                  A map at its capacity drops what it cannot take, counted in \
                  vmtrace.agent.events.dropped under that map's reason.",
};
pub const AGENT_MAP_CAPACITY: MetricDef = MetricDef {
    name: "vmtrace.agent.map.capacity",
    unit: "{entry}",
    kind: MetricKind::Gauge,
    description: "Capacity (max_entries) of each of the probes' hash maps, by `map`.",
};

pub const AGENT_STATE_ENTRIES: MetricDef = MetricDef {
    name: "vmtrace.agent.state.entries",
    unit: "{entry}",
    kind: MetricKind::Gauge,
    description: "Entries the agent holds per cgroup or tenant, by `state`: cgroup_paths (cgroups \
                  the counters reference), recent_cgroup_paths (paths from the kernel's cgroup \
                  events awaiting counts), cgroups_awaiting_walk (counted ids no event named, reported once the next walk of the hierarchy, at most one a second, names them), \
                  named_tenants, overflowed_tenants (summed into the `overflow` tenant), \
                  accounted_cgroups (cgroups whose CPU and memory figures are kept), \
                  previous_tenants (what rates are computed against), iommu_owners. Each is \
                  bounded by the live tenants; docs/memory-bound.md gives the bound.",
};

/// Every metric, for documentation and tests.
pub const ALL: [MetricDef; 33] = [
    VM_EXITS,
    VMM_EXITS,
    VM_EVENTS,
    VIRTIO_KICKS,
    TLB_EVENTS,
    MEMORY_FAULTS,
    MMU_PAGES,
    MEMORY_INVALIDATIONS,
    MEMORY_INVALIDATED,
    MEMORY_USAGE,
    MEMORY_CGROUP_EVENTS,
    IOMMU_MAPPINGS,
    IOMMU_MAPPED,
    IOMMU_FAULTS,
    CPU_TIME,
    TAX_RATIO,
    VM_EXIT_DURATION,
    VMM_SERVICE_DURATION,
    KICK_SERVICE_DURATION,
    AGENT_DROPPED,
    AGENT_TENANTS,
    AGENT_CPU_TIME,
    AGENT_MEMORY,
    AGENT_EXPORT_DROPPED,
    AGENT_EXPORT_RETRIES,
    AGENT_EXPORT_REJECTED_POINTS,
    AGENT_PROBE_ATTACHED,
    AGENT_FIGURE_AVAILABLE,
    BUILD_INFO,
    AGENT_SAMPLE_ERRORS,
    AGENT_MAP_ENTRIES,
    AGENT_MAP_CAPACITY,
    AGENT_STATE_ENTRIES,
];

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
    /// The kernel's log2 buckets as counted; each exporter renders them (`export::histogram`).
    Histogram(Box<LatencyHistogram>),
}

/// One data point: attributes (OpenTelemetry keys) and a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub attributes: Vec<(&'static str, String)>,
    pub value: Value,
}

/// A metric with its data points.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub def: MetricDef,
    pub points: Vec<Point>,
}

/// The agent's own health, measured by the exporter loop.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgentHealth {
    pub cpu_user_secs: f64,
    pub cpu_system_secs: f64,
    pub rss_bytes: u64,
    pub export_dropped: u64,
    pub export_retries: u64,
    pub export_rejected_points: u64,
    pub sample_errors: u64,
}

/// The kernel's release, read once.
fn kernel_release() -> &'static str {
    static RELEASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RELEASE.get_or_init(crate::host::kernel_release)
}

/// Every metric's data points for one sample.
pub fn families(sample: &Sample, health: &AgentHealth) -> Vec<Family> {
    let mut by_def: Vec<Family> = ALL
        .iter()
        .map(|&def| Family {
            def,
            points: Vec::new(),
        })
        .collect();
    let mut push = |def: MetricDef, attributes: Vec<(&'static str, String)>, value: Value| {
        if let Some(family) = by_def.iter_mut().find(|f| f.def == def) {
            family.points.push(Point { attributes, value });
        }
    };
    for tenant in &sample.tenants {
        let base = tenant_attributes(tenant);
        let with = |attributes: Vec<(&'static str, String)>| {
            let mut all = base.clone();
            all.extend(attributes);
            all
        };
        for (kind, &count) in &tenant.counts {
            for metric in kind
                .metric()
                .into_iter()
                .chain(kind.exit_metric(sample.exit_source))
            {
                push(
                    metric.def,
                    with(metric.attributes),
                    metric.scale.value(count),
                );
            }
        }
        for (gauge, &value) in &tenant.gauges {
            if let Some(def) = gauge.metric() {
                push(def, base.clone(), Value::Float(value));
            }
        }
        for (kind, latency) in &tenant.latency {
            if let Some((def, attributes)) = kind.latency_metric() {
                push(
                    def,
                    with(attributes),
                    Value::Histogram(Box::new(latency.histogram())),
                );
            }
        }
    }
    for fault in &sample.iommu_faults {
        // The tenant's own attributes, so that its faults are on the same series labels (and OTLP
        // Resource) as the rest of its figures; a fault of no known tenant names only itself.
        let mut attributes = sample
            .tenants
            .iter()
            .find(|t| t.tenant == fault.tenant)
            .map_or_else(
                || {
                    vec![
                        ("tenant", fault.tenant.clone()),
                        ("tenant.name", fault.tenant.clone()),
                    ]
                },
                tenant_attributes,
            );
        attributes.extend([
            ("iommu.device", fault.device.clone()),
            ("iommu.flags", fault.flags.to_string()),
        ]);
        push(IOMMU_FAULTS, attributes, Value::Int(fault.faults));
    }
    for (reason, &count) in &sample.drops {
        push(
            AGENT_DROPPED,
            vec![("reason", reason.clone())],
            Value::Int(count),
        );
    }
    push(
        AGENT_TENANTS,
        Vec::new(),
        Value::Int(sample.tenants.len() as u64),
    );
    push(
        AGENT_CPU_TIME,
        vec![("cpu.mode", "user".to_owned())],
        Value::Float(health.cpu_user_secs),
    );
    push(
        AGENT_CPU_TIME,
        vec![("cpu.mode", "system".to_owned())],
        Value::Float(health.cpu_system_secs),
    );
    push(AGENT_MEMORY, Vec::new(), Value::Int(health.rss_bytes));
    push(
        AGENT_EXPORT_DROPPED,
        Vec::new(),
        Value::Int(health.export_dropped),
    );
    push(
        AGENT_EXPORT_RETRIES,
        Vec::new(),
        Value::Int(health.export_retries),
    );
    push(
        AGENT_EXPORT_REJECTED_POINTS,
        Vec::new(),
        Value::Int(health.export_rejected_points),
    );
    for probe in &sample.probes_attached {
        push(
            AGENT_PROBE_ATTACHED,
            vec![("probe", probe.clone())],
            Value::Int(1),
        );
    }
    for failure in &sample.probes_not_attached {
        push(
            AGENT_PROBE_ATTACHED,
            vec![
                ("probe", failure.probe.clone()),
                ("reason", failure.reason.clone()),
            ],
            Value::Int(0),
        );
    }
    push(
        BUILD_INFO,
        vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("revision", env!("VMTRACE_BUILD_REVISION").to_owned()),
            ("kernel", kernel_release().to_owned()),
            ("kvm", sample.kvm.name().to_lowercase()),
            ("exit_source", sample.exit_source.short_name().to_owned()),
        ],
        Value::Int(1),
    );
    for figure in crate::host::figures::FIGURES {
        let unavailable = sample
            .figures_unavailable
            .iter()
            .find(|u| u.figure == figure);
        let mut attributes = vec![("figure", figure.to_owned())];
        attributes.extend(unavailable.map(|u| ("reason", u.reason.clone())));
        push(
            AGENT_FIGURE_AVAILABLE,
            attributes,
            Value::Int(u64::from(unavailable.is_none())),
        );
    }
    push(
        AGENT_SAMPLE_ERRORS,
        Vec::new(),
        Value::Int(health.sample_errors),
    );
    for fill in &sample.maps {
        let map = vec![("map", fill.map.to_owned())];
        push(
            AGENT_MAP_ENTRIES,
            map.clone(),
            Value::Int(fill.entries.into()),
        );
        push(AGENT_MAP_CAPACITY, map, Value::Int(fill.capacity.into()));
    }
    for (state, entries) in sample.state.entries() {
        push(
            AGENT_STATE_ENTRIES,
            vec![("state", state.to_owned())],
            Value::Int(entries as u64),
        );
    }
    by_def
}

/// The probes the metrics show missing, as `probe: reason` lines: empty when none is.
pub fn probes_missing(families: &[Family]) -> Vec<String> {
    families
        .iter()
        .filter(|f| f.def == AGENT_PROBE_ATTACHED)
        .flat_map(|f| &f.points)
        .filter(|p| p.value == Value::Int(0))
        .map(|p| {
            let attribute = |key: &str| {
                p.attributes
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map_or("", |(_, v)| v.as_str())
            };
            format!("{}: {}", attribute("probe"), attribute("reason"))
        })
        .collect()
}

/// `tenant`, the name people read (`tenant.name`), and what is known of who the tenant is.
fn tenant_attributes(tenant: &TenantCounts) -> Vec<(&'static str, String)> {
    let mut attributes = vec![
        ("tenant", tenant.tenant.clone()),
        ("tenant.name", tenant.display_name()),
    ];
    if let Some(pod) = &tenant.kubernetes {
        attributes.push(("k8s.namespace.name", pod.namespace.clone()));
        attributes.push(("k8s.pod.name", pod.name.clone()));
        if let Some(vmi) = &pod.vmi {
            attributes.push(("vm.name", vmi.clone()));
        }
    }
    match &tenant.identity {
        Some(Tenant::KubernetesPod { pod_uid, .. }) => {
            attributes.push(("k8s.pod.uid", pod_uid.clone()));
        }
        Some(Tenant::LibvirtVm { name }) => attributes.push(("vm.name", name.clone())),
        Some(Tenant::SystemdUnit { unit }) => attributes.push(("systemd.unit", unit.clone())),
        Some(Tenant::Path { .. }) | None => {}
    }
    attributes
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn the_metrics_reference_names_every_metric() {
        let reference = include_str!("../../../docs/metrics.md");
        for def in ALL {
            assert!(
                reference.contains(&format!("`{}`", def.name)),
                "docs/metrics.md lacks {}",
                def.name
            );
            assert!(
                reference.contains(&format!("`{}`", def.unit)),
                "docs/metrics.md lacks unit {}",
                def.unit
            );
            assert!(!def.description.is_empty());
        }
    }

    /// One tenant's sample with both the returns to the VMM and the hardware exits of the same
    /// guest, as a VMX host counts them, and the exits KVM completed itself.
    fn sample_from(exit_source: &str) -> Sample {
        let counts = serde_json::json!({
            "exit.io": 100, "exit.mmio": 7, "kvm_exit.io": 100, "kvm_exit.npf": 40,
            "kvm_exit.cpuid": 5, "mmio.write.kernel": 33, "cpuid": 5, "pio.out": 100,
            "mmio.write": 40, "run_error.eintr": 2,
        });
        serde_json::from_value(serde_json::json!({
            "timestamp": 1.0, "elapsed_secs": 1.0, "interval_secs": 1.0, "kvm": "vmx",
            "exit_source": exit_source, "drops": {},
            "tenants": [{"tenant": "/a", "identity": null, "cgroups": [], "counts": counts,
                         "rates": {}}],
        }))
        .unwrap()
    }

    #[test]
    fn a_tenants_exits_sum_once_on_both_exporters() {
        use crate::export::{otlp, prometheus};
        use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};

        // kvm_exit: the hardware exits alone; derived: exit.* + mmio.write.kernel + cpuid.
        for (source, exits) in [("kvm_exit", 100 + 40 + 5), ("derived", 100 + 7 + 33 + 5)] {
            let families = families(&sample_from(source), &AgentHealth::default());
            let text =
                prometheus::encode(&families, crate::export::histogram::BucketFactor::KERNEL)
                    .unwrap();
            let scraped = |name: &str| -> u64 {
                text.lines()
                    .filter(|l| l.starts_with(&format!("{name}{{")))
                    .inspect(|l| {
                        if name == "vmtrace_vm_exits_total" {
                            assert!(l.contains(&format!("exit_source=\"{source}\"")), "{l}");
                        }
                    })
                    .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
                    .sum()
            };
            let request = otlp::request(
                &families,
                &[],
                otlp::HistogramAggregation::default(),
                UNIX_EPOCH,
                UNIX_EPOCH,
            );
            let exported = |name: &str| -> i64 {
                let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
                let Some(Data::Sum(sum)) = &metrics.iter().find(|m| m.name == name).unwrap().data
                else {
                    panic!("{name} is not a sum");
                };
                sum.data_points
                    .iter()
                    .map(|p| match p.value {
                        Some(number_data_point::Value::AsInt(v)) => v,
                        other => panic!("{name}: {other:?}"),
                    })
                    .sum()
            };
            assert_eq!(
                (scraped("vmtrace_vm_exits_total"), exported(VM_EXITS.name)),
                (exits, exits as i64),
                "{source}"
            );
            // The returns to the VMM are exported as such on every host.
            assert_eq!(
                (scraped("vmtrace_vmm_exits_total"), exported(VMM_EXITS.name)),
                (107, 107),
                "{source}"
            );
        }
    }
}
