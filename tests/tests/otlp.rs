//! The agent's OTLP export, received over gRPC and HTTP, plain and gzip-compressed, by a receiver
//! built on the official OTLP protobuf definitions, checked against the reference VMM's ground
//! truth; and an unreachable
//! collector, which must neither stop probing nor grow memory, and whose drops are counted.

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
    otlp_receiver::{Receiver, attribute, int_value, metric},
    privileged_host,
    process::Proc,
    run_vmm,
};

/// `vmtrace agent` exporting to `endpoint` only, stopped with SIGTERM (after a last export) by
/// [`AgentProcess::stop`], killed on drop.
struct AgentProcess(Proc);

impl AgentProcess {
    fn start(protocol: &str, endpoint: &str, compression: &str) -> Self {
        let process = Proc::spawn(
            "vmtrace agent",
            Command::new(binary("vmtrace"))
                .args(["agent", "--listen", "off", "--interval", "200ms"])
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

/// Exports over `protocol` with `compression` (`none` or `gzip`) carry the reference VMMs' counts.
fn exports_match_ground_truth(protocol: &str, compression: &str) {
    let receiver = Receiver::start(0);
    let endpoint = match protocol {
        "grpc" => format!("http://{}", receiver.grpc),
        _ => format!("http://{}", receiver.http),
    };
    let base = format!(
        "vmtrace-test-otlp-{}-{compression}-{}",
        protocol.replace('/', "-"),
        std::process::id()
    );
    let _base = TenantCgroup::new(&base);
    let (a, b) = (
        TenantCgroup::new(&format!("{base}/a")),
        TenantCgroup::new(&format!("{base}/b")),
    );
    let agent = AgentProcess::start(protocol, &endpoint, compression);
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
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    let requests = receiver.requests();
    let last = last_with(&requests, "vmtrace.vm.exits");
    let encoding = if compression == "gzip" {
        "gzip"
    } else {
        "identity"
    };
    let encodings = receiver.encodings();
    assert!(
        !encodings.is_empty() && encodings.iter().all(|e| e == encoding),
        "every {protocol} request {encoding}: {encodings:?}"
    );

    let resource = last.resource_metrics[0].resource.as_ref().unwrap();
    assert_eq!(
        attribute(&resource.attributes, "service.name"),
        Some("vmtrace")
    );
    assert_eq!(
        attribute(&resource.attributes, "k8s.cluster.name"),
        Some("test-cluster")
    );
    assert!(attribute(&resource.attributes, "host.name").is_some_and(|h| !h.is_empty()));

    let exits = metric(&last, "vmtrace.vm.exits").unwrap();
    assert_eq!(
        (exits.unit.as_str(), exits.description.is_empty()),
        ("{exit}", false)
    );
    assert!(
        matches!(&exits.data, Some(Data::Sum(s)) if s.is_monotonic && s.aggregation_temporality == 2)
    );
    let tenant_a = a.agent_path();
    let vmm_exits = metric(&last, "vmtrace.vmm.exits").unwrap();
    let io = |tenant: &str| int_value(vmm_exits, &[("tenant", tenant), ("exit.reason", "io")]);
    assert_eq!(io(&tenant_a), Some(pio.total.exits["io"] as i64));
    assert_eq!(io(&b.agent_path()), Some(doorbell.total.exits["io"] as i64));
    // Every exit once, from the host's one source: without kvm_exit, the returns to the VMM and
    // the exits KVM completed itself (the doorbell's writes), as docs/exits.md says.
    let source = match HostKvm::of_this_host() {
        HostKvm::Pvm => "derived",
        HostKvm::Hardware => "kvm_exit",
    };
    let exit = |tenant: &str, reason: &str| {
        int_value(
            exits,
            &[
                ("tenant", tenant),
                ("exit.source", source),
                ("exit.reason", reason),
            ],
        )
    };
    if source == "derived" {
        assert_eq!(exit(&tenant_a, "io"), Some(pio.total.exits["io"] as i64));
        assert_eq!(
            exit(&b.agent_path(), "mmio.write.kernel"),
            Some(doorbell.doorbell_signals.unwrap() as i64)
        );
    }
    let Some(Data::Sum(sum)) = &exits.data else {
        panic!("vmtrace.vm.exits is not a sum")
    };
    assert!(
        sum.data_points
            .iter()
            .all(|p| attribute(&p.attributes, "exit.source") == Some(source)),
        "another exit source than {source}: {sum:?}"
    );
    let events = metric(&last, "vmtrace.vm.events").unwrap();
    assert_eq!(
        int_value(events, &[("tenant", &tenant_a), ("event", "pio.out")]),
        Some(pio.total.exits["io"] as i64)
    );
    assert_eq!(
        int_value(
            events,
            &[("tenant", &b.agent_path()), ("event", "mmio.write.kernel")]
        ),
        Some(doorbell.doorbell_signals.unwrap() as i64)
    );
    let kicks = metric(&last, "vmtrace.virtio.kicks").unwrap();
    assert_eq!(
        int_value(
            kicks,
            &[("tenant", &b.agent_path()), ("virtio.queue", "any")]
        ),
        Some(doorbell.doorbell_signals.unwrap() as i64)
    );
    // Every io exit but each vCPU's last (after which the VMM stops) was served and timed.
    let service = metric(&last, "vmtrace.vmm.service.duration").unwrap();
    assert_eq!(service.unit, "s");
    let Some(Data::Histogram(histogram)) = &service.data else {
        panic!("not a histogram: {service:?}")
    };
    let point = histogram
        .data_points
        .iter()
        .find(|p| attribute(&p.attributes, "tenant") == Some(&tenant_a))
        .expect("tenant a's service time");
    assert_eq!(point.count, pio.total.exits["io"] - pio.vcpus.len() as u64);
    assert_eq!(point.bucket_counts.iter().sum::<u64>(), point.count);
    assert_eq!(point.bucket_counts.len(), point.explicit_bounds.len() + 1);
    assert!(metric(&last, "vmtrace.agent.memory.rss").is_some());
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
                metric(r, "vmtrace.vmm.exits")
                    .and_then(|m| int_value(m, &[("tenant", &path), ("exit.reason", "io")]))
                    == Some(io)
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
