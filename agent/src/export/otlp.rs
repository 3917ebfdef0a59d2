//! OTLP metrics push, over gRPC or HTTP/protobuf, configured by the standard `OTEL_EXPORTER_OTLP_*`
//! variables.
//!
//! The request is built from [`crate::export::metrics`] with the official OTLP types (`opentelemetry-proto`)
//! rather than through the OpenTelemetry SDK's instruments: the kernel already aggregated the data,
//! and the SDK can only build a histogram by recording every value again, where vmtrace holds
//! bucket counts. Counters and histograms are cumulative, so an export that fails loses nothing: the
//! next one that succeeds carries everything counted meanwhile. Exports never block sampling: the
//! exporter reads the latest metrics from a watch channel (a queue of one), and each attempt is
//! bounded by the timeout; a failed attempt is counted in `vmtrace.agent.export.dropped`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient,
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point,
    },
    resource::v1::Resource,
};
use prost::Message;
use tokio::sync::watch;

use crate::export::metrics::{Family, MetricKind, Value};

/// `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// `OTEL_EXPORTER_OTLP_COMPRESSION`: how request bodies are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    /// gzip: `grpc-encoding: gzip` on gRPC, `Content-Encoding: gzip` on HTTP.
    Gzip,
}

/// Where and how to export, resolved from the environment and the agent's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    pub protocol: Protocol,
    pub compression: Compression,
    /// For gRPC the collector's address; for HTTP the full URL of the metrics path.
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub interval: Duration,
    pub resource: Vec<(String, String)>,
}

impl OtlpConfig {
    /// Reads the standard variables through `env` (a lookup, so tests need not touch the process
    /// environment). Returns `None` when no endpoint is configured anywhere: export is off.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let protocol = match env("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => bail!(
                "unsupported OTLP protocol `{other}`: use `grpc` or `http/protobuf` (http/json is not supported)"
            ),
        };
        let signal_endpoint = env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT");
        let base_endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT");
        let endpoint = match (signal_endpoint, base_endpoint, protocol) {
            // The per-signal variable is used as given; the base one gets the signal's path for HTTP.
            (Some(url), _, _) => url,
            (None, Some(base), Protocol::HttpProtobuf) => {
                format!("{}/v1/metrics", base.trim_end_matches('/'))
            }
            (None, Some(base), Protocol::Grpc) => base,
            (None, None, _) => return Ok(None),
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            bail!("OTLP endpoint `{endpoint}` must start with http:// or https://");
        }
        let millis = |name: &str, default: u64| -> Result<Duration> {
            match env(name) {
                None => Ok(Duration::from_millis(default)),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Duration::from_millis)
                    .with_context(|| format!("{name}=`{v}` is not a number of milliseconds")),
            }
        };
        let compression = match env("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION")
            .or_else(|| env("OTEL_EXPORTER_OTLP_COMPRESSION"))
            .as_deref()
            .map(str::trim)
        {
            None | Some("" | "none") => Compression::None,
            Some("gzip") => Compression::Gzip,
            Some(other) => bail!(
                "unsupported OTLP compression `{other}` (OTEL_EXPORTER_OTLP_COMPRESSION): use `gzip` or `none`"
            ),
        };
        let timeout_variable = if env("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT").is_some() {
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"
        } else {
            "OTEL_EXPORTER_OTLP_TIMEOUT"
        };
        let timeout = millis(timeout_variable, 10_000)?;
        let headers = env("OTEL_EXPORTER_OTLP_METRICS_HEADERS")
            .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
            .map(|h| parse_key_values(&h, "OTEL_EXPORTER_OTLP_HEADERS"))
            .transpose()?
            .unwrap_or_default();
        Ok(Some(Self {
            protocol,
            compression,
            endpoint,
            headers,
            timeout,
            interval: millis("OTEL_METRIC_EXPORT_INTERVAL", 60_000)?,
            resource: Vec::new(),
        }))
    }
}

/// Parses `key1=value1,key2=value2` with percent-encoded values, as the OTEL_* variables are written.
pub fn parse_key_values(text: &str, variable: &str) -> Result<Vec<(String, String)>> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("{variable}: `{pair}` is not key=value"))?;
            let value = percent_decode(value.trim())
                .with_context(|| format!("{variable}: bad percent-encoding in `{pair}`"))?;
            Ok((key.trim().to_owned(), value))
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Sends the latest metrics every interval until the process ends.
pub async fn run(
    config: OtlpConfig,
    latest: watch::Receiver<Option<Arc<Vec<Family>>>>,
    dropped: Arc<AtomicU64>,
    start_time: SystemTime,
) -> Result<()> {
    // The configuration refuses such intervals; this keeps any other caller from a panic in
    // `tokio::time::interval`.
    anyhow::ensure!(
        !config.interval.is_zero(),
        "the OTLP export interval must be above zero"
    );
    let client = Client::new(&config)?;
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures_logged = 0u32;
    loop {
        ticker.tick().await;
        let Some(families) = latest.borrow().clone() else {
            continue;
        };
        let request = request(&families, &config.resource, start_time, SystemTime::now());
        match tokio::time::timeout(config.timeout, client.send(request, &config)).await {
            Ok(Ok(())) => failures_logged = 0,
            outcome => {
                dropped.fetch_add(1, Ordering::Relaxed);
                // One line per outage, not one per interval.
                if failures_logged == 0 {
                    let why = match outcome {
                        Ok(Err(e)) => format!("{e:#}"),
                        _ => format!("no answer within {:?}", config.timeout),
                    };
                    tracing::warn!(endpoint = %config.endpoint, "OTLP export failed, will retry every interval: {why}");
                }
                failures_logged = failures_logged.saturating_add(1);
            }
        }
    }
}

/// Exports the latest metrics once, e.g. when the agent stops.
pub async fn export_latest(
    config: &OtlpConfig,
    latest: &watch::Receiver<Option<Arc<Vec<Family>>>>,
    start_time: SystemTime,
) -> Result<()> {
    let Some(families) = latest.borrow().clone() else {
        return Ok(());
    };
    let client = Client::new(config)?;
    let request = request(&families, &config.resource, start_time, SystemTime::now());
    tokio::time::timeout(config.timeout, client.send(request, config))
        .await
        .context("no answer in time")?
}

enum Client {
    Grpc(MetricsServiceClient<tonic::transport::Channel>),
    Http(reqwest::Client),
}

impl Client {
    fn new(config: &OtlpConfig) -> Result<Self> {
        Ok(match config.protocol {
            Protocol::Grpc => {
                // Lazy: the agent starts whether or not the collector is up, and reconnects itself.
                let channel = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
                    .context("bad OTLP gRPC endpoint")?
                    .timeout(config.timeout)
                    .connect_lazy();
                let client = MetricsServiceClient::new(channel);
                Self::Grpc(match config.compression {
                    Compression::Gzip => {
                        client.send_compressed(tonic::codec::CompressionEncoding::Gzip)
                    }
                    Compression::None => client,
                })
            }
            Protocol::HttpProtobuf => Self::Http(
                reqwest::Client::builder()
                    .timeout(config.timeout)
                    .build()
                    .context("building the HTTP client")?,
            ),
        })
    }

    async fn send(&self, request: ExportMetricsServiceRequest, config: &OtlpConfig) -> Result<()> {
        match self {
            Self::Grpc(client) => {
                let mut grpc = tonic::Request::new(request);
                for (key, value) in &config.headers {
                    let key: tonic::metadata::MetadataKey<_> =
                        key.parse().context("bad OTLP header name")?;
                    grpc.metadata_mut()
                        .insert(key, value.parse().context("bad OTLP header value")?);
                }
                client.clone().export(grpc).await.context("gRPC export")?;
            }
            Self::Http(client) => {
                let mut post = client
                    .post(&config.endpoint)
                    .header("content-type", "application/x-protobuf");
                post = match config.compression {
                    Compression::Gzip => post
                        .header("content-encoding", "gzip")
                        .body(gzip(&request.encode_to_vec())?),
                    Compression::None => post.body(request.encode_to_vec()),
                };
                for (key, value) in &config.headers {
                    post = post.header(key, value);
                }
                let response = post.send().await.context("HTTP export")?;
                if !response.status().is_success() {
                    bail!("HTTP export: the collector answered {}", response.status());
                }
            }
        }
        Ok(())
    }
}

/// `body` gzip-compressed.
fn gzip(body: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).context("compressing the export")?;
    encoder.finish().context("compressing the export")
}

/// The OTLP request for one set of metrics.
pub fn request(
    families: &[Family],
    resource: &[(String, String)],
    start: SystemTime,
    now: SystemTime,
) -> ExportMetricsServiceRequest {
    let nanos = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    let (start, now) = (nanos(start), nanos(now));
    let cumulative = AggregationTemporality::Cumulative as i32;
    let metrics = families
        .iter()
        .filter(|f| !f.points.is_empty())
        .map(|family| {
            let def = family.def;
            let numbers = || {
                family
                    .points
                    .iter()
                    .filter_map(|p| {
                        let value = match p.value {
                            Value::Int(v) => number_data_point::Value::AsInt(v as i64),
                            Value::Float(v) => number_data_point::Value::AsDouble(v),
                            Value::Histogram(_) => return None,
                        };
                        Some(NumberDataPoint {
                            attributes: attributes(&p.attributes),
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
                MetricKind::Histogram => Data::Histogram(Histogram {
                    data_points: family
                        .points
                        .iter()
                        .filter_map(|p| match &p.value {
                            Value::Histogram(h) => Some(HistogramDataPoint {
                                attributes: attributes(&p.attributes),
                                start_time_unix_nano: start,
                                time_unix_nano: now,
                                count: h.count,
                                sum: Some(h.sum),
                                bucket_counts: h.bucket_counts.clone(),
                                explicit_bounds: h.bounds.clone(),
                                max: Some(h.max),
                                ..Default::default()
                            }),
                            _ => None,
                        })
                        .collect(),
                    aggregation_temporality: cumulative,
                }),
            };
            Metric {
                name: def.name.to_owned(),
                description: def.description.to_owned(),
                unit: def.unit.to_owned(),
                data: Some(data),
                ..Default::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| key_value(k, v)).collect(),
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
        }],
    }
}

fn attributes(attributes: &[(&'static str, String)]) -> Vec<KeyValue> {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn standard_variables_configure_the_exporter() {
        assert_eq!(OtlpConfig::from_env(&env(&[])).unwrap(), None);
        let http = OtlpConfig::from_env(&env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (http.protocol, http.endpoint.as_str()),
            (Protocol::HttpProtobuf, "http://c:4318/v1/metrics")
        );
        assert_eq!(
            (http.timeout, http.interval),
            (Duration::from_secs(10), Duration::from_mins(1))
        );
        let grpc = OtlpConfig::from_env(&env(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b,x=1"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (grpc.protocol, grpc.endpoint.as_str()),
            (Protocol::Grpc, "http://c:4317")
        );
        assert_eq!(
            grpc.headers,
            vec![("api-key".into(), "a b".into()), ("x".into(), "1".into())]
        );
        assert_eq!(
            (grpc.timeout, grpc.interval),
            (Duration::from_millis(2500), Duration::from_millis(500))
        );
        let signal = OtlpConfig::from_env(&env(&[
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "https://m/custom"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(signal.endpoint, "https://m/custom");
    }

    #[test]
    fn bad_values_are_one_clear_error() {
        let err = |vars: &[(&str, &str)]| OtlpConfig::from_env(&env(vars)).unwrap_err().to_string();
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c")
            ])
            .contains("http/json")
        );
        assert!(err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317")]).contains("must start with http"));
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")
            ])
            .contains("milliseconds")
        );
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")
            ])
            .contains("key=value")
        );
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")
            ])
            .contains("use `gzip` or `none`")
        );
    }

    #[tokio::test]
    async fn a_zero_interval_is_an_error_not_a_panic() {
        let mut config = OtlpConfig::from_env(&env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c")]))
            .unwrap()
            .unwrap();
        config.interval = Duration::ZERO;
        let (_tx, latest) = watch::channel(None);
        let e = run(config, latest, Arc::default(), SystemTime::now())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("above zero"), "{e}");
    }
}
