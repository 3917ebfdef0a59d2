//! One connection to the collector, kept across exports (a tonic channel or a reqwest pool), with
//! the endpoint's TLS; and what each answer means under the OTLP specification's retry rules.

use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    metrics_service_client::MetricsServiceClient,
};
use prost::Message;
use tonic_types::StatusExt;

use super::config::{Compression, OtlpConfig, Protocol, TlsFiles};

/// What one request's answer means.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// Accepted; `rejected` points were refused (`partial_success`), with the collector's reason.
    Accepted { rejected: u64, message: String },
    /// Worth sending again: after `after` when the collector says (`RetryInfo`, `Retry-After`).
    Retryable {
        after: Option<Duration>,
        why: String,
    },
    /// Sending it again would not help (a bad request, a refused credential).
    Refused(String),
}

pub enum Client {
    Grpc(MetricsServiceClient<tonic::transport::Channel>),
    Http(reqwest::Client),
}

impl Client {
    pub fn new(config: &OtlpConfig) -> Result<Self> {
        let https = config.endpoint.starts_with("https://");
        Ok(match config.protocol {
            Protocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
                    .context("bad OTLP gRPC endpoint")?
                    .timeout(config.timeout)
                    .connect_timeout(config.timeout);
                if https {
                    endpoint = endpoint
                        .tls_config(grpc_tls(&config.tls)?)
                        .context("the OTLP endpoint's TLS settings")?;
                }
                // Lazy: the agent starts whether or not the collector is up; the channel
                // reconnects by itself and is reused by every export.
                let client = MetricsServiceClient::new(endpoint.connect_lazy());
                Self::Grpc(match config.compression {
                    Compression::Gzip => {
                        client.send_compressed(tonic::codec::CompressionEncoding::Gzip)
                    }
                    Compression::None => client,
                })
            }
            Protocol::HttpProtobuf => {
                let mut builder = reqwest::Client::builder()
                    .timeout(config.timeout)
                    .connect_timeout(config.timeout);
                if let Some(path) = &config.tls.certificate {
                    let pem = read(path, "OTEL_EXPORTER_OTLP_CERTIFICATE")?;
                    for certificate in reqwest::Certificate::from_pem_bundle(&pem)
                        .with_context(|| format!("{}: not PEM certificates", path.display()))?
                    {
                        builder = builder.add_root_certificate(certificate);
                    }
                }
                if let Some(identity) = &config.tls.client {
                    let mut pem = read(
                        &identity.certificate,
                        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    )?;
                    pem.extend(read(&identity.key, "OTEL_EXPORTER_OTLP_CLIENT_KEY")?);
                    builder = builder.identity(reqwest::Identity::from_pem(&pem).context(
                        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and _CLIENT_KEY are not a PEM \
                         certificate and its private key",
                    )?);
                }
                Self::Http(builder.build().context("building the HTTP client")?)
            }
        })
    }

    /// Sends one request and says what the answer means.
    pub async fn send(&self, request: ExportMetricsServiceRequest, config: &OtlpConfig) -> Answer {
        match self {
            Self::Grpc(client) => {
                let mut grpc = tonic::Request::new(request);
                for (key, value) in &config.headers {
                    let (Ok(key), Ok(value)) = (
                        key.parse::<tonic::metadata::MetadataKey<_>>(),
                        value.parse(),
                    ) else {
                        return Answer::Refused(format!("header `{key}` cannot be sent over gRPC"));
                    };
                    grpc.metadata_mut().insert(key, value);
                }
                match client.clone().export(grpc).await {
                    Ok(response) => accepted(response.into_inner()),
                    Err(status) => grpc_failure(&status),
                }
            }
            Self::Http(client) => {
                let body = request.encode_to_vec();
                let mut post = client
                    .post(&config.endpoint)
                    .header("content-type", "application/x-protobuf");
                post = match config.compression {
                    Compression::Gzip => match gzip(&body) {
                        Ok(compressed) => post.header("content-encoding", "gzip").body(compressed),
                        Err(e) => return Answer::Refused(format!("{e:#}")),
                    },
                    Compression::None => post.body(body),
                };
                for (key, value) in &config.headers {
                    post = post.header(key, value);
                }
                match post.send().await {
                    Ok(response) => http_answer(response).await,
                    // Not connected, reset, timed out: the collector may be back next time.
                    Err(e) => Answer::Retryable {
                        after: None,
                        why: format!("HTTP export: {}", error_chain(&e)),
                    },
                }
            }
        }
    }
}

fn read(path: &std::path::Path, variable: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{variable}: cannot read {}", path.display()))
}

/// The gRPC channel's TLS: the system's roots (where it has any) and the configured CA, and the
/// client certificate if one is configured.
fn grpc_tls(files: &TlsFiles) -> Result<tonic::transport::ClientTlsConfig> {
    let mut tls = tonic::transport::ClientTlsConfig::new();
    // tonic refuses to connect when asked for system roots that are not there (a slim image
    // without ca-certificates), even with a CA of its own: ask only where there are some.
    if !rustls_native_certs::load_native_certs().certs.is_empty() {
        tls = tls.with_native_roots();
    } else if files.certificate.is_none() {
        anyhow::bail!(
            "no CA to verify the OTLP endpoint with: the system has no trusted certificates \
             (install ca-certificates) and OTEL_EXPORTER_OTLP_CERTIFICATE is not set"
        );
    }
    if let Some(path) = &files.certificate {
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(
            path,
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        )?));
    }
    if let Some(identity) = &files.client {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read(
                &identity.certificate,
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            )?,
            read(&identity.key, "OTEL_EXPORTER_OTLP_CLIENT_KEY")?,
        ));
    }
    Ok(tls)
}

fn accepted(response: ExportMetricsServiceResponse) -> Answer {
    let partial = response.partial_success.unwrap_or_default();
    Answer::Accepted {
        rejected: partial.rejected_data_points.max(0) as u64,
        message: partial.error_message,
    }
}

/// The OTLP specification's retryable gRPC codes; RESOURCE_EXHAUSTED only when the collector says
/// when to come back (`RetryInfo`), as it then expects to recover.
fn grpc_failure(status: &tonic::Status) -> Answer {
    use tonic::Code;
    let after = status.get_details_retry_info().and_then(|r| r.retry_delay);
    let why = format!("gRPC export: {:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Answer::Retryable { after, why },
        Code::ResourceExhausted if after.is_some() => Answer::Retryable { after, why },
        _ => Answer::Refused(why),
    }
}

/// 2xx with its `partial_success`; 429, 502, 503 and 504 retryable (after `Retry-After`
/// seconds when given), as the specification says; anything else refused.
async fn http_answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    if status.is_success() {
        let body = response.bytes().await.unwrap_or_default();
        // An empty or unreadable body is a full success: the collector said 2xx.
        return ExportMetricsServiceResponse::decode(body).map_or(
            Answer::Accepted {
                rejected: 0,
                message: String::new(),
            },
            accepted,
        );
    }
    let after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_secs);
    let why = format!("HTTP export: the collector answered {status}");
    match status.as_u16() {
        429 | 502 | 503 | 504 => Answer::Retryable { after, why },
        _ => Answer::Refused(why),
    }
}

/// `error` with its causes: reqwest's own message is only the top one ("error sending request").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `body` gzip-compressed.
fn gzip(body: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).context("compressing the export")?;
    encoder.finish().context("compressing the export")
}
