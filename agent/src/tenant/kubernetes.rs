//! Kubernetes metadata for pod tenants: namespace, pod name, and for KubeVirt's virt-launcher pods
//! the VirtualMachineInstance they run. The cgroup path gives the pod UID; the names come from the
//! API server through kube-rs's metadata watcher: this node's pods only
//! (`fieldSelector=spec.nodeName=`), their metadata only (`PartialObjectMetadata`), resumed from the
//! last version seen, listed again after 410 Gone, with bookmarks and a jittered backoff.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};
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
    /// In a cluster: the service account's token (re-read as it rotates) and CA, and only that CA.
    /// Otherwise (`--kube-api`, e.g. `kubectl proxy`), no credentials.
    pub in_cluster: bool,
    pub node: String,
}

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
        Ok(Some(Self {
            api: api.trim_end_matches('/').to_owned(),
            in_cluster: !explicit,
            node: node.to_owned(),
        }))
    }

    fn client(&self) -> Result<kube::Client> {
        let config = if self.in_cluster {
            kube::Config::incluster().context("the in-cluster service account")?
        } else {
            kube::Config::new(self.api.parse().context("the Kubernetes API URL")?)
        };
        kube::Client::try_from(config).context("building the Kubernetes client")
    }
}

/// The tenant-facing metadata of a pod, with its UID; `None` without a UID.
fn pod_meta(m: &ObjectMeta) -> Option<(String, PodMeta)> {
    // virt-launcher pods are owned by their VirtualMachineInstance and name it in an annotation.
    let vmi = m
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "VirtualMachineInstance")
        .map(|o| o.name.clone())
        .or_else(|| {
            let launcher = m
                .labels
                .as_ref()
                .and_then(|l| l.get("kubevirt.io"))
                .is_some_and(|v| v == "virt-launcher");
            launcher
                .then(|| m.annotations.as_ref()?.get("kubevirt.io/domain").cloned())
                .flatten()
        });
    Some((
        m.uid.clone()?,
        PodMeta {
            namespace: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone().unwrap_or_default(),
            vmi,
        },
    ))
}

/// A (re)list in progress: the pods of the list so far, which replace the directory when it ends.
type Listing = Option<HashMap<String, PodMeta>>;

/// Applies one watcher event to `directory`.
fn apply(
    event: watcher::Event<PartialObjectMeta<Pod>>,
    listing: &mut Listing,
    directory: &PodDirectory,
) {
    use watcher::Event;
    match event {
        Event::Init => *listing = Some(HashMap::new()),
        Event::InitApply(pod) => {
            if let (Some(listed), Some((uid, meta))) = (listing.as_mut(), pod_meta(&pod.metadata)) {
                listed.insert(uid, meta);
            }
        }
        Event::InitDone => {
            if let Some(listed) = listing.take() {
                *directory.write().expect("pod directory lock") = listed;
            }
        }
        Event::Apply(pod) => {
            if let Some((uid, meta)) = pod_meta(&pod.metadata) {
                directory
                    .write()
                    .expect("pod directory lock")
                    .insert(uid, meta);
            }
        }
        Event::Delete(pod) => {
            if let Some(uid) = &pod.metadata.uid {
                directory.write().expect("pod directory lock").remove(uid);
            }
        }
    }
}

/// [`run`] on a thread of its own, for a command without a runtime (`vmtrace top`).
pub fn watch_in_background(config: KubeConfig) -> Result<PodDirectory> {
    let directory = PodDirectory::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the Kubernetes watcher's runtime")?;
    let filled = directory.clone();
    std::thread::Builder::new()
        .name("kube-watch".into())
        .spawn(move || runtime.block_on(run(config, filled)))
        .context("starting the Kubernetes watcher's thread")?;
    Ok(directory)
}

/// Keeps `directory` filled with this node's pods until the process ends. Errors (the API server
/// down, 5xx, a dropped or expired watch) are retried after kube-rs's default backoff, jittered so
/// that a fleet's agents do not come back in lockstep; one warning per outage.
pub async fn run(config: KubeConfig, directory: PodDirectory) {
    let client = match config.client() {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(api = %config.api, "Kubernetes pod metadata unavailable: {e:#}");
            return;
        }
    };
    // PartialObjectMeta: kube asks for metadata only (`as=PartialObjectMetadataList`).
    let pods: kube::Api<PartialObjectMeta<Pod>> = kube::Api::all(client);
    let watch = watcher::Config::default().fields(&format!("spec.nodeName={}", config.node));
    let mut events = std::pin::pin!(watcher(pods, watch).default_backoff());
    let mut listing: Listing = None;
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                // Init only starts a list, which may fail again.
                if failing && !matches!(event, watcher::Event::Init) {
                    tracing::info!(api = %config.api, "Kubernetes pod metadata available again");
                    failing = false;
                }
                apply(event, &mut listing, &directory);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(api = %config.api, "Kubernetes pod metadata unavailable, retrying with backoff: {e}");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAUNCHER: &str = r#"{"uid":"6b3f1c9e-0d2a-4c55-9e0e-1f2a3b4c5d6e","name":"virt-launcher-db-7xk2p","namespace":"vms",
        "labels":{"kubevirt.io":"virt-launcher","kubevirt.io/created-by":"a1"},
        "annotations":{"kubevirt.io/domain":"db"},
        "ownerReferences":[{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","name":"db","uid":"a1"}]}"#;

    fn pod(metadata: &str) -> PartialObjectMeta<Pod> {
        PartialObjectMeta {
            types: None,
            metadata: serde_json::from_str(metadata).unwrap(),
            _phantom: std::marker::PhantomData,
        }
    }

    #[test]
    fn launcher_pods_name_their_vmi() {
        let (uid, meta) = pod_meta(&pod(LAUNCHER).metadata).unwrap();
        assert_eq!(uid, "6b3f1c9e-0d2a-4c55-9e0e-1f2a3b4c5d6e");
        assert_eq!(
            meta,
            PodMeta {
                namespace: "vms".into(),
                name: "virt-launcher-db-7xk2p".into(),
                vmi: Some("db".into())
            }
        );
        let plain = pod(r#"{"uid":"u","name":"web-0","namespace":"shop"}"#);
        assert_eq!(pod_meta(&plain.metadata).unwrap().1.vmi, None);
        assert_eq!(pod_meta(&pod(r#"{"name":"no-uid"}"#).metadata), None);
    }

    #[test]
    fn watch_events_update_the_directory() {
        use watcher::Event;
        let directory = PodDirectory::default();
        let mut listing = None;
        let web = r#"{"uid":"w","name":"web-0","namespace":"shop"}"#;
        for event in [Event::Init, Event::InitApply(pod(web))] {
            apply(event, &mut listing, &directory);
        }
        // A list in progress does not show until it is complete.
        assert!(directory.read().unwrap().is_empty());
        apply(Event::InitDone, &mut listing, &directory);
        assert_eq!(directory.read().unwrap()["w"].name, "web-0");
        apply(Event::Apply(pod(LAUNCHER)), &mut listing, &directory);
        assert_eq!(directory.read().unwrap().len(), 2);
        apply(Event::Delete(pod(LAUNCHER)), &mut listing, &directory);
        assert_eq!(directory.read().unwrap().len(), 1);
        // A new list (after 410 Gone) replaces what the directory held.
        for event in [
            Event::Init,
            Event::InitApply(pod(LAUNCHER)),
            Event::InitDone,
        ] {
            apply(event, &mut listing, &directory);
        }
        let pods = directory.read().unwrap();
        assert_eq!(
            pods.keys().collect::<Vec<_>>(),
            ["6b3f1c9e-0d2a-4c55-9e0e-1f2a3b4c5d6e"]
        );
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
            (explicit.api.as_str(), explicit.in_cluster),
            ("http://127.0.0.1:8001", false)
        );
        assert!(config.in_cluster);
    }
}
