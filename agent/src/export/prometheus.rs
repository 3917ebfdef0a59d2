//! The Prometheus endpoint: `/metrics` (OpenMetrics text, the metrics of [`crate::export::metrics`] under the
//! usual OpenTelemetry-to-Prometheus translation), `/api/timeline` (the agent's timeline, JSON),
//! `/healthz` (the agent is alive) and `/readyz` (the probes are attached and a first sample was
//! taken).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    http::header,
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use serde::Deserialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    export::metrics::{Family, MetricKind, Value, probes_missing},
    sample::timeline::Timeline,
};

/// The latest metrics, shared between the sampling loop and the HTTP server.
pub type Latest = watch::Receiver<Option<Arc<Vec<Family>>>>;

/// The agent's timeline and its sampling interval, shared likewise.
#[derive(Clone)]
pub struct SharedTimeline {
    pub timeline: Arc<Mutex<Timeline>>,
    pub interval: Duration,
}

#[derive(Clone)]
struct AppState {
    latest: Latest,
    timeline: SharedTimeline,
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: TcpListener, latest: Latest, timeline: SharedTimeline) -> Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/timeline", get(timeline_json))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AppState { latest, timeline });
    axum::serve(listener, app)
        .await
        .context("the Prometheus endpoint failed")
}

/// `/api/timeline?tenant=T&prefix=P`: both optional.
#[derive(Debug, Deserialize)]
struct TimelineQuery {
    tenant: Option<String>,
    prefix: Option<String>,
}

async fn timeline_json(
    State(state): State<AppState>,
    Query(query): Query<TimelineQuery>,
) -> impl IntoResponse {
    let shared = &state.timeline;
    let view = match shared.timeline.lock() {
        Ok(timeline) => timeline.view(
            shared.interval,
            query.tenant.as_deref(),
            query.prefix.as_deref(),
        ),
        Err(_) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "timeline unavailable\n").into_response();
        }
    };
    Json(view).into_response()
}

/// 200 once a first sample was taken with every probe the host should have attached; 503 before,
/// and while any is missing (degraded), with the probes and why. Liveness (`/healthz`) stays 200: a
/// degraded agent still counts what it can, and restarting it would not attach the probe.
async fn ready(State(AppState { latest, .. }): State<AppState>) -> impl IntoResponse {
    let Some(families) = latest.borrow().clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "probes not attached yet\n".to_owned(),
        );
    };
    readiness(&families)
}

fn readiness(families: &[Family]) -> (StatusCode, String) {
    let missing = probes_missing(families);
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "degraded: {} probe{} not attached\n{}\n",
                missing.len(),
                if missing.len() == 1 { "" } else { "s" },
                missing.join("\n")
            ),
        )
    }
}

async fn metrics(State(AppState { latest, .. }): State<AppState>) -> impl IntoResponse {
    let Some(families) = latest.borrow().clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no sample yet\n".to_owned(),
        )
            .into_response();
    };
    match encode(&families) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding failed: {e}\n"),
        )
            .into_response(),
    }
}

/// The families as OpenMetrics text.
pub fn encode(families: &[Family]) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families.to_vec())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let def = family.def;
            let (name, unit) = prometheus_name(def.name, def.unit);
            let metric_type = match def.kind {
                MetricKind::Counter => MetricType::Counter,
                MetricKind::Gauge => MetricType::Gauge,
                MetricKind::Histogram => MetricType::Histogram,
            };
            let mut metric =
                encoder.encode_descriptor(&name, def.description, unit.as_ref(), metric_type)?;
            for point in &family.points {
                let labels: Vec<(String, String)> = point
                    .attributes
                    .iter()
                    .map(|(key, value)| (key.replace('.', "_"), value.clone()))
                    .collect();
                let point_encoder = metric.encode_family(&labels)?;
                match (&point.value, def.kind) {
                    (Value::Int(v), MetricKind::Counter) => {
                        ConstCounter::new(*v).encode(point_encoder)?;
                    }
                    (Value::Float(v), MetricKind::Counter) => {
                        ConstCounter::new(*v).encode(point_encoder)?;
                    }
                    (Value::Int(v), _) => ConstGauge::new(*v as i64).encode(point_encoder)?,
                    (Value::Float(v), _) => ConstGauge::new(*v).encode(point_encoder)?,
                    (Value::Histogram(h), _) => {
                        let mut buckets: Vec<(f64, u64)> = h
                            .bounds
                            .iter()
                            .copied()
                            .zip(h.bucket_counts.iter().copied())
                            .collect();
                        buckets.push((f64::INFINITY, h.bucket_counts.last().copied().unwrap_or(0)));
                        let mut point_encoder = point_encoder;
                        point_encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            h.sum, h.count, &buckets, None,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The Prometheus name and unit of an OpenTelemetry metric: dots become underscores, a unit in
/// braces (an annotation, like `{exit}`) is dropped, `s` and `By` become `seconds` and `bytes`.
/// The encoder appends the unit and, for counters, `_total`.
pub fn prometheus_name(name: &str, unit: &str) -> (String, Option<Unit>) {
    let unit = match unit {
        "s" => Some(Unit::Seconds),
        "By" => Some(Unit::Bytes),
        _ => None,
    };
    (name.replace('.', "_"), unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::metrics::{HistogramValue, Point, VM_EXITS, VMM_SERVICE_DURATION};

    #[test]
    fn ready_only_while_every_probe_that_should_be_is_attached() {
        let probe = |name: &str, reason: Option<&str>| Point {
            attributes: std::iter::once(("probe", name.to_owned()))
                .chain(reason.map(|r| ("reason", r.to_owned())))
                .collect(),
            value: Value::Int(u64::from(reason.is_none())),
        };
        let attached = vec![Family {
            def: crate::export::metrics::AGENT_PROBE_ATTACHED,
            points: vec![probe("kvm:kvm_mmio", None)],
        }];
        assert_eq!(readiness(&attached).0, StatusCode::OK);
        let mut degraded = attached;
        degraded[0]
            .points
            .push(probe("cgroup:cgroup_rmdir", Some("tracefs not found")));
        let (status, body) = readiness(&degraded);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "degraded: 1 probe not attached\ncgroup:cgroup_rmdir: tracefs not found\n"
        );
    }

    #[test]
    fn counters_and_histograms_follow_the_prometheus_translation() {
        let families = vec![
            Family {
                def: VM_EXITS,
                points: vec![Point {
                    attributes: vec![
                        ("tenant", "/a".to_owned()),
                        ("exit.reason", "io".to_owned()),
                    ],
                    value: Value::Int(42),
                }],
            },
            Family {
                def: VMM_SERVICE_DURATION,
                points: vec![Point {
                    attributes: vec![("tenant", "/a".to_owned())],
                    value: Value::Histogram(HistogramValue {
                        count: 3,
                        sum: 0.5,
                        max: 0.4,
                        bounds: vec![0.1, 0.2],
                        bucket_counts: vec![1, 0, 2],
                    }),
                }],
            },
        ];
        let text = encode(&families).unwrap();
        assert!(text.contains("# TYPE vmtrace_vm_exits counter"), "{text}");
        assert!(
            text.contains("vmtrace_vm_exits_total{tenant=\"/a\",exit_reason=\"io\"} 42"),
            "{text}"
        );
        assert!(
            text.contains(
                "vmtrace_vmm_service_duration_seconds_bucket{le=\"0.1\",tenant=\"/a\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "vmtrace_vmm_service_duration_seconds_bucket{le=\"0.2\",tenant=\"/a\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "vmtrace_vmm_service_duration_seconds_bucket{le=\"+Inf\",tenant=\"/a\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("vmtrace_vmm_service_duration_seconds_count{tenant=\"/a\"} 3"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
