//! Holding a vCPU to a rate: the guest writes the PACE port after every operation and the VMM
//! sleeps there until the operation's slot in the schedule has come.

use std::time::{Duration, Instant};

/// The schedule of one vCPU: operation `n` may not complete before `start + n / rate`.
#[derive(Debug)]
pub(crate) struct Pacer {
    start: Instant,
    period: f64,
    done: u64,
}

impl Pacer {
    /// A schedule of `rate` operations per second starting now.
    pub(crate) fn new(rate: f64) -> Self {
        Pacer {
            start: Instant::now(),
            period: 1.0 / rate,
            done: 0,
        }
    }

    /// Records one more completed operation and sleeps until it is on schedule.
    pub(crate) fn tick(&mut self) {
        self.done += 1;
        let due = self.start + Duration::from_secs_f64(self.done as f64 * self.period);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }

    /// Operations recorded so far.
    pub(crate) fn ticks(&self) -> u64 {
        self.done
    }
}
