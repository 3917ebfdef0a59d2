//! Pod tenants get their namespace and pod name, and KubeVirt launcher pods their VMI name, from the
//! API server: a node-scoped, metadata-only list, then a watch. The API server here is a stand-in
//! that speaks the Kubernetes list/watch protocol on loopback, serves pods' metadata shaped like real
//! ones, and has a bad day: 500s, a slow list, a dropped watch and 410 Gone. Over OTLP, each
//! pod is a Resource of its own with the semantic conventions' `k8s.*` attributes.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
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
/// The pods of the `top` test: their own UIDs, so that the agent test running beside it does not
/// count their VMMs.
const TOP_WEB_UID: &str = "3d8e1f2a-6b4c-4d9e-8f1a-5c7b9d2e4f6a";
const TOP_LAUNCHER_UID: &str = "9c2d4e6f-1a3b-4c5d-8e7f-0a1b2c3d4e5f";

/// A pod's metadata as the API server gives it to a metadata-only client.
fn pod(
    uid: &str,
    namespace: &str,
    name: &str,
    version: &str,
    launcher_of: Option<&str>,
) -> serde_json::Value {
    let mut metadata = serde_json::json!({"uid": uid, "name": name, "namespace": namespace,
        "resourceVersion": version, "labels": {"app": "web"}});
    if let Some(vmi) = launcher_of {
        metadata["labels"] =
            serde_json::json!({"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "a1"});
        metadata["annotations"] = serde_json::json!({"kubevirt.io/domain": vmi});
        metadata["ownerReferences"] = serde_json::json!([{"apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance", "name": vmi, "uid": "a1", "controller": true}]);
    }
    serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": metadata})
}

/// The UIDs of the stand-in's two pods, a web pod and a KubeVirt launcher.
#[derive(Clone, Copy)]
struct PodUids {
    web: &'static str,
    launcher: &'static str,
}

fn web_pod(uids: PodUids) -> serde_json::Value {
    pod(uids.web, "shop", "web-0", "7", None)
}

fn launcher_pod(uids: PodUids) -> serde_json::Value {
    pod(
        uids.launcher,
        "vms",
        "virt-launcher-db-x7k2p",
        "8",
        Some("db"),
    )
}

/// One request to the stand-in.
#[derive(Debug, Clone)]
struct Request {
    at: Instant,
    watch: bool,
    query: HashMap<String, String>,
    accept: String,
}

/// What the stand-in saw, and whether the slow list is still being answered.
#[derive(Default)]
struct Seen {
    uids: Option<PodUids>,
    requests: Mutex<Vec<Request>>,
    slow_list_pending: AtomicBool,
}

/// The stand-in API server. It plays a bad day, in order:
/// - lists 1 and 2: `500`;
/// - list 3: answered after 5 s (a slow server), the web pod, version 7;
/// - watch 1: the launcher pod ADDED (version 8), then the connection drops;
/// - watch 2 (which should resume from 8): `ERROR` 410 Gone, the version expired;
/// - list 4 (which 410 calls for): both pods, version 9;
/// - watch 3 and later: open, quiet, as a healthy watch.
fn start_api_server(uids: PodUids) -> (SocketAddr, Arc<Seen>, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let seen = Arc::new(Seen {
        uids: Some(uids),
        ..Seen::default()
    });
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/api/v1/pods", get(pods))
            .with_state(seen.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    });
    (addr, seen, runtime)
}

async fn pods(
    State(seen): State<Arc<Seen>>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::{http::StatusCode, response::IntoResponse};
    let watch = query.get("watch").map(String::as_str) == Some("true");
    let uids = seen.uids.expect("the stand-in's pods");
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let number = {
        let mut requests = seen.requests.lock().unwrap();
        requests.push(Request {
            at: Instant::now(),
            watch,
            query,
            accept,
        });
        requests.iter().filter(|r| r.watch == watch).count()
    };
    let list = |items: Vec<serde_json::Value>, version: &str| {
        serde_json::json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": version}, "items": items})
        .to_string()
        .into_response()
    };
    let events = |lines: Vec<serde_json::Value>, then_close: bool| {
        let lines: Vec<Result<String, std::io::Error>> =
            lines.iter().map(|l| Ok(format!("{l}\n"))).collect();
        let stream = futures_util::stream::iter(lines);
        if then_close {
            Body::from_stream(stream).into_response()
        } else {
            // A connection that stays open, as a real watch does.
            Body::from_stream(stream.chain(futures_util::stream::pending())).into_response()
        }
    };
    match (watch, number) {
        (false, 1 | 2) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"etcdserver: leader changed","code":500}"#,
        )
            .into_response(),
        (false, 3) => {
            seen.slow_list_pending.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(5)).await;
            seen.slow_list_pending.store(false, Ordering::SeqCst);
            list(vec![web_pod(uids)], "7")
        }
        (false, _) => list(vec![web_pod(uids), launcher_pod(uids)], "9"),
        (true, 1) => events(
            vec![serde_json::json!({"type": "ADDED", "object": launcher_pod(uids)})],
            true,
        ),
        (true, 2) => events(
            vec![serde_json::json!({"type": "ERROR", "object": {"kind": "Status",
                "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                "message": "too old resource version: 8 (9)", "code": 410}})],
            true,
        ),
        (true, _) => events(Vec::new(), false),
    }
}

use futures_util::StreamExt;

#[test]
fn pod_tenants_are_named_from_the_api_server() {
    if !privileged_host("pod_tenants_are_named_from_the_api_server") {
        return;
    }
    let (api, seen, _runtime) = start_api_server(PodUids {
        web: WEB_UID,
        launcher: LAUNCHER_UID,
    });
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
    // While the API server takes its time over a list, the endpoint answers as ever.
    wait_for("the slow list", Duration::from_secs(30), || {
        seen.slow_list_pending.load(Ordering::SeqCst).then_some(())
    });
    let answered_while_slow = matches!(http_get(port, "/healthz"), Ok((200, _)))
        && matches!(http_get(port, "/metrics"), Ok((200, _)))
        && seen.slow_list_pending.load(Ordering::SeqCst);
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
                // What dashboards and `top` show: namespace/pod.
                ("tenant_name", "shop/web-0"),
            ],
        ),
        (
            &launcher_report,
            vec![
                ("k8s_namespace_name", "vms"),
                ("k8s_pod_name", "virt-launcher-db-x7k2p"),
                ("vm_name", "db"),
                ("k8s_pod_uid", LAUNCHER_UID),
                // A KubeVirt VM's pod: namespace/VM.
                ("tenant_name", "vms/db"),
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
    // The client came through the bad day as a watcher should (the names may be complete before the
    // day is over: the launcher pod arrives with the first watch).
    wait_for(
        "the list after 410 and the watch after it",
        Duration::from_mins(1),
        || {
            let requests = seen.requests.lock().unwrap();
            (requests.iter().filter(|r| !r.watch).count() >= 4
                && requests.iter().filter(|r| r.watch).count() >= 3)
                .then_some(())
        },
    );
    let requests = seen.requests.lock().unwrap().clone();
    let lists: Vec<&Request> = requests.iter().filter(|r| !r.watch).collect();
    let watches: Vec<&Request> = requests.iter().filter(|r| r.watch).collect();
    let version = |r: &Request| r.query.get("resourceVersion").cloned().unwrap_or_default();
    assert!(
        requests
            .iter()
            .all(|r| r.query.get("fieldSelector").map(String::as_str)
                == Some("spec.nodeName=node-1")
                && r.accept.contains("as=PartialObjectMetadata")),
        "not node-scoped and metadata-only: {requests:#?}"
    );
    assert!(lists.len() >= 4 && watches.len() >= 3, "{requests:#?}");
    // After each 500, a pause (kube-rs's backoff starts at 800 ms, jittered), not a tight loop.
    for pair in lists[..3].windows(2) {
        let pause = pair[1].at - pair[0].at;
        assert!(pause >= Duration::from_millis(500), "lists {pause:?} apart");
    }
    // The first watch from the list's version; after it dropped, the next resumed from the last
    // version it had seen, without a list; after 410, a list, then a watch from its version.
    assert_eq!(
        watches[..3].iter().map(|w| version(w)).collect::<Vec<_>>(),
        ["7", "8", "9"]
    );
    let position = |r: &Request| requests.iter().position(|x| x.at == r.at).unwrap();
    assert!(position(lists[2]) < position(watches[0]) && position(watches[1]) < position(lists[3]));
    assert!(
        !requests[position(watches[0])..position(watches[1])]
            .iter()
            .any(|r| !r.watch),
        "listed again after a dropped watch: {requests:#?}"
    );
    assert!(
        answered_while_slow,
        "the endpoint did not answer while the API server was slow"
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
                ("vmtrace.tenant.name", "vms/db"),
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

/// `vmtrace top` names pod tenants from the same API server as the agent: namespace/pod, and
/// namespace/VM for a KubeVirt launcher, through the same bad day.
#[test]
fn top_names_pod_tenants_from_the_api_server() {
    if !privileged_host("top_names_pod_tenants_from_the_api_server") {
        return;
    }
    let (api, _seen, _runtime) = start_api_server(PodUids {
        web: TOP_WEB_UID,
        launcher: TOP_LAUNCHER_UID,
    });
    let base = format!("vmtrace-test-k8s-top-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let _kubepods = TenantCgroup::new(&format!("{base}/kubepods"));
    let _qos = TenantCgroup::new(&format!("{base}/kubepods/besteffort"));
    let web_pod = TenantCgroup::new(&format!("{base}/kubepods/besteffort/pod{TOP_WEB_UID}"));
    let web = TenantCgroup::new(&format!("{}/cri-containerd-5e6f", web_pod.relative));
    let launcher_pod =
        TenantCgroup::new(&format!("{base}/kubepods/besteffort/pod{TOP_LAUNCHER_UID}"));
    let launcher = TenantCgroup::new(&format!("{}/cri-containerd-7a8b", launcher_pod.relative));
    let dir = vmtrace_tests::temp::TempDir::new("k8s-top");
    let frames = dir.path().join("frames.txt");
    let _top = Proc::spawn(
        "vmtrace top",
        Command::new(binary("vmtrace"))
            .args(["top", "-b", "--interval", "500ms"])
            .args([
                "--kube-api",
                &format!("http://{api}"),
                "--node-name",
                "node-1",
            ])
            .stdout(std::fs::File::create(&frames).unwrap())
            .stderr(Stdio::inherit()),
    );
    let last_frame = || {
        let text = std::fs::read_to_string(&frames).unwrap_or_default();
        text.rsplit("vmtrace top · live")
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    wait_for("top's first frame", Duration::from_mins(1), || {
        last_frame().contains("TENANT").then_some(())
    });
    for tenant in [&web, &launcher] {
        run_vmm(&[
            "--scenario",
            "pio",
            "--count",
            "300",
            "--cgroup",
            &tenant.relative,
        ]);
    }
    let frame = poll(Duration::from_mins(1), || {
        let frame = last_frame();
        let named = |name: &str| {
            frame
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
        };
        (named("shop/web-0") && named("vms/db")).then_some(frame)
    });
    assert!(
        frame.is_some(),
        "top did not name both pods; its last frame:\n{}",
        last_frame()
    );
}
