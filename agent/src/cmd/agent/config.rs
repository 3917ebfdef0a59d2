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
    cmd::args::{ProbeArgs, parse_interval},
    export::otlp::OtlpConfig,
    tenant::kubernetes::KubeConfig,
};

/// Flags of `vmtrace agent`; each also reads the environment variable shown.
#[derive(Debug, Clone, Default, Args)]
pub struct AgentArgs {
    /// TOML configuration file (keys: interval, window, listen, kick_latency, node_name, and an
    /// `[otlp]` table with endpoint, protocol, headers, timeout_ms, interval_ms; see
    /// docs/configuration.md).
    #[arg(long, env = "VMTRACE_CONFIG")]
    pub config: Option<PathBuf>,
    /// How often the probes' counters are read, e.g. `1s` [default: 1s].
    #[arg(long, env = "VMTRACE_INTERVAL", value_parser = parse_interval)]
    pub interval: Option<Duration>,
    /// How much of every tenant's timeline the agent keeps and serves at /api/timeline, e.g.
    /// `10m` [default: 10m].
    #[arg(long, env = "VMTRACE_WINDOW", value_parser = parse_interval)]
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
    /// The Kubernetes node this agent runs on (`k8s.node.name`), usually from the downward API.
    /// With it, inside a cluster, pod tenants get their namespace and name (and KubeVirt VMs their
    /// VirtualMachineInstance name) from the API server, watching this node's pods only.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubernetes API server base URL, for use outside a cluster (e.g. `kubectl proxy`'s
    /// `http://127.0.0.1:8001`); inside a cluster the service environment and account are used.
    #[arg(long, env = "VMTRACE_KUBE_API")]
    pub kube_api: Option<String>,
    #[command(flatten)]
    pub probes: ProbeArgs,
}

/// The optional configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, with = "humantime_serde_option")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_option")]
    pub window: Option<Duration>,
    pub listen: Option<String>,
    pub kick_latency: Option<bool>,
    pub node_name: Option<String>,
    #[serde(default)]
    pub otlp: FileOtlp,
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
}

/// Durations in the file are written as in flags: "1s", "500ms".
mod humantime_serde_option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| crate::cmd::args::parse_interval(&t).map_err(D::Error::custom))
            .transpose()
    }
}

/// The agent's settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub interval: Duration,
    /// Timeline kept in the agent.
    pub window: Duration,
    /// `None` when the Prometheus endpoint is off.
    pub listen: Option<SocketAddr>,
    pub kick_latency: bool,
    pub node_name: Option<String>,
    /// `None` when OTLP export is off.
    pub otlp: Option<OtlpConfig>,
    /// `None` outside a cluster: pod tenants keep their UID only.
    pub kube: Option<KubeConfig>,
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
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("configuration file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let listen = match args.listen.clone().or(file.listen) {
            Some(text) if text == "off" => None,
            Some(text) => Some(text.parse().with_context(|| {
                format!("listen address `{text}` is not HOST:PORT (e.g. 127.0.0.1:9464) or `off`")
            })?),
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        };
        let otlp = OtlpConfig::from_env(&|name| otlp_setting(name, args, env, &file.otlp))?;
        let interval = args
            .interval
            .or(file.interval)
            .unwrap_or(Duration::from_secs(1));
        let window = args
            .window
            .or(file.window)
            .unwrap_or(Duration::from_mins(10));
        if window < interval {
            bail!(
                "the timeline window ({}) is shorter than the interval ({}): make it at least one \
                 interval long",
                humantime::format_duration(window),
                humantime::format_duration(interval)
            );
        }
        if listen.is_none() && otlp.is_none() {
            bail!(
                "nothing to export to: the Prometheus endpoint is off and no OTLP endpoint is set \
                 (set --listen, or --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT)"
            );
        }
        let node_name = args.node_name.clone().or(file.node_name);
        let kube = KubeConfig::resolve(args.kube_api.as_deref(), node_name.as_deref(), env)?;
        Ok(Self {
            interval,
            window,
            listen,
            kick_latency: args.probes.kick_latency || file.kick_latency.unwrap_or(false),
            node_name,
            otlp,
            kube,
        })
    }
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
        let path = std::env::temp_dir().join(format!(
            "vmtrace-config-{}-{}.toml",
            std::process::id(),
            text.len()
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
                    || needle == "must start with http",
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
}
