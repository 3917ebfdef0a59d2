//! The sampling clock of `watch`, `record` and `agent`: a tick every interval, and word of the last
//! one, when the duration is up or on SIGINT/SIGTERM, so that every command ends with a final sample.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    time::{Instant, Interval},
};

pub struct Ticks {
    ticker: Interval,
    deadline: Option<Instant>,
    interrupt: Signal,
    terminate: Signal,
}

impl Ticks {
    /// Ticks every `interval`, the first one at once when `first_at_once` (the agent wants a sample
    /// for /readyz straight away) or after one interval (views want a rate over a whole interval).
    pub fn new(
        interval: Duration,
        duration: Option<Duration>,
        first_at_once: bool,
    ) -> Result<Self> {
        let now = Instant::now();
        let first = if first_at_once { now } else { now + interval };
        Ok(Self {
            ticker: tokio::time::interval_at(first, interval),
            deadline: duration.map(|d| now + d),
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Waits for the next tick; true when it is the last.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.ticker.tick() => self.deadline.is_some_and(|d| Instant::now() >= d),
            _ = self.interrupt.recv() => true,
            _ = self.terminate.recv() => true,
        }
    }
}
