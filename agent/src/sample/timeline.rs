//! Timelines: every tenant's rates (exits, TLB, faults, memory, tax, ...) and gauges (memory usage,
//! tax ratio) as fixed-interval samples over a window, oldest first. `vmtrace agent` keeps one and
//! serves it at `/api/timeline`; `vmtrace top` draws its trends from one.
//!
//! Stored by column, one ring of `f64` per (tenant, series), so the memory is tenants x series x
//! points x 8 bytes whatever the event rate.

use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use serde::Serialize;

use crate::{
    kind::{Kind, Series, name_matches},
    sample::sampler::Sample,
};

/// Recent samples of every tenant, at most `capacity` of them.
#[derive(Debug, Clone)]
pub struct Timeline {
    capacity: usize,
    /// Unix time of each point, oldest first.
    times: VecDeque<f64>,
    /// Per tenant and series (a counter kind's rate per second, or a gauge): one value per point.
    tenants: BTreeMap<String, BTreeMap<Series, VecDeque<f64>>>,
}

/// What `/api/timeline` returns: the points' times and each tenant's series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineView {
    /// Seconds between points.
    pub interval_secs: f64,
    /// Unix time of each point, oldest first.
    pub timestamps: Vec<f64>,
    /// Per tenant, per series: one value per timestamp (0 where the tenant had none).
    pub tenants: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
}

impl Timeline {
    /// A timeline of `window` at one point per `interval` (at least one point).
    pub fn new(window: Duration, interval: Duration) -> Self {
        let points = window.as_secs_f64() / interval.as_secs_f64().max(1e-3);
        Self::with_capacity(points.ceil().max(1.0) as usize)
    }

    /// A timeline of the last `capacity` points.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            times: VecDeque::new(),
            tenants: BTreeMap::new(),
        }
    }

    /// Points kept at most.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds a sample as the newest point. A tenant absent from it gets zeros, and leaves once its
    /// series have been zero over the whole window.
    pub fn push(&mut self, sample: &Sample) {
        if self.times.len() == self.capacity {
            self.times.pop_front();
            for values in self.tenants.values_mut().flat_map(|s| s.values_mut()) {
                values.pop_front();
            }
        }
        self.times.push_back(sample.timestamp);
        let points = self.times.len();
        for tenant in &sample.tenants {
            let series = self.tenants.entry(tenant.tenant.clone()).or_default();
            let rates = tenant
                .rates
                .iter()
                .map(|(kind, value)| (Series::Rate(kind.clone()), value));
            let gauges = tenant
                .gauges
                .iter()
                .map(|(gauge, value)| (Series::Gauge(gauge.clone()), value));
            for (name, &value) in rates.chain(gauges) {
                series
                    .entry(name)
                    .or_insert_with(|| VecDeque::from(vec![0.0; points - 1]))
                    .push_back(value);
            }
        }
        for series in self.tenants.values_mut() {
            for values in series.values_mut() {
                // Series the sample did not set.
                values.resize(points, 0.0);
            }
        }
        let present: Vec<&str> = sample.tenants.iter().map(|t| t.tenant.as_str()).collect();
        self.tenants.retain(|name, series| {
            present.contains(&name.as_str()) || series.values().flatten().any(|v| *v != 0.0)
        });
    }

    /// The tenants on the timeline.
    #[cfg(test)]
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.tenants.keys().map(String::as_str)
    }

    /// One value per point for `tenant`: `value` applied to its kinds' rates at each point (empty
    /// if the tenant is not on the timeline).
    pub fn values(
        &self,
        tenant: &str,
        value: impl Fn(&dyn Fn(&Kind) -> f64, &[&Kind]) -> f64,
    ) -> Vec<f64> {
        let Some(series) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        let kinds: Vec<&Kind> = series
            .keys()
            .filter_map(|s| match s {
                Series::Rate(kind) => Some(kind),
                Series::Gauge(_) => None,
            })
            .collect();
        (0..self.times.len())
            .map(|i| {
                let at = |kind: &Kind| {
                    series
                        .get(&Series::Rate(kind.clone()))
                        .and_then(|v| v.get(i))
                        .copied()
                };
                value(&|kind| at(kind).unwrap_or(0.0), &kinds)
            })
            .collect()
    }

    /// The timeline, optionally only for one tenant and for series whose names match `prefix` (see
    /// [`name_matches`]).
    pub fn view(
        &self,
        interval: Duration,
        tenant: Option<&str>,
        prefix: Option<&str>,
    ) -> TimelineView {
        let tenants = self
            .tenants
            .iter()
            .filter(|(name, _)| tenant.is_none_or(|t| t == name.as_str()))
            .map(|(name, series)| {
                let series = series
                    .iter()
                    .map(|(series, values)| (series.to_string(), values))
                    .filter(|(name, _)| prefix.is_none_or(|p| name_matches(name, p)))
                    .map(|(name, values)| (name, values.iter().copied().collect()))
                    .collect();
                (name.clone(), series)
            })
            .collect();
        TimelineView {
            interval_secs: interval.as_secs_f64(),
            timestamps: self.times.iter().copied().collect(),
            tenants,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::aggregate::TenantCounts;

    fn sample(timestamp: f64, tenants: &[(&str, &[(&str, f64)])]) -> Sample {
        let tenants: Vec<TenantCounts> = tenants
            .iter()
            .map(|(name, rates)| {
                serde_json::from_value(serde_json::json!({
                    "tenant": name, "identity": null, "cgroups": [], "counts": {},
                    "rates": rates.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
                    "gauges": {"memory.usage_bytes": 4096.0},
                }))
                .unwrap()
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "timestamp": timestamp, "elapsed_secs": timestamp, "interval_secs": 1.0,
            "kvm": "pvm", "exit_source": "derived", "tenants": tenants, "drops": {},
        }))
        .unwrap()
    }

    #[test]
    fn keeps_a_window_of_aligned_series() {
        let mut timeline = Timeline::new(Duration::from_secs(3), Duration::from_secs(1));
        assert_eq!(timeline.capacity(), 3);
        timeline.push(&sample(1.0, &[("a", &[("exit.io", 10.0)])]));
        timeline.push(&sample(
            2.0,
            &[
                ("a", &[("exit.io", 20.0)]),
                ("b", &[("tlb.flush.task_switch", 5.0)]),
            ],
        ));
        timeline.push(&sample(3.0, &[("b", &[("tlb.flush.task_switch", 6.0)])]));
        timeline.push(&sample(
            4.0,
            &[("a", &[("exit.io", 40.0), ("fault.user", 1.0)])],
        ));
        let view = timeline.view(Duration::from_secs(1), None, None);
        assert_eq!(view.timestamps, [2.0, 3.0, 4.0]);
        assert_eq!(view.tenants["a"]["exit.io"], [20.0, 0.0, 40.0]);
        assert_eq!(view.tenants["a"]["fault.user"], [0.0, 0.0, 1.0]);
        assert_eq!(
            view.tenants["a"]["memory.usage_bytes"],
            [4096.0, 0.0, 4096.0]
        );
        assert_eq!(view.tenants["b"]["tlb.flush.task_switch"], [5.0, 6.0, 0.0]);
        let exits = timeline.values("a", |at, _| at(&"exit.io".parse().unwrap()));
        assert_eq!(exits, [20.0, 0.0, 40.0]);

        let only = timeline.view(Duration::from_secs(1), Some("a"), Some("fault."));
        assert_eq!(only.tenants.len(), 1);
        assert_eq!(only.tenants["a"].keys().collect::<Vec<_>>(), ["fault.user"]);
    }

    #[test]
    fn a_tenant_leaves_once_flat_over_the_window() {
        let mut timeline = Timeline::with_capacity(2);
        timeline.push(&sample(1.0, &[("gone", &[("exit.io", 1.0)])]));
        timeline.push(&sample(2.0, &[]));
        assert_eq!(timeline.tenants().collect::<Vec<_>>(), ["gone"]);
        timeline.push(&sample(3.0, &[]));
        assert_eq!(timeline.tenants().count(), 0);
    }
}
