//! When to try again after a retryable answer: exponential backoff with jitter, as the OTLP
//! specification asks, so that a fleet of agents does not come back to a recovering collector in
//! lockstep; and the collector's own delay when it gives one (throttling).

use std::time::Duration;

/// The longest delay a collector may ask for: beyond it, the agent tries again anyway.
pub const MAX_THROTTLE: Duration = Duration::from_mins(5);

/// Delays starting at `min(1 s, interval)` and doubling up to the export interval: a failing
/// export is never tried less often than a healthy one is sent.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(interval: Duration) -> Self {
        Self {
            first: interval.min(Duration::from_secs(1)),
            cap: interval,
            failures: 0,
        }
    }

    /// The delay before the next attempt after one more failure: the collector's when it gave
    /// one (at most [`MAX_THROTTLE`]), else this backoff's, jittered between half and all of it.
    pub fn next(&mut self, asked: Option<Duration>) -> Duration {
        let exponential = self
            .first
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(self.cap);
        self.failures = self.failures.saturating_add(1);
        match asked {
            Some(delay) => delay.min(MAX_THROTTLE),
            None => exponential / 2 + exponential.mul_f64(fastrand::f64() / 2.0),
        }
    }

    /// After an export that went through.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_interval_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_mins(1));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next(None)).collect();
        for (attempt, delay) in delays.iter().enumerate() {
            let full = Duration::from_secs(1 << attempt.min(6)).min(Duration::from_mins(1));
            assert!(
                *delay >= full / 2 && *delay <= full,
                "attempt {attempt}: {delay:?} outside [{:?}, {full:?}]",
                full / 2
            );
        }
        backoff.reset();
        assert!(backoff.next(None) <= Duration::from_secs(1));
        // A short interval caps the delay: the first one is the interval itself.
        let mut short = Backoff::new(Duration::from_millis(300));
        assert!((0..20).all(|_| short.next(None) <= Duration::from_millis(300)));
    }

    #[test]
    fn the_collectors_delay_is_followed_up_to_a_bound() {
        let mut backoff = Backoff::new(Duration::from_secs(10));
        assert_eq!(
            backoff.next(Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(backoff.next(Some(Duration::from_hours(1))), MAX_THROTTLE);
    }

    #[test]
    fn jitter_spreads_agents_apart() {
        let delays: std::collections::HashSet<Duration> = (0..50)
            .map(|_| Backoff::new(Duration::from_mins(1)).next(None))
            .collect();
        assert!(delays.len() > 40, "50 agents' first delays: {delays:?}");
    }
}
