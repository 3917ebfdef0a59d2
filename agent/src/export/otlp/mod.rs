//! OTLP metrics push, over gRPC or HTTP/protobuf, configured by the standard `OTEL_EXPORTER_OTLP_*`
//! variables.
//!
//! Requests are built from [`crate::export::metrics`] with the official OTLP types
//! (`opentelemetry-proto`) rather than through the OpenTelemetry SDK (docs/export.md says why).
//! Counters and histograms are cumulative, so an export that fails loses nothing: the next one
//! that succeeds carries everything counted meanwhile. Exports never block sampling: the exporter
//! reads the latest metrics from a watch channel (a queue of one), and each attempt is bounded by
//! the timeout. A retryable failure is tried again after a jittered, growing delay (or the
//! collector's own), with the newest metrics.

mod client;
mod config;
mod request;
mod retry;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use anyhow::{Context, Result};
pub use config::{HistogramAggregation, OtlpConfig, parse_key_values};
pub use request::request;
use request::split;
use tokio::{sync::watch, time::Instant};

use crate::export::metrics::Family;
use client::{Answer, Client};
use retry::Backoff;

/// What the exporter counts about itself, shown in the agent's own metrics.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Export attempts that did not go through (retried or not).
    pub failed: AtomicU64,
    /// Attempts made again after a retryable answer.
    pub retries: AtomicU64,
    /// Data points the collector accepted the request of, but refused (`partial_success`).
    pub rejected_points: AtomicU64,
}

/// The latest metrics, as the sampler publishes them.
pub type Latest = watch::Receiver<Option<Arc<Vec<Family>>>>;

/// How one export went, all of its requests together.
enum Outcome {
    Delivered {
        rejected: u64,
        message: String,
    },
    Retry {
        after: Option<std::time::Duration>,
        why: String,
    },
    Refused(String),
}

/// The collector's client and what the exports need to build their requests.
pub struct Exporter {
    config: OtlpConfig,
    client: Client,
    start_time: SystemTime,
}

impl Exporter {
    /// Checks the settings (TLS files included) and prepares the connection; nothing is sent yet.
    pub fn new(config: OtlpConfig, start_time: SystemTime) -> Result<Self> {
        // The configuration refuses such intervals; this keeps any other caller from a panic in
        // the schedule.
        anyhow::ensure!(
            !config.interval.is_zero(),
            "the OTLP export interval must be above zero"
        );
        let client = Client::new(&config)?;
        Ok(Self {
            config,
            client,
            start_time,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.config.endpoint
    }

    pub fn interval(&self) -> std::time::Duration {
        self.config.interval
    }

    /// Sends the latest metrics every interval until the process ends.
    pub async fn run(self, latest: Latest, counters: Arc<ExportCounters>) {
        let interval = self.config.interval;
        let mut backoff = Backoff::new(interval);
        let mut scheduled = Instant::now();
        let mut next = scheduled;
        let mut in_trouble = false;
        loop {
            tokio::time::sleep_until(next).await;
            let Some(families) = latest.borrow().clone() else {
                scheduled += interval;
                next = scheduled;
                continue;
            };
            match self.export(&families).await {
                Outcome::Delivered { rejected, message } => {
                    backoff.reset();
                    if rejected > 0 {
                        counters
                            .rejected_points
                            .fetch_add(rejected, Ordering::Relaxed);
                        if !in_trouble {
                            tracing::warn!(endpoint = %self.config.endpoint, "the collector refused {rejected} data points: {message}");
                        }
                    }
                    in_trouble = rejected > 0;
                    // Back on the regular schedule, without a burst for the ticks missed.
                    scheduled = next_tick(scheduled, interval);
                    next = scheduled;
                }
                Outcome::Retry { after, why } => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    let delay = backoff.next(after);
                    if !in_trouble {
                        tracing::warn!(endpoint = %self.config.endpoint, "OTLP export failed, trying again in {delay:.1?} and then at growing intervals: {why}");
                    }
                    in_trouble = true;
                    next = Instant::now() + delay;
                    scheduled = next;
                }
                Outcome::Refused(why) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                    if !in_trouble {
                        tracing::warn!(endpoint = %self.config.endpoint, "OTLP export refused, not retried (the next interval sends newer figures): {why}");
                    }
                    in_trouble = true;
                    scheduled = next_tick(scheduled, interval);
                    next = scheduled;
                }
            }
        }
    }

    /// Sends `families` once, as as many requests as the size limit needs.
    async fn export(&self, families: &[Family]) -> Outcome {
        let request = request(
            families,
            &self.config.resource,
            self.config.histograms,
            self.start_time,
            SystemTime::now(),
        );
        let (mut rejected, mut messages) = (0, Vec::new());
        for part in split(request, self.config.max_request_bytes) {
            let answer =
                tokio::time::timeout(self.config.timeout, self.client.send(part, &self.config))
                    .await
                    .unwrap_or_else(|_| Answer::Retryable {
                        after: None,
                        why: format!("no answer within {:?}", self.config.timeout),
                    });
            match answer {
                Answer::Accepted {
                    rejected: refused,
                    message,
                } => {
                    rejected += refused;
                    if !message.is_empty() {
                        messages.push(message);
                    }
                }
                // The parts already accepted are sent again with the retry: cumulative values
                // sent twice are the same values.
                Answer::Retryable { after, why } => return Outcome::Retry { after, why },
                Answer::Refused(why) => return Outcome::Refused(why),
            }
        }
        Outcome::Delivered {
            rejected,
            message: messages.join("; "),
        }
    }

    /// Exports the latest metrics once, e.g. when the agent stops.
    pub async fn export_latest(&self, latest: &Latest) -> Result<()> {
        let Some(families) = latest.borrow().clone() else {
            return Ok(());
        };
        match self.export(&families).await {
            Outcome::Delivered { .. } => Ok(()),
            Outcome::Retry { why, .. } | Outcome::Refused(why) => Err(anyhow::anyhow!(why)),
        }
        .context("the last OTLP export")
    }
}

/// The first tick of the schedule `scheduled + k * interval` that is not in the past.
fn next_tick(scheduled: Instant, interval: std::time::Duration) -> Instant {
    let now = Instant::now();
    let mut next = scheduled + interval;
    if next < now {
        let behind = (now - next).as_nanos() / interval.as_nanos().max(1);
        next += interval * (behind as u32 + 1);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_interval_is_an_error_not_a_panic() {
        let mut config = OtlpConfig::from_env(&|name| {
            (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c".to_owned())
        })
        .unwrap()
        .unwrap();
        config.interval = std::time::Duration::ZERO;
        let e = Exporter::new(config, SystemTime::now()).err().unwrap();
        assert!(e.to_string().contains("above zero"), "{e}");
    }
}
