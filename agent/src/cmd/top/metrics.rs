//! One tenant's row in `top`: the handful of figures an SRE scans first, derived from the tenant's
//! counts, rates and latencies in a sample. Pure, so sorting and formatting are unit-tested.
//!
//! Metrics whose probes do not exist on this host (or in this vmtrace yet) are `None` and shown as
//! "–": each kind names its column ([`Kind::top_column`]): TLB flushes, faults, the
//! virtualisation tax (nanoseconds of host CPU spent outside guest mode, so their rate in ns/s is a
//! share of one CPU). They appear as soon as a sample carries such kinds.

use crate::{
    kind::{Kind, Latency, TopColumn},
    probe::latency::LatencySummary,
    tenant::aggregate::TenantCounts,
};

/// What `top` shows for one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRow {
    pub tenant: String,
    /// What the TENANT column shows: the namespace and pod (or VM) where known.
    pub name: String,
    /// Exits per second: every `kvm_exit.*` where the host emits kvm_exit; else exits to the VMM
    /// (`exit.*`) plus the exits the kernel served itself that the probes see (`mmio.write.kernel`,
    /// `cpuid`). See [`Kind::counts_as_exit`].
    pub exits: f64,
    /// The exit kind with the highest rate (or, when idle, the highest count), short name.
    pub top_reason: Option<String>,
    /// The kind behind `top_reason`, e.g. `exit.io`.
    pub top_kind: Option<Kind>,
    /// p99 latency of the top reason (VMM service time for `exit.*`, exit to entry for
    /// `kvm_exit.*`), else of the exit kind with the most measured latencies.
    pub p99_ns: Option<u64>,
    /// Virtio kicks per second, all queues.
    pub kicks: f64,
    pub tlb: Option<f64>,
    pub faults: Option<f64>,
    /// Share of one CPU spent on the tenant's exits (1.0 = one CPU).
    pub tax: Option<f64>,
}

/// Whether a tenant with these kinds has its exits from kvm_exit (which already includes every
/// other kind's exits).
pub fn has_hardware_exits<'a>(mut kinds: impl Iterator<Item = &'a Kind>) -> bool {
    kinds.any(Kind::is_hardware_exit)
}

/// Exits per second at one point of a timeline: `at` gives a kind's rate, `kinds` the tenant's
/// kinds (the same kinds [`tenant_row`] sums).
pub fn exits_at(at: &dyn Fn(&Kind) -> f64, kinds: &[&Kind]) -> f64 {
    let hardware = has_hardware_exits(kinds.iter().copied());
    kinds
        .iter()
        .filter(|k| k.counts_as_exit(hardware))
        .map(|k| at(k))
        .sum()
}

fn sum_rates(t: &TenantCounts, column: TopColumn) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for (kind, rate) in &t.rates {
        if kind.top_column() == column {
            found = true;
            sum += rate;
        }
    }
    // A kind with a count but no rate yet (first sample) still shows that the metric exists.
    found |= t.counts.keys().any(|k| k.top_column() == column);
    found.then_some(sum)
}

pub fn tenant_row(t: &TenantCounts) -> TenantRow {
    let hardware = has_hardware_exits(t.counts.keys());
    let exit_kinds: Vec<&Kind> = t
        .counts
        .keys()
        .filter(|k| k.counts_as_exit(hardware))
        .collect();
    let rate = |k: &Kind| t.rates.get(k).copied().unwrap_or(0.0);
    let exits = exit_kinds.iter().map(|k| rate(k)).sum();
    let top_kind = exit_kinds
        .iter()
        .copied()
        .filter(|k| t.counts.get(*k).copied().unwrap_or(0) > 0)
        .max_by(|a, b| {
            rate(a)
                .total_cmp(&rate(b))
                .then(t.counts[*a].cmp(&t.counts[*b]))
                // Equal: the alphabetically first wins (max_by keeps the last of equals).
                .then(b.cmp(a))
        })
        .cloned();
    let p99_ns = top_kind
        .as_ref()
        .and_then(|k| t.latency.get(k))
        .filter(|l| l.count > 0)
        .or_else(|| busiest_latency(t, hardware))
        .map(|l| l.p99_ns);
    TenantRow {
        tenant: t.tenant.clone(),
        name: t.display_name(),
        exits,
        top_reason: top_kind.as_ref().map(Kind::reason_name),
        top_kind,
        p99_ns,
        kicks: sum_rates(t, TopColumn::Kicks).unwrap_or(0.0),
        tlb: sum_rates(t, TopColumn::Tlb),
        faults: sum_rates(t, TopColumn::Faults),
        tax: sum_rates(t, TopColumn::Tax).map(|ns_per_s| ns_per_s / 1e9),
    }
}

/// The exit kind's latency with the most measurements: exit to entry, or where the host has no
/// kvm_exit, the VMM's service time.
fn busiest_latency(t: &TenantCounts, hardware: bool) -> Option<&LatencySummary> {
    t.latency
        .iter()
        .filter(|(k, l)| {
            l.count > 0
                && match k.latency() {
                    Some(Latency::ExitToEntry) => true,
                    Some(Latency::VmmService) => !hardware,
                    Some(Latency::KickService) | None => false,
                }
        })
        .max_by_key(|(_, l)| l.count)
        .map(|(_, l)| l)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A tenant with `(kind, count, rate)` entries and `(kind, p99)` latencies.
    pub(crate) fn tenant(
        name: &str,
        kinds: &[(&str, u64, f64)],
        p99: &[(&str, u64)],
    ) -> TenantCounts {
        let latency: BTreeMap<&str, serde_json::Value> = p99
            .iter()
            .map(|(k, p)| {
                let summary = serde_json::json!({
                    "count": 100, "mean_ns": p / 2, "p50_ns": p / 2, "p90_ns": p,
                    "p99_ns": p, "max_ns": p, "buckets": [[p.next_power_of_two() / 2, 100]],
                });
                (*k, summary)
            })
            .collect();
        // Through serde, as a recording is read: fields added to the type later take defaults.
        serde_json::from_value(serde_json::json!({
            "tenant": name,
            "identity": null,
            "cgroups": [],
            "counts": kinds.iter().map(|(k, c, _)| (*k, *c)).collect::<BTreeMap<_, _>>(),
            "rates": kinds.iter().map(|(k, _, r)| (*k, *r)).collect::<BTreeMap<_, _>>(),
            "latency": latency,
        }))
        .unwrap()
    }

    #[test]
    fn derived_exits_are_vmm_exits_plus_kernel_served_ones() {
        let t = tenant(
            "b",
            &[
                ("exit.io", 100, 10.0),
                ("pio.out", 100, 10.0),
                ("mmio.write", 500, 50.0),
                ("mmio.write.kernel", 500, 50.0),
                ("kick.any", 500, 50.0),
                ("cpuid", 7, 1.0),
            ],
            &[("exit.io", 20_000)],
        );
        let row = tenant_row(&t);
        assert_eq!(row.exits, 61.0);
        assert_eq!(row.top_reason.as_deref(), Some("mmio.kern"));
        // The top reason has no latency: the busiest exit kind's p99 stands in.
        assert_eq!(row.p99_ns, Some(20_000));
        assert_eq!(row.kicks, 50.0);
        assert_eq!((row.tlb, row.faults, row.tax), (None, None, None));
    }

    #[test]
    fn hardware_exits_use_kvm_exit_only_and_future_kinds_appear() {
        let t = tenant(
            "vm/web",
            &[
                ("kvm_exit.EPT_VIOLATION", 10, 5.0),
                ("kvm_exit.HLT", 30, 3.0),
                ("exit.io", 9, 2.0),
                ("tlb.flush", 4, 4.0),
                ("tax", 1, 250_000_000.0),
            ],
            &[("kvm_exit.EPT_VIOLATION", 3_000), ("kvm_exit.HLT", 9_000)],
        );
        let row = tenant_row(&t);
        assert_eq!(row.exits, 8.0);
        assert_eq!(row.top_reason.as_deref(), Some("EPT_VIOLATION"));
        assert_eq!(row.p99_ns, Some(3_000));
        assert_eq!(row.tlb, Some(4.0));
        assert_eq!(row.tax, Some(0.25));
        assert_eq!(row.faults, None);
    }

    #[test]
    fn an_idle_tenant_names_its_most_counted_reason() {
        let t = tenant("c", &[("exit.hlt", 3, 0.0), ("exit.io", 9, 0.0)], &[]);
        let row = tenant_row(&t);
        assert_eq!(row.top_reason.as_deref(), Some("io"));
        assert_eq!(row.p99_ns, None);
        let empty = tenant_row(&tenant("d", &[], &[]));
        assert_eq!(empty.top_reason, None);
        assert_eq!(empty.exits, 0.0);
    }
}
