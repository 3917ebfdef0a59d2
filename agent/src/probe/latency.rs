//! Exit latency histograms as the agent reports them: merged across CPUs and cgroups, summarised as
//! percentiles.

use serde::{Deserialize, Serialize};
use vmtrace_common::{LATENCY_BUCKETS, LatencyHistogram};

/// Adds `other` into `into` (per-CPU copies, or the cgroups of one tenant).
pub fn merge(into: &mut LatencyHistogram, other: &LatencyHistogram) {
    for (a, b) in into.buckets.iter_mut().zip(other.buckets.iter()) {
        *a += b;
    }
    into.count += other.count;
    into.sum_ns += other.sum_ns;
    into.max_ns = into.max_ns.max(other.max_ns);
}

/// A histogram's summary. Percentiles are the upper bound of the log2 bucket that holds them (so
/// within a factor of two above the true value), capped at the largest latency seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    /// Sum of all latencies, for exact means over any window.
    #[serde(default)]
    pub sum_ns: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    /// Non-empty buckets as `[lowest ns, count]`: the bucket holds latencies from its lowest ns up to
    /// twice that (exclusive).
    pub buckets: Vec<(u64, u64)>,
}

impl LatencySummary {
    pub fn of(h: &LatencyHistogram) -> Self {
        let percentile = |q: f64| {
            let rank = ((q * h.count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, &n) in h.buckets.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return bucket_upper_ns(i).min(h.max_ns);
                }
            }
            h.max_ns
        };
        Self {
            count: h.count,
            sum_ns: h.sum_ns,
            mean_ns: h.sum_ns.checked_div(h.count).unwrap_or(0),
            p50_ns: percentile(0.50),
            p90_ns: percentile(0.90),
            p99_ns: percentile(0.99),
            max_ns: h.max_ns,
            buckets: h
                .buckets
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, &n)| (bucket_lower_ns(i), n))
                .collect(),
        }
    }
}

impl LatencySummary {
    /// The kernel's histogram this summary was made of.
    pub fn histogram(&self) -> LatencyHistogram {
        let mut h = LatencyHistogram {
            count: self.count,
            sum_ns: self.sum_ns,
            max_ns: self.max_ns,
            ..LatencyHistogram::EMPTY
        };
        for &(lowest_ns, count) in &self.buckets {
            h.buckets[LatencyHistogram::bucket(lowest_ns)] += count;
        }
        h
    }
}

/// Lowest latency of bucket `i`: 2^i ns (bucket 0 starts at 0).
pub fn bucket_lower_ns(i: usize) -> u64 {
    if i == 0 { 0 } else { 1 << i }
}

/// Highest latency of bucket `i`: 2^(i+1) - 1 ns, unbounded for the last bucket.
fn bucket_upper_ns(i: usize) -> u64 {
    if i + 1 >= LATENCY_BUCKETS {
        u64::MAX
    } else {
        (1 << (i + 1)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_bucket_upper_bounds_capped_at_max() {
        let mut h = LatencyHistogram::EMPTY;
        for _ in 0..98 {
            h.record(1_000); // bucket 9: 512..1023
        }
        h.record(100_000); // bucket 16: 65536..131071
        h.record(5_000_000); // bucket 22
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ns, 1023);
        assert_eq!(s.p90_ns, 1023);
        assert_eq!(s.p99_ns, 131_071);
        assert_eq!(s.max_ns, 5_000_000);
        assert_eq!(s.mean_ns, (98 * 1_000 + 100_000 + 5_000_000) / 100);
        assert_eq!(s.buckets, vec![(512, 98), (65_536, 1), (4_194_304, 1)]);
        let mut merged = LatencyHistogram::EMPTY;
        merge(&mut merged, &h);
        merge(&mut merged, &h);
        assert_eq!(LatencySummary::of(&merged).count, 200);
        assert_eq!(LatencySummary::of(&LatencyHistogram::EMPTY).p99_ns, 0);
    }
}
