//! Configuration of `vmtrace agent`: flags, environment and an optional TOML file.
//!
//! Precedence, highest first: command-line flags; environment (`VMTRACE_*`, and the standard
//! `OTEL_*` variables for OTLP); the file given by `--config`; built-in defaults. An unknown key or a
//! bad value in the file is one clear error naming the file.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;

use crate::{
    cmd::args::{
        INTERVAL_RANGE, KubeArgs, ProbeArgs, WINDOW_RANGE, check_max_tenants, check_range,
        parse_in_range,
    },
    export::{histogram::BucketFactor, otlp::OtlpConfig},
    tenant::kubernetes::KubeConfig,
};

/// Flags of `vmtrace agent`; each also reads the environment variable shown.
#[derive(Debug, Clone, Default, Args)]
pub struct AgentArgs {
    /// TOML configuration file (keys: interval, window, listen, kick_latency, vm_ioctls,
    /// service_time, max_tenants, node_name, state_dir, web_config, prometheus_bucket_factor, and an
    /// `[otlp]` table with endpoint, protocol, headers, compression, timeout_ms, interval_ms,
    /// certificate, client_certificate, client_key, max_request_bytes,
    /// default_histogram_aggregation; see docs/configuration.md).
    #[arg(long, env = "VMTRACE_CONFIG")]
    pub config: Option<PathBuf>,
    /// How often the probes' counters are read, e.g. `1s`, from 10ms to 1h [default: 1s].
    // The variable is named in the error too: clap names only the flag, even for a value that
    // came from the environment.
    #[arg(long, env = "VMTRACE_INTERVAL", value_parser = |text: &str| {
        parse_in_range(text, "the interval (--interval, VMTRACE_INTERVAL)", INTERVAL_RANGE)
    })]
    pub interval: Option<Duration>,
    /// How much of every tenant's timeline the agent keeps and serves at /api/timeline, e.g.
    /// `10m`, from one interval to 24h [default: 10m].
    #[arg(long, env = "VMTRACE_WINDOW", value_parser = |text: &str| {
        parse_in_range(text, "the window (--window, VMTRACE_WINDOW)", WINDOW_RANGE)
    })]
    pub window: Option<Duration>,
    /// Address of the Prometheus endpoint (/metrics, /api/timeline, /healthz, /readyz), or `off`
    /// [default: 127.0.0.1:9464].
    #[arg(long, env = "VMTRACE_LISTEN")]
    pub listen: Option<String>,
    /// OTLP collector base endpoint, e.g. `http://collector:4317` for gRPC or `http://collector:4318`
    /// for HTTP; overrides OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_EXPORTER_OTLP_METRICS_ENDPOINT.
    /// OTLP export is off when no endpoint is set anywhere.
    #[arg(long, env = "VMTRACE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol, `grpc` or `http/protobuf`; overrides OTEL_EXPORTER_OTLP_PROTOCOL
    /// [default: http/protobuf].
    #[arg(long, env = "VMTRACE_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<String>,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Directory where the agent keeps the doorbells it has learnt, so that after a restart it
    /// goes on counting the kicks of VMs that were already running; `off` keeps nothing
    /// [default: /run/vmtrace].
    #[arg(long, env = "VMTRACE_STATE_DIR")]
    pub state_dir: Option<String>,
    /// Web configuration file for the Prometheus endpoint: TLS (`[tls_server_config]` with
    /// cert_file, key_file, and client_ca_file to require client certificates), basic auth
    /// (`[basic_auth_users]`, bcrypt hashes) and `bearer_token_file`, as node_exporter's keys but
    /// in TOML (docs/configuration.md). Plain HTTP, open to whoever reaches --listen, without it.
    #[arg(long, env = "VMTRACE_WEB_CONFIG")]
    pub web_config: Option<PathBuf>,
    /// Ratio between consecutive latency histogram bounds on the Prometheus endpoint, a power of
    /// two: 2 keeps every one of the kernel's log2 buckets (42 series per histogram with _sum and
    /// _count), 4 every other one (22), 16 every fourth (12), up to 1024 (6). Counts are exact at
    /// every bound kept. OTLP is not affected [default: 2].
    #[arg(long, env = "VMTRACE_PROMETHEUS_BUCKET_FACTOR", value_parser = |text: &str| {
        BucketFactor::parse(text, "--prometheus-bucket-factor (VMTRACE_PROMETHEUS_BUCKET_FACTOR)")
    })]
    pub prometheus_bucket_factor: Option<BucketFactor>,
    #[command(flatten)]
    pub probes: ProbeArgs,
}

/// The optional configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, deserialize_with = "humantime_serde_option::interval")]
    pub interval: Option<Duration>,
    #[serde(default, deserialize_with = "humantime_serde_option::window")]
    pub window: Option<Duration>,
    pub listen: Option<String>,
    pub kick_latency: Option<bool>,
    pub vm_ioctls: Option<bool>,
    pub service_time: Option<bool>,
    pub max_tenants: Option<usize>,
    pub node_name: Option<String>,
    pub state_dir: Option<String>,
    pub web_config: Option<PathBuf>,
    pub prometheus_bucket_factor: Option<u64>,
    #[serde(default)]
    pub otlp: FileOtlp,
}

impl FileConfig {
    /// Parses the file's text; an error is one line naming the file and the line of the bad key
    /// or value (toml's own rendering quotes the source over several lines).
    fn parse(path: &std::path::Path, text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .and_then(|span| text.get(..span.start))
                .map_or_else(String::new, |before| {
                    format!(", line {}", before.matches('\n').count() + 1)
                });
            one_line(anyhow::anyhow!(
                "configuration file {}{line}: {}",
                path.display(),
                e.message().trim()
            ))
        })
    }
}

/// An error as one line: the values it quotes from the file or the environment (a TOML multi-line
/// string, a quoted key) may hold line breaks and other control characters, shown escaped.
fn one_line(error: anyhow::Error) -> anyhow::Error {
    let text = format!("{error:#}");
    if !text.contains(char::is_control) {
        return error;
    }
    anyhow::Error::msg(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>(),
    )
}

/// `[otlp]`: the same settings as the OTEL_EXPORTER_OTLP_* variables.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOtlp {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub headers: Option<String>,
    pub timeout_ms: Option<u64>,
    pub interval_ms: Option<u64>,
    pub compression: Option<String>,
    pub certificate: Option<String>,
    pub client_certificate: Option<String>,
    pub client_key: Option<String>,
    pub max_request_bytes: Option<u64>,
    pub default_histogram_aggregation: Option<String>,
}

/// Durations in the file are written as in flags, "1s", "500ms", and have the flags' ranges.
mod humantime_serde_option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    use crate::cmd::args::{parse_interval, parse_window};

    pub fn interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| parse_interval(&t).map_err(D::Error::custom))
            .transpose()
    }

    pub fn window<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| parse_window(&t).map_err(D::Error::custom))
            .transpose()
    }
}

/// The OTLP export intervals accepted (`OTEL_METRIC_EXPORT_INTERVAL`, `[otlp] interval_ms`).
pub const OTLP_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_hours(1));
/// The OTLP export timeouts accepted (`OTEL_EXPORTER_OTLP_TIMEOUT`, `[otlp] timeout_ms`).
pub const OTLP_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_mins(10));

/// Where the agent keeps its state unless told: /run is emptied at boot, as the VMs the state
/// describes are gone then.
pub const DEFAULT_STATE_DIR: &str = "/run/vmtrace";

/// The agent's settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub interval: Duration,
    /// Timeline kept in the agent.
    pub window: Duration,
    /// `None` when the Prometheus endpoint is off.
    pub listen: Option<SocketAddr>,
    pub kick_latency: bool,
    /// Whether VMMs' setup ioctls are followed (`--vm-ioctls`).
    pub vm_ioctls: bool,
    /// Whether the VMMs' service time is measured (`--service-time`).
    pub service_time: bool,
    /// Tenants reported by name; the others are summed into the `overflow` tenant.
    pub max_tenants: usize,
    pub node_name: Option<String>,
    /// Where learnt doorbells are kept across restarts; `None` when off.
    pub state_dir: Option<PathBuf>,
    /// `None` when OTLP export is off.
    pub otlp: Option<OtlpConfig>,
    /// `None` outside a cluster: pod tenants keep their UID only.
    pub kube: Option<KubeConfig>,
    /// The endpoint's TLS and authentication; `None`: plain HTTP, open.
    pub web_config: Option<PathBuf>,
    /// The endpoint's latency histogram bounds.
    pub prometheus_buckets: BucketFactor,
}

impl AgentConfig {
    /// Resolves flags (which clap already merged with their `VMTRACE_*` variables), the `OTEL_*`
    /// environment read through `env`, and the file.
    pub fn resolve(args: &AgentArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read the configuration file {}", path.display())
                })?;
                FileConfig::parse(path, &text)?
            }
            None => FileConfig::default(),
        };
        Self::resolve_with_file(args, env, file).map_err(one_line)
    }

    /// Resolves a configuration file's text alone, as `vmtrace agent --config <path>` without
    /// flags or environment would: the file's parsing and every range check (the fuzz targets).
    pub fn resolve_file_text(path: &std::path::Path, text: &str) -> Result<Self> {
        let args = AgentArgs {
            config: Some(path.to_owned()),
            ..AgentArgs::default()
        };
        Self::resolve_with_file(&args, &|_| None, FileConfig::parse(path, text)?).map_err(one_line)
    }

    fn resolve_with_file(
        args: &AgentArgs,
        env: &dyn Fn(&str) -> Option<String>,
        file: FileConfig,
    ) -> Result<Self> {
        let listen = match args.listen.clone().or(file.listen) {
            Some(text) if text == "off" => None,
            Some(text) => Some(text.parse().with_context(|| {
                format!("listen address `{text}` is not HOST:PORT (e.g. 127.0.0.1:9464) or `off`")
            })?),
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        };
        let otlp = OtlpConfig::from_env(&|name| otlp_setting(name, args, env, &file.otlp))?;
        let file_key = |key: &str| match &args.config {
            Some(path) => format!("`{key}` in {}", path.display()),
            None => format!("`{key}`"),
        };
        let (interval, interval_from) = match (args.interval, file.interval) {
            (Some(flag), _) => (flag, "--interval (VMTRACE_INTERVAL)".to_owned()),
            (None, Some(value)) => (value, file_key("interval")),
            (None, None) => (Duration::from_secs(1), "the default interval".to_owned()),
        };
        let (window, window_from) = match (args.window, file.window) {
            (Some(flag), _) => (flag, "--window (VMTRACE_WINDOW)".to_owned()),
            (None, Some(value)) => (value, file_key("window")),
            (None, None) => (Duration::from_mins(10), "the default window".to_owned()),
        };
        // The parsers check the ranges already; settings built in code pass here too.
        check_range(interval, &interval_from, INTERVAL_RANGE).map_err(anyhow::Error::msg)?;
        check_range(window, &window_from, WINDOW_RANGE).map_err(anyhow::Error::msg)?;
        if window < interval {
            bail!(
                "the timeline window ({}, from {window_from}) is shorter than the interval ({}, \
                 from {interval_from}): make it at least one interval long",
                humantime::format_duration(window),
                humantime::format_duration(interval)
            );
        }
        if let Some(otlp) = &otlp {
            let from = |variables: &[&str], key: &str| {
                variables
                    .iter()
                    .find(|name| env(name).is_some())
                    .map_or_else(|| file_key(key), |name| (*name).to_owned())
            };
            check_millis(
                otlp.interval,
                OTLP_INTERVAL_RANGE,
                &from(&["OTEL_METRIC_EXPORT_INTERVAL"], "[otlp] interval_ms"),
                "the OTLP export interval",
            )?;
            check_millis(
                otlp.timeout,
                OTLP_TIMEOUT_RANGE,
                &from(
                    &[
                        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
                        "OTEL_EXPORTER_OTLP_TIMEOUT",
                    ],
                    "[otlp] timeout_ms",
                ),
                "the OTLP export timeout",
            )?;
        }
        if listen.is_none() && otlp.is_none() {
            bail!(
                "nothing to export to: the Prometheus endpoint is off and no OTLP endpoint is set \
                 (set --listen, or --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT)"
            );
        }
        let state_dir = match args.state_dir.clone().or(file.state_dir) {
            Some(text) if text == "off" => None,
            Some(text) if text.is_empty() => {
                bail!(
                    "the state directory (--state-dir, VMTRACE_STATE_DIR) is empty: give a directory or `off`"
                )
            }
            Some(text) => Some(PathBuf::from(text)),
            None => Some(PathBuf::from(DEFAULT_STATE_DIR)),
        };
        let max_tenants = match (args.probes.max_tenants, file.max_tenants) {
            (Some(flag), _) => flag,
            (None, Some(value)) => {
                check_max_tenants(value, &file_key("max_tenants")).map_err(anyhow::Error::msg)?;
                value
            }
            (None, None) => args.probes.max_tenants(),
        };
        let prometheus_buckets =
            match (args.prometheus_bucket_factor, file.prometheus_bucket_factor) {
                (Some(flag), _) => flag,
                (None, Some(value)) => {
                    BucketFactor::parse(&value.to_string(), &file_key("prometheus_bucket_factor"))
                        .map_err(anyhow::Error::msg)?
                }
                (None, None) => BucketFactor::KERNEL,
            };
        let node_name = args.kube.node_name.clone().or(file.node_name);
        let kube = KubeConfig::resolve(args.kube.kube_api.as_deref(), node_name.as_deref(), env)?;
        Ok(Self {
            interval,
            window,
            listen,
            kick_latency: args.probes.kick_latency || file.kick_latency.unwrap_or(false),
            vm_ioctls: args.probes.vm_ioctls || file.vm_ioctls.unwrap_or(false),
            service_time: args.probes.service_time || file.service_time.unwrap_or(false),
            max_tenants,
            node_name,
            state_dir,
            otlp,
            kube,
            web_config: args.web_config.clone().or(file.web_config),
            prometheus_buckets,
        })
    }
}

/// Refuses a setting given in milliseconds outside `range`, naming where it was set.
fn check_millis(
    value: Duration,
    (min, max): (Duration, Duration),
    setting: &str,
    what: &str,
) -> Result<()> {
    if value < min || value > max {
        bail!(
            "{setting} = {}: {what} must be from {} to {} ms",
            value.as_millis(),
            min.as_millis(),
            max.as_millis()
        );
    }
    Ok(())
}

/// One OTEL_EXPORTER_OTLP_* setting: the flag, else the environment, else the file.
fn otlp_setting(
    name: &str,
    args: &AgentArgs,
    env: &dyn Fn(&str) -> Option<String>,
    file: &FileOtlp,
) -> Option<String> {
    let flag = match name {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => args.otlp_endpoint.clone(),
        // A base endpoint given as a flag replaces any per-signal endpoint of the environment.
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT" if args.otlp_endpoint.is_some() => return None,
        "OTEL_EXPORTER_OTLP_PROTOCOL" => args.otlp_protocol.clone(),
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL" if args.otlp_protocol.is_some() => return None,
        _ => None,
    };
    let from_file: HashMap<&str, Option<String>> = HashMap::from([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", file.endpoint.clone()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", file.protocol.clone()),
        ("OTEL_EXPORTER_OTLP_HEADERS", file.headers.clone()),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", file.compression.clone()),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", file.certificate.clone()),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            file.client_certificate.clone(),
        ),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", file.client_key.clone()),
        (
            "VMTRACE_OTLP_MAX_REQUEST_BYTES",
            file.max_request_bytes.map(|v| v.to_string()),
        ),
        (
            "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
            file.default_histogram_aggregation.clone(),
        ),
        (
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            file.timeout_ms.map(|v| v.to_string()),
        ),
        (
            "OTEL_METRIC_EXPORT_INTERVAL",
            file.interval_ms.map(|v| v.to_string()),
        ),
    ]);
    flag.or_else(|| env(name))
        .or_else(|| from_file.get(name).cloned().flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn file(text: &str) -> PathBuf {
        // Tests run in parallel: each file gets its own name.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmtrace-config-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_serve_prometheus_on_localhost_only() {
        let config = AgentConfig::resolve(&AgentArgs::default(), &no_env).unwrap();
        assert_eq!(config.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(config.interval, Duration::from_secs(1));
        assert_eq!(config.otlp, None);
        assert_eq!(config.max_tenants, 1000);
    }

    #[test]
    fn flags_beat_environment_beats_file() {
        let path = file(
            "interval = \"5s\"\nlisten = \"0.0.0.0:9000\"\n[otlp]\nendpoint = \"http://file:4318\"\ntimeout_ms = 700\n",
        );
        let args = AgentArgs {
            config: Some(path.clone()),
            ..AgentArgs::default()
        };
        let config = AgentConfig::resolve(&args, &no_env).unwrap();
        assert_eq!(config.interval, Duration::from_secs(5));
        assert_eq!(config.listen, Some("0.0.0.0:9000".parse().unwrap()));
        let otlp = config.otlp.unwrap();
        assert_eq!(
            (otlp.endpoint.as_str(), otlp.timeout),
            ("http://file:4318/v1/metrics", Duration::from_millis(700))
        );

        let env = |name: &str| {
            (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://env:4318".to_owned())
        };
        let config = AgentConfig::resolve(&args, &env).unwrap();
        assert_eq!(config.otlp.unwrap().endpoint, "http://env:4318/v1/metrics");

        let flagged = AgentArgs {
            otlp_endpoint: Some("http://flag:4317".into()),
            otlp_protocol: Some("grpc".into()),
            interval: Some(Duration::from_millis(250)),
            ..args
        };
        let config = AgentConfig::resolve(&flagged, &env).unwrap();
        assert_eq!(config.otlp.unwrap().endpoint, "http://flag:4317");
        assert_eq!(config.interval, Duration::from_millis(250));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_one_clear_error() {
        for (text, needle) in [
            ("intervall = \"1s\"\n", "unknown field `intervall`"),
            ("interval = \"soon\"\n", "soon"),
            ("listen = \"everywhere\"\n", "not HOST:PORT"),
            (
                "[otlp]\nendpoint = \"collector:4317\"\n",
                "must start with http",
            ),
            ("prometheus_bucket_factor = 12\n", "power of two from 2"),
            (
                "[otlp]\nendpoint = \"http://c:4318\"\ndefault_histogram_aggregation = \"log\"\n",
                "base2_exponential_bucket_histogram",
            ),
        ] {
            let path = file(text);
            let args = AgentArgs {
                config: Some(path.clone()),
                ..AgentArgs::default()
            };
            let err = format!("{:#}", AgentConfig::resolve(&args, &no_env).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(
                err.contains("vmtrace-config")
                    || needle == "not HOST:PORT"
                    || needle == "must start with http"
                    || needle == "base2_exponential_bucket_histogram",
                "{err}"
            );
            std::fs::remove_file(path).unwrap();
        }
        let off = AgentArgs {
            listen: Some("off".into()),
            ..AgentArgs::default()
        };
        assert!(
            AgentConfig::resolve(&off, &no_env)
                .unwrap_err()
                .to_string()
                .contains("nothing to export")
        );
    }

    #[test]
    fn zero_and_absurd_durations_are_refused_naming_their_setting_and_range() {
        let with_file = |text: &str, env: &dyn Fn(&str) -> Option<String>| {
            let path = file(text);
            let args = AgentArgs {
                config: Some(path.clone()),
                otlp_endpoint: Some("http://collector:4318".into()),
                ..AgentArgs::default()
            };
            let result = AgentConfig::resolve(&args, env).map_err(|e| format!("{e:#}"));
            std::fs::remove_file(path).unwrap();
            result
        };
        for (text, needles) in [
            (
                "interval = \"0\"\n",
                &["interval", "at least 10ms", "not 0s"][..],
            ),
            ("interval = \"2h\"\n", &["interval", "at most 1h"]),
            (
                "max_tenants = 0\n",
                &["`max_tenants` in", "from 1 to 1000000"],
            ),
            ("window = \"0s\"\n", &["window", "at least 10ms"]),
            ("window = \"2days\"\n", &["window", "at most 1day"]),
            (
                "interval = \"10s\"\nwindow = \"5s\"\n",
                &["`window` in", "`interval` in", "shorter than the interval"],
            ),
            (
                "[otlp]\ninterval_ms = 0\n",
                &["`[otlp] interval_ms` in", "= 0:", "from 100 to 3600000 ms"],
            ),
            (
                "[otlp]\ntimeout_ms = 0\n",
                &["`[otlp] timeout_ms` in", "from 10 to 600000 ms"],
            ),
            (
                "[otlp]\ntimeout_ms = 86400000\n",
                &["`[otlp] timeout_ms`", "= 86400000:"],
            ),
        ] {
            let err = with_file(text, &no_env).unwrap_err();
            for needle in needles {
                assert!(err.contains(needle), "{text:?}: {err}");
            }
        }
        let env = |name: &str| match name {
            "OTEL_METRIC_EXPORT_INTERVAL" => Some("0".to_owned()),
            "OTEL_EXPORTER_OTLP_TIMEOUT" => Some("1".to_owned()),
            _ => None,
        };
        let err = with_file("[otlp]\ninterval_ms = 1000\n", &env).unwrap_err();
        assert!(
            err.starts_with("OTEL_METRIC_EXPORT_INTERVAL = 0: the OTLP export interval"),
            "{err}"
        );
        let env = |name: &str| (name == "OTEL_EXPORTER_OTLP_TIMEOUT").then(|| "1".to_owned());
        let err = with_file("", &env).unwrap_err();
        assert!(err.starts_with("OTEL_EXPORTER_OTLP_TIMEOUT = 1: "), "{err}");
        assert!(with_file("interval = \"10ms\"\nwindow = \"24h\"\n", &no_env).is_ok());

        // Settings built in code, not parsed, are held to the same ranges.
        let args = AgentArgs {
            interval: Some(Duration::ZERO),
            ..AgentArgs::default()
        };
        let err = AgentConfig::resolve(&args, &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--interval (VMTRACE_INTERVAL) must be at least 10ms"),
            "{err}"
        );
    }

    #[test]
    fn a_value_with_line_breaks_is_quoted_on_one_line() {
        // Found by the agent_config fuzz target: a TOML multi-line string echoed in the error.
        for text in [
            "listen = \'\'\'\"off\"\n\'\'\'\n",
            "[otlp]\nendpoint = \"coll\\nector:4317\"\n",
            "\"inter\\nval\" = \"1s\"\n",
        ] {
            let err =
                AgentConfig::resolve_file_text(std::path::Path::new("a.toml"), text).unwrap_err();
            let err = format!("{err:#}");
            assert!(!err.contains('\n') && err.contains("\\n"), "{err}");
        }
    }
}
