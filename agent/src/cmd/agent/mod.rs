//! `vmtrace agent`: the long-running agent. Samples the probes every interval, keeps the timeline
//! and exports the metrics through a Prometheus endpoint and OTLP push.

pub(crate) mod config;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::{
    cmd::agent::config::{AgentArgs, AgentConfig},
    export::metrics::{AgentHealth, families},
    export::{otlp, prometheus},
    host::agent_usage,
    probe::load::ProbeOptions,
    sample::errors::SampleErrors,
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
    let mut errors = SampleErrors::default();
    sample_every_tick(
        &mut ticks,
        &mut sampler,
        &mut errors,
        |sample, fresh, errors| {
            if fresh {
                name_pods(sample, &pods);
            }
            let (cpu_user_secs, cpu_system_secs) = agent_usage::cpu_secs();
            let health = AgentHealth {
                cpu_user_secs,
                cpu_system_secs,
                rss_bytes: agent_usage::rss_bytes(),
                export_dropped: export_dropped.load(Ordering::Relaxed),
                sample_errors: errors,
            };
            latest_tx.send_replace(Some(Arc::new(families(sample, &health))));
            if fresh && let Ok(mut timeline) = timeline.timeline.lock() {
                timeline.push(sample);
            }
        },
    )
    .await;
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

/// Where the agent's samples come from: the probes, through [`Sampler`].
pub(crate) trait SampleSource {
    fn sample(&mut self) -> Result<Sample>;
}

impl SampleSource for Sampler {
    fn sample(&mut self) -> Result<Sample> {
        Sampler::sample(self)
    }
}

/// Samples on every tick until the last one. A failed sample is counted in `errors`, logged (rate
/// limited) and skipped: the previous sample is published again with the new error count, so that
/// `vmtrace.agent.sample.errors` moves at once, and the next tick tries afresh. `publish` gets the
/// sample, whether it is new (false when shown again), and the errors so far.
async fn sample_every_tick(
    ticks: &mut Ticks,
    source: &mut dyn SampleSource,
    errors: &mut SampleErrors,
    mut publish: impl FnMut(&mut Sample, bool, u64),
) {
    let mut previous: Option<Sample> = None;
    loop {
        let stop = ticks.next().await;
        match source.sample() {
            Ok(mut sample) => {
                publish(&mut sample, true, errors.total());
                previous = Some(sample);
            }
            Err(e) => {
                errors.record(&e, Instant::now());
                if let Some(sample) = &mut previous {
                    publish(sample, false, errors.total());
                }
            }
        }
        if stop {
            break;
        }
    }
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
    use std::time::Duration;

    use super::*;
    use crate::{host::KvmFlavour, probe::load::ExitSource};

    /// A source whose every third sample fails, as a map read refused by the kernel would.
    struct Flaky {
        calls: u64,
    }

    impl SampleSource for Flaky {
        fn sample(&mut self) -> Result<Sample> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                anyhow::bail!(
                    "reading map `KICKS`: bpf_map_delete_elem failed: Bad file descriptor"
                );
            }
            Ok(Sample {
                timestamp: 0.0,
                #[allow(clippy::cast_precision_loss)]
                elapsed_secs: self.calls as f64,
                interval_secs: 0.01,
                kvm: KvmFlavour::Pvm,
                exit_source: ExitSource::Derived,
                tenants: Vec::new(),
                dtlb_unavailable: None,
                iommu_faults: Vec::new(),
                drops: std::collections::BTreeMap::new(),
                probes_not_attached: Vec::new(),
                probes_attached: Vec::new(),
                maps: Vec::new(),
                last: false,
            })
        }
    }

    #[tokio::test]
    async fn a_failed_sample_is_counted_and_the_loop_goes_on() {
        let mut ticks = Ticks::new(
            Duration::from_millis(10),
            Some(Duration::from_millis(200)),
            true,
        )
        .unwrap();
        let mut source = Flaky { calls: 0 };
        let mut errors = SampleErrors::default();
        let mut published = Vec::new();
        sample_every_tick(
            &mut ticks,
            &mut source,
            &mut errors,
            |sample, fresh, errors| {
                published.push((sample.elapsed_secs, fresh, errors));
            },
        )
        .await;
        // It ran to its deadline through every failure.
        assert!(source.calls >= 10, "{} ticks", source.calls);
        assert_eq!(errors.total(), source.calls / 3);
        // Every tick published: a new sample, or the previous one again with the errors counted.
        assert_eq!(published.len() as u64, source.calls);
        for (i, &(elapsed, fresh, count)) in published.iter().enumerate() {
            let call = i as u64 + 1;
            assert_eq!(count, call / 3, "tick {call}");
            assert_eq!(fresh, !call.is_multiple_of(3), "tick {call}");
            let shown = if fresh { call } else { call - 1 };
            #[allow(clippy::cast_precision_loss)]
            let shown = shown as f64;
            assert!((elapsed - shown).abs() < f64::EPSILON, "tick {call}");
        }
    }

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
