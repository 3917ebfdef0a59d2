//! Failed samples: counted, logged at most once a minute per kind of error, and skipped, so that
//! one refused map operation never ends the agent.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// The longest a kind of error stays silent while it recurs.
pub const LOG_EVERY: Duration = Duration::from_mins(1);

/// Kinds of error remembered for rate limiting; the rest share one slot, so that errors whose
/// message carries a changing part (a path, an id) cannot grow this table.
const MAX_KINDS: usize = 32;

/// What the agent knows of its failed samples.
#[derive(Debug, Default)]
pub struct SampleErrors {
    total: u64,
    kinds: HashMap<String, Kind>,
}

#[derive(Debug)]
struct Kind {
    logged_at: Instant,
    /// Errors of this kind since its last line.
    unlogged: u64,
}

impl SampleErrors {
    /// Sampling errors since the agent started: `vmtrace.agent.sample.errors`.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The value of `result`, or `None` when it failed: then the error is counted and logged as
    /// [`record`](Self::record) does.
    pub fn skip<T>(&mut self, result: anyhow::Result<T>) -> Option<T> {
        result.map_err(|e| self.record(&e, Instant::now())).ok()
    }

    /// Counts `error` and logs it unless its kind was logged less than [`LOG_EVERY`] ago.
    /// Returns the line logged, if any.
    pub fn record(&mut self, error: &anyhow::Error, now: Instant) -> Option<String> {
        self.total += 1;
        // The whole chain names what failed and how (a map and its errno, a file); errors whose
        // messages carry a changing detail are held in check by the cap.
        let message = format!("{error:#}");
        let kind = if self.kinds.contains_key(&message) || self.kinds.len() < MAX_KINDS {
            message
        } else {
            "other".to_owned()
        };
        let line = match self.kinds.get_mut(&kind) {
            Some(seen) if now.duration_since(seen.logged_at) < LOG_EVERY => {
                seen.unlogged += 1;
                return None;
            }
            Some(seen) => {
                let repeats = std::mem::take(&mut seen.unlogged);
                seen.logged_at = now;
                format!(
                    "sample skipped: {error:#} ({repeats} more of this kind in the last {}; at most \
                     one line per kind every {})",
                    humantime::format_duration(LOG_EVERY),
                    humantime::format_duration(LOG_EVERY)
                )
            }
            None => {
                self.kinds.insert(
                    kind,
                    Kind {
                        logged_at: now,
                        unlogged: 0,
                    },
                );
                format!(
                    "sample skipped: {error:#} (the agent goes on; at most one line per kind of \
                     error every {})",
                    humantime::format_duration(LOG_EVERY)
                )
            }
        };
        tracing::warn!("{line}");
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::*;

    #[test]
    fn each_kind_is_logged_at_most_once_a_minute_and_every_error_is_counted() {
        let mut errors = SampleErrors::default();
        let start = Instant::now();
        let map = || anyhow!("reading map `KICKS`: bpf_map_delete_elem failed");
        let cgroup = || anyhow!("cannot read memory.stat").context("accounting");
        assert!(errors.record(&map(), start).is_some());
        assert!(errors.record(&cgroup(), start).is_some(), "another kind");
        for second in 1..60 {
            let now = start + Duration::from_secs(second);
            assert_eq!(errors.record(&map(), now), None, "second {second}");
        }
        let line = errors
            .record(&map(), start + Duration::from_mins(1))
            .unwrap();
        assert!(line.contains("59 more of this kind"), "{line}");
        assert_eq!(errors.total(), 62);
    }

    #[test]
    fn errors_with_ever_new_messages_share_one_slot_beyond_the_cap() {
        let mut errors = SampleErrors::default();
        let now = Instant::now();
        let logged = (0..1000)
            .filter(|i| {
                errors
                    .record(&anyhow!("cgroup {i} vanished"), now)
                    .is_some()
            })
            .count();
        assert_eq!(logged, MAX_KINDS + 1);
        assert_eq!(errors.kinds.len(), MAX_KINDS + 1);
        assert_eq!(errors.total(), 1000);
    }
}
