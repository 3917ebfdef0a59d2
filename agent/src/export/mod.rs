//! Where the metrics go: a Prometheus endpoint (pull) and OTLP (push).

pub(crate) mod exposition;
pub(crate) mod histogram;
pub(crate) mod kind_metric;
pub mod metrics;

pub(crate) mod otlp;
pub(crate) mod prometheus;
pub(crate) mod web;
