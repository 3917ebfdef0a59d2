//! Per-tenant view of a counter snapshot: cgroups resolved to tenants, counts summed per tenant,
//! and rates against the previous snapshot.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use vmtrace_common::LatencyHistogram;

use crate::{
    host::cgroup_index::CgroupIndex,
    kind::{CpuMode, Gauge, Kind},
    probe::counters::{DoorbellKicks, KindCounts, Snapshot},
    probe::latency::{LatencySummary, merge},
    tenant::kubernetes::PodMeta,
    tenant::resolve::Tenant,
};

/// One cgroup that belongs to a tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CgroupRef {
    pub id: u64,
    /// Path below the cgroup v2 root; `None` when the cgroup vanished before it could be named.
    pub path: Option<String>,
}

/// A tenant's counts since the agent started and its rates over the last interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantCounts {
    /// Short label: `pod/<uid>`, `vm/<name>`, `unit/<unit>`, or the cgroup path.
    pub tenant: String,
    pub identity: Option<Tenant>,
    pub cgroups: Vec<CgroupRef>,
    pub counts: KindCounts,
    /// Events per second over the last interval, by kind.
    pub rates: BTreeMap<Kind, f64>,
    /// Values that go up and down, by name (memory usage, the tax ratio).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gauges: BTreeMap<Gauge, f64>,
    /// Latency by kind: for `kvm_exit.*` kinds, exit to the vCPU's next entry (VMX, SVM); for
    /// `exit.*` kinds, the VMM's service time, from the return to the VMM to its next KVM_RUN.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency: BTreeMap<Kind, LatencySummary>,
    /// True on the last sample that reports a tenant whose cgroups were all removed; the tenant is
    /// absent from later samples.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    /// Namespace, pod name and KubeVirt VMI of a pod tenant, where the API server told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<PodMeta>,
    /// Kicks per VMM process, doorbell and queue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub doorbells: Vec<DoorbellKicks>,
}

/// Groups per-cgroup counts by tenant; [`add_rates`] completes them.
pub fn by_tenant(snapshot: &Snapshot, index: &mut CgroupIndex) -> Vec<TenantCounts> {
    let mut tenants: BTreeMap<String, TenantCounts> = BTreeMap::new();
    let mut histograms: BTreeMap<String, BTreeMap<Kind, LatencyHistogram>> = BTreeMap::new();
    let cgroup_ids = snapshot
        .by_cgroup
        .keys()
        .chain(snapshot.latency_by_cgroup.keys());
    let cgroup_ids: BTreeSet<u64> = cgroup_ids.copied().collect();
    for id in cgroup_ids {
        let path = index.resolve(id).map(str::to_owned);
        let identity = path.as_deref().map(Tenant::from_cgroup_path);
        let label = identity
            .as_ref()
            .map_or_else(|| format!("cgroup-id/{id}"), Tenant::label);
        let entry = tenants
            .entry(label.clone())
            .or_insert_with(|| TenantCounts {
                tenant: label,
                identity,
                cgroups: Vec::new(),
                counts: KindCounts::new(),
                rates: BTreeMap::new(),
                gauges: BTreeMap::new(),
                latency: BTreeMap::new(),
                removed: false,
                kubernetes: None,
                doorbells: Vec::new(),
            });
        entry.cgroups.push(CgroupRef { id, path });
        for (kind, count) in snapshot.by_cgroup.get(&id).into_iter().flatten() {
            *entry.counts.entry(kind.clone()).or_default() += count;
        }
        if let Some(kicks) = snapshot.kicks_by_cgroup.get(&id) {
            entry.doorbells.extend(kicks.iter().cloned());
        }
        for (kind, histogram) in snapshot.latency_by_cgroup.get(&id).into_iter().flatten() {
            let merged = histograms
                .entry(entry.tenant.clone())
                .or_default()
                .entry(kind.clone())
                .or_insert(LatencyHistogram::EMPTY);
            merge(merged, histogram);
        }
    }
    for tenant in tenants.values_mut() {
        tenant.removed = tenant.cgroups.iter().all(|c| index.is_removed(c.id));
    }
    for (label, kinds) in histograms {
        if let Some(tenant) = tenants.get_mut(&label) {
            tenant.latency = kinds
                .iter()
                .map(|(k, h)| (k.clone(), LatencySummary::of(h)))
                .collect();
        }
    }
    tenants.into_values().collect()
}

/// Each tenant's counts, by tenant label: what the next interval's rates are computed against.
pub type PreviousCounts = BTreeMap<String, KindCounts>;

/// Sets each tenant's rates against `previous`, the last interval's counts.
pub fn add_rates(tenants: &mut [TenantCounts], previous: &PreviousCounts, interval_secs: f64) {
    for tenant in tenants.iter_mut() {
        let before = previous.get(&tenant.tenant);
        for (kind, &count) in &tenant.counts {
            let prior = before.and_then(|b| b.get(kind)).copied().unwrap_or(0);
            let rate = if interval_secs > 0.0 {
                count.saturating_sub(prior) as f64 / interval_secs
            } else {
                0.0
            };
            tenant.rates.insert(kind.clone(), rate);
        }
        if let Some(ratio) = tax_ratio(&tenant.rates) {
            tenant.gauges.insert(Gauge::TaxRatio, ratio);
        }
    }
}

/// The tax's share of a tenant's CPU time over the last interval, from its rates (ns/s), if it used
/// any CPU.
pub fn tax_ratio(rates: &BTreeMap<Kind, f64>) -> Option<f64> {
    let rate = |kind: Kind| rates.get(&kind).copied().unwrap_or(0.0);
    let tax = rate(Kind::Cpu(CpuMode::TaxKernel)) + rate(Kind::Cpu(CpuMode::TaxVmm));
    let total = tax + rate(Kind::Cpu(CpuMode::Guest));
    (total > 0.0).then(|| tax / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_tax_over_all_cpu() {
        let rates: BTreeMap<Kind, f64> = [
            (Kind::Cpu(CpuMode::TaxKernel), 1e8),
            (Kind::Cpu(CpuMode::TaxVmm), 1e8),
            (Kind::Cpu(CpuMode::Guest), 8e8),
        ]
        .into_iter()
        .collect();
        assert_eq!(tax_ratio(&rates), Some(0.2));
        assert_eq!(tax_ratio(&BTreeMap::new()), None);
    }
}
