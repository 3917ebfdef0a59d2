//! The OTLP requests for one set of metrics: one Resource per tenant, as the semantic conventions
//! want pods described (the OpenTelemetry Collector's kubeletstats receiver emits them the same
//! way), and requests split below the collector's size limit.

use std::{
    collections::HashMap,
    time::{SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, ExponentialHistogram, ExponentialHistogramDataPoint, Gauge,
        Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
        exponential_histogram_data_point::Buckets, metric::Data, number_data_point,
    },
    resource::v1::Resource,
};
use prost::Message;

use super::HistogramAggregation;
use crate::export::{
    histogram::{self, BucketFactor, ZERO_THRESHOLD_NS},
    metrics::{Family, MetricKind, Point, Value},
};

/// The Resource attribute a tenant-describing point attribute becomes; `None` for the attributes
/// that stay on the data point (the exit reason, the queue, ...). Keys of the semantic conventions
/// are kept; vmtrace's own are namespaced under `vmtrace.` (docs/export.md).
fn resource_key(point_key: &str) -> Option<&'static str> {
    Some(match point_key {
        "tenant" => "vmtrace.tenant",
        "tenant.name" => "vmtrace.tenant.name",
        "k8s.pod.uid" => "k8s.pod.uid",
        "k8s.pod.name" => "k8s.pod.name",
        "k8s.namespace.name" => "k8s.namespace.name",
        "vm.name" => "vmtrace.vm.name",
        "systemd.unit" => "vmtrace.systemd.unit",
        _ => return None,
    })
}

/// Attributes as keys and borrowed values.
type Attributes<'a> = Vec<(&'static str, &'a str)>;

/// The points of one Resource: the agent's own (no tenant attributes) or one tenant's.
struct Group<'a> {
    tenant: Attributes<'a>,
    /// For each family (by index), its points with their remaining attributes.
    points: Vec<Vec<(&'a Point, Attributes<'a>)>>,
}

/// The OTLP request for one set of metrics: the agent's own metrics under `resource`, each
/// tenant's under `resource` plus the tenant's attributes; latencies as `histograms` says.
pub fn request(
    families: &[Family],
    resource: &[(String, String)],
    histograms: HistogramAggregation,
    start: SystemTime,
    now: SystemTime,
) -> ExportMetricsServiceRequest {
    let nanos = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    let times = (nanos(start), nanos(now));
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<Attributes, usize> = HashMap::new();
    for (family_index, family) in families.iter().enumerate() {
        for point in &family.points {
            let (tenant, rest): (Vec<_>, Vec<_>) = point
                .attributes
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .partition(|(k, _)| resource_key(k).is_some());
            let tenant: Vec<_> = tenant
                .into_iter()
                .filter_map(|(k, v)| Some((resource_key(k)?, v)))
                .collect();
            let slot = *index.entry(tenant.clone()).or_insert_with(|| {
                groups.push(Group {
                    tenant,
                    points: vec![Vec::new(); families.len()],
                });
                groups.len() - 1
            });
            groups[slot].points[family_index].push((point, rest));
        }
    }
    ExportMetricsServiceRequest {
        resource_metrics: groups
            .iter()
            .map(|group| {
                let attributes = resource
                    .iter()
                    .map(|(k, v)| key_value(k, v))
                    .chain(group.tenant.iter().map(|(k, v)| key_value(k, v)))
                    .collect();
                let metrics = families
                    .iter()
                    .zip(&group.points)
                    .filter(|(_, points)| !points.is_empty())
                    .map(|(family, points)| metric(family, points, histograms, times))
                    .collect();
                ResourceMetrics {
                    resource: Some(Resource {
                        attributes,
                        ..Default::default()
                    }),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "vmtrace".to_owned(),
                            version: env!("CARGO_PKG_VERSION").to_owned(),
                            ..Default::default()
                        }),
                        metrics,
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            })
            .collect(),
    }
}

/// One family's points of one Resource, cumulative since `start`.
fn metric(
    family: &Family,
    points: &[(&Point, Attributes)],
    histograms: HistogramAggregation,
    (start, now): (u64, u64),
) -> Metric {
    let def = family.def;
    let mut unit = def.unit;
    let cumulative = AggregationTemporality::Cumulative as i32;
    let numbers = || {
        points
            .iter()
            .filter_map(|(p, attributes)| {
                let value = match p.value {
                    Value::Int(v) => number_data_point::Value::AsInt(v as i64),
                    Value::Float(v) => number_data_point::Value::AsDouble(v),
                    Value::Histogram(_) => return None,
                };
                Some(NumberDataPoint {
                    attributes: key_values(attributes),
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    value: Some(value),
                    ..Default::default()
                })
            })
            .collect()
    };
    let data = match def.kind {
        MetricKind::Counter => Data::Sum(Sum {
            data_points: numbers(),
            aggregation_temporality: cumulative,
            is_monotonic: true,
        }),
        MetricKind::Gauge => Data::Gauge(Gauge {
            data_points: numbers(),
        }),
        MetricKind::Histogram => {
            let latencies = points.iter().filter_map(|(p, attributes)| match &p.value {
                Value::Histogram(h) => Some((h, attributes)),
                _ => None,
            });
            match histograms {
                HistogramAggregation::Explicit => Data::Histogram(Histogram {
                    data_points: latencies
                        .map(|(h, attributes)| {
                            let buckets = histogram::explicit(h, BucketFactor::KERNEL);
                            HistogramDataPoint {
                                attributes: key_values(attributes),
                                start_time_unix_nano: start,
                                time_unix_nano: now,
                                count: h.count,
                                sum: Some(h.sum_ns as f64 / 1e9),
                                bucket_counts: buckets.counts,
                                explicit_bounds: buckets.bounds_secs,
                                max: Some(h.max_ns as f64 / 1e9),
                                ..Default::default()
                            }
                        })
                        .collect(),
                    aggregation_temporality: cumulative,
                }),
                // Scale 0 is base 2, the kernel's buckets, but only in the unit they were
                // counted in: powers of two of seconds would cut through them.
                HistogramAggregation::Exponential => {
                    unit = "ns";
                    Data::ExponentialHistogram(ExponentialHistogram {
                        data_points: latencies
                            .map(|(h, attributes)| {
                                let buckets = histogram::exponential(h);
                                ExponentialHistogramDataPoint {
                                    attributes: key_values(attributes),
                                    start_time_unix_nano: start,
                                    time_unix_nano: now,
                                    count: h.count,
                                    sum: Some(h.sum_ns as f64),
                                    scale: 0,
                                    zero_count: buckets.zero_count,
                                    zero_threshold: ZERO_THRESHOLD_NS,
                                    positive: Some(Buckets {
                                        offset: buckets.offset,
                                        bucket_counts: buckets.counts,
                                    }),
                                    max: Some(h.max_ns as f64),
                                    ..Default::default()
                                }
                            })
                            .collect(),
                        aggregation_temporality: cumulative,
                    })
                }
            }
        }
    };
    Metric {
        name: def.name.to_owned(),
        description: def.description.to_owned(),
        unit: unit.to_owned(),
        data: Some(data),
        ..Default::default()
    }
}

fn key_values(attributes: &[(&'static str, &str)]) -> Vec<KeyValue> {
    attributes.iter().map(|(k, v)| key_value(k, v)).collect()
}

fn key_value(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

/// `request` as requests of at most `limit` encoded bytes each, which together carry every data
/// point once. A Resource too large is cut between its metrics, a metric too large between its
/// data points; only a single data point above `limit` goes out alone, larger.
pub fn split(
    request: ExportMetricsServiceRequest,
    limit: usize,
) -> Vec<ExportMetricsServiceRequest> {
    if request.encoded_len() <= limit {
        return vec![request];
    }
    let mut requests = Vec::new();
    let mut current = ExportMetricsServiceRequest::default();
    let mut current_len = 0;
    for piece in request
        .resource_metrics
        .into_iter()
        .flat_map(|resource| pieces(resource, limit))
    {
        // The bytes a piece adds to a request: its field key and length prefix, then itself.
        let piece_len = prost::encoding::message::encoded_len(1, &piece);
        if current_len + piece_len > limit && !current.resource_metrics.is_empty() {
            requests.push(std::mem::take(&mut current));
            current_len = 0;
        }
        current.resource_metrics.push(piece);
        current_len += piece_len;
    }
    if !current.resource_metrics.is_empty() {
        requests.push(current);
    }
    requests
}

/// `resource` cut in halves until each part fits in `limit` (with the request's own framing).
fn pieces(resource: ResourceMetrics, limit: usize) -> Vec<ResourceMetrics> {
    if prost::encoding::message::encoded_len(1, &resource) <= limit {
        return vec![resource];
    }
    match halves(resource) {
        Ok((first, second)) => {
            let mut all = pieces(first, limit);
            all.extend(pieces(second, limit));
            all
        }
        Err(unsplittable) => vec![unsplittable],
    }
}

/// `resource` in two parts with the same Resource and scopes: its scopes, else its metrics, else
/// its one metric's data points, divided in two. `Err` when it holds a single data point.
fn halves(
    mut resource: ResourceMetrics,
) -> Result<(ResourceMetrics, ResourceMetrics), ResourceMetrics> {
    let mut second = ResourceMetrics {
        resource: resource.resource.clone(),
        scope_metrics: Vec::new(),
        schema_url: resource.schema_url.clone(),
    };
    if resource.scope_metrics.len() >= 2 {
        let middle = resource.scope_metrics.len() / 2;
        second.scope_metrics = resource.scope_metrics.split_off(middle);
        return Ok((resource, second));
    }
    let Some(scope) = resource.scope_metrics.first_mut() else {
        return Err(resource);
    };
    let mut second_scope = ScopeMetrics {
        scope: scope.scope.clone(),
        metrics: Vec::new(),
        schema_url: scope.schema_url.clone(),
    };
    if scope.metrics.len() >= 2 {
        let middle = scope.metrics.len() / 2;
        second_scope.metrics = scope.metrics.split_off(middle);
    } else if let Some(metric) = scope.metrics.first_mut()
        && let Some(data) = metric.data.as_mut()
        && let Some(rest) = split_points(data)
    {
        second_scope.metrics = vec![Metric {
            data: Some(rest),
            ..metric.clone()
        }];
    } else {
        return Err(resource);
    }
    second.scope_metrics.push(second_scope);
    Ok((resource, second))
}

/// Moves the second half of `data`'s points into a new `Data` of the same kind; `None` when it
/// has fewer than two.
fn split_points(data: &mut Data) -> Option<Data> {
    fn second_half<T>(points: &mut Vec<T>) -> Option<Vec<T>> {
        (points.len() >= 2).then(|| points.split_off(points.len() / 2))
    }
    Some(match data {
        Data::Sum(sum) => Data::Sum(Sum {
            data_points: second_half(&mut sum.data_points)?,
            ..*sum
        }),
        Data::Gauge(gauge) => Data::Gauge(Gauge {
            data_points: second_half(&mut gauge.data_points)?,
        }),
        Data::Histogram(histogram) => Data::Histogram(Histogram {
            data_points: second_half(&mut histogram.data_points)?,
            ..*histogram
        }),
        Data::ExponentialHistogram(histogram) => Data::ExponentialHistogram(
            opentelemetry_proto::tonic::metrics::v1::ExponentialHistogram {
                data_points: second_half(&mut histogram.data_points)?,
                ..*histogram
            },
        ),
        Data::Summary(summary) => Data::Summary(opentelemetry_proto::tonic::metrics::v1::Summary {
            data_points: second_half(&mut summary.data_points)?,
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::export::metrics::{AGENT_TENANTS, IOMMU_FAULTS};
    use vmtrace_common::LatencyHistogram;

    fn tenant_points(count: usize) -> Vec<Family> {
        let exits = crate::export::metrics::ALL
            .iter()
            .copied()
            .find(|d| d.name == "vmtrace.vmm.exits")
            .unwrap();
        let service = crate::export::metrics::ALL
            .iter()
            .copied()
            .find(|d| d.kind == MetricKind::Histogram)
            .unwrap();
        let mut families = vec![
            Family {
                def: exits,
                points: Vec::new(),
            },
            Family {
                def: service,
                points: Vec::new(),
            },
            Family {
                def: AGENT_TENANTS,
                points: vec![Point {
                    attributes: Vec::new(),
                    value: Value::Int(count as u64),
                }],
            },
            Family {
                def: IOMMU_FAULTS,
                points: Vec::new(),
            },
        ];
        for t in 0..count {
            let tenant = vec![
                ("tenant", format!("pod/uid-{t}")),
                ("k8s.namespace.name", "vms".to_owned()),
                ("k8s.pod.name", format!("virt-launcher-{t}")),
                ("vm.name", format!("vm-{t}")),
                ("k8s.pod.uid", format!("uid-{t}")),
            ];
            for reason in ["io", "mmio", "hlt"] {
                let mut attributes = tenant.clone();
                attributes.push(("exit.reason", reason.to_owned()));
                families[0].points.push(Point {
                    attributes,
                    value: Value::Int(t as u64 * 10),
                });
            }
            families[1].points.push(Point {
                attributes: tenant.clone(),
                value: Value::Histogram(Box::new({
                    let mut h = LatencyHistogram::EMPTY;
                    for ns in [100, 300, 500] {
                        h.record(ns);
                    }
                    h
                })),
            });
        }
        families
    }

    /// Every data point of `requests` as (resource attributes, metric, point attributes, value).
    fn flatten(requests: &[ExportMetricsServiceRequest]) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        for resource in requests.iter().flat_map(|r| &r.resource_metrics) {
            let attributes = format!("{:?}", resource.resource.as_ref().unwrap().attributes);
            for metric in resource.scope_metrics.iter().flat_map(|s| &s.metrics) {
                let points: Vec<String> = match metric.data.as_ref().unwrap() {
                    Data::Sum(s) => s.data_points.iter().map(|p| format!("{p:?}")).collect(),
                    Data::Gauge(g) => g.data_points.iter().map(|p| format!("{p:?}")).collect(),
                    Data::Histogram(h) => h.data_points.iter().map(|p| format!("{p:?}")).collect(),
                    Data::ExponentialHistogram(h) => {
                        h.data_points.iter().map(|p| format!("{p:?}")).collect()
                    }
                    other @ Data::Summary(_) => panic!("unexpected {other:?}"),
                };
                for point in points {
                    assert!(all.insert(format!("{attributes} {} {point}", metric.name)));
                }
            }
        }
        all
    }

    #[test]
    fn latencies_go_as_exponential_histograms_in_ns_or_explicit_ones_in_seconds() {
        let latency = |request: &ExportMetricsServiceRequest| {
            request.resource_metrics[0].scope_metrics[0].metrics[1].clone()
        };
        let exponential = latency(&request(
            &tenant_points(1),
            &[],
            HistogramAggregation::Exponential,
            UNIX_EPOCH,
            UNIX_EPOCH,
        ));
        assert_eq!(exponential.unit, "ns");
        let Some(Data::ExponentialHistogram(h)) = exponential.data else {
            panic!("{exponential:?}")
        };
        let point = &h.data_points[0];
        // 100 ns in (64, 128], 300 in (256, 512], 500 likewise: indices 6 and 8 at scale 0.
        assert_eq!((point.scale, point.count, point.sum), (0, 3, Some(900.0)));
        let positive = point.positive.as_ref().unwrap();
        assert_eq!(
            (positive.offset, positive.bucket_counts.as_slice()),
            (6, &[1, 0, 2][..])
        );
        assert_eq!((point.zero_count, point.zero_threshold), (0, 1.0));
        assert_eq!(point.max, Some(500.0));

        let explicit = latency(&request(
            &tenant_points(1),
            &[],
            HistogramAggregation::Explicit,
            UNIX_EPOCH,
            UNIX_EPOCH,
        ));
        assert_eq!(explicit.unit, "s");
        let Some(Data::Histogram(h)) = explicit.data else {
            panic!("{explicit:?}")
        };
        let point = &h.data_points[0];
        assert_eq!(point.explicit_bounds.len(), 39);
        assert_eq!((point.bucket_counts[6], point.bucket_counts[8]), (1, 2));
        assert_eq!(point.sum, Some(900e-9));
    }

    #[test]
    fn each_tenant_is_one_resource_with_its_kubernetes_attributes() {
        let agent = vec![("service.name".to_owned(), "vmtrace".to_owned())];
        let request = request(
            &tenant_points(2),
            &agent,
            HistogramAggregation::default(),
            UNIX_EPOCH,
            UNIX_EPOCH,
        );
        // One Resource per tenant, in the order met, and the agent's own.
        assert_eq!(request.resource_metrics.len(), 3);
        let keys = |r: &ResourceMetrics| -> Vec<(String, String)> {
            r.resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .map(|kv| {
                    let Some(any_value::Value::StringValue(v)) =
                        kv.value.as_ref().and_then(|v| v.value.clone())
                    else {
                        panic!("{kv:?}")
                    };
                    (kv.key.clone(), v)
                })
                .collect()
        };
        let tenant = keys(&request.resource_metrics[0]);
        let expected: Vec<(String, String)> = [
            ("service.name", "vmtrace"),
            ("vmtrace.tenant", "pod/uid-0"),
            ("k8s.namespace.name", "vms"),
            ("k8s.pod.name", "virt-launcher-0"),
            ("vmtrace.vm.name", "vm-0"),
            ("k8s.pod.uid", "uid-0"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(tenant, expected);
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        assert_eq!(metrics.len(), 2, "exits and the histogram");
        let Some(Data::Sum(exits)) = &metrics[0].data else {
            panic!()
        };
        // Only the exit reason stays on the point.
        assert!(
            exits
                .data_points
                .iter()
                .all(|p| p.attributes.len() == 1 && p.attributes[0].key == "exit.reason")
        );
        assert_eq!(keys(&request.resource_metrics[2]), agent);
    }

    #[test]
    fn split_requests_fit_and_carry_every_point_once() {
        let whole = request(
            &tenant_points(200),
            &[],
            HistogramAggregation::default(),
            UNIX_EPOCH,
            UNIX_EPOCH,
        );
        let expected = flatten(std::slice::from_ref(&whole));
        for limit in [4096, 10_000, 100_000] {
            let parts = split(whole.clone(), limit);
            assert!(
                parts.len() > 1,
                "{limit}: {} bytes in one",
                whole.encoded_len()
            );
            assert!(
                parts.iter().all(|p| p.encoded_len() <= limit),
                "{limit}: {:?}",
                parts.iter().map(Message::encoded_len).collect::<Vec<_>>()
            );
            // Packed: no two neighbours would have fitted together.
            for pair in parts.windows(2) {
                assert!(pair[0].encoded_len() + pair[1].resource_metrics[0].encoded_len() > limit);
            }
            assert_eq!(flatten(&parts), expected, "{limit}");
        }
        assert_eq!(split(whole.clone(), usize::MAX), vec![whole]);
    }

    #[test]
    fn a_resource_too_large_is_cut_between_its_points() {
        // One tenant with many exit reasons: a single Resource above the limit.
        let mut families = tenant_points(1);
        let base = families[0].points[0].attributes.clone();
        for i in 0..500 {
            let mut attributes = base.clone();
            attributes.last_mut().unwrap().1 = format!("reason-{i}");
            families[0].points.push(Point {
                attributes,
                value: Value::Int(i),
            });
        }
        let whole = request(
            &families,
            &[],
            HistogramAggregation::default(),
            UNIX_EPOCH,
            UNIX_EPOCH,
        );
        let parts = split(whole.clone(), 4096);
        assert!(parts.len() >= 4);
        assert!(parts.iter().all(|p| p.encoded_len() <= 4096));
        assert_eq!(flatten(&parts), flatten(&[whole]));
    }
}
