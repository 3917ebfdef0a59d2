//! Timelines: every tenant's rates (exits, TLB, faults, memory, tax, ...) and gauges (memory usage,
//! tax ratio) as fixed-interval samples over a window, oldest first. `vmtrace agent` keeps one and
//! serves it at `/api/timeline`; `vmtrace top` draws its trends from one.
//!
//! Stored by column, one ring of `f64` per (tenant, series), so the memory is tenants x series x
//! points x 8 bytes whatever the event rate.
//!
//! `/api/timeline` writes the timeline out one tenant at a time, taking the lock for each tenant
//! only: a reader names the points it started with by their position ([`Points`]), and the agent's
//! timeline keeps [`READ_GRACE`] of points beyond its window, so that a reader that takes up to that
//! long still finds every point it started with.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    time::Duration,
};

#[cfg(test)]
use serde::Serialize;

use crate::{
    kind::{Kind, Series, name_matches},
    sample::sampler::Sample,
};

/// How long a reader of the agent's timeline may take and still find every point it started with:
/// the timeline keeps that much beyond its window (at most as much again as the window).
pub const READ_GRACE: Duration = Duration::from_secs(30);

/// Recent samples of every tenant: views show the newest `capacity` points; `held` are kept.
#[derive(Debug, Clone)]
pub struct Timeline {
    capacity: usize,
    /// Points kept: `capacity` and the grace readers get.
    held: usize,
    /// Points pushed so far: the position of the next one.
    pushed: u64,
    /// Unix time of each point kept, oldest first.
    times: VecDeque<f64>,
    /// Per tenant and series (a counter kind's rate per second, or a gauge): one value per point.
    tenants: BTreeMap<String, BTreeMap<Series, VecDeque<f64>>>,
    /// Tenants kept after they left the samples, at most: the samples carry a bounded number of
    /// tenants, but tenants that come and go within the window would otherwise pile up.
    ended_limit: usize,
}

/// What `/api/timeline` returns: the points' times and each tenant's series.
#[cfg(test)]
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
    /// A timeline of `window` at one point per `interval` (at least one point), which keeps
    /// [`READ_GRACE`] more for readers that write it out while it moves on.
    pub fn new(window: Duration, interval: Duration) -> Self {
        let points = |span: Duration| {
            let points = span.as_secs_f64() / interval.as_secs_f64().max(1e-3);
            points.ceil().max(1.0) as usize
        };
        let capacity = points(window);
        let mut timeline = Self::with_capacity(capacity);
        timeline.held = capacity + points(READ_GRACE).min(capacity);
        timeline
    }

    /// A timeline of the last `capacity` points, with no grace for slow readers.
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            held: capacity,
            pushed: 0,
            times: VecDeque::new(),
            tenants: BTreeMap::new(),
            ended_limit: usize::MAX,
        }
    }

    /// Keeps at most `limit` tenants that have left the samples (those that left first go first),
    /// so that the timeline holds at most the tenants of a sample plus `limit`.
    #[must_use]
    pub fn with_ended_limit(mut self, limit: usize) -> Self {
        self.ended_limit = limit;
        self
    }

    /// Points kept at most.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds a sample as the newest point. A tenant absent from it gets zeros, and leaves once its
    /// series have been zero over every point kept.
    pub fn push(&mut self, sample: &Sample) {
        if self.times.len() == self.held {
            self.times.pop_front();
            for values in self.tenants.values_mut().flat_map(|s| s.values_mut()) {
                values.pop_front();
            }
        }
        self.times.push_back(sample.timestamp);
        self.pushed += 1;
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
        let present: HashSet<&str> = sample.tenants.iter().map(|t| t.tenant.as_str()).collect();
        self.tenants.retain(|name, series| {
            present.contains(&name.as_str()) || series.values().flatten().any(|v| *v != 0.0)
        });
        self.drop_ended_beyond_limit(&present);
    }

    /// Drops the tenants absent from the newest point beyond [`Self::ended_limit`], those whose
    /// last non-zero value is oldest first.
    fn drop_ended_beyond_limit(&mut self, present: &HashSet<&str>) {
        // Most samples have no more ended tenants than the limit: nothing to rank then.
        let ended_count = self
            .tenants
            .keys()
            .filter(|name| !present.contains(name.as_str()))
            .count();
        if ended_count <= self.ended_limit {
            return;
        }
        let mut ended: Vec<(usize, String)> = self
            .tenants
            .iter()
            .filter(|(name, _)| !present.contains(&name.as_str()))
            .map(|(name, series)| {
                let last_set = series
                    .values()
                    .filter_map(|values| values.iter().rposition(|v| *v != 0.0))
                    .max()
                    .unwrap_or(0);
                (last_set, name.clone())
            })
            .collect();
        ended.sort_unstable();
        let excess = ended.len() - self.ended_limit;
        for (_, name) in ended.into_iter().take(excess) {
            self.tenants.remove(&name);
        }
    }

    /// The tenants on the timeline.
    #[cfg(test)]
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.tenants.keys().map(String::as_str)
    }

    /// Index in `times` (and in every series) of the oldest point shown.
    fn first_shown(&self) -> usize {
        self.times.len().saturating_sub(self.capacity)
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
        (self.first_shown()..self.times.len())
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

    /// The newest `limit` points shown (all of them without a limit): where they are, and their
    /// times.
    pub fn newest(&self, limit: Option<usize>) -> (Points, Vec<f64>) {
        let shown = self.times.len() - self.first_shown();
        let count = limit.map_or(shown, |limit| limit.min(shown));
        let from = self.times.len() - count;
        let points = Points {
            first: self.pushed - count as u64,
            count,
        };
        (points, self.times.range(from..).copied().collect())
    }

    /// The tenants on the timeline, or only `tenant` if it is on it.
    pub fn tenant_names(&self, tenant: Option<&str>) -> Vec<String> {
        self.tenants
            .keys()
            .filter(|name| tenant.is_none_or(|t| t == name.as_str()))
            .cloned()
            .collect()
    }

    /// `tenant`'s series whose names match `prefix` (see [`name_matches`]) at `points`, by name;
    /// `None` if the tenant has left the timeline.
    pub fn series(
        &self,
        tenant: &str,
        prefix: Option<&str>,
        points: Points,
    ) -> Result<Option<BTreeMap<String, Vec<f64>>>, MovedOn> {
        let oldest = self.pushed - self.times.len() as u64;
        if points.first < oldest || points.first + points.count as u64 > self.pushed {
            return Err(MovedOn);
        }
        let Some(series) = self.tenants.get(tenant) else {
            return Ok(None);
        };
        let from = (points.first - oldest) as usize;
        Ok(Some(
            series
                .iter()
                .map(|(series, values)| (series.to_string(), values))
                .filter(|(name, _)| prefix.is_none_or(|p| name_matches(name, p)))
                .map(|(name, values)| {
                    (
                        name,
                        values.range(from..from + points.count).copied().collect(),
                    )
                })
                .collect(),
        ))
    }

    /// The timeline, optionally only for one tenant and for series whose names match `prefix`: what
    /// `/api/timeline` writes out.
    #[cfg(test)]
    pub fn view(
        &self,
        interval: Duration,
        tenant: Option<&str>,
        prefix: Option<&str>,
    ) -> TimelineView {
        let (points, timestamps) = self.newest(None);
        let tenants = self
            .tenant_names(tenant)
            .into_iter()
            .filter_map(|name| {
                let series = self.series(&name, prefix, points).ok()??;
                Some((name, series))
            })
            .collect();
        TimelineView {
            interval_secs: interval.as_secs_f64(),
            timestamps,
            tenants,
        }
    }
}

/// Points of a timeline by position, the n-th point ever pushed being point n: they keep their
/// position while newer points arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Points {
    pub first: u64,
    pub count: usize,
}

/// The points a reader started with are no longer kept: it took longer than [`READ_GRACE`].
#[derive(Debug, thiserror::Error)]
#[error("the timeline moved on past the points being read")]
pub struct MovedOn;

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

    #[test]
    fn ended_tenants_beyond_the_limit_go_those_that_left_first_first() {
        let mut timeline = Timeline::with_capacity(10).with_ended_limit(2);
        timeline.push(&sample(
            1.0,
            &[("a", &[("exit.io", 1.0)]), ("b", &[("exit.io", 1.0)])],
        ));
        timeline.push(&sample(2.0, &[("c", &[("exit.io", 1.0)])]));
        timeline.push(&sample(3.0, &[("d", &[("exit.io", 1.0)])]));
        // a and b left first; c has left too; d is in the newest sample.
        let mut kept: Vec<&str> = timeline.tenants().collect();
        kept.sort_unstable();
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert!(kept.contains(&"c") && kept.contains(&"d"), "{kept:?}");
    }

    #[test]
    fn a_reader_finds_the_points_it_started_with_for_the_grace() {
        // 3 s of window at 1 s, and 3 points of grace (READ_GRACE is longer than the window).
        let mut timeline = Timeline::new(Duration::from_secs(3), Duration::from_secs(1));
        for t in 1..=4 {
            timeline.push(&sample(
                f64::from(t),
                &[("a", &[("exit.io", f64::from(t))])],
            ));
        }
        let (points, times) = timeline.newest(Some(2));
        assert_eq!(times, [3.0, 4.0]);
        assert_eq!(timeline.newest(None).1, [2.0, 3.0, 4.0]);
        assert_eq!(timeline.newest(Some(10)).1, [2.0, 3.0, 4.0]);
        // The timeline moves on while the reader writes; its points stay where they were.
        for t in 5..=8 {
            timeline.push(&sample(
                f64::from(t),
                &[("a", &[("exit.io", f64::from(t))])],
            ));
        }
        let series = timeline.series("a", None, points).unwrap().unwrap();
        assert_eq!(series["exit.io"], [3.0, 4.0]);
        assert_eq!(
            timeline.view(Duration::from_secs(1), None, None).timestamps,
            [6.0, 7.0, 8.0]
        );
        assert!(timeline.series("b", None, points).unwrap().is_none());
        // Past the grace they are gone, and the reader is told rather than given other points.
        timeline.push(&sample(9.0, &[("a", &[("exit.io", 9.0)])]));
        assert!(timeline.series("a", None, points).is_err());
    }
}
