//! `vmtrace agent`: the long-running agent. Samples the probes every interval, keeps the timeline
//! and exports the metrics through a Prometheus endpoint and OTLP push.

pub(crate) mod config;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::{
    cmd::agent::config::{AgentArgs, AgentConfig},
    export::metrics::{AgentHealth, families},
    export::{otlp, prometheus},
    host::agent_usage,
    probe::load::ProbeOptions,
    sample::sampler::{Sample, Sampler},
    sample::ticks::Ticks,
    sample::timeline::Timeline,
    tenant::kubernetes,
    tenant::resolve::Tenant,
};

pub async fn run(args: &AgentArgs) -> Result<()> {
    let config = AgentConfig::resolve(args, &|name| std::env::var(name).ok())?;
    let listener = match config.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the Prometheus endpoint"))?,
        ),
        None => None,
    };
    let mut sampler = Sampler::start(&ProbeOptions {
        kick_latency: config.kick_latency,
    })?;
    let pods = kubernetes::PodDirectory::default();
    if let Some(kube) = config.kube.clone() {
        eprintln!(
            "vmtrace agent: pod metadata from {} (node {})",
            kube.api, kube.node
        );
        tokio::spawn(kubernetes::run(kube, pods.clone()));
    }
    let started = SystemTime::now();
    let (latest_tx, latest) = watch::channel(None);
    let timeline = prometheus::SharedTimeline {
        timeline: Arc::new(Mutex::new(Timeline::new(config.window, config.interval))),
        interval: config.interval,
    };
    let export_dropped = Arc::new(AtomicU64::new(0));
    if let Some(listener) = listener {
        eprintln!(
            "vmtrace agent: Prometheus endpoint on http://{}/metrics",
            listener.local_addr()?
        );
        let (latest, timeline) = (latest.clone(), timeline.clone());
        tokio::spawn(async move {
            if let Err(e) = prometheus::serve(listener, latest, timeline).await {
                tracing::error!("{e:#}");
            }
        });
    }
    if let Some(mut otlp_config) = config.otlp.clone() {
        otlp_config.resource = resource(config.node_name.as_deref(), &|n| std::env::var(n).ok())?;
        eprintln!(
            "vmtrace agent: OTLP export to {} every {:?}",
            otlp_config.endpoint, otlp_config.interval
        );
        let (latest, dropped) = (latest.clone(), export_dropped.clone());
        tokio::spawn(async move {
            if let Err(e) = otlp::run(otlp_config, latest, dropped, started).await {
                tracing::error!("{e:#}");
            }
        });
    }
    eprintln!(
        "vmtrace agent: watching; KVM {}; exit source: {}",
        sampler.kvm().flavour.name(),
        sampler.probes().exit_source.describe()
    );

    let mut ticks = Ticks::new(config.interval, None, true)?;
    loop {
        let stop = ticks.next().await;
        let mut sample = sampler.sample()?;
        name_pods(&mut sample, &pods);
        let (cpu_user_secs, cpu_system_secs) = agent_usage::cpu_secs();
        let health = AgentHealth {
            cpu_user_secs,
            cpu_system_secs,
            rss_bytes: agent_usage::rss_bytes(),
            export_dropped: export_dropped.load(Ordering::Relaxed),
        };
        latest_tx.send_replace(Some(Arc::new(families(&sample, &health))));
        if let Ok(mut timeline) = timeline.timeline.lock() {
            timeline.push(&sample);
        }
        if stop {
            break;
        }
    }
    // The last counts reach the collector before the agent goes: counters are cumulative, so this
    // export carries everything since the last one.
    if let Some(mut otlp_config) = config.otlp {
        otlp_config.resource = resource(config.node_name.as_deref(), &|n| std::env::var(n).ok())?;
        if let Err(e) = otlp::export_latest(&otlp_config, &latest, started).await {
            tracing::warn!("final OTLP export failed: {e:#}");
        }
    }
    Ok(())
}

/// Adds what the API server knows to pod tenants.
fn name_pods(sample: &mut Sample, pods: &kubernetes::PodDirectory) {
    let pods = pods.read().expect("pod directory lock");
    for tenant in &mut sample.tenants {
        if let Some(Tenant::KubernetesPod { pod_uid, .. }) = &tenant.identity {
            tenant.kubernetes = pods.get(pod_uid).cloned();
        }
    }
}

/// OTLP resource attributes: vmtrace's own, then OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME,
/// which take precedence as the specification asks.
pub fn resource(
    node_name: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>> {
    let mut attributes: Vec<(String, String)> = vec![
        ("service.name".into(), "vmtrace".into()),
        ("service.version".into(), env!("CARGO_PKG_VERSION").into()),
        // In a pod the hostname is the pod's; the node's name is the host's.
        (
            "host.name".into(),
            node_name.map_or_else(hostname, str::to_owned),
        ),
    ];
    if let Some(node) = node_name {
        attributes.push(("k8s.node.name".into(), node.to_owned()));
    }
    let mut set = |key: String, value: String| match attributes.iter_mut().find(|(k, _)| *k == key)
    {
        Some(slot) => slot.1 = value,
        None => attributes.push((key, value)),
    };
    if let Some(text) = env("OTEL_RESOURCE_ATTRIBUTES") {
        for (key, value) in otlp::parse_key_values(&text, "OTEL_RESOURCE_ATTRIBUTES")? {
            set(key, value);
        }
    }
    if let Some(name) = env("OTEL_SERVICE_NAME") {
        set("service.name".into(), name);
    }
    Ok(attributes)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "unknown".to_owned(), |h| h.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_attributes_from_the_environment_win() {
        let env = |name: &str| match name {
            "OTEL_RESOURCE_ATTRIBUTES" => Some("k8s.cluster.name=prod,host.name=node-7".to_owned()),
            "OTEL_SERVICE_NAME" => Some("vmtrace-eu".to_owned()),
            _ => None,
        };
        let attributes = resource(Some("node-7"), &env).unwrap();
        let get = |k: &str| {
            attributes
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("service.name"), Some("vmtrace-eu"));
        assert_eq!(get("host.name"), Some("node-7"));
        assert_eq!(get("k8s.cluster.name"), Some("prod"));
        assert_eq!(get("k8s.node.name"), Some("node-7"));
        assert_eq!(get("service.version"), Some(env!("CARGO_PKG_VERSION")));
    }
}
