//! Where the metrics go: a Prometheus endpoint (pull) and OTLP (push).

pub mod metrics;

pub mod otlp;
pub mod prometheus;
