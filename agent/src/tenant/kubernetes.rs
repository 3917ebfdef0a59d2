//! Kubernetes metadata for pod tenants: namespace, pod name, and for KubeVirt's virt-launcher pods
//! the VirtualMachineInstance they run. The cgroup path gives the pod UID; the names come from the
//! API server, with a list and watch of this node's pods only (`fieldSelector=spec.nodeName=`).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// What the API server says of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    /// The KubeVirt VirtualMachineInstance a virt-launcher pod runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmi: Option<String>,
}

/// Pod metadata by pod UID, shared between the watcher and the sampling loop.
pub type PodDirectory = Arc<RwLock<HashMap<String, PodMeta>>>;

/// How to reach the API server.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeConfig {
    /// Base URL, e.g. `https://10.96.0.1:443`.
    pub api: String,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub node: String,
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl KubeConfig {
    /// The API server from `--kube-api`, else the in-cluster service environment; `None` outside a
    /// cluster. The node name is needed to watch this node's pods only.
    pub fn resolve(
        api: Option<&str>,
        node: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>> {
        let in_cluster = || {
            let host = env("KUBERNETES_SERVICE_HOST")?;
            let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".to_owned());
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            Some(format!("https://{host}:{port}"))
        };
        let explicit = api.is_some();
        let Some(api) = api.map(str::to_owned).or_else(in_cluster) else {
            return Ok(None);
        };
        let Some(node) = node else {
            bail!(
                "Kubernetes metadata needs this node's name: set --node-name or NODE_NAME (the downward API's spec.nodeName)"
            );
        };
        let account = PathBuf::from(SERVICE_ACCOUNT);
        let existing = |name: &str| Some(account.join(name)).filter(|p| p.exists());
        Ok(Some(Self {
            api: api.trim_end_matches('/').to_owned(),
            token_file: if explicit { None } else { existing("token") },
            ca_file: if explicit { None } else { existing("ca.crt") },
            node: node.to_owned(),
        }))
    }
}

#[derive(Debug, Deserialize)]
struct PodList {
    metadata: ListMeta,
    items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
struct ListMeta {
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: ObjectMeta,
}

#[derive(Debug, Deserialize)]
struct ObjectMeta {
    uid: String,
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(rename = "ownerReferences", default)]
    owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Deserialize)]
struct OwnerReference {
    kind: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

impl Pod {
    fn meta(&self) -> PodMeta {
        let m = &self.metadata;
        // virt-launcher pods are owned by their VirtualMachineInstance and name it in an annotation.
        let vmi = m
            .owner_references
            .iter()
            .find(|o| o.kind == "VirtualMachineInstance")
            .map(|o| o.name.clone())
            .or_else(|| {
                (m.labels.get("kubevirt.io").map(String::as_str) == Some("virt-launcher"))
                    .then(|| m.annotations.get("kubevirt.io/domain").cloned())
                    .flatten()
            });
        PodMeta {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            vmi,
        }
    }
}

/// Keeps `directory` filled with this node's pods until the process ends: list, then watch from the
/// list's version; on any error, list again after a pause.
pub async fn run(config: KubeConfig, directory: PodDirectory) {
    let mut failures = 0u32;
    loop {
        match list_and_watch(&config, &directory).await {
            Ok(()) => failures = 0,
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(api = %config.api, "Kubernetes pod metadata unavailable, retrying: {e:#}");
                }
                failures = failures.saturating_add(1);
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn list_and_watch(config: &KubeConfig, directory: &PodDirectory) -> Result<()> {
    let client = client(config)?;
    let token = match &config.token_file {
        // Re-read each time: projected service-account tokens rotate.
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let selector = format!("spec.nodeName={}", config.node);
    let get = |query: Vec<(&str, String)>| {
        let request = client
            .get(format!("{}/api/v1/pods", config.api))
            .query(&query);
        match &token {
            Some(token) => request.bearer_auth(token.trim()),
            None => request,
        }
    };
    let list = get(vec![("fieldSelector", selector.clone())])
        .send()
        .await
        .context("listing pods")?
        .error_for_status()
        .context("listing pods")?
        .bytes()
        .await
        .context("reading the pod list")?;
    let list: PodList = serde_json::from_slice(&list).context("decoding the pod list")?;
    {
        let mut pods = directory.write().expect("pod directory lock");
        pods.clear();
        pods.extend(
            list.items
                .iter()
                .map(|p| (p.metadata.uid.clone(), p.meta())),
        );
    }
    let mut response = get(vec![
        ("fieldSelector", selector),
        ("watch", "true".to_owned()),
        ("resourceVersion", list.metadata.resource_version),
        ("allowWatchBookmarks", "true".to_owned()),
    ])
    .timeout(Duration::from_hours(1))
    .send()
    .await
    .context("watching pods")?
    .error_for_status()
    .context("watching pods")?;
    let mut buffer = Vec::new();
    while let Some(chunk) = response.chunk().await.context("reading the pod watch")? {
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            apply(&line, directory)?;
        }
    }
    Ok(())
}

/// Applies one watch event line.
fn apply(line: &[u8], directory: &PodDirectory) -> Result<()> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let event: WatchEvent = serde_json::from_slice(line).context("decoding a pod watch event")?;
    match event.kind.as_str() {
        "ADDED" | "MODIFIED" | "DELETED" => {
            let pod: Pod =
                serde_json::from_value(event.object).context("decoding a watched pod")?;
            let mut pods = directory.write().expect("pod directory lock");
            if event.kind == "DELETED" {
                pods.remove(&pod.metadata.uid);
            } else {
                pods.insert(pod.metadata.uid.clone(), pod.meta());
            }
            Ok(())
        }
        "BOOKMARK" => Ok(()),
        // An expired resource version and the like: list again.
        other => bail!("pod watch ended with {other}: {}", event.object),
    }
}

fn client(config: &KubeConfig) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        builder = builder
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).context("the cluster CA")?);
    }
    builder.build().context("building the Kubernetes client")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAUNCHER: &str = r#"{"metadata":{"uid":"6b3f1c9e-0d2a-4c55-9e0e-1f2a3b4c5d6e","name":"virt-launcher-db-7xk2p","namespace":"vms",
        "labels":{"kubevirt.io":"virt-launcher","kubevirt.io/created-by":"a1"},
        "annotations":{"kubevirt.io/domain":"db"},
        "ownerReferences":[{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","name":"db","uid":"a1"}]}}"#;

    #[test]
    fn launcher_pods_name_their_vmi() {
        let pod: Pod = serde_json::from_str(LAUNCHER).unwrap();
        assert_eq!(
            pod.meta(),
            PodMeta {
                namespace: "vms".into(),
                name: "virt-launcher-db-7xk2p".into(),
                vmi: Some("db".into())
            }
        );
        let plain: Pod =
            serde_json::from_str(r#"{"metadata":{"uid":"u","name":"web-0","namespace":"shop"}}"#)
                .unwrap();
        assert_eq!(plain.meta().vmi, None);
    }

    #[test]
    fn watch_events_update_the_directory() {
        let directory = PodDirectory::default();
        let added = format!(r#"{{"type":"ADDED","object":{LAUNCHER}}}"#).replace('\n', " ");
        apply(added.as_bytes(), &directory).unwrap();
        assert_eq!(
            directory.read().unwrap()["6b3f1c9e-0d2a-4c55-9e0e-1f2a3b4c5d6e"].name,
            "virt-launcher-db-7xk2p"
        );
        apply(
            br#"{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}"#,
            &directory,
        )
        .unwrap();
        let deleted = added.replace("ADDED", "DELETED");
        apply(deleted.as_bytes(), &directory).unwrap();
        assert!(directory.read().unwrap().is_empty());
        assert!(apply(br#"{"type":"ERROR","object":{"code":410}}"#, &directory).is_err());
    }

    #[test]
    fn in_cluster_configuration_needs_the_node_name() {
        let env = |name: &str| match name {
            "KUBERNETES_SERVICE_HOST" => Some("10.96.0.1".to_owned()),
            _ => None,
        };
        assert!(
            KubeConfig::resolve(None, None, &env)
                .unwrap_err()
                .to_string()
                .contains("NODE_NAME")
        );
        let config = KubeConfig::resolve(None, Some("node-1"), &env)
            .unwrap()
            .unwrap();
        assert_eq!(config.api, "https://10.96.0.1:443");
        assert_eq!(
            KubeConfig::resolve(None, Some("n"), &|_| None).unwrap(),
            None
        );
        let explicit = KubeConfig::resolve(Some("http://127.0.0.1:8001/"), Some("n"), &|_| None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (explicit.api.as_str(), explicit.token_file),
            ("http://127.0.0.1:8001", None)
        );
    }
}
