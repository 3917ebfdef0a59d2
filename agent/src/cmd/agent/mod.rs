//! `vmtrace agent`: the long-running agent. Samples the probes every interval, keeps the timeline
//! and exports the metrics through a Prometheus endpoint and OTLP push.
//!
//! The probes are loaded and sampled on a thread of their own ([`SamplingThread`]); the runtime's
//! thread serves HTTP, pushes OTLP and keeps the clock, so a slow sample on a large node delays
//! only the next sample.

pub(crate) mod config;

use std::{
    sync::{Arc, Mutex, atomic::Ordering, mpsc},
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result, anyhow};
use tokio::sync::{oneshot, watch};

use crate::{
    cmd::agent::config::AgentConfig,
    cmd::log,
    export::metrics::{AgentHealth, families},
    export::{otlp, prometheus, web},
    host::{agent_usage, capabilities},
    probe::{load::ProbeOptions, spec::ProbeOption},
    sample::errors::SampleErrors,
    sample::sampler::{Sample, Sampler},
    sample::ticks::Ticks,
    sample::timeline::Timeline,
    tenant::{aggregate, kubernetes},
};

pub async fn run(config: AgentConfig) -> Result<()> {
    let web = match &config.web_config {
        Some(path) => web::WebConfig::load(path)?,
        None => web::WebConfig::open(),
    };
    // Checked before the probes load, so that a bad certificate stops the agent at once. The
    // cumulative points start here, before anything is counted.
    let mut exporters = Exporters::new(&config, SystemTime::now())?;
    let listener = match config.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the Prometheus endpoint"))?,
        ),
        None => None,
    };
    let pods = kubernetes::PodDirectory::default();
    if let Some(kube) = config.kube.clone() {
        log::status(&format!(
            "vmtrace agent: pod metadata from {} (node {})",
            kube.api, kube.node
        ));
        tokio::spawn(kubernetes::run(kube, pods.clone()));
    }
    let (latest_tx, latest) = watch::channel(None);
    let timeline = prometheus::SharedTimeline {
        timeline: Arc::new(Mutex::new(
            Timeline::new(config.window, config.interval).with_ended_limit(config.max_tenants + 1),
        )),
        interval: config.interval,
    };
    let export_counters = Arc::new(otlp::ExportCounters::default());
    // Served while the probes load: /healthz answers, /readyz says they are not attached yet.
    if let Some(listener) = listener {
        log::status(&format!(
            "vmtrace agent: Prometheus endpoint on {}://{}/metrics{}",
            if web.tls.is_some() { "https" } else { "http" },
            listener.local_addr()?,
            web.describe()
        ));
        let (latest, timeline) = (latest.clone(), timeline.clone());
        let buckets = config.prometheus_buckets;
        tokio::spawn(async move {
            if let Err(e) = prometheus::serve(listener, latest, timeline, web, buckets).await {
                tracing::error!("{e:#}");
            }
        });
    }
    let options = ProbeOptions {
        kick_latency: config.kick_latency,
        vm_ioctls: config.vm_ioctls,
        service_time: config.service_time,
        thread_exits: false,
    };
    let state_dir = config.state_dir.clone();
    let max_tenants = config.max_tenants;
    let (sampling, watching) = SamplingThread::start(move || {
        let mut sampler = Sampler::start(&options)?;
        sampler.limit_tenants(max_tenants);
        // Without --vm-ioctls no doorbell is learnt, so there is none to keep: kicks are inferred.
        if let Some(dir) = state_dir
            .as_ref()
            .filter(|_| options.is_on(ProbeOption::VmIoctls))
        {
            let restored = sampler.keep_doorbells(dir);
            log::status(&format!(
                "vmtrace agent: learnt doorbells kept in {}; {restored} put back from before",
                dir.display()
            ));
        }
        // The probes are attached: keep only what reading them takes from now on.
        let needed = capabilities::needed_by_the_sampler(
            sampler.counts_hardware_events(),
            crate::host::detect_iommu().present(),
        );
        match capabilities::keep_only(&needed) {
            Ok(dropped) if !dropped.is_empty() => log::status(&format!(
                "vmtrace agent: probes attached; gave up {}, no longer needed; the sampling \
                 thread keeps at most {}, the others none",
                if dropped.len() <= 4 {
                    dropped.join(", ")
                } else {
                    format!("{} capabilities", dropped.len())
                },
                capabilities::names(&needed)
            )),
            Ok(_) => {}
            Err(e) => tracing::warn!("{e:#}"),
        }
        let watching = format!(
            "vmtrace agent: watching; KVM {}; exit source: {}",
            sampler.kvm().flavour.name(),
            sampler.probes().exit_source.describe()
        );
        Ok((sampler, watching))
    })
    .await?;
    // The other threads (the endpoint, OTLP, the Kubernetes watch) need no capability.
    if let Err(e) = capabilities::keep_only(&[]) {
        tracing::warn!("{e:#}");
    }
    if let Some(running) = exporters.running.take() {
        log::status(&format!(
            "vmtrace agent: OTLP export to {} every {:?}",
            running.endpoint(),
            running.interval()
        ));
        tokio::spawn(running.run(latest.clone(), export_counters.clone()));
    }
    log::status(&watching);

    let mut ticks = Ticks::new(config.interval, None, true)?;
    let mut errors = SampleErrors::default();
    let sampled = sample_every_tick(
        &mut ticks,
        &sampling,
        &mut errors,
        |sample, fresh, errors| {
            if fresh {
                aggregate::name_pods(&mut sample.tenants, &pods);
            }
            let (cpu_user_secs, cpu_system_secs) = agent_usage::cpu_secs();
            let health = AgentHealth {
                cpu_user_secs,
                cpu_system_secs,
                rss_bytes: agent_usage::rss_bytes(),
                export_dropped: export_counters.failed.load(Ordering::Relaxed),
                export_retries: export_counters.retries.load(Ordering::Relaxed),
                export_rejected_points: export_counters.rejected_points.load(Ordering::Relaxed),
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
    // export carries everything since the last one. Also when sampling broke down: what was
    // counted until then is not lost.
    if let Some(last) = exporters.last
        && let Err(e) = last.export_latest(&latest).await
    {
        tracing::warn!("{e:#}");
    }
    sampled
}

/// The OTLP exporters: the one that runs every interval, and one with a client of its own for the
/// last export, as the running one may be mid-request when the agent stops.
struct Exporters {
    running: Option<otlp::Exporter>,
    last: Option<otlp::Exporter>,
}

impl Exporters {
    fn new(config: &AgentConfig, start_time: SystemTime) -> Result<Self> {
        let Some(mut otlp_config) = config.otlp.clone() else {
            return Ok(Self {
                running: None,
                last: None,
            });
        };
        otlp_config.resource = resource(config.node_name.as_deref(), &|n| std::env::var(n).ok())?;
        Ok(Self {
            running: Some(otlp::Exporter::new(otlp_config.clone(), start_time)?),
            last: Some(otlp::Exporter::new(otlp_config, start_time)?),
        })
    }
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

/// A [`SampleSource`] on a thread of its own, which takes a sample when asked. The thread ends
/// when this is dropped, once the sample it may be taking is done.
pub(crate) struct SamplingThread {
    requests: mpsc::Sender<oneshot::Sender<Result<Sample>>>,
}

impl SamplingThread {
    /// Starts the thread, which makes its source with `start` (loading the probes takes a while
    /// too), and returns once that is done, with what `start` gave besides the source.
    pub(crate) async fn start<S: SampleSource + 'static, T: Send + 'static>(
        start: impl FnOnce() -> Result<(S, T)> + Send + 'static,
    ) -> Result<(Self, T)> {
        let (started_tx, started) = oneshot::channel();
        let (requests, pending) = mpsc::channel::<oneshot::Sender<Result<Sample>>>();
        std::thread::Builder::new()
            .name("vmtrace-sampler".to_owned())
            .spawn(move || {
                let mut source = match start() {
                    Ok((source, started)) => {
                        let _ = started_tx.send(Ok(started));
                        source
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                // One request per tick; the loop ends when the agent drops its end.
                for reply in pending {
                    let _ = reply.send(source.sample());
                }
            })
            .context("cannot start the sampling thread")?;
        let started = started
            .await
            .map_err(|_| anyhow!("the sampling thread ended while starting"))??;
        Ok((Self { requests }, started))
    }

    /// A sample, taken on the thread; `Err(Stopped)` if the thread is gone (a sample panicked).
    async fn sample(&self) -> Result<Result<Sample>, Stopped> {
        let (reply, sample) = oneshot::channel();
        self.requests.send(reply).map_err(|_| Stopped)?;
        sample.await.map_err(|_| Stopped)
    }
}

/// The sampling thread is gone.
#[derive(Debug, thiserror::Error)]
#[error("the sampling thread stopped")]
pub(crate) struct Stopped;

/// Samples on every tick until the last one. A failed sample is counted in `errors`, logged (rate
/// limited) and skipped: the previous sample is published again with the new error count, so that
/// `vmtrace.agent.sample.errors` moves at once, and the next tick tries afresh. `publish` gets the
/// sample, whether it is new (false when shown again), and the errors so far. Ends with an error
/// if the sampling thread is gone: an agent that can no longer sample should be restarted.
async fn sample_every_tick(
    ticks: &mut Ticks,
    sampling: &SamplingThread,
    errors: &mut SampleErrors,
    mut publish: impl FnMut(&mut Sample, bool, u64),
) -> Result<()> {
    let mut previous: Option<Sample> = None;
    loop {
        let stop = ticks.next().await;
        match sampling.sample().await? {
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
            return Ok(());
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
    use std::sync::atomic::AtomicU64;

    /// A source whose every third sample fails, as a map read refused by the kernel would.
    struct Flaky {
        calls: Arc<AtomicU64>,
    }

    impl SampleSource for Flaky {
        fn sample(&mut self) -> Result<Sample> {
            let calls = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            if calls.is_multiple_of(3) {
                anyhow::bail!(
                    "reading map `KICKS`: bpf_map_delete_elem failed: Bad file descriptor"
                );
            }
            Ok(Sample {
                timestamp: 0.0,
                #[allow(clippy::cast_precision_loss)]
                elapsed_secs: calls as f64,
                interval_secs: 0.01,
                kvm: KvmFlavour::Pvm,
                exit_source: ExitSource::Derived,
                tenants: Vec::new(),
                dtlb_unavailable: None,
                guest_time_unavailable: None,
                figures_unavailable: Vec::new(),
                iommu_faults: Vec::new(),
                drops: std::collections::BTreeMap::new(),
                probes_not_attached: Vec::new(),
                probes_attached: Vec::new(),
                maps: Vec::new(),
                state: crate::sample::sampler::StateSizes::default(),
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
        let calls = Arc::new(AtomicU64::new(0));
        let source = Flaky {
            calls: calls.clone(),
        };
        let (sampling, ()) = SamplingThread::start(move || Ok((source, ())))
            .await
            .unwrap();
        let mut errors = SampleErrors::default();
        let mut published = Vec::new();
        sample_every_tick(
            &mut ticks,
            &sampling,
            &mut errors,
            |sample, fresh, errors| {
                published.push((sample.elapsed_secs, fresh, errors));
            },
        )
        .await
        .unwrap();
        let calls = calls.load(Ordering::Relaxed);
        // It ran to its deadline through every failure.
        assert!(calls >= 10, "{calls} ticks");
        assert_eq!(errors.total(), calls / 3);
        // Every tick published: a new sample, or the previous one again with the errors counted.
        assert_eq!(published.len() as u64, calls);
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
