//! How the kernel's latency histograms leave the agent. The probes count latencies in log2 buckets
//! of nanoseconds (bucket k holds floor(log2(ns)) = k; bucket 0 also holds 0 ns; the last bucket
//! everything above). Both renderings here only add buckets together, never split one, so every
//! exported count is the kernel's:
//! - explicit bounds at every power of two of nanoseconds, or every `factor`-th one for a
//!   Prometheus endpoint that should cost fewer series ([`BucketFactor`]);
//! - an OTLP exponential histogram at scale 0 (base 2), whose buckets are the kernel's one to one.

use vmtrace_common::{LATENCY_BUCKETS, LatencyHistogram};

/// The ratio between consecutive explicit bounds, a power of two: 2 keeps every kernel bucket
/// (39 bounds and +Inf); 16 keeps every fourth bound (9 and +Inf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketFactor {
    log2: u32,
}

impl BucketFactor {
    /// The kernel's own buckets.
    pub const KERNEL: Self = Self { log2: 1 };
    /// The largest factor accepted: 2^10 leaves bounds at about 1 µs, 1 ms and 1 s.
    const MAX_LOG2: u32 = 10;

    /// Parses `2`, `4`, ... `1024`; `what` names the setting in the error.
    pub fn parse(text: &str, what: &str) -> Result<Self, String> {
        match text.trim().parse::<u64>() {
            Ok(factor)
                if factor.is_power_of_two()
                    && (1..=Self::MAX_LOG2).contains(&factor.trailing_zeros()) =>
            {
                Ok(Self {
                    log2: factor.trailing_zeros(),
                })
            }
            _ => Err(format!(
                "{what} = `{text}`: give a power of two from 2 (every kernel bucket, the default) \
                 to {}",
                1u64 << Self::MAX_LOG2
            )),
        }
    }

    pub fn factor(self) -> u64 {
        1 << self.log2
    }

    /// The kernel bucket indices that start a bucket of their own: the bounds, in ns, are 2^i.
    fn bound_indices(self) -> impl Iterator<Item = usize> {
        (1..LATENCY_BUCKETS).filter(move |i| (*i as u32).is_multiple_of(self.log2))
    }

    /// How many explicit bounds (+Inf aside) a histogram has at this factor.
    pub fn bounds(self) -> usize {
        self.bound_indices().count()
    }
}

/// Explicit buckets: `counts[j]` holds the latencies below `bounds[j]` and at or above the bound
/// before; the last count (`counts.len() == bounds.len() + 1`) is everything above the last bound.
#[derive(Debug, Clone, PartialEq)]
pub struct ExplicitBuckets {
    pub bounds_secs: Vec<f64>,
    pub counts: Vec<u64>,
}

pub fn explicit(histogram: &LatencyHistogram, factor: BucketFactor) -> ExplicitBuckets {
    let mut bounds_secs = Vec::new();
    let mut counts = Vec::new();
    let mut first = 0;
    for bound in factor.bound_indices() {
        bounds_secs.push((1u64 << bound) as f64 / 1e9);
        counts.push(histogram.buckets[first..bound].iter().sum());
        first = bound;
    }
    counts.push(histogram.buckets[first..].iter().sum());
    ExplicitBuckets {
        bounds_secs,
        counts,
    }
}

/// An OTLP exponential histogram at scale 0, in nanoseconds: bucket index i holds (2^i, 2^(i+1)],
/// the zero bucket [0, [`ZERO_THRESHOLD_NS`]]. Kernel bucket k ≥ 1 is index k, kernel bucket 0
/// (0 and 1 ns) the zero bucket. Only a latency of exactly 2^k ns lands one bucket higher than
/// the definition says, as with the explicit bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct ExponentialBuckets {
    pub zero_count: u64,
    /// The index of `counts[0]`.
    pub offset: i32,
    /// From the first kernel bucket above 0 that holds a latency to the last one that does.
    pub counts: Vec<u64>,
}

/// The zero bucket's upper end: the kernel's bucket 0 holds 0 and 1 ns.
pub const ZERO_THRESHOLD_NS: f64 = 1.0;

pub fn exponential(histogram: &LatencyHistogram) -> ExponentialBuckets {
    let positive = &histogram.buckets[1..];
    let first = positive.iter().position(|&n| n > 0);
    let last = positive.iter().rposition(|&n| n > 0);
    let (offset, counts) = match (first, last) {
        (Some(first), Some(last)) => (first as i32 + 1, positive[first..=last].to_vec()),
        _ => (0, Vec::new()),
    };
    ExponentialBuckets {
        zero_count: histogram.buckets[0],
        offset,
        counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(latencies_ns: &[u64]) -> LatencyHistogram {
        let mut h = LatencyHistogram::EMPTY;
        for &ns in latencies_ns {
            h.record(ns);
        }
        h
    }

    #[test]
    fn the_kernel_factor_keeps_every_bucket() {
        let h = recorded(&[0, 1, 700, 1500, 1500, 1 << 50]);
        let e = explicit(&h, BucketFactor::KERNEL);
        assert_eq!(e.bounds_secs.len(), LATENCY_BUCKETS - 1);
        assert_eq!((e.bounds_secs[0], e.bounds_secs[9]), (2e-9, 1024e-9));
        assert_eq!(e.counts.len(), e.bounds_secs.len() + 1);
        // 0 and 1 ns below 2 ns; 700 ns in [512, 1024); 1500 ns in [1024, 2048); the rest last.
        assert_eq!((e.counts[0], e.counts[9], e.counts[10]), (2, 1, 2));
        assert_eq!(*e.counts.last().unwrap(), 1);
        assert_eq!(e.counts.iter().sum::<u64>(), h.count);
    }

    #[test]
    fn coarser_factors_add_whole_kernel_buckets() {
        let h = recorded(&[3, 15, 16, 255, 256, 5000, 1 << 39, 1 << 45]);
        let factor = BucketFactor::parse("16", "test").unwrap();
        let e = explicit(&h, factor);
        assert_eq!(factor.bounds(), 9);
        assert_eq!(e.bounds_secs[..3], [16e-9, 256e-9, 4096e-9]);
        assert_eq!(e.counts[..4], [2, 2, 1, 1]);
        // 2^39 and 2^45 ns are both above the last bound, 2^36 ns.
        assert_eq!(e.counts[9], 2);
        assert_eq!(e.counts.iter().sum::<u64>(), h.count);
        for (text, bounds) in [("2", 39), ("4", 19), ("8", 13), ("1024", 3)] {
            assert_eq!(BucketFactor::parse(text, "t").unwrap().bounds(), bounds);
        }
        for bad in ["1", "3", "0", "2048", "-2", "x"] {
            let error = BucketFactor::parse(bad, "--prometheus-bucket-factor").unwrap_err();
            assert!(error.contains("power of two from 2"), "{error}");
        }
    }

    #[test]
    fn exponential_buckets_are_the_kernel_buckets_one_to_one() {
        let h = recorded(&[1, 0, 700, 1500, 1600, 5000]);
        let e = exponential(&h);
        assert_eq!(e.zero_count, 2);
        // 700 ns: floor(log2) 9; 1500, 1600: 10; 5000: 12; index i holds (2^i, 2^(i+1)] ns.
        assert_eq!(e.offset, 9);
        assert_eq!(e.counts, [1, 2, 0, 1]);
        assert_eq!(
            exponential(&recorded(&[0])),
            ExponentialBuckets {
                zero_count: 1,
                offset: 0,
                counts: Vec::new()
            }
        );
    }
}
