//! deploy/: the Kubernetes manifests validate offline against the Kubernetes schemas (PyPI
//! `kubernetes-validate`, installed into a venv under target/), keep to least privilege, agree with
//! each other and with the image, and the agent runs as the DaemonSet would: the manifest's
//! arguments, environment, user, capabilities and read-only host mounts, in its own mount, PID,
//! network, UTS and cgroup namespaces, while a reference VMM runs in a tenant cgroup.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::Duration,
};

use serde_json::Value;
use vmtrace_tests::{
    TenantCgroup, binary, cgroup2_root, have,
    manifests::{
        containerfile_capabilities, deploy_dir, find_kind, kubernetes_validate, merge,
        pod_and_container, python, security, strings, yaml_docs,
    },
    on_path,
    pod::{
        Grant, assert_agent_capabilities, capability_number, counts_a_pio_and_a_doorbell_vmm,
        start_pod,
    },
    privileged_host,
    temp::{RmdirOnDrop, TempDir, copy_dir},
    wait::poll,
};

#[test]
fn manifests_validate_and_keep_to_least_privilege() {
    let test = "manifests_validate_and_keep_to_least_privilege";
    let python = match python() {
        Ok(p) => p,
        Err(e) => {
            have(
                test,
                false,
                &format!("kubernetes-validate unavailable: {e}"),
            );
            return;
        }
    };
    let dir = deploy_dir();

    // Every Kubernetes manifest, one by one, against the schemas (strict: no unknown fields).
    let kustomization = &yaml_docs(&python, &dir.join("kustomization.yaml"))[0];
    let listed = strings(&kustomization["resources"]);
    let kustomization_text = fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    // Optional pieces are listed commented out: `# - file.yaml` and `# - path: patches/x.yaml`.
    let optional: Vec<String> = kustomization_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix('#')?.trim().strip_prefix('-'))
        .filter_map(|l| {
            let word = l
                .trim()
                .trim_start_matches("path:")
                .split_whitespace()
                .next()?;
            std::path::Path::new(word)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("yaml"))
                .then(|| word.to_owned())
        })
        .collect();
    for file in listed.iter().chain(&optional) {
        assert!(
            dir.join(file).is_file(),
            "kustomization.yaml names {file}, which does not exist"
        );
    }
    let mut all_docs: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for file in listed.iter().chain(&optional) {
        let docs = yaml_docs(&python, &dir.join(file));
        assert!(!docs.is_empty(), "{file} is empty");
        if file.starts_with("patches/") {
            // A patch is not a whole object; it is validated applied, below.
        } else if docs
            .iter()
            .all(|d| d["apiVersion"] == "monitoring.coreos.com/v1")
        {
            // The Prometheus Operator's CRD is not in the core schemas: checked by hand below.
            eprintln!(
                "{file}: ServiceMonitor (a CRD, not in the Kubernetes schemas): checked structurally"
            );
        } else {
            kubernetes_validate(&python, &dir.join(file));
        }
        all_docs.insert(file.clone(), docs);
    }
    let docs_of = |file: &str| {
        all_docs
            .get(file)
            .unwrap_or_else(|| panic!("{file} missing"))
    };

    // The DaemonSet: least privilege.
    let daemonset = find_kind(docs_of("daemonset.yaml"), "DaemonSet");
    let (pod, container) = pod_and_container(daemonset);
    let ctx = |key: &str| security(pod, container, key);
    assert_ne!(
        ctx("privileged"),
        &Value::Bool(true),
        "no privileged container"
    );
    assert_eq!(ctx("allowPrivilegeEscalation"), &Value::Bool(false));
    assert_eq!(ctx("readOnlyRootFilesystem"), &Value::Bool(true));
    assert_eq!(ctx("runAsNonRoot"), &Value::Bool(true));
    let uid = ctx("runAsUser").as_u64().expect("runAsUser");
    let gid = ctx("runAsGroup").as_u64().expect("runAsGroup");
    assert_ne!(uid, 0, "the DaemonSet runs as a non-root user");
    let capabilities = &container["securityContext"]["capabilities"];
    assert_eq!(strings(&capabilities["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strings(&capabilities["add"]).into_iter().collect();
    let allowed: BTreeSet<String> = ["BPF", "PERFMON", "DAC_READ_SEARCH"]
        .map(str::to_owned)
        .into();
    assert!(
        added.is_subset(&allowed) && added.contains("BPF") && added.contains("PERFMON"),
        "capabilities {added:?}: BPF and PERFMON, and only what docs/deploy.md proves necessary"
    );
    for host in ["hostPID", "hostNetwork", "hostIPC"] {
        assert_ne!(pod[host], Value::Bool(true), "{host}");
    }
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null())),
        "tolerates every taint"
    );
    for (kind, key) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "memory"),
    ] {
        assert!(
            container["resources"][kind][key].is_string(),
            "resources.{kind}.{key}"
        );
    }
    // hostPath volumes: tracefs, cgroupfs and BTF, all mounted read-only.
    let volumes: BTreeMap<&str, &str> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
        .collect();
    for path in ["/sys/kernel/tracing", "/sys/fs/cgroup", "/sys/kernel/btf"] {
        assert!(
            volumes.values().any(|p| *p == path),
            "a hostPath volume for {path}"
        );
    }
    for mount in container["volumeMounts"].as_array().expect("volumeMounts") {
        let name = mount["name"].as_str().unwrap_or_default();
        if volumes.contains_key(name) {
            assert_eq!(mount["readOnly"], true, "hostPath mount {name} read-only");
        }
    }
    // The agent runs under vmtrace's own seccomp profile, which the init container installs from
    // the image into the hostPath the profile's path names; the init container holds nothing.
    let profile = &container["securityContext"]["seccompProfile"];
    assert_eq!(profile["type"], "Localhost");
    let profile_path = profile["localhostProfile"]
        .as_str()
        .expect("localhostProfile");
    let (profile_dir, profile_file) = profile_path.rsplit_once('/').expect("dir/file");
    assert_eq!(
        volumes.get("seccomp").copied(),
        Some(format!("/var/lib/kubelet/seccomp/{profile_dir}").as_str()),
        "the seccomp volume is the profile's directory under the kubelet's seccomp root"
    );
    let inits = pod["initContainers"].as_array().expect("initContainers");
    let installer = inits
        .iter()
        .find(|c| c["name"] == "install-seccomp-profile")
        .expect("the seccomp profile's installer");
    let command = strings(&installer["command"]).join(" ");
    assert!(
        command.contains("/usr/share/vmtrace/seccomp.json")
            && command.contains(&format!("/seccomp/{profile_file}")),
        "the installer writes the image's profile as {profile_path}: {command}"
    );
    assert!(
        containerfile_text_has(
            &dir,
            "COPY deploy/seccomp/vmtrace.json /usr/share/vmtrace/seccomp.json"
        ),
        "the image carries deploy/seccomp/vmtrace.json"
    );
    for init in inits {
        let name = init["name"].as_str().unwrap_or_default();
        if name == "mount-tracefs" {
            // Privileged only for Bidirectional propagation, and only one mount (docs/deploy.md).
            let command = strings(&init["command"]).join(" ");
            assert!(command.contains("mount -t tracefs"), "{name}: {command}");
            let mounts = init["volumeMounts"].as_array().expect("volumeMounts");
            assert_eq!(mounts.len(), 1, "{name} mounts tracefs only");
            assert_eq!(mounts[0]["mountPropagation"], "Bidirectional");
        } else {
            assert_eq!(
                strings(&init["securityContext"]["capabilities"]["drop"]),
                ["ALL"],
                "{name}"
            );
            assert!(
                init["securityContext"]["capabilities"]["add"].is_null(),
                "{name}"
            );
            assert_ne!(init["securityContext"]["privileged"], true, "{name}");
        }
        assert_eq!(
            init["securityContext"]["readOnlyRootFilesystem"], true,
            "{name}"
        );
        assert_eq!(
            init["image"], container["image"],
            "{name} runs the agent's image"
        );
    }

    // Probes, port, arguments, environment, scrape annotations.
    let port = container["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "metrics"))
        .expect("a port named metrics");
    assert_eq!(port["containerPort"], 9464);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let args = strings(&container["args"]);
    assert!(
        args.first().is_some_and(|a| a == "agent")
            && args.iter().any(|a| a == "--listen=0.0.0.0:9464"),
        "args {args:?}"
    );
    let node_env = container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "NODE_NAME"))
        .expect("NODE_NAME");
    assert_eq!(
        node_env["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let annotations = &daemonset["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9464");
    let pod_labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &daemonset["spec"]["selector"]["matchLabels"], pod_labels,
        "the selector matches the pod template"
    );

    // The image gives the non-root user exactly the manifest's capabilities.
    assert_eq!(
        containerfile_capabilities(),
        added,
        "deploy/Containerfile's setcap must grant exactly the DaemonSet's capabilities.add"
    );
    let containerfile = fs::read_to_string(dir.join("Containerfile")).unwrap();
    assert!(
        containerfile.contains(&format!("USER {uid}:{gid}")),
        "Containerfile USER is the manifest's runAsUser:runAsGroup"
    );

    // RBAC: the agent's service account may read pods, nothing else.
    let rbac = docs_of("rbac.yaml");
    let account = find_kind(rbac, "ServiceAccount");
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    let role = find_kind(rbac, "ClusterRole");
    for rule in role["rules"].as_array().expect("rules") {
        assert_eq!(strings(&rule["resources"]), ["pods"], "{rule}");
        let verbs: BTreeSet<String> = strings(&rule["verbs"]).into_iter().collect();
        assert!(
            verbs.is_subset(&["get", "list", "watch"].map(str::to_owned).into()),
            "read-only: {verbs:?}"
        );
    }
    let binding = find_kind(rbac, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);

    // Service and ServiceMonitor select the agent's pods and its metrics port.
    let service = find_kind(docs_of("service.yaml"), "Service");
    for (key, value) in service["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(
            &pod_labels[key], value,
            "the Service selects the agent's pods"
        );
    }
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["targetPort"], "metrics");
    let monitor = find_kind(docs_of("servicemonitor.yaml"), "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("ServiceMonitor selector")
    {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "the ServiceMonitor selects the Service"
        );
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], service_port["name"]);
    assert!(
        endpoint["relabelings"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["targetLabel"] == "node"
                && r["sourceLabels"][0] == "__meta_kubernetes_pod_node_name")),
        "the ServiceMonitor labels series with their node"
    );

    // The NetworkPolicy admits only one namespace, to the agents' metrics port.
    let policy = find_kind(docs_of("networkpolicy.yaml"), "NetworkPolicy");
    for (key, value) in policy["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .expect("podSelector")
    {
        assert_eq!(
            &pod_labels[key], value,
            "the policy selects the agent's pods"
        );
    }
    assert_eq!(strings(&policy["spec"]["policyTypes"]), ["Ingress"]);
    let ingress = policy["spec"]["ingress"].as_array().expect("ingress rules");
    assert_eq!(ingress.len(), 1, "one ingress rule");
    let from = ingress[0]["from"].as_array().expect("from");
    assert!(
        from.len() == 1
            && from[0]["podSelector"].is_null()
            && from[0]["ipBlock"].is_null()
            && from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                .is_string(),
        "only a namespace, by name: {from:?}"
    );
    assert_eq!(ingress[0]["ports"][0]["port"], port["name"]);

    // The TLS patch: the agent reads the ConfigMap's web.toml, whose files are where the patch
    // mounts the Secret, and whose example user's hash is of the password the file names.
    let web = find_kind(docs_of("web-config.yaml"), "ConfigMap");
    let web_toml = web["data"]["web.toml"].as_str().expect("web.toml");
    let mut tls = daemonset.clone();
    merge(&mut tls, &docs_of("patches/metrics-tls.yaml")[0]);
    let (tls_pod, tls_agent) = pod_and_container(&tls);
    let env_value = |name: &str| {
        tls_agent["env"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["name"] == name))
            .and_then(|e| e["value"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let mount_of = |volume: &str| {
        tls_agent["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == volume))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("no mount of {volume}"))
            .to_owned()
    };
    assert_eq!(
        env_value("VMTRACE_WEB_CONFIG"),
        format!("{}/web.toml", mount_of("web-config"))
    );
    for file in ["tls.crt", "tls.key"] {
        assert!(
            web_toml.contains(&format!("\"{}/{file}\"", mount_of("metrics-tls"))),
            "web.toml names the Secret's {file}"
        );
    }
    let hash = web_toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("prometheus = "))
        .expect("the example user")
        .trim_matches('"');
    assert!(
        bcrypt::verify("change-me", hash).unwrap(),
        "the example hash is of change-me"
    );
    let volumes_of_tls: Vec<&str> = tls_pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(volumes_of_tls.contains(&"metrics-tls") && volumes_of_tls.contains(&"tracefs"));
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(tls_agent[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
        assert_eq!(
            tls_agent[probe]["httpGet"]["port"], "metrics",
            "{probe} keeps its port"
        );
    }

    // The OTLP example: the collector receives gRPC and HTTP, and the patch points the agents at it.
    let collector = docs_of("otel-collector.yaml");
    let config_map = find_kind(collector, "ConfigMap");
    let scratch = TempDir::new("manifests");
    let config_path = scratch.join("otel-collector-config.yaml");
    fs::write(
        &config_path,
        config_map["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml"),
    )
    .unwrap();
    let config = yaml_docs(&python, &config_path).remove(0);
    let protocols = &config["receivers"]["otlp"]["protocols"];
    assert!(
        protocols["grpc"]["endpoint"]
            .as_str()
            .is_some_and(|e| e.ends_with(":4317"))
    );
    assert!(
        protocols["http"]["endpoint"]
            .as_str()
            .is_some_and(|e| e.ends_with(":4318"))
    );
    let pipeline = &config["service"]["pipelines"]["metrics"];
    assert_eq!(strings(&pipeline["receivers"]), ["otlp"]);
    for exporter in strings(&pipeline["exporters"]) {
        assert!(
            config["exporters"][&exporter].is_object(),
            "exporter {exporter}"
        );
    }
    assert!(strings(&pipeline["exporters"]).contains(&"prometheus".to_owned()));
    assert!(strings(&pipeline["exporters"]).contains(&"debug".to_owned()));
    let collector_service = find_kind(collector, "Service");
    let mut patched = daemonset.clone();
    merge(&mut patched, &docs_of("patches/otlp-export.yaml")[0]);
    let env: BTreeMap<String, String> = pod_and_container(&patched).1["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect();
    assert_eq!(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some(&format!(
            "http://{}.{}.svc:4317",
            collector_service["metadata"]["name"].as_str().unwrap(),
            collector_service["metadata"]["namespace"].as_str().unwrap()
        )),
        "patches/otlp-export.yaml points at the example collector's gRPC port"
    );
    assert_eq!(
        env.get("OTEL_EXPORTER_OTLP_PROTOCOL").map(String::as_str),
        Some("grpc")
    );

    // Every patch applied (as kubectl would) still validates.
    let mut both = daemonset.clone();
    for patch in optional.iter().filter(|f| f.starts_with("patches/")) {
        merge(&mut both, &docs_of(patch)[0]);
    }
    assert_eq!(both["spec"]["template"]["spec"]["hostPID"], true);
    assert!(
        both["spec"]["template"]["spec"]["initContainers"]
            .as_array()
            .is_some_and(|i| i.iter().all(|c| c["name"] != "mount-tracefs")),
        "patches/no-tracefs-mount.yaml removes the privileged init container"
    );
    let path = scratch.join("patched-daemonset.json");
    fs::write(&path, serde_json::to_string_pretty(&both).unwrap()).unwrap();
    kubernetes_validate(&python, &path);

    // The kustomize base renders, with every optional piece too.
    if have(
        "manifests_validate_and_keep_to_least_privilege",
        on_path("kubectl"),
        "kubectl is not installed (`cargo xtask setup` installs Debian's kubernetes-client)",
    ) {
        let work = TempDir::new("kustomize");
        copy_dir(&dir, work.path());
        let render = |what: &str| {
            let output = Command::new("kubectl")
                .arg("kustomize")
                .arg(work.path())
                .output()
                .expect("kubectl kustomize");
            assert!(
                output.status.success(),
                "kubectl kustomize ({what}) failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let rendered = work.join(format!("rendered-{what}.yaml"));
            fs::write(&rendered, &output.stdout).unwrap();
            kubernetes_validate(&python, &rendered);
            yaml_docs(&python, &rendered)
        };
        let base = render("base");
        let documents: usize = listed.iter().map(|f| docs_of(f).len()).sum();
        assert_eq!(base.len(), documents, "the base renders every resource");
        // Uncomment every optional resource and patch.
        let everything: String = kustomization_text
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("# -") && t.contains(".yaml") || t.starts_with("# patches:") {
                    format!("{}{}", &l[..l.len() - t.len()], &t[2..])
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(work.join("kustomization.yaml"), everything).unwrap();
        let full = render("everything");
        let rendered_ds = find_kind(&full, "DaemonSet");
        let (rendered_pod, rendered_agent) = pod_and_container(rendered_ds);
        assert_eq!(rendered_pod["securityContext"]["runAsUser"], 0);
        assert_eq!(rendered_pod["hostPID"], true);
        assert!(
            rendered_pod["initContainers"]
                .as_array()
                .is_some_and(|i| i.len() == 1 && i[0]["name"] == "install-seccomp-profile"),
            "kustomize applies the delete patch: {}",
            rendered_pod["initContainers"]
        );
        assert!(
            rendered_agent["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
        );
        find_kind(&full, "ServiceMonitor");
    }
}

fn containerfile_text_has(dir: &Path, line: &str) -> bool {
    fs::read_to_string(dir.join("Containerfile"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == line)
}

/// Runs the agent container of `daemonset` as a pod with `grant`, drives a pio and a doorbell
/// reference VMM in a tenant cgroup, and checks that the agent is ready and counts them exactly.
fn run_as_pod(daemonset: &Value, grant: Grant, executable: &Path, parent: &str, dir: &Path) {
    let label = format!("{grant:?}").to_lowercase();
    let (pod_spec, container) = pod_and_container(daemonset);
    let pod_cgroup = TenantCgroup::new(&format!("{parent}/pod-{label}"));
    let tenant = TenantCgroup::new(&format!("{parent}/tenant-{label}"));
    let pod = start_pod(daemonset, grant, executable, &pod_cgroup, dir, &label);
    let port_of = |probe: &str| -> (u16, String) {
        let get = &container[probe]["httpGet"];
        let port = match &get["port"] {
            Value::String(name) => container["ports"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["name"] == *name))
                .and_then(|p| p["containerPort"].as_u64())
                .expect("named port"),
            other => other.as_u64().expect("port"),
        };
        (port as u16, get["path"].as_str().expect("path").to_owned())
    };
    let (ready_port, ready_path) = port_of("readinessProbe");
    let (live_port, live_path) = port_of("livenessProbe");

    let ready = poll(Duration::from_mins(1), || {
        matches!(pod.http_get(ready_port, &ready_path), Ok((200, _))).then_some(())
    });
    assert!(
        ready.is_some(),
        "{label}: {ready_path} not 200 within 60 s; the pod's stderr:\n{}",
        pod.stderr()
    );
    let (status, _) = pod.http_get(live_port, &live_path).expect("liveness");
    assert_eq!(status, 200, "{label}: {live_path}");

    // The agent holds exactly what the manifest grants: its user, its capabilities, no_new_privs.
    let agent = pod.agent_pid().expect("the agent process");
    let status = fs::read_to_string(format!("/proc/{agent}/status")).expect("agent status");
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let uid = security(pod_spec, container, "runAsUser")
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        field("Uid:").split_whitespace().next(),
        Some(uid.to_string().as_str()),
        "{label}: the agent's uid"
    );
    let wanted: u64 = strings(&container["securityContext"]["capabilities"]["add"])
        .iter()
        .map(|c| 1u64 << capability_number(c))
        .sum();
    // What it keeps once the probes are attached: the sampling thread CAP_BPF (with CAP_PERFMON
    // only where hardware counters are opened), the other threads nothing.
    let effective = assert_agent_capabilities(&label, agent, wanted);
    if security(pod_spec, container, "allowPrivilegeEscalation") == &Value::Bool(false) {
        assert_eq!(field("NoNewPrivs:"), "1", "{label}: no_new_privs");
    }

    eprintln!("{label}: ready, uid {uid}, sampling thread CapEff {effective:#x}");
    counts_a_pio_and_a_doorbell_vmm(
        &label,
        &tenant,
        || {
            pod.http_get(ready_port, "/metrics")
                .map(|(_, body)| body)
                .unwrap_or_default()
        },
        || pod.stderr(),
    );
}

#[test]
fn the_agent_runs_as_the_daemonset_would() {
    let test = "the_agent_runs_as_the_daemonset_would";
    if !privileged_host(test) {
        return;
    }
    for tool in ["unshare", "setpriv", "ip", "setcap"] {
        if !have(
            test,
            on_path(tool),
            &format!("{tool} missing (util-linux, iproute2, libcap2-bin)"),
        ) {
            return;
        }
    }
    let python = match python() {
        Ok(p) => p,
        Err(e) => {
            have(test, false, &format!("PyYAML unavailable: {e}"));
            return;
        }
    };
    let dir = deploy_dir();
    let daemonset = find_kind(
        &yaml_docs(&python, &dir.join("daemonset.yaml")),
        "DaemonSet",
    )
    .clone();
    let mut as_root = daemonset.clone();
    merge(
        &mut as_root,
        &yaml_docs(&python, &dir.join("patches/run-as-root.yaml"))[0],
    );
    let vmtrace = binary("vmtrace");
    binary("vmtrace-vmm");

    let parent = format!("vmtrace-deploy-{}", std::process::id());
    let _parent = RmdirOnDrop(cgroup2_root().expect("cgroup v2").join(&parent));
    let work = TempDir::new("deploy");
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).unwrap();

    // The image's binary: a copy with the Containerfile's file capabilities.
    let image_binary = work.join("vmtrace");
    fs::copy(&vmtrace, &image_binary).expect("copying vmtrace");
    let file_caps = containerfile_capabilities()
        .iter()
        .map(|c| format!("cap_{}", c.to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let status = Command::new("setcap")
        .arg(format!("{file_caps}=ep"))
        .arg(&image_binary)
        .status()
        .expect("setcap");
    assert!(status.success(), "setcap {file_caps}=ep failed");

    // As Kubernetes runs the DaemonSet's non-root container (bounding set only, file capabilities
    // from the image, no_new_privs); the same user with the manifest's capabilities as ambient
    // capabilities; and patches/run-as-root.yaml's root user with its two capabilities.
    run_as_pod(
        &daemonset,
        Grant::FileCapabilities,
        &image_binary,
        &parent,
        work.path(),
    );
    run_as_pod(&daemonset, Grant::Ambient, &vmtrace, &parent, work.path());
    run_as_pod(&as_root, Grant::Root, &vmtrace, &parent, work.path());
}

#[test]
fn strategic_merge_of_the_patches_merges_containers_and_env_by_name() {
    let mut base = serde_json::json!({"spec": {"containers": [
        {"name": "agent", "env": [{"name": "A", "value": "1"}],
         "securityContext": {"capabilities": {"add": ["BPF", "PERFMON", "DAC_READ_SEARCH"]}}}
    ]}});
    let patch = serde_json::json!({"spec": {"containers": [
        {"name": "agent", "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "3"}],
         "securityContext": {"capabilities": {"add": ["BPF"]}}}
    ]}});
    merge(&mut base, &patch);
    let agent = &base["spec"]["containers"][0];
    assert_eq!(agent["env"].as_array().unwrap().len(), 2);
    assert_eq!(agent["env"][0]["value"], "3");
    assert_eq!(
        agent["securityContext"]["capabilities"]["add"],
        serde_json::json!(["BPF"])
    );
    let mut pod = serde_json::json!({"initContainers": [{"name": "a"}, {"name": "b"}]});
    merge(
        &mut pod,
        &serde_json::json!({"initContainers": [{"name": "a", "$patch": "delete"}]}),
    );
    assert_eq!(pod["initContainers"], serde_json::json!([{"name": "b"}]));
    assert_eq!(capability_number("CAP_BPF"), 39);
    assert_eq!(capability_number("DAC_READ_SEARCH"), 2);
}
