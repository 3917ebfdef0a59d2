//! Pod tenants get their namespace and pod name, and KubeVirt launcher pods their VMI name, from the
//! API server: a node-scoped list, then a watch. The API server here is a stand-in that speaks the
//! Kubernetes list/watch protocol on loopback and serves pods shaped like real ones. Over OTLP, each
//! pod is a Resource of its own with the semantic conventions' `k8s.*` attributes.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Query, State},
    routing::get,
};
use vmtrace_tests::{
    TenantCgroup, binary,
    expect::{Expectation, HostKvm},
    expected_agent_counts, free_port, http_get,
    otlp_receiver::{Receiver, attribute, exports, tenant_int, tenant_resource},
    privileged_host,
    process::Proc,
    prometheus::{sample, tenant_counts},
    run_vmm,
    wait::{poll, wait_for},
};

const WEB_UID: &str = "0f5c3e6a-8d2b-4f1e-9a7c-2b6d4e8f1a3c";
const LAUNCHER_UID: &str = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

fn pod(uid: &str, namespace: &str, name: &str, launcher_of: Option<&str>) -> serde_json::Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"uid": uid, "name": name, "namespace": namespace, "resourceVersion": "7",
                     "labels": {"app": "web"}},
        "spec": {"nodeName": "node-1"},
    });
    if let Some(vmi) = launcher_of {
        pod["metadata"]["labels"] =
            serde_json::json!({"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "a1"});
        pod["metadata"]["annotations"] = serde_json::json!({"kubevirt.io/domain": vmi});
        pod["metadata"]["ownerReferences"] = serde_json::json!([{"apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance", "name": vmi, "uid": "a1", "controller": true}]);
    }
    pod
}

/// The stand-in API server: lists the web pod; its watch then announces the launcher pod.
fn start_api_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let queries: Arc<Mutex<Vec<String>>> = Arc::default();
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/api/v1/pods", get(pods))
            .with_state(queries.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    });
    (addr, queries, runtime)
}

async fn pods(
    State(queries): State<Arc<Mutex<Vec<String>>>>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Body {
    queries.lock().unwrap().push(format!("{query:?}"));
    if query.get("watch").map(String::as_str) == Some("true") {
        let event = serde_json::json!({"type": "ADDED", "object": pod(LAUNCHER_UID, "vms", "virt-launcher-db-x7k2p", Some("db"))});
        let lines = vec![Ok::<_, std::io::Error>(format!("{event}\n"))];
        // The event, then a connection that stays open as a real watch does.
        let stream = tokio_stream_from(lines);
        return Body::from_stream(stream);
    }
    let list = serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
        "items": [pod(WEB_UID, "shop", "web-0", None)]});
    Body::from(list.to_string())
}

fn tokio_stream_from(
    lines: Vec<Result<String, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<String, std::io::Error>> {
    futures_util::stream::iter(lines).chain(futures_util::stream::pending())
}

use futures_util::StreamExt;

#[test]
fn pod_tenants_are_named_from_the_api_server() {
    if !privileged_host("pod_tenants_are_named_from_the_api_server") {
        return;
    }
    let (api, queries, _runtime) = start_api_server();
    let base = format!("vmtrace-test-k8s-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    // The kubelet's cgroupfs layout: kubepods/<qos>/pod<uid>/<container>.
    let _kubepods = TenantCgroup::new(&format!("{base}/kubepods"));
    let _qos = TenantCgroup::new(&format!("{base}/kubepods/burstable"));
    let web_pod = TenantCgroup::new(&format!("{base}/kubepods/burstable/pod{WEB_UID}"));
    let web = TenantCgroup::new(&format!("{}/cri-containerd-1a2b", web_pod.relative));
    let launcher_pod = TenantCgroup::new(&format!("{base}/kubepods/burstable/pod{LAUNCHER_UID}"));
    let launcher = TenantCgroup::new(&format!("{}/cri-containerd-3c4d", launcher_pod.relative));

    let port = free_port();
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let receiver = Receiver::start(0);
    let _agent = Proc::spawn(
        "vmtrace agent",
        Command::new(binary("vmtrace"))
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", receiver.grpc),
            )
            .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
            .args([
                "agent",
                "--interval",
                "200ms",
                "--listen",
                &listen.to_string(),
            ])
            .args([
                "--kube-api",
                &format!("http://{api}"),
                "--node-name",
                "node-1",
            ])
            .stderr(Stdio::inherit()),
    );
    wait_for("the agent to be ready", Duration::from_mins(1), || {
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    let web_report = run_vmm(&[
        "--scenario",
        "pio",
        "--count",
        "500",
        "--cgroup",
        &web.relative,
    ]);
    let launcher_report = run_vmm(&[
        "--scenario",
        "pio",
        "--count",
        "700",
        "--cgroup",
        &launcher.relative,
    ]);

    // Each pod's series carries its API-server labels, and its count is the VMM's, compared as
    // numbers.
    let pods = [
        (
            &web_report,
            vec![
                ("k8s_namespace_name", "shop"),
                ("k8s_pod_name", "web-0"),
                ("k8s_pod_uid", WEB_UID),
            ],
        ),
        (
            &launcher_report,
            vec![
                ("k8s_namespace_name", "vms"),
                ("k8s_pod_name", "virt-launcher-db-x7k2p"),
                ("vm_name", "db"),
                ("k8s_pod_uid", LAUNCHER_UID),
            ],
        ),
    ];
    let expected: Vec<f64> = pods
        .iter()
        .map(|(report, _)| expected_agent_counts(std::slice::from_ref(*report))["exit.io"] as f64)
        .collect();
    let mut metrics = String::new();
    let counted = |metrics: &str| -> Vec<Option<f64>> {
        pods.iter()
            .map(|(_, labels)| {
                let mut wanted = labels.clone();
                wanted.push(("exit_reason", "io"));
                sample(metrics, "vmtrace_vmm_exits_total", &wanted)
            })
            .collect()
    };
    let labelled = poll(Duration::from_secs(20), || {
        metrics = http_get(port, "/metrics").expect("GET /metrics").1;
        counted(&metrics)
            .iter()
            .zip(&expected)
            .all(|(got, want)| *got == Some(*want))
            .then_some(())
    });
    assert!(
        labelled.is_some(),
        "pod series: wanted exit.io {expected:?}, got {:?}, in:\n{metrics}",
        counted(&metrics)
    );
    // Every kind of each pod, against its VMM's figures, once the emptied cgroups' memory
    // figures have settled.
    let kvm = HostKvm::of_this_host();
    for (uid, report) in [(WEB_UID, &web_report), (LAUNCHER_UID, &launcher_report)] {
        let tenant = format!("pod/{uid}");
        let expectation = Expectation::of_vmms(std::slice::from_ref(report), kvm);
        poll(Duration::from_secs(10), || {
            metrics = http_get(port, "/metrics").expect("GET /metrics").1;
            expectation
                .mismatches(&tenant_counts(&metrics, &tenant))
                .is_empty()
                .then_some(())
        });
        expectation.assert_matches(&tenant, &tenant_counts(&metrics, &tenant));
    }
    let queries = queries.lock().unwrap();
    assert!(
        queries.iter().all(|q| q.contains("spec.nodeName=node-1")),
        "not node-scoped: {queries:?}"
    );
    assert!(
        queries
            .iter()
            .any(|q| q.contains("\"watch\": \"true\"") && q.contains("\"resourceVersion\": \"7\"")),
        "{queries:?}"
    );

    // Over OTLP: one Resource per pod, with the pod's identity as the collector's kubeletstats
    // receiver gives it, and the pod's counts on it.
    let resources = [
        (
            WEB_UID,
            &web_report,
            vec![
                ("k8s.namespace.name", "shop"),
                ("k8s.pod.name", "web-0"),
                ("k8s.pod.uid", WEB_UID),
                ("k8s.node.name", "node-1"),
            ],
        ),
        (
            LAUNCHER_UID,
            &launcher_report,
            vec![
                ("k8s.namespace.name", "vms"),
                ("k8s.pod.name", "virt-launcher-db-x7k2p"),
                ("k8s.pod.uid", LAUNCHER_UID),
                ("k8s.node.name", "node-1"),
                ("vmtrace.vm.name", "db"),
            ],
        ),
    ];
    receiver.wait_for(
        Duration::from_secs(20),
        "both pods' Resources with their names and counts",
        |requests| {
            exports(requests).last().is_some_and(|(_, last)| {
                resources.iter().all(|(uid, report, wanted)| {
                    let tenant = format!("pod/{uid}");
                    let Some(resource) =
                        tenant_resource(last, &tenant).and_then(|r| r.resource.as_ref())
                    else {
                        return false;
                    };
                    wanted
                        .iter()
                        .all(|(k, v)| attribute(&resource.attributes, k) == Some(v))
                        && tenant_int(last, &tenant, "vmtrace.vmm.exits", &[("exit.reason", "io")])
                            == Some(report.total.exits["io"] as i64)
                })
            })
        },
    );
}
