//! The agent's OTLP export, received over gRPC and HTTP by a receiver built on the official OTLP
//! protobuf definitions and checked against the reference VMM's ground truth: plain and
//! gzip-compressed, over TLS with a client certificate, to a collector that answers
//! RESOURCE_EXHAUSTED (or 429) first, to one with a small message limit, and with partial
//! successes; one Resource per tenant; and an unreachable collector, which must neither stop
//! probing nor grow memory, and whose drops are counted.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest, metrics::v1::metric::Data,
};
use vmtrace_tests::{
    TenantCgroup, binary,
    expect::HostKvm,
    free_port,
    otlp_receiver::{
        Behaviour, Receiver, TlsFiles, attribute, exports, int_value, make_certificates, metric,
        tenant_int, tenant_metric, tenant_resource,
    },
    privileged_host,
    process::Proc,
    run_vmm,
    temp::TempDir,
};

/// `vmtrace agent` exporting to `endpoint` only, stopped with SIGTERM (after a last export) by
/// [`AgentProcess::stop`], killed on drop.
struct AgentProcess(Proc);

impl AgentProcess {
    fn start(protocol: &str, endpoint: &str, compression: &str) -> Self {
        Self::start_with(protocol, endpoint, compression, &[])
    }

    /// With more environment, e.g. the TLS files.
    fn start_with(protocol: &str, endpoint: &str, compression: &str, env: &[(&str, &str)]) -> Self {
        let process = Proc::spawn(
            "vmtrace agent",
            Command::new(binary("vmtrace"))
                .envs(env.iter().copied())
                .args(["agent", "--listen", "off", "--interval", "200ms"])
                .arg("--service-time")
                .env("OTEL_EXPORTER_OTLP_COMPRESSION", compression)
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
                .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
                .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
                .env("OTEL_RESOURCE_ATTRIBUTES", "k8s.cluster.name=test-cluster")
                .stderr(Stdio::inherit()),
        );
        // Give the probes time to attach before guests run.
        std::thread::sleep(Duration::from_millis(1500));
        Self(process)
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn stop(mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let status = self.0.child.wait().unwrap();
        assert!(status.success(), "vmtrace agent exited with {status}");
    }
}

fn last_with(requests: &[ExportMetricsServiceRequest], name: &str) -> ExportMetricsServiceRequest {
    requests
        .iter()
        .rev()
        .find(|r| metric(r, name).is_some())
        .unwrap_or_else(|| panic!("no export carried {name}"))
        .clone()
}

/// The settings of one run: the protocol, compression, the receiver's behaviour and the agent's
/// extra environment.
struct Setup<'a> {
    /// Names the tenants' cgroups: tests run side by side.
    label: &'a str,
    protocol: &'a str,
    compression: &'a str,
    behaviour: Behaviour,
    https: bool,
    env: Vec<(&'a str, String)>,
    /// An agent counter and the value the run waits for it to reach in an export before stopping.
    settled: Option<(&'a str, i64)>,
}

impl<'a> Setup<'a> {
    fn plain(label: &'a str, protocol: &'a str, compression: &'a str) -> Self {
        Self {
            label,
            protocol,
            compression,
            behaviour: Behaviour::default(),
            https: false,
            env: Vec::new(),
            settled: None,
        }
    }
}

/// What a run left: the receiver, the VMMs' reports and the tenants' names.
struct Run {
    receiver: Receiver,
    pio: vmtrace_vmm::Report,
    doorbell: vmtrace_vmm::Report,
    tenant_a: String,
    tenant_b: String,
}

/// Two tenants' guests (pio with 2 vCPUs, doorbell) under an agent exporting as `setup` says,
/// stopped (with its last export) once they are done.
fn run(setup: &Setup) -> Run {
    let receiver = Receiver::with(0, setup.behaviour.clone());
    let scheme = if setup.https { "https" } else { "http" };
    let endpoint = match setup.protocol {
        "grpc" => format!("{scheme}://{}", receiver.grpc),
        _ => format!("{scheme}://{}", receiver.http),
    };
    let base = format!(
        "vmtrace-test-otlp-{}-{}-{}-{}",
        setup.label,
        setup.protocol.replace('/', "-"),
        setup.compression,
        std::process::id()
    );
    let _base = TenantCgroup::new(&base);
    let (a, b) = (
        TenantCgroup::new(&format!("{base}/a")),
        TenantCgroup::new(&format!("{base}/b")),
    );
    let env: Vec<(&str, &str)> = setup.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = AgentProcess::start_with(setup.protocol, &endpoint, setup.compression, &env);
    let pio = run_vmm(&[
        "--scenario",
        "pio",
        "--count",
        "3000",
        "--vcpus",
        "2",
        "--cgroup",
        &a.relative,
    ]);
    let doorbell = run_vmm(&[
        "--scenario",
        "doorbell",
        "--count",
        "4000",
        "--cgroup",
        &b.relative,
    ]);
    // Stopped once an export has carried every count: a collector that refuses some requests
    // delays the first one through.
    let (path_a, path_b) = (a.agent_path(), b.agent_path());
    let io = |report: &vmtrace_vmm::Report| Some(report.total.exits["io"] as i64);
    receiver.wait_for(
        Duration::from_secs(30),
        "both tenants' io exits",
        |requests| {
            exports(requests).last().is_some_and(|(_, last)| {
                let count = |tenant: &str| {
                    tenant_int(last, tenant, "vmtrace.vmm.exits", &[("exit.reason", "io")])
                };
                let settled = setup.settled.is_none_or(|(name, value)| {
                    metric(last, name).and_then(|m| int_value(m, &[])) == Some(value)
                });
                count(&path_a) == io(&pio) && count(&path_b) == io(&doorbell) && settled
            })
        },
    );
    agent.stop();
    Run {
        receiver,
        pio,
        doorbell,
        tenant_a: a.agent_path(),
        tenant_b: b.agent_path(),
    }
}

impl Run {
    /// The last export, merged from its requests if it was split.
    fn last_export(&self) -> ExportMetricsServiceRequest {
        let exports = exports(&self.receiver.requests());
        exports
            .into_iter()
            .rev()
            .map(|(_, merged)| merged)
            .find(|r| metric(r, "vmtrace.vm.exits").is_some())
            .expect("an export with vmtrace.vm.exits")
    }

    /// The last export carries both tenants' counts exactly, each on the tenant's own Resource.
    fn assert_ground_truth(&self) {
        let last = self.last_export();
        let (tenant_a, tenant_b) = (self.tenant_a.as_str(), self.tenant_b.as_str());
        let (pio, doorbell) = (&self.pio, &self.doorbell);
        for tenant in [tenant_a, tenant_b] {
            let resource = tenant_resource(&last, tenant)
                .and_then(|r| r.resource.as_ref())
                .unwrap_or_else(|| panic!("no Resource for {tenant}"));
            assert_eq!(
                attribute(&resource.attributes, "service.name"),
                Some("vmtrace")
            );
            assert_eq!(
                attribute(&resource.attributes, "k8s.cluster.name"),
                Some("test-cluster")
            );
            assert!(attribute(&resource.attributes, "host.name").is_some_and(|h| !h.is_empty()));
        }
        let exits = tenant_metric(&last, tenant_a, "vmtrace.vm.exits").unwrap();
        assert_eq!(
            (exits.unit.as_str(), exits.description.is_empty()),
            ("{exit}", false)
        );
        assert!(
            matches!(&exits.data, Some(Data::Sum(s)) if s.is_monotonic && s.aggregation_temporality == 2)
        );
        let io =
            |tenant: &str| tenant_int(&last, tenant, "vmtrace.vmm.exits", &[("exit.reason", "io")]);
        assert_eq!(io(tenant_a), Some(pio.total.exits["io"] as i64));
        assert_eq!(io(tenant_b), Some(doorbell.total.exits["io"] as i64));
        // Every exit once, from the host's one source: without kvm_exit, the returns to the VMM
        // and the exits KVM completed itself (the doorbell's writes), as docs/exits.md says.
        let source = match HostKvm::of_this_host() {
            HostKvm::Pvm => "derived",
            HostKvm::Hardware => "kvm_exit",
        };
        let exit = |tenant: &str, reason: &str| {
            tenant_int(
                &last,
                tenant,
                "vmtrace.vm.exits",
                &[("exit.source", source), ("exit.reason", reason)],
            )
        };
        if source == "derived" {
            assert_eq!(exit(tenant_a, "io"), Some(pio.total.exits["io"] as i64));
            assert_eq!(
                exit(tenant_b, "mmio.write.kernel"),
                Some(doorbell.doorbell_signals.unwrap() as i64)
            );
        }
        let Some(Data::Sum(sum)) = &exits.data else {
            panic!("vmtrace.vm.exits is not a sum")
        };
        // The tenant is the Resource's: the points keep only their own attributes.
        assert!(
            sum.data_points.iter().all(|p| {
                attribute(&p.attributes, "exit.source") == Some(source)
                    && attribute(&p.attributes, "tenant").is_none()
            }),
            "another exit source than {source}, or a tenant on a point: {sum:?}"
        );
        assert_eq!(
            tenant_int(
                &last,
                tenant_a,
                "vmtrace.vm.events",
                &[("event", "pio.out")]
            ),
            Some(pio.total.exits["io"] as i64)
        );
        assert_eq!(
            tenant_int(
                &last,
                tenant_b,
                "vmtrace.vm.events",
                &[("event", "mmio.write.kernel")]
            ),
            Some(doorbell.doorbell_signals.unwrap() as i64)
        );
        // The doorbell has no datamatch; the default probes infer its kicks as those of the queue
        // index the guest writes, 0.
        assert_eq!(
            tenant_int(
                &last,
                tenant_b,
                "vmtrace.virtio.kicks",
                &[("virtio.queue", "0")]
            ),
            Some(doorbell.doorbell_signals.unwrap() as i64)
        );
        // Every io exit but each vCPU's last (after which the VMM stops) was served and timed.
        // Latencies go as exponential histograms at scale 0, in the kernel's nanoseconds, or as
        // explicit ones in seconds where configured so.
        let service = tenant_metric(&last, tenant_a, "vmtrace.vmm.service.duration").unwrap();
        let served = pio.total.exits["io"] - pio.vcpus.len() as u64;
        match &service.data {
            Some(Data::ExponentialHistogram(histogram)) => {
                assert_eq!(service.unit, "ns");
                let point = &histogram.data_points[0];
                assert_eq!((point.count, point.scale), (served, 0));
                let positive = point.positive.as_ref().unwrap();
                assert_eq!(
                    point.zero_count + positive.bucket_counts.iter().sum::<u64>(),
                    point.count
                );
                // Serving an exit takes more than 2 ns, and less than the 2^40 ns counted to.
                assert!(positive.offset >= 1, "{point:?}");
                assert!(
                    positive.offset as usize + positive.bucket_counts.len() <= 40,
                    "{point:?}"
                );
                assert!(point.max.unwrap() <= point.sum.unwrap(), "{point:?}");
            }
            Some(Data::Histogram(histogram)) => {
                assert_eq!(service.unit, "s");
                let point = &histogram.data_points[0];
                assert_eq!(point.count, served);
                assert_eq!(point.bucket_counts.iter().sum::<u64>(), point.count);
                assert_eq!(point.explicit_bounds.len(), 39);
                assert_eq!(point.bucket_counts.len(), point.explicit_bounds.len() + 1);
            }
            other => panic!("not a histogram: {other:?}"),
        }
        // The agent's own metrics are on its own Resource, without a tenant.
        let agent = last
            .resource_metrics
            .iter()
            .find(|r| metric_in(r, "vmtrace.agent.memory.rss"))
            .expect("the agent's Resource");
        let agent_resource = agent.resource.as_ref().unwrap();
        assert_eq!(
            attribute(&agent_resource.attributes, "vmtrace.tenant"),
            None
        );
        assert_eq!(
            attribute(&agent_resource.attributes, "service.name"),
            Some("vmtrace")
        );
    }

    /// The agent's own counter `name` in the last export.
    fn agent_counter(&self, name: &str) -> i64 {
        int_value(metric(&self.last_export(), name).unwrap(), &[]).unwrap()
    }
}

fn metric_in(
    resource: &opentelemetry_proto::tonic::metrics::v1::ResourceMetrics,
    name: &str,
) -> bool {
    resource
        .scope_metrics
        .iter()
        .flat_map(|s| &s.metrics)
        .any(|m| m.name == name)
}

/// Exports over `protocol` with `compression` (`none` or `gzip`) carry the reference VMMs'
/// counts, every request encoded as asked, over one connection.
fn exports_match_ground_truth(protocol: &str, compression: &str) {
    let run = run(&Setup::plain("plain", protocol, compression));
    run.assert_ground_truth();
    let encoding = if compression == "gzip" {
        "gzip"
    } else {
        "identity"
    };
    let encodings = run.receiver.encodings();
    assert!(
        !encodings.is_empty() && encodings.iter().all(|e| e == encoding),
        "every {protocol} request {encoding}: {encodings:?}"
    );
    // One connection for the periodic exports, at most one more for the last export: three
    // exports show a connection reused (a loaded machine runs the guests in fewer periods).
    assert!(
        encodings.len() >= 3 && run.receiver.connections() <= 2,
        "{} exports over {} connections",
        encodings.len(),
        run.receiver.connections()
    );
    assert_eq!(run.agent_counter("vmtrace.agent.export.dropped"), 0);
}

#[test]
fn otlp_grpc_export_carries_the_ground_truth() {
    if privileged_host("otlp_grpc_export_carries_the_ground_truth") {
        exports_match_ground_truth("grpc", "none");
    }
}

#[test]
fn otlp_grpc_gzip_export_carries_the_ground_truth() {
    if privileged_host("otlp_grpc_gzip_export_carries_the_ground_truth") {
        exports_match_ground_truth("grpc", "gzip");
    }
}

#[test]
fn otlp_http_gzip_export_carries_the_ground_truth() {
    if privileged_host("otlp_http_gzip_export_carries_the_ground_truth") {
        exports_match_ground_truth("http/protobuf", "gzip");
    }
}

#[test]
fn otlp_http_export_carries_the_ground_truth() {
    if privileged_host("otlp_http_export_carries_the_ground_truth") {
        exports_match_ground_truth("http/protobuf", "none");
    }
}

#[test]
fn otlp_explicit_bucket_histograms_by_configuration() {
    if !privileged_host("otlp_explicit_bucket_histograms_by_configuration") {
        return;
    }
    let mut setup = Setup::plain("explicit", "http/protobuf", "none");
    setup.env = vec![(
        "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
        "explicit_bucket_histogram".to_owned(),
    )];
    let run = run(&setup);
    run.assert_ground_truth();
    let last = run.last_export();
    let service = tenant_metric(&last, &run.tenant_a, "vmtrace.vmm.service.duration").unwrap();
    assert!(
        matches!(service.data, Some(Data::Histogram(_))),
        "{service:?}"
    );
}

/// Over TLS to a collector that requires a client certificate: with the CA and the agent's
/// certificate configured, every count arrives; without the certificate, nothing does.
fn exports_over_mutual_tls(protocol: &str) {
    let dir = TempDir::new(&format!("otlp-tls-{}", protocol.replace('/', "-")));
    make_certificates(dir.path());
    let file = |name: &str| dir.path().join(name);
    let behaviour = Behaviour {
        tls: Some(TlsFiles {
            certificate: file("server.crt"),
            key: file("server.key"),
            client_ca: file("ca.crt"),
        }),
        ..Behaviour::default()
    };
    let path = |name: &str| file(name).to_str().unwrap().to_owned();
    let run = run(&Setup {
        behaviour: behaviour.clone(),
        https: true,
        env: vec![
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", path("ca.crt")),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", path("client.crt")),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", path("client.key")),
        ],
        ..Setup::plain("tls", protocol, "gzip")
    });
    run.assert_ground_truth();
    assert_eq!(run.agent_counter("vmtrace.agent.export.dropped"), 0);

    // The same collector, an agent that trusts it but has no certificate of its own: refused at
    // the handshake, every attempt counted.
    let receiver = Receiver::with(0, behaviour);
    let endpoint = match protocol {
        "grpc" => format!("https://{}", receiver.grpc),
        _ => format!("https://{}", receiver.http),
    };
    let ca = path("ca.crt");
    let agent = AgentProcess::start_with(
        protocol,
        &endpoint,
        "none",
        &[("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca)],
    );
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
    assert!(
        receiver.connections() >= 2 && receiver.requests().is_empty(),
        "without a client certificate: {} connections, {} requests accepted",
        receiver.connections(),
        receiver.requests().len()
    );
}

#[test]
fn otlp_grpc_over_tls_with_a_client_certificate() {
    if privileged_host("otlp_grpc_over_tls_with_a_client_certificate") {
        exports_over_mutual_tls("grpc");
    }
}

#[test]
fn otlp_http_over_tls_with_a_client_certificate() {
    if privileged_host("otlp_http_over_tls_with_a_client_certificate") {
        exports_over_mutual_tls("http/protobuf");
    }
}

/// A collector that refuses the first three requests as retryable, asking for a delay, then
/// answers two with a partial success: the agent waits as asked, retries, loses nothing, and
/// counts the retries and the rejected points exactly.
fn retries_after_the_collector_says(protocol: &str, retry_after: Duration) {
    let run = run(&Setup {
        behaviour: Behaviour {
            refuse_first: 3,
            retry_after,
            partial_first: 2,
            rejected_points: 5,
            ..Behaviour::default()
        },
        settled: Some(("vmtrace.agent.export.rejected_points", 10)),
        ..Setup::plain("retry", protocol, "none")
    });
    run.assert_ground_truth();
    let arrivals = run.receiver.arrivals();
    let refused: Vec<bool> = arrivals.iter().map(|a| a.refused).collect();
    assert_eq!(refused[..4], [true, true, true, false], "{refused:?}");
    for pair in arrivals[..4].windows(2) {
        let waited = pair[1].at - pair[0].at;
        assert!(
            waited >= retry_after,
            "retried after {waited:?}, the collector asked for {retry_after:?}"
        );
    }
    assert_eq!(run.agent_counter("vmtrace.agent.export.retries"), 3);
    assert_eq!(run.agent_counter("vmtrace.agent.export.dropped"), 3);
    assert_eq!(
        run.agent_counter("vmtrace.agent.export.rejected_points"),
        10
    );
}

#[test]
fn otlp_grpc_retries_after_resource_exhausted() {
    if privileged_host("otlp_grpc_retries_after_resource_exhausted") {
        retries_after_the_collector_says("grpc", Duration::from_millis(800));
    }
}

#[test]
fn otlp_http_retries_after_too_many_requests() {
    if privileged_host("otlp_http_retries_after_too_many_requests") {
        // Retry-After is in whole seconds.
        retries_after_the_collector_says("http/protobuf", Duration::from_secs(1));
    }
}

/// A collector that refuses requests above 6 KiB: the agent, told that limit, splits every export
/// into requests below it, and the parts together carry every count.
fn splits_below_the_collectors_limit(protocol: &str) {
    const LIMIT: usize = 6 * 1024;
    let run = run(&Setup {
        behaviour: Behaviour {
            max_message_bytes: Some(LIMIT),
            ..Behaviour::default()
        },
        env: vec![("VMTRACE_OTLP_MAX_REQUEST_BYTES", LIMIT.to_string())],
        ..Setup::plain("split", protocol, "none")
    });
    run.assert_ground_truth();
    let arrivals = run.receiver.arrivals();
    let largest = arrivals.iter().map(|a| a.bytes).max().unwrap();
    assert!(largest <= LIMIT, "a request of {largest} bytes");
    let exports = exports(&run.receiver.requests());
    let parts: Vec<usize> = exports.iter().map(|(parts, _)| *parts).collect();
    assert!(
        parts.iter().filter(|&&p| p >= 2).count() >= 3,
        "exports were not split: {parts:?}"
    );
    assert_eq!(run.agent_counter("vmtrace.agent.export.dropped"), 0);
    eprintln!("split: exports of {parts:?} requests, the largest {largest} bytes");
}

#[test]
fn otlp_grpc_splits_below_the_message_limit() {
    if privileged_host("otlp_grpc_splits_below_the_message_limit") {
        splits_below_the_collectors_limit("grpc");
    }
}

#[test]
fn otlp_http_splits_below_the_body_limit() {
    if privileged_host("otlp_http_splits_below_the_body_limit") {
        splits_below_the_collectors_limit("http/protobuf");
    }
}

#[test]
fn an_unreachable_collector_costs_nothing_but_counted_drops() {
    if !privileged_host("an_unreachable_collector_costs_nothing_but_counted_drops") {
        return;
    }
    let port = free_port();
    let base = format!("vmtrace-test-otlp-down-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenant = TenantCgroup::new(&format!("{base}/t"));
    let agent = AgentProcess::start("grpc", &format!("http://127.0.0.1:{port}"), "none");
    let rss_start = agent.rss_kib();
    // Guests exit throughout the outage: 60 s at 2000 port writes per second.
    let vmm = Command::new(binary("vmtrace-vmm"))
        .args([
            "--scenario",
            "pio",
            "--count",
            "124000",
            "--rate",
            "2000",
            "--quiet",
        ])
        .args(["--cgroup", &tenant.relative])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let outage = Instant::now();
    let mut rss_max = rss_start;
    while outage.elapsed() < Duration::from_mins(1) {
        std::thread::sleep(Duration::from_secs(1));
        rss_max = rss_max.max(agent.rss_kib());
    }
    let receiver = Receiver::start(port);
    let output = vmm.wait_with_output().unwrap();
    assert!(output.status.success());
    let truth: vmtrace_vmm::Report = serde_json::from_slice(&output.stdout).unwrap();
    let io = truth.total.exits["io"] as i64;
    let path = tenant.agent_path();
    receiver.wait_for(
        Duration::from_secs(20),
        "the tenant's full exit count",
        |requests| {
            requests.iter().any(|r| {
                tenant_int(r, &path, "vmtrace.vmm.exits", &[("exit.reason", "io")]) == Some(io)
            })
        },
    );
    let requests = receiver.requests();
    let last = last_with(&requests, "vmtrace.agent.export.dropped");
    let dropped = int_value(metric(&last, "vmtrace.agent.export.dropped").unwrap(), &[]).unwrap();
    // One export every 300 ms for 60 s failed: each is counted.
    assert!(dropped >= 100, "only {dropped} failed exports counted");
    assert!(
        rss_max <= rss_start + 8 * 1024,
        "agent memory grew from {rss_start} KiB to {rss_max} KiB during the outage"
    );
    eprintln!(
        "outage: {dropped} exports dropped, RSS {rss_start} -> max {rss_max} KiB, {io} exits all delivered"
    );
    agent.stop();
}
