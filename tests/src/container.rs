//! The DaemonSet's containers run by a real container runtime: podman with runc, given the flags
//! that say what the manifest says (user, capabilities, read-only root, seccomp profile, no
//! privilege escalation, host mounts, host namespaces, resources, environment, arguments).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{
    http_get_from,
    manifests::{security, strings},
    pod::environment,
};

/// The image `cargo xtask image` builds from this checkout.
pub const IMAGE: &str = "localhost/vmtrace:dev";

/// The flags podman needs on these machines: crun refuses their hybrid cgroup layout, and root
/// here lacks CAP_SYS_RESOURCE, which podman's default rlimits need (docs/deploy.md).
const HOST_FLAGS: [&str; 3] = [
    "--runtime=runc",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=1024:1024",
];

/// Where the pod's host paths are on this machine, and where its Localhost seccomp profiles are.
#[derive(Debug, Clone, Default)]
pub struct Node {
    /// hostPath paths served from elsewhere (e.g. the kubelet's seccomp directory from a scratch
    /// directory); the others are the host's own.
    pub host_paths: BTreeMap<String, PathBuf>,
    /// The kubelet's seccomp profile root, which `localhostProfile` is relative to.
    pub seccomp_root: PathBuf,
    /// The node's mount namespace, as the pid of a process in it, when it is not the host's: podman
    /// runs there, so the containers' host paths are that namespace's.
    pub mount_namespace: Option<u32>,
}

impl Node {
    /// podman, run in the node's mount namespace.
    pub fn podman(&self) -> Command {
        match self.mount_namespace {
            Some(pid) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--target={pid}"))
                    .args(["--mount", "--", "podman"]);
                command
            }
            None => Command::new("podman"),
        }
    }

    pub fn host_path(&self, path: &str) -> PathBuf {
        self.host_paths
            .get(path)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(path))
    }
}

/// `podman run` flags for `container` of the pod spec `pod`, as the kubelet would have a runtime
/// run it: everything but the image and the arguments.
pub fn run_flags(pod: &Value, container: &Value, node: &Node, name: &str) -> Vec<String> {
    let mut flags: Vec<String> = HOST_FLAGS.iter().map(|f| (*f).to_owned()).collect();
    flags.push(format!("--name={name}"));
    flags.push(format!("--hostname={name}"));
    flags.push("--cgroupns=private".to_owned());
    let uid = security(pod, container, "runAsUser").as_u64().unwrap_or(0);
    let gid = security(pod, container, "runAsGroup").as_u64().unwrap_or(0);
    flags.push(format!("--user={uid}:{gid}"));
    if security(pod, container, "privileged") == &Value::Bool(true) {
        flags.push("--privileged".to_owned());
    }
    let capabilities = &container["securityContext"]["capabilities"];
    for cap in strings(&capabilities["drop"]) {
        flags.push(format!("--cap-drop={cap}"));
    }
    for cap in strings(&capabilities["add"]) {
        flags.push(format!("--cap-add={cap}"));
    }
    if security(pod, container, "readOnlyRootFilesystem") == &Value::Bool(true) {
        // Kubernetes mounts no tmpfs of its own on a read-only root; podman would.
        flags.push("--read-only".to_owned());
        flags.push("--read-only-tmpfs=false".to_owned());
    }
    if security(pod, container, "allowPrivilegeEscalation") == &Value::Bool(false) {
        flags.push("--security-opt=no-new-privileges".to_owned());
    }
    let profile = security(pod, container, "seccompProfile");
    match profile["type"].as_str() {
        Some("Localhost") => {
            let file = profile["localhostProfile"]
                .as_str()
                .expect("localhostProfile");
            flags.push(format!(
                "--security-opt=seccomp={}",
                node.seccomp_root.join(file).display()
            ));
        }
        Some("Unconfined") => flags.push("--security-opt=seccomp=unconfined".to_owned()),
        // RuntimeDefault (and, since Kubernetes 1.27 with SeccompDefault, unset): podman's own
        // default, containers-common's profile, the one CRI-O applies.
        _ => {}
    }
    for (key, namespace) in [
        ("hostPID", "pid"),
        ("hostNetwork", "network"),
        ("hostIPC", "ipc"),
    ] {
        if pod[key] == true {
            flags.push(format!("--{namespace}=host"));
        }
    }
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = volumes[mount["name"].as_str().expect("volume name")];
        let host_path = volume["hostPath"]["path"]
            .as_str()
            .expect("only hostPath volumes");
        let source = node.host_path(host_path);
        if volume["hostPath"]["type"] == "DirectoryOrCreate" {
            std::fs::create_dir_all(&source).expect("creating a DirectoryOrCreate host path");
        }
        let mut options = vec![if mount["readOnly"] == true {
            "ro"
        } else {
            "rw"
        }];
        match mount["mountPropagation"].as_str() {
            Some("HostToContainer") => options.push("rslave"),
            Some("Bidirectional") => options.push("rshared"),
            _ => options.push("rprivate"),
        }
        flags.push(format!(
            "--volume={}:{}:{}",
            source.display(),
            mount["mountPath"].as_str().expect("mountPath"),
            options.join(",")
        ));
    }
    let limits = &container["resources"]["limits"];
    if let Some(memory) = limits["memory"].as_str() {
        flags.push(format!(
            "--memory={}",
            memory.trim_end_matches('i').to_lowercase()
        ));
    }
    if let Some(cpu) = limits["cpu"].as_str() {
        let cores = cpu.strip_suffix('m').map_or_else(
            || cpu.parse::<f64>().expect("cpu limit"),
            |milli| milli.parse::<f64>().expect("cpu limit") / 1000.0,
        );
        flags.push(format!("--cpus={cores}"));
    }
    for (key, value) in environment(container, "test-node", name) {
        flags.push(format!("--env={key}={value}"));
    }
    if let Some(command) = container["command"].as_array() {
        let command: Vec<String> = command
            .iter()
            .map(|c| c.as_str().expect("command").to_owned())
            .collect();
        flags.push(format!(
            "--entrypoint={}",
            serde_json::to_string(&command).unwrap()
        ));
    }
    flags
}

/// A container podman runs detached; removed on drop.
pub struct Container {
    pub name: String,
    node: Node,
}

impl Container {
    /// Starts the image with `flags` and `container`'s arguments (`args` when given instead).
    /// Fails with podman's error when the runtime cannot start it.
    pub fn start(
        node: &Node,
        flags: &[String],
        image: &str,
        container: &Value,
        args: Option<&[String]>,
    ) -> Result<Self, String> {
        let name = flags
            .iter()
            .find_map(|f| f.strip_prefix("--name="))
            .expect("a --name flag")
            .to_owned();
        let _ = node
            .podman()
            .args(["rm", "--force", "--time=0", &name])
            .output();
        let args = args.map_or_else(|| strings(&container["args"]), <[String]>::to_vec);
        let output = node
            .podman()
            .args(["run", "--detach"])
            .args(flags)
            .arg(image)
            .args(&args)
            .output()
            .expect("running podman");
        let container = Self {
            name,
            node: node.clone(),
        };
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(container)
    }

    fn inspect(&self, format: &str) -> String {
        let output = self
            .node
            .podman()
            .args(["inspect", "--format", format, &self.name])
            .output()
            .expect("podman inspect");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The container's first process, in the host's PID namespace.
    pub fn pid(&self) -> Option<u32> {
        self.inspect("{{.State.Pid}}")
            .parse()
            .ok()
            .filter(|&p| p > 0)
    }

    /// Its exit code, once it has exited within `timeout`.
    pub fn exit_code(&self, timeout: Duration) -> Option<i32> {
        crate::wait::poll(timeout, || {
            (self.inspect("{{.State.Status}}") == "exited")
                .then(|| self.inspect("{{.State.ExitCode}}").parse().ok())
                .flatten()
        })
    }

    /// What the container wrote to its stdout and stderr, and the runtime's error if it could not
    /// start the container's process (e.g. exec refused).
    pub fn logs(&self) -> String {
        let output = self
            .node
            .podman()
            .args(["logs", &self.name])
            .output()
            .expect("podman logs");
        let mut logs = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let error = self.inspect("{{.State.Error}}");
        if !error.is_empty() {
            logs.push_str(&format!("\n(runtime) {error}\n"));
        }
        logs
    }

    /// A GET to the container's `port` on its own network address (the pod IP).
    pub fn http_get(&self, port: u16, path: &str) -> std::io::Result<(u16, String)> {
        let ip: IpAddr = self
            .inspect("{{.NetworkSettings.IPAddress}}")
            .parse()
            .map_err(|e| std::io::Error::other(format!("no container address: {e}")))?;
        http_get_from(SocketAddr::new(ip, port), path)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self
            .node
            .podman()
            .args(["rm", "--force", "--time=0", &self.name])
            .output();
    }
}

/// Runs `container` to completion (an init container): its exit code and output.
pub fn run_to_completion(
    node: &Node,
    flags: &[String],
    image: &str,
    container: &Value,
) -> (i32, String) {
    let started = Container::start(node, flags, image, container, None);
    let container = match started {
        Ok(c) => c,
        Err(e) => return (-1, e),
    };
    let code = container
        .exit_code(Duration::from_mins(1))
        .expect("the init container did not finish within a minute");
    (code, container.logs())
}

/// Whether `image` is in podman's local storage.
pub fn image_exists(image: &str) -> bool {
    Command::new("podman")
        .args(["image", "exists", image])
        .status()
        .is_ok_and(|s| s.success())
}

/// The host path a pod spec's volume named `name` serves.
pub fn volume_host_path<'a>(pod: &'a Value, name: &str) -> &'a str {
    pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name))
        .and_then(|v| v["hostPath"]["path"].as_str())
        .unwrap_or_else(|| panic!("no hostPath volume {name}"))
}

/// The directory of deploy/seccomp/, for the profile the image ships.
pub fn seccomp_dir() -> PathBuf {
    crate::manifests::deploy_dir().join("seccomp")
}

/// Whether `dir` is usable as a scratch host path by a container of another user.
pub fn make_world_readable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}
