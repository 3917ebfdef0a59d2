//! deploy/'s manifests as data: the Kubernetes YAML read through PyYAML and validated offline with
//! PyPI's `kubernetes-validate` (installed into a venv under target/), the DaemonSet's pod and
//! container, kubectl's strategic merge of the patches, and the image's file capabilities.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use serde_json::Value;

/// Kubernetes versions the manifests are validated against: an older one still in wide use, and
/// the newest kubernetes-validate knows (its default).
pub const KUBERNETES_VERSIONS: [Option<&str>; 2] = [Some("1.28"), None];

/// deploy/ in the source tree.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The target directory (`target/debug/deps/<test>` -> `target`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors().nth(3).expect("target dir").to_owned()
}

// ---------------------------------------------------------------------------------------------
// Python: kubernetes-validate, and PyYAML (its dependency) to read the manifests; the reference
// Python client's strict OpenMetrics parser (prometheus-client) for the exposition.

/// The venv's python with kubernetes-validate, PyYAML and prometheus-client importable, installed
/// on first use.
pub fn python() -> Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = target_dir().join("kubernetes-validate-venv");
            let python = venv.join("bin/python");
            let importable = || {
                Command::new(&python)
                    .args(["-c", "import kubernetes_validate, yaml, prometheus_client"])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if importable() {
                return Ok(python);
            }
            let run = |command: &mut Command, what: &str| -> Result<(), String> {
                let output = command
                    .output()
                    .map_err(|e| format!("{what}: cannot run: {e}"))?;
                if output.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{what} failed: {}",
                        String::from_utf8_lossy(&output.stderr)
                    ))
                }
            };
            if !python.exists() {
                run(
                    Command::new("python3").arg("-m").arg("venv").arg(&venv),
                    "python3 -m venv (Debian: apt-get install python3-venv)",
                )?;
            }
            run(
                Command::new(&python).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "kubernetes-validate",
                    "prometheus-client",
                ]),
                "pip install kubernetes-validate prometheus-client",
            )?;
            if importable() {
                Ok(python)
            } else {
                Err(
                    "kubernetes-validate or prometheus-client installed but not importable"
                        .to_owned(),
                )
            }
        })
        .clone()
}

/// The YAML documents of `path` as JSON (empty documents left out).
pub fn yaml_docs(python: &Path, path: &Path) -> Vec<Value> {
    let output = Command::new(python)
        .args([
            "-c",
            "import sys, json, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("running python");
    assert!(
        output.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from python")
}

/// Validates `path` with kubernetes-validate --strict against each of [`KUBERNETES_VERSIONS`].
pub fn kubernetes_validate(python: &Path, path: &Path) {
    for version in KUBERNETES_VERSIONS {
        let mut command = Command::new(python);
        command.args(["-m", "kubernetes_validate", "--strict"]);
        if let Some(v) = version {
            command.args(["-k", v]);
        }
        let output = command.arg(path).output().expect("kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && !text.contains("ERROR"),
            "{} does not validate against Kubernetes {}:\n{text}",
            path.display(),
            version.unwrap_or("(newest)")
        );
        eprint!("{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// The manifests as data.

pub fn find_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} among {} documents", docs.len()))
}

/// The DaemonSet's pod spec and its `agent` container.
pub fn pod_and_container(daemonset: &Value) -> (&Value, &Value) {
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = pod["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "agent"))
        .expect("a container named agent");
    (pod, container)
}

/// A container setting, the container's securityContext winning over the pod's.
pub fn security<'a>(pod: &'a Value, container: &'a Value, key: &str) -> &'a Value {
    let own = &container["securityContext"][key];
    if own.is_null() {
        &pod["securityContext"][key]
    } else {
        own
    }
}

pub fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Applies a strategic-merge patch the way kubectl does for the fields these patches touch:
/// objects merge, `containers`, `initContainers`, `env`, `volumes` and `volumeMounts` merge by
/// `name` (an item with `$patch: delete` removes its namesake), other lists are replaced.
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                match base.get_mut(key) {
                    Some(Value::Array(items))
                        if matches!(
                            key.as_str(),
                            "containers" | "initContainers" | "env" | "volumes" | "volumeMounts"
                        ) && value.is_array() =>
                    {
                        for item in value.as_array().unwrap() {
                            if item["$patch"] == "delete" {
                                items.retain(|i| i["name"] != item["name"]);
                                continue;
                            }
                            match items.iter_mut().find(|i| i["name"] == item["name"]) {
                                Some(existing) => merge(existing, item),
                                None => items.push(item.clone()),
                            }
                        }
                    }
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

/// The capabilities the Containerfile's `setcap` gives the binary, as Kubernetes names them.
pub fn containerfile_capabilities() -> BTreeSet<String> {
    let text =
        fs::read_to_string(deploy_dir().join("Containerfile")).expect("deploy/Containerfile");
    // The command, not a comment that names it: `setcap <caps>=<flags> <file>`.
    let spec = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "setcap")
                .nth(1)
                .filter(|w| w.contains('='))
        })
        .expect("a setcap command in the Containerfile");
    let (caps, flags) = spec.split_once('=').expect("caps=flags");
    assert_eq!(
        flags, "ep",
        "the file capabilities must be effective and permitted"
    );
    caps.split(',')
        .map(|c| c.trim_start_matches("cap_").to_uppercase())
        .collect()
}
