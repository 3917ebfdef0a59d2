//! Per-tenant view of a counter snapshot: cgroups resolved to tenants, counts summed per tenant,
//! and rates against the previous snapshot.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::Instant,
};

use serde::{Deserialize, Serialize};

use vmtrace_common::LatencyHistogram;

use crate::{
    host::cgroup_index::CgroupIndex,
    kind::{CpuMode, Gauge, Kind},
    probe::counters::{DoorbellKicks, Snapshot},
    probe::exit_counts::KindCounts,
    probe::latency::{LatencySummary, merge},
    probe::threads::ThreadExits,
    tenant::kubernetes::{PodDirectory, PodMeta},
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
    /// Exit events per VMM thread (vCPU), where the probes count them (`top`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub threads: Vec<ThreadExits>,
}

impl TenantCounts {
    /// The name people read: `<namespace>/<VMI>` for a KubeVirt VM's pod, `<namespace>/<pod>` for
    /// another pod the API server named, else the tenant label (`vm/<name>`, `unit/<unit>`, the
    /// path, or `pod/<uid>` while the pod is not known).
    pub fn display_name(&self) -> String {
        match &self.kubernetes {
            Some(pod) => format!(
                "{}/{}",
                pod.namespace,
                pod.vmi.as_deref().unwrap_or(&pod.name)
            ),
            None => self.tenant.clone(),
        }
    }
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
    // The index holds the referenced ids only: those whose counters were deleted go.
    let now = Instant::now();
    index.retain(&cgroup_ids, now);
    // Ids waiting for a walk to name them are reported once named (their counts are totals, so
    // nothing is lost by waiting).
    let waiting = index.refresh(&cgroup_ids, now);
    for id in cgroup_ids.into_iter().filter(|id| !waiting.contains(id)) {
        let path = index.path(id).map(str::to_owned);
        let identity = path.as_deref().map(Tenant::from_cgroup_path);
        let label = identity
            .as_ref()
            .map_or_else(|| format!("cgroup-id/{id}"), Tenant::label);
        let entry = tenants
            .entry(label.clone())
            .or_insert_with(|| empty_tenant(label, identity));
        entry.cgroups.push(CgroupRef { id, path });
        match snapshot.by_cgroup.get(&id) {
            // Most tenants are one cgroup: a copy of its map, which compares no kinds.
            Some(counts) if entry.counts.is_empty() => entry.counts.clone_from(counts),
            Some(counts) => {
                for (kind, count) in counts {
                    *entry.counts.entry(kind.clone()).or_default() += count;
                }
            }
            None => {}
        }
        if let Some(kicks) = snapshot.kicks_by_cgroup.get(&id) {
            entry.doorbells.extend(kicks.iter().cloned());
        }
        if let Some(threads) = snapshot.threads_by_cgroup.get(&id) {
            entry.threads.extend(threads.iter().cloned());
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

/// The label of the tenant that takes the counts of every tenant beyond the cap.
pub const OVERFLOW_TENANT: &str = "overflow";
/// How many tenants are reported by name unless told otherwise.
pub const DEFAULT_MAX_TENANTS: usize = 1000;

/// Reports at most `max` tenants by name and sums the others into one [`OVERFLOW_TENANT`], as the
/// OpenTelemetry SDK's cardinality limit does, so that a host with very many tenants cannot swell
/// the agent or its exporters.
///
/// Which tenants are named is stable: first come, first kept (tenants new in the same sample in
/// label order); a tenant stays where it was put until it ends, and a named tenant that ends frees
/// its slot for the next new one. The overflow tenant is a counter like any other: it keeps the
/// last counts of the tenants it held that have ended, so the sum over all tenants, overflow
/// included, equals the sum without the cap and never goes down.
#[derive(Debug)]
pub struct TenantCap {
    max: usize,
    /// Tenants reported by name.
    kept: HashSet<String>,
    /// Tenants summed into the overflow tenant, with their last counts.
    overflowed: HashMap<String, KindCounts>,
    /// Last counts of the overflowed tenants that have ended.
    ended: KindCounts,
}

impl TenantCap {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            kept: HashSet::new(),
            overflowed: HashMap::new(),
            ended: KindCounts::new(),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Tenants reported by name, and tenants held in the overflow tenant.
    pub fn sizes(&self) -> (usize, usize) {
        (self.kept.len(), self.overflowed.len())
    }

    /// The tenants to report: the kept ones as they are, the others summed into one.
    pub fn apply(&mut self, tenants: Vec<TenantCounts>) -> Vec<TenantCounts> {
        let present: HashSet<&str> = tenants.iter().map(|t| t.tenant.as_str()).collect();
        self.kept.retain(|label| present.contains(label.as_str()));
        let ended: Vec<String> = self
            .overflowed
            .keys()
            .filter(|label| !present.contains(label.as_str()))
            .cloned()
            .collect();
        for label in ended {
            if let Some(counts) = self.overflowed.remove(&label) {
                add_counts(&mut self.ended, &counts);
            }
        }
        let mut reported = Vec::with_capacity(tenants.len().min(self.max + 1));
        let mut overflow = empty_tenant(OVERFLOW_TENANT.to_owned(), None);
        let mut overflowing = !self.ended.is_empty();
        for tenant in tenants {
            let keep = if self.kept.contains(&tenant.tenant) {
                true
            } else if self.overflowed.contains_key(&tenant.tenant) {
                false
            } else if self.kept.len() < self.max {
                self.kept.insert(tenant.tenant.clone());
                true
            } else {
                false
            };
            if keep {
                reported.push(tenant);
                continue;
            }
            overflowing = true;
            add_counts(&mut overflow.counts, &tenant.counts);
            if let Some(usage) = tenant.gauges.get(&Gauge::MemoryUsage) {
                *overflow.gauges.entry(Gauge::MemoryUsage).or_default() += usage;
            }
            self.overflowed.insert(tenant.tenant, tenant.counts);
        }
        if overflowing {
            add_counts(&mut overflow.counts, &self.ended);
            reported.push(overflow);
        }
        reported
    }
}

impl Default for TenantCap {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_TENANTS)
    }
}

/// Adds `more` to `counts`, kind by kind.
/// Adds what the API server knows to the pod tenants among `tenants`.
pub fn name_pods(tenants: &mut [TenantCounts], directory: &PodDirectory) {
    let pods = directory.read().expect("pod directory lock");
    for tenant in tenants {
        if let Some(Tenant::KubernetesPod { pod_uid, .. }) = &tenant.identity {
            tenant.kubernetes = pods.get(pod_uid).cloned();
        }
    }
}

fn add_counts(counts: &mut KindCounts, more: &KindCounts) {
    for (kind, count) in more {
        *counts.entry(kind.clone()).or_default() += count;
    }
}

/// A tenant with nothing counted yet.
fn empty_tenant(label: String, identity: Option<Tenant>) -> TenantCounts {
    TenantCounts {
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
        threads: Vec::new(),
    }
}

/// Each tenant's counts, by tenant label: what the next interval's rates are computed against.
pub type PreviousCounts = BTreeMap<String, KindCounts>;

/// Sets each tenant's rates against `previous`, the last interval's counts, and where the host
/// knows guest time (`guest_time_known`), the tax ratio.
pub fn add_rates(
    tenants: &mut [TenantCounts],
    previous: &PreviousCounts,
    interval_secs: f64,
    guest_time_known: bool,
) {
    for tenant in tenants.iter_mut() {
        // Both maps are in kind order, and mostly of the same kinds: the previous one is walked
        // alongside (an equality test per kind, where a lookup would compare names), and the
        // rates come out in order, which builds their map without a search per kind.
        let mut before = previous
            .get(&tenant.tenant)
            .into_iter()
            .flatten()
            .peekable();
        let mut rates: BTreeMap<Kind, f64> = tenant
            .counts
            .iter()
            .map(|(kind, &count)| {
                while before.next_if(|(k, _)| *k != kind && *k < kind).is_some() {}
                let prior = before.next_if(|(k, _)| *k == kind).map_or(0, |(_, c)| *c);
                let rate = if interval_secs > 0.0 {
                    count.saturating_sub(prior) as f64 / interval_secs
                } else {
                    0.0
                };
                (kind.clone(), rate)
            })
            .collect();
        tenant.rates.append(&mut rates);
        // Without guest time every CPU second would look like tax: 100%, which the host cannot
        // know.
        if guest_time_known && let Some(ratio) = tax_ratio(&tenant.rates) {
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

    fn tenant(label: &str, exits: u64) -> TenantCounts {
        let mut tenant = empty_tenant(label.to_owned(), None);
        tenant.counts.insert(Kind::Cpuid, exits);
        tenant
    }

    fn reported(tenants: &[TenantCounts]) -> BTreeMap<&str, u64> {
        tenants
            .iter()
            .map(|t| (t.tenant.as_str(), t.counts[&Kind::Cpuid]))
            .collect()
    }

    #[test]
    fn tenants_beyond_the_cap_are_summed_into_a_stable_overflow_tenant() {
        let mut cap = TenantCap::new(2);
        let first = cap.apply(vec![tenant("a", 1), tenant("b", 2)]);
        assert_eq!(reported(&first), BTreeMap::from([("a", 1), ("b", 2)]));
        // Later tenants overflow even where their labels sort first.
        let second = cap.apply(vec![
            tenant("0", 10),
            tenant("a", 3),
            tenant("b", 4),
            tenant("c", 20),
        ]);
        assert_eq!(
            reported(&second),
            BTreeMap::from([("a", 3), ("b", 4), (OVERFLOW_TENANT, 30)])
        );
        // `a` ends: its slot goes to the next new tenant, not to one already in the overflow, and
        // the overflow tenant keeps what its ended tenants counted.
        let third = cap.apply(vec![tenant("b", 5), tenant("c", 21), tenant("d", 7)]);
        assert_eq!(
            reported(&third),
            BTreeMap::from([("b", 5), ("d", 7), (OVERFLOW_TENANT, 31)])
        );
        let fourth = cap.apply(vec![tenant("b", 6), tenant("d", 8)]);
        assert_eq!(
            reported(&fourth),
            BTreeMap::from([("b", 6), ("d", 8), (OVERFLOW_TENANT, 31)])
        );
        assert_eq!(cap.sizes(), (2, 0));
    }

    #[test]
    fn totals_with_the_cap_equal_totals_without_it() {
        let mut cap = TenantCap::new(3);
        let tenants: Vec<TenantCounts> = (0..50).map(|i| tenant(&format!("t{i:02}"), i)).collect();
        let total: u64 = tenants.iter().map(|t| t.counts[&Kind::Cpuid]).sum();
        let capped = cap.apply(tenants);
        assert_eq!(capped.len(), 4);
        assert_eq!(reported(&capped).values().sum::<u64>(), total);
        assert!(
            TenantCap::new(3).apply(vec![tenant("x", 1)]).len() == 1,
            "no overflow tenant"
        );
    }
}
