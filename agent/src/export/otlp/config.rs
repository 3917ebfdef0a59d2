//! The exporter's settings, from the standard `OTEL_EXPORTER_OTLP_*` variables (or the agent's
//! flags and `[otlp]` table, which reach this module through the same lookup).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};

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

/// `OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION`: how latency histograms are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistogramAggregation {
    /// `base2_exponential_bucket_histogram`: scale 0 in nanoseconds, the kernel's log2 buckets one
    /// to one. The default here (the specification's is explicit): it is exact and costs one
    /// series per histogram in backends with native histograms.
    #[default]
    Exponential,
    /// `explicit_bucket_histogram`: bounds at every power of two of nanoseconds, in seconds.
    Explicit,
}

/// The PEM files of an `https://` endpoint's TLS, beside the system's trusted roots.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsFiles {
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`: a CA trusted beside the system roots, e.g. the cluster's.
    pub certificate: Option<PathBuf>,
    /// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `_CLIENT_KEY`: the agent's own certificate, for
    /// collectors that require one (mutual TLS).
    pub client: Option<ClientIdentity>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientIdentity {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// Requests above this many bytes (encoded, before compression) are split: the OpenTelemetry
/// Collector's gRPC receiver refuses messages above 4 MiB unless configured otherwise.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4_000_000;
/// The smallest request limit accepted: below it one tenant's histogram alone would not fit.
pub const MIN_MAX_REQUEST_BYTES: usize = 4096;

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
    pub tls: TlsFiles,
    /// `VMTRACE_OTLP_MAX_REQUEST_BYTES`: larger requests are sent as several.
    pub max_request_bytes: usize,
    pub histograms: HistogramAggregation,
    /// The agent's own Resource attributes (service, host, node); each tenant's are added to them.
    pub resource: Vec<(String, String)>,
}

impl OtlpConfig {
    /// Reads the standard variables through `env` (a lookup, so tests need not touch the process
    /// environment). Returns `None` when no endpoint is configured anywhere: export is off.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        // The per-signal variable wins over the general one, as the specification says.
        let setting = |name: &str| {
            env(&name.replace("OTEL_EXPORTER_OTLP_", "OTEL_EXPORTER_OTLP_METRICS_"))
                .or_else(|| env(name))
        };
        let protocol = match setting("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
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
        let millis = |name: &str, value: Option<String>, default: u64| -> Result<Duration> {
            match value {
                None => Ok(Duration::from_millis(default)),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Duration::from_millis)
                    .with_context(|| format!("{name}=`{v}` is not a number of milliseconds")),
            }
        };
        let compression = match setting("OTEL_EXPORTER_OTLP_COMPRESSION")
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
        let timeout = millis(timeout_variable, env(timeout_variable), 10_000)?;
        let headers = setting("OTEL_EXPORTER_OTLP_HEADERS")
            .map(|h| parse_key_values(&h, "OTEL_EXPORTER_OTLP_HEADERS"))
            .transpose()?
            .unwrap_or_default();
        let tls = tls_files(&setting)?;
        if endpoint.starts_with("http://") && tls != TlsFiles::default() {
            bail!(
                "OTLP endpoint `{endpoint}` is plain HTTP, but TLS files are set \
                 (OTEL_EXPORTER_OTLP_CERTIFICATE or _CLIENT_*): use an https:// endpoint"
            );
        }
        let max_request_bytes = match env("VMTRACE_OTLP_MAX_REQUEST_BYTES") {
            None => DEFAULT_MAX_REQUEST_BYTES,
            Some(text) => match text.trim().parse::<usize>() {
                Ok(bytes) if bytes >= MIN_MAX_REQUEST_BYTES => bytes,
                _ => bail!(
                    "VMTRACE_OTLP_MAX_REQUEST_BYTES=`{text}`: give a number of bytes of at least \
                     {MIN_MAX_REQUEST_BYTES} (default {DEFAULT_MAX_REQUEST_BYTES})"
                ),
            },
        };
        let histograms = match env("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION")
            .as_deref()
            .map(str::trim)
        {
            None | Some("" | "base2_exponential_bucket_histogram") => {
                HistogramAggregation::Exponential
            }
            Some("explicit_bucket_histogram") => HistogramAggregation::Explicit,
            Some(other) => bail!(
                "unsupported histogram aggregation `{other}` \
                 (OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION): use \
                 `base2_exponential_bucket_histogram` (the default) or `explicit_bucket_histogram`"
            ),
        };
        Ok(Some(Self {
            protocol,
            compression,
            endpoint,
            headers,
            timeout,
            interval: millis(
                "OTEL_METRIC_EXPORT_INTERVAL",
                env("OTEL_METRIC_EXPORT_INTERVAL"),
                60_000,
            )?,
            tls,
            max_request_bytes,
            histograms,
            resource: Vec::new(),
        }))
    }
}

/// The TLS files named, each read and parsed now rather than at the first export, so that a wrong
/// file stops the agent at once as a configuration error.
fn tls_files(setting: &dyn Fn(&str) -> Option<String>) -> Result<TlsFiles> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let file = |name: &str| -> Option<PathBuf> {
        setting(name)
            .filter(|p| !p.trim().is_empty())
            .map(|p| PathBuf::from(p.trim()))
    };
    let certificates = |name: &str| -> Result<Option<PathBuf>> {
        let Some(path) = file(name) else {
            return Ok(None);
        };
        std::fs::metadata(&path)
            .with_context(|| format!("{name}: cannot read {}", path.display()))?;
        let parsed: Vec<CertificateDer> = CertificateDer::pem_file_iter(&path)
            .and_then(Iterator::collect)
            .map_err(|e| anyhow::anyhow!("{name}: {}: {e}", path.display()))?;
        anyhow::ensure!(
            !parsed.is_empty(),
            "{name}: {} holds no PEM certificate",
            path.display()
        );
        Ok(Some(path))
    };
    let certificate = certificates("OTEL_EXPORTER_OTLP_CERTIFICATE")?;
    let client_certificate = certificates("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?;
    let client_key = match file("OTEL_EXPORTER_OTLP_CLIENT_KEY") {
        None => None,
        Some(path) => {
            std::fs::metadata(&path).with_context(|| {
                format!(
                    "OTEL_EXPORTER_OTLP_CLIENT_KEY: cannot read {}",
                    path.display()
                )
            })?;
            PrivateKeyDer::from_pem_file(&path).map_err(|e| {
                anyhow::anyhow!(
                    "OTEL_EXPORTER_OTLP_CLIENT_KEY: {} is not a PEM private key: {e}",
                    path.display()
                )
            })?;
            Some(path)
        }
    };
    let client = match (client_certificate, client_key) {
        (Some(certificate), Some(key)) => Some(ClientIdentity { certificate, key }),
        (None, None) => None,
        _ => bail!(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together: \
             set both for a client certificate, or neither"
        ),
    };
    Ok(TlsFiles {
        certificate,
        client,
    })
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

    #[test]
    fn tls_files_and_the_request_limit_are_read() {
        let dir = std::env::temp_dir().join(format!("vmtrace-otlp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, cert, key) = (dir.join("ca.pem"), dir.join("c.pem"), dir.join("k.pem"));
        // Any DER bytes parse as PEM certificates and keys; their content is checked by the TLS
        // libraries when the exporter is made.
        let pem = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
        std::fs::write(&ca, pem("CERTIFICATE")).unwrap();
        std::fs::write(&cert, pem("CERTIFICATE")).unwrap();
        std::fs::write(&key, pem("PRIVATE KEY")).unwrap();
        let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
        let (ca_s, cert_s, key_s) = (s(&ca), s(&cert), s(&key));
        let config = OtlpConfig::from_env(&env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nowhere"),
            ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", &ca_s),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert_s),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key_s),
            ("VMTRACE_OTLP_MAX_REQUEST_BYTES", "65536"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(config.tls.certificate.as_deref(), Some(ca.as_path()));
        assert_eq!(
            config.tls.client,
            Some(ClientIdentity {
                certificate: cert.clone(),
                key: key.clone()
            })
        );
        assert_eq!(config.max_request_bytes, 65536);
        let err = |vars: &[(&str, &str)]| OtlpConfig::from_env(&env(vars)).unwrap_err().to_string();
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c"),
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert_s)
            ])
            .contains("go together")
        );
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nowhere/ca.pem")
            ])
            .contains("cannot read /nowhere/ca.pem")
        );
        std::fs::write(dir.join("garbage"), "not a certificate").unwrap();
        let garbage = s(&dir.join("garbage"));
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", &garbage)
            ])
            .contains("holds no PEM certificate")
        );
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c"),
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert_s),
                ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &garbage)
            ])
            .contains("is not a PEM private key")
        );
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca_s)
            ])
            .contains("use an https:// endpoint")
        );
        assert!(
            err(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("VMTRACE_OTLP_MAX_REQUEST_BYTES", "100")
            ])
            .contains("at least 4096")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
