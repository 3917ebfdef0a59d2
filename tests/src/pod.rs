//! A pod simulator: the DaemonSet's agent container run as the kubelet would run it, with the
//! manifest's arguments, environment, user, capabilities and read-only host mounts, in its own
//! cgroup and mount, PID, network, UTS and cgroup namespaces (`unshare` and `setpriv`).

use std::{
    collections::BTreeMap,
    fs,
    os::unix::io::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    TenantCgroup, http_get,
    manifests::{pod_and_container, security, strings},
};

/// How the pod's user comes to hold its capabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Grant {
    /// As Kubernetes does for a non-root container: the bounding set is the manifest's
    /// capabilities, nothing is inherited or ambient, and the image's binary carries them as file
    /// capabilities (deploy/Containerfile).
    FileCapabilities,
    /// The capabilities as ambient capabilities of the process, with no file capabilities.
    Ambient,
    /// uid 0: the bounding set alone decides what root holds.
    Root,
}

/// A pod: `unshare` with the agent as the first process of its PID namespace. Both are killed on
/// drop.
pub struct Pod {
    unshare: Child,
    stderr: PathBuf,
}

impl Pod {
    /// The agent's pid (in the host's PID namespace): unshare's child.
    pub fn agent_pid(&self) -> Option<u32> {
        let pid = self.unshare.id();
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// GET from inside the pod's network namespace (a thread that joins it).
    pub fn http_get(&self, port: u16, path: &str) -> std::io::Result<(u16, String)> {
        let pid = self.unshare.id();
        let own = fs::read_link("/proc/self/ns/net")?;
        let theirs = fs::read_link(format!("/proc/{pid}/ns/net"))?;
        if own == theirs {
            return Err(std::io::Error::other(
                "the pod's network namespace is not set up yet",
            ));
        }
        let ns = fs::File::open(format!("/proc/{pid}/ns/net"))?;
        let path = path.to_owned();
        std::thread::spawn(move || {
            // SAFETY: setns with a valid namespace fd; it changes only this thread's network
            // namespace, and the thread ends after this request.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            http_get(port, &path)
        })
        .join()
        .expect("http thread")
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(pid) = self.agent_pid() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our pod's first process.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            // unshare reaps it and exits, leaving the pod's cgroup empty for its removal.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.unshare.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// What Kubernetes would set for the container's environment variables (values, and the downward
/// API fields the manifest uses), with `$(NAME)` references expanded.
pub fn environment(container: &Value, node: &str, pod_name: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().expect("env name").to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            let mut value = value.to_owned();
            for (earlier, v) in &env {
                value = value.replace(&format!("$({earlier})"), v);
            }
            value
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => node.to_owned(),
                Some("metadata.name") => pod_name.to_owned(),
                Some("metadata.namespace") => "vmtrace".to_owned(),
                other => panic!("env {name}: unsupported source {other:?}"),
            }
        };
        env.push((name, value));
    }
    env
}

/// Starts the DaemonSet's agent container as a pod would run: the pod's cgroup, new namespaces
/// (mount, UTS, cgroup, and network and PID unless the pod shares the host's), the hostPath
/// volumes bind-mounted at their mountPaths (read-only where the manifest says), the manifest's
/// environment only, its user and group, its capabilities granted as `grant` says, no_new_privs
/// unless privilege escalation is allowed, then the image's entrypoint with the manifest's args.
pub fn start_pod(
    daemonset: &Value,
    grant: Grant,
    executable: &Path,
    pod_cgroup: &TenantCgroup,
    dir: &Path,
    label: &str,
) -> Pod {
    let (pod, container) = pod_and_container(daemonset);
    let pod_name = format!("vmtrace-{label}");
    let volumes: BTreeMap<&str, &str> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
        .collect();
    let mut inner = vec!["set -e".to_owned()];
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let Some(host) = volumes.get(mount["name"].as_str().unwrap_or_default()) else {
            continue;
        };
        let target = mount["mountPath"].as_str().expect("mountPath");
        inner.push(format!("mount --rbind {} {}", quote(host), quote(target)));
        if mount["readOnly"] == true {
            inner.push(format!("mount -o remount,bind,ro {}", quote(target)));
        }
    }
    let host_network = pod["hostNetwork"] == true;
    if !host_network {
        inner.push("ip link set lo up".to_owned());
    }
    inner.push(format!("hostname {}", quote(&pod_name)));

    let uid = security(pod, container, "runAsUser").as_u64().unwrap_or(0);
    let gid = security(pod, container, "runAsGroup").as_u64().unwrap_or(0);
    let caps = strings(&container["securityContext"]["capabilities"]["add"]);
    assert_eq!(
        strings(&container["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    let set = format!(
        "-all{}",
        caps.iter()
            .map(|c| format!(",+{}", c.to_lowercase()))
            .collect::<String>()
    );
    let mut setpriv = vec![
        "setpriv".to_owned(),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".to_owned(),
        format!("--bounding-set={set}"),
    ];
    match grant {
        Grant::Ambient => {
            setpriv.push(format!("--inh-caps={set}"));
            setpriv.push(format!("--ambient-caps={set}"));
        }
        Grant::FileCapabilities | Grant::Root => setpriv.push("--inh-caps=-all".to_owned()),
    }
    if security(pod, container, "allowPrivilegeEscalation") == &Value::Bool(false) {
        setpriv.push("--nnp".to_owned());
    }
    let mut exec = vec![
        "exec".to_owned(),
        "env".to_owned(),
        "-i".to_owned(),
        "PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
        format!("HOSTNAME={pod_name}"),
    ];
    for (name, value) in environment(container, "test-node", &pod_name) {
        exec.push(format!("{name}={value}"));
    }
    exec.extend(setpriv);
    exec.push(executable.display().to_string());
    assert!(
        container["command"].is_null(),
        "the manifest relies on the image's entrypoint (vmtrace)"
    );
    exec.extend(strings(&container["args"]));
    inner.push(exec.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "));

    let mut namespaces = vec!["--mount", "--propagation", "private", "--uts", "--cgroup"];
    if !host_network {
        namespaces.push("--net");
    }
    if pod["hostPID"] != true {
        namespaces.extend(["--pid", "--fork", "--mount-proc"]);
    }
    let outer = format!(
        "echo $$ > \"$2/cgroup.procs\"; exec unshare {} -- sh -c \"$1\"",
        namespaces.join(" ")
    );
    let stderr = dir.join(format!("{label}.stderr"));
    let unshare = Command::new("sh")
        .args(["-c", &outer, "sh", &inner.join("\n")])
        .arg(&pod_cgroup.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("starting unshare");
    Pod { unshare, stderr }
}

/// Runs a pio and a doorbell reference VMM in `tenant` while an agent runs, and waits until its
/// /metrics (`metrics()`) counts them exactly (exits, PIO and MMIO events, kicks), without VMM service
/// times (off as shipped) and with no probe left unattached (`output()`: the agent's log). Returns the last /metrics.
pub fn counts_a_pio_and_a_doorbell_vmm(
    label: &str,
    tenant: &TenantCgroup,
    mut metrics: impl FnMut() -> String,
    output: impl Fn() -> String,
) -> String {
    use crate::{
        expect::{Expectation, HostKvm},
        prometheus::{sample, tenant_counts},
        run_vmm,
    };
    let reports = vec![
        run_vmm(&[
            "--scenario",
            "pio",
            "--count",
            "2000",
            "--cgroup",
            &tenant.relative,
        ]),
        run_vmm(&[
            "--scenario",
            "doorbell",
            "--count",
            "1000",
            "--cgroup",
            &tenant.relative,
        ]),
    ];
    // Every kind, host-side ones too: what the agent can read under these privileges.
    let expectation = Expectation::of_vmms(&reports, HostKvm::of_this_host());
    let path = tenant.agent_path();
    let mut last = String::new();
    crate::wait::poll(Duration::from_secs(30), || {
        last = metrics();
        expectation
            .mismatches(&tenant_counts(&last, &path))
            .is_empty()
            .then_some(())
    });
    let wrong = expectation.mismatches(&tenant_counts(&last, &path));
    assert!(
        wrong.is_empty(),
        "{label}: {path}:\n  {}\nthe agent's output:\n{}",
        wrong.join("\n  "),
        output()
    );
    // The DaemonSet as shipped leaves the VMM service time off (`--service-time` costs every exit
    // to the VMM, docs/latency.md): no service time series.
    let served = sample(
        &last,
        "vmtrace_vmm_service_duration_seconds_count",
        &[("tenant", &path), ("exit_reason", "io")],
    );
    assert!(
        served.is_none(),
        "{label}: a VMM service time for {path} from the agent as shipped, which should not measure it"
    );
    let log = output();
    assert!(
        !log.contains("not attached"),
        "{label}: a probe did not attach:\n{log}"
    );
    eprintln!(
        "{label}: counted for {path}: {:?}",
        tenant_counts(&last, &path)
    );
    last
}

/// Checks what an agent process holds once its probes are attached: its bounding set is exactly
/// `granted` (what the container was given), its sampling thread holds CAP_BPF and nothing beyond
/// `granted`, and every other thread holds nothing. Returns the sampling thread's effective set.
pub fn assert_agent_capabilities(label: &str, pid: u32, granted: u64) -> u64 {
    let hex = |status: &str, key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("{label}: no {key}"))
    };
    let mut sampler = None;
    for task in fs::read_dir(format!("/proc/{pid}/task")).expect("the agent's threads") {
        let task = task.unwrap().path();
        let (Ok(status), Ok(name)) = (
            fs::read_to_string(task.join("status")),
            fs::read_to_string(task.join("comm")),
        ) else {
            continue; // a thread that just ended
        };
        let (effective, bounding) = (hex(&status, "CapEff:"), hex(&status, "CapBnd:"));
        assert_eq!(
            bounding, granted,
            "{label}: thread {name}: bounding set {bounding:#x}, the manifest grants {granted:#x}"
        );
        if name.trim() == "vmtrace-sampler" {
            sampler = Some(effective);
        } else {
            assert_eq!(
                effective,
                0,
                "{label}: thread {} holds {effective:#x}",
                name.trim()
            );
        }
    }
    let sampler = sampler.unwrap_or_else(|| panic!("{label}: no vmtrace-sampler thread"));
    let bpf = 1u64 << capability_number("BPF");
    assert!(
        sampler & bpf != 0 && sampler & !granted == 0,
        "{label}: the sampling thread holds {sampler:#x}: CAP_BPF, within {granted:#x}"
    );
    sampler
}

/// The capability numbers of capabilities(7).
pub fn capability_number(name: &str) -> u32 {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let bare = name.trim_start_matches("CAP_");
    NAMES
        .iter()
        .position(|n| *n == bare)
        .unwrap_or_else(|| panic!("unknown capability {name}")) as u32
}
