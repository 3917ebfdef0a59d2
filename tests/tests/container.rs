//! deploy/ run by a real container runtime: the image `cargo xtask image` builds, run by podman
//! (runc) with the flags that say what the DaemonSet says, its init container installing the
//! seccomp profile the agent container then runs under. The reference VMM's tenants are counted
//! exactly through the container's /metrics; without the profile, or without any one of the
//! manifest's capabilities, the agent fails the way docs/deploy.md says.

use std::{fs, path::Path, time::Duration};

use serde_json::Value;
use vmtrace_tests::{
    TenantCgroup, cgroup2_root,
    container::{
        Container, IMAGE, Node, image_exists, make_world_readable, run_flags, run_to_completion,
        seccomp_dir, volume_host_path,
    },
    have,
    manifests::{deploy_dir, find_kind, merge, pod_and_container, python, strings, yaml_docs},
    on_path,
    pod::{assert_agent_capabilities, capability_number, counts_a_pio_and_a_doorbell_vmm},
    privileged_host,
    prometheus::sample,
    temp::{RmdirOnDrop, TempDir},
    wait::poll,
};

/// The agent's metrics port in the manifest.
const PORT: u16 = 9464;

/// What a test needs: the DaemonSet (the base, as `kubectl apply -k deploy/` applies it), a
/// scratch node whose kubelet seccomp directory is a scratch directory, and a cgroup parent.
struct Deployment {
    daemonset: Value,
    node: Node,
    parent: String,
    _parent: RmdirOnDrop,
    _work: TempDir,
}

fn deployment(test: &str) -> Option<Deployment> {
    if !privileged_host(test)
        || !have(
            test,
            on_path("podman"),
            "podman missing (`cargo xtask setup`)",
        )
        || !have(
            test,
            image_exists(IMAGE),
            &format!("no image {IMAGE}: run `cargo xtask image`"),
        )
    {
        return None;
    }
    let python = match python() {
        Ok(p) => p,
        Err(e) => {
            have(test, false, &format!("PyYAML unavailable: {e}"));
            return None;
        }
    };
    let daemonset = find_kind(
        &yaml_docs(&python, &deploy_dir().join("daemonset.yaml")),
        "DaemonSet",
    )
    .clone();
    let work = TempDir::new(test);
    make_world_readable(work.path());
    let seccomp_root = work.join("kubelet-seccomp");
    let (pod, _) = pod_and_container(&daemonset);
    let mut node = Node {
        seccomp_root: seccomp_root.clone(),
        ..Node::default()
    };
    // The kubelet's seccomp directory, served from the scratch directory.
    let profiles = volume_host_path(pod, "seccomp");
    let relative = profiles
        .strip_prefix("/var/lib/kubelet/seccomp/")
        .expect("the seccomp volume is under the kubelet's seccomp root");
    node.host_paths
        .insert(profiles.to_owned(), seccomp_root.join(relative));
    let parent = format!("vmtrace-container-{test}-{}", std::process::id());
    let parent_path = cgroup2_root().expect("cgroup v2").join(&parent);
    Some(Deployment {
        daemonset,
        node,
        parent,
        _parent: RmdirOnDrop(parent_path),
        _work: work,
    })
}

/// Runs the pod's init containers, as the kubelet does before the agent's; they must succeed.
fn run_init_containers(daemonset: &Value, node: &Node, label: &str) {
    let (pod, _) = pod_and_container(daemonset);
    for init in pod["initContainers"].as_array().into_iter().flatten() {
        let name = format!("vmtrace-{label}-{}", init["name"].as_str().unwrap());
        let flags = run_flags(pod, init, node, &name);
        let (code, logs) = run_to_completion(node, &flags, IMAGE, init);
        assert_eq!(code, 0, "{label}: init container {name} failed:\n{logs}");
    }
}

/// The agent container of `daemonset`, started with `extra` flags and `args` (the manifest's when
/// None).
fn start_agent(
    daemonset: &Value,
    node: &Node,
    label: &str,
    extra: &[String],
    args: Option<&[String]>,
) -> Result<Container, String> {
    let (pod, container) = pod_and_container(daemonset);
    let mut flags = run_flags(pod, container, node, &format!("vmtrace-{label}"));
    flags.extend_from_slice(extra);
    Container::start(node, &flags, IMAGE, container, args)
}

/// Starts the agent container, waits for its readiness, checks what it holds, and that it counts a
/// pio and a doorbell reference VMM in a tenant cgroup exactly. Returns its last /metrics.
fn counts_exactly(deployment: &Deployment, node: &Node, daemonset: &Value, label: &str) -> String {
    let (pod, container) = pod_and_container(daemonset);
    run_init_containers(daemonset, node, label);
    let agent = start_agent(daemonset, node, label, &[], None)
        .unwrap_or_else(|e| panic!("{label}: podman could not start the agent: {e}"));
    let ready = poll(Duration::from_mins(1), || {
        matches!(agent.http_get(PORT, "/readyz"), Ok((200, _))).then_some(())
    });
    assert!(
        ready.is_some(),
        "{label}: /readyz not 200 within 60 s; the container's output:\n{}",
        agent.logs()
    );

    // The agent holds exactly what the manifest grants, under a seccomp filter.
    let pid = agent.pid().expect("the agent's pid");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let uid = vmtrace_tests::manifests::security(pod, container, "runAsUser")
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
    let effective = assert_agent_capabilities(label, pid, wanted);
    assert_eq!(field("NoNewPrivs:"), "1", "{label}: no_new_privs");
    assert_eq!(field("Seccomp:"), "2", "{label}: a seccomp filter");

    let tenant = TenantCgroup::new(&format!("{}/tenant-{label}", deployment.parent));
    eprintln!("{label}: ready, uid {uid}, sampling thread CapEff {effective:#x}, seccomp filter");
    counts_a_pio_and_a_doorbell_vmm(
        label,
        &tenant,
        || {
            agent
                .http_get(PORT, "/metrics")
                .map(|(_, body)| body)
                .unwrap_or_default()
        },
        || agent.logs(),
    )
}

/// `vmtrace_agent_figure_available` of `figure`, and its `reason` when it is 0.
fn figure_available(metrics: &str, figure: &str) -> (Option<f64>, String) {
    let value = sample(
        metrics,
        "vmtrace_agent_figure_available",
        &[("figure", figure)],
    );
    let reason = metrics
        .lines()
        .find(|l| {
            l.starts_with("vmtrace_agent_figure_available{")
                && l.contains(&format!("figure=\"{figure}\""))
        })
        .and_then(|l| l.split("reason=\"").nth(1))
        .and_then(|r| r.split('"').next())
        .unwrap_or_default()
        .to_owned();
    (value, reason)
}

fn with_patch(daemonset: &Value, patch: &str) -> Value {
    let python = python().expect("PyYAML");
    let mut patched = daemonset.clone();
    merge(
        &mut patched,
        &yaml_docs(&python, &deploy_dir().join(patch))[0],
    );
    patched
}

#[test]
fn the_image_counts_exactly_as_the_daemonset_runs_it() {
    let Some(deployment) = deployment("the_image_counts_exactly_as_the_daemonset_runs_it") else {
        return;
    };
    counts_exactly(
        &deployment,
        &deployment.node,
        &deployment.daemonset,
        "daemonset",
    );
    // The init container installed the profile the image ships, byte for byte.
    let (pod, _) = pod_and_container(&deployment.daemonset);
    let installed = deployment
        .node
        .host_path(volume_host_path(pod, "seccomp"))
        .join("agent.json");
    assert_eq!(
        fs::read_to_string(&installed).expect("the installed profile"),
        fs::read_to_string(seccomp_dir().join("vmtrace.json")).unwrap(),
        "{}",
        installed.display()
    );
    let as_root = with_patch(&deployment.daemonset, "patches/run-as-root.yaml");
    counts_exactly(&deployment, &deployment.node, &as_root, "run-as-root");
    // patches/host-pid.yaml: the host's /proc, so the VMM holding a device can be found.
    let host_pid = with_patch(&deployment.daemonset, "patches/host-pid.yaml");
    let metrics = counts_exactly(&deployment, &deployment.node, &host_pid, "host-pid");
    assert_eq!(
        figure_available(&metrics, "iommu.fault.owner").0,
        Some(1.0),
        "iommu.fault.owner with hostPID"
    );
}

/// The image trusts Debian's public roots (OTLP to a collector with a public certificate needs
/// them) and not the build host's authorities, which the build sees (docs/deploy.md).
#[test]
fn the_image_trusts_the_public_roots_and_nothing_of_the_build_host() {
    let test = "the_image_trusts_the_public_roots_and_nothing_of_the_build_host";
    let Some(deployment) = deployment(test) else {
        return;
    };
    let output = deployment
        .node
        .podman()
        .args(["run", "--rm", "--runtime=runc", "--network=none"])
        .args(["--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024"])
        .args(["--entrypoint", "sh", IMAGE, "-c"])
        .arg(
            "cat /usr/share/ca-certificates/mozilla/*.crt | grep -c 'BEGIN CERT'; \
             grep -c 'BEGIN CERT' /etc/ssl/certs/ca-certificates.crt",
        )
        .output()
        .expect("podman run");
    let text = String::from_utf8_lossy(&output.stdout);
    let counts: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(
        output.status.success() && counts.len() == 2,
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(counts[0] > 100, "Debian's roots: {}", counts[0]);
    assert_eq!(
        counts[1], counts[0],
        "the image's bundle holds other certificates than Debian's roots"
    );
}

/// The first line of `logs` that says `error`, and how many do.
fn error_lines(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| l.to_lowercase().contains("error"))
        .collect()
}

#[test]
fn under_the_runtimes_default_seccomp_profile_the_agent_names_the_fix() {
    let test = "under_the_runtimes_default_seccomp_profile_the_agent_names_the_fix";
    let Some(deployment) = deployment(test) else {
        return;
    };
    let mut daemonset = deployment.daemonset.clone();
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfile"] =
        serde_json::json!({"type": "RuntimeDefault"});
    let agent = start_agent(&daemonset, &deployment.node, "runtime-default", &[], None)
        .expect("podman starts the container");
    let code = agent.exit_code(Duration::from_secs(30));
    let logs = agent.logs();
    assert_eq!(code, Some(1), "the agent should fail at start:\n{logs}");
    let errors = error_lines(&logs);
    assert_eq!(errors.len(), 1, "one error line:\n{logs}");
    for words in ["seccomp", "deploy/seccomp/vmtrace.json", "CAP_BPF"] {
        assert!(errors[0].contains(words), "the error names {words}: {logs}");
    }
    documented(errors[0], "bpf() was refused (EPERM)");
    eprintln!("runtime default: {}", errors[0]);
}

/// docs/deploy.md says that a run fails with `text`, and `line` does.
fn documented(line: &str, text: &str) {
    let docs = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy.md"))
        .expect("docs/deploy.md");
    assert!(line.contains(text), "expected `{text}` in: {line}");
    assert!(
        docs.contains(text),
        "docs/deploy.md does not say that the run fails with `{text}`"
    );
}

#[test]
fn without_any_one_capability_the_agent_fails_as_documented() {
    let test = "without_any_one_capability_the_agent_fails_as_documented";
    let Some(deployment) = deployment(test) else {
        return;
    };
    run_init_containers(&deployment.daemonset, &deployment.node, "capabilities");
    let (_, container) = pod_and_container(&deployment.daemonset);
    let granted = strings(&container["securityContext"]["capabilities"]["add"]);
    assert_eq!(granted, ["BPF", "PERFMON", "DAC_READ_SEARCH"]);
    // The image as built: its binary's file capabilities need every one of them in the bounding
    // set, so the kernel refuses the exec itself.
    // The same image's binary copied without file capabilities, the capabilities ambient (what
    // podman gives a non-root user): the agent's own failure says which is missing.
    let plain = [
        "--tmpfs=/scratch:rw,exec,mode=1777".to_owned(),
        "--entrypoint=[\"/bin/sh\",\"-c\",\"cp /usr/local/bin/vmtrace /scratch/vmtrace && exec /scratch/vmtrace \\\"$@\\\"\",\"sh\"]".to_owned(),
    ];
    let failures = [
        ("BPF", "failed to create map"),
        ("PERFMON", "BPF_PROG_LOAD"),
        ("DAC_READ_SEARCH", "Permission denied"),
    ];
    for (cap, failure) in failures {
        let mut without = deployment.daemonset.clone();
        let add = &mut without["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
            ["add"];
        *add = Value::from(
            granted
                .iter()
                .filter(|c| *c != cap)
                .cloned()
                .collect::<Vec<_>>(),
        );
        let label = format!("without-{}", cap.to_lowercase().replace('_', "-"));
        let refused = match start_agent(&without, &deployment.node, &label, &[], None) {
            Err(e) => e,
            Ok(agent) => {
                let code = agent.exit_code(Duration::from_secs(30));
                assert!(
                    code.is_some_and(|c| c != 0),
                    "{label}: the image's binary ran without {cap}: {code:?}\n{}",
                    agent.logs()
                );
                agent.logs()
            }
        };
        let line = refused
            .lines()
            .find(|l| l.contains("operation not permitted"))
            .unwrap_or_else(|| panic!("{label}: exec was not refused:\n{refused}"));
        documented(line, "operation not permitted");
        eprintln!("{label}: {line}");
        let plain_label = format!("{label}-plain");
        let agent = start_agent(&without, &deployment.node, &plain_label, &plain, None)
            .expect("podman starts the container");
        let logs = if cap == "DAC_READ_SEARCH" {
            // Degraded, not dead: the raw tracepoints count, the classic ones are missing.
            poll(Duration::from_secs(30), || {
                let logs = agent.logs();
                logs.contains(failure).then_some(())
            });
            let ready = agent.http_get(PORT, "/readyz");
            assert!(
                matches!(ready, Ok((503, _))),
                "{plain_label}: /readyz should say degraded: {ready:?}\n{}",
                agent.logs()
            );
            agent.logs()
        } else {
            let code = agent.exit_code(Duration::from_secs(30));
            assert_eq!(code, Some(1), "{plain_label}: {}", agent.logs());
            agent.logs()
        };
        let line = logs
            .lines()
            .find(|l| l.contains(failure))
            .unwrap_or_else(|| panic!("{plain_label}: no `{failure}` in:\n{logs}"));
        documented(line, failure);
        eprintln!("{plain_label}: {line}");
    }
}

/// A process in a mount namespace of its own where tracefs is not mounted, whose mounts propagate
/// as a systemd host's do (shared): a node that does not mount tracefs. Killed on drop.
struct NodeWithoutTracefs(std::process::Child);

impl NodeWithoutTracefs {
    fn start() -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .args([
                "sh",
                "-c",
                "umount /sys/kernel/tracing && mount --make-rshared / && echo ready && exec sleep 3600",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("the namespace's holder");
        assert_eq!(
            line.trim(),
            "ready",
            "tracefs could not be unmounted in a namespace"
        );
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether tracefs is mounted at /sys/kernel/tracing in the namespace.
    fn has_tracefs(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/mountinfo", self.pid()))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(" /sys/kernel/tracing ") && l.contains(" - tracefs "))
    }
}

impl Drop for NodeWithoutTracefs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn on_a_node_without_tracefs_the_init_container_mounts_it() {
    let test = "on_a_node_without_tracefs_the_init_container_mounts_it";
    let Some(deployment) = deployment(test) else {
        return;
    };
    let namespace = NodeWithoutTracefs::start();
    assert!(!namespace.has_tracefs(), "tracefs is still mounted");
    let node = Node {
        mount_namespace: Some(namespace.pid()),
        ..deployment.node.clone()
    };
    // The agent's classic tracepoints (cgroup lifecycle) need tracefs: counting
    // exactly with no probe left unattached (its log names any that is not) shows it was there
    // for the agent.
    counts_exactly(&deployment, &node, &deployment.daemonset, "no-tracefs");
    assert!(
        namespace.has_tracefs(),
        "the init container did not mount tracefs on the node"
    );
}
