//! Tenant resolver: turns a cgroup v2 path into the workload that owns it, so
//! samples keyed by cgroup can be grouped per pod, VM or unit rather than per
//! raw path. Pure string work on the path: no filesystem, no runtime lookups.

use serde::{Deserialize, Serialize};

/// Who a cgroup belongs to; this is the unit every sample is attributed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Tenant {
    /// Kubernetes pod. Checked first, because KubeVirt VMs and nested runtimes
    /// live inside pods and the pod is what Kubernetes metadata resolves.
    KubernetesPod {
        /// Pod uid in canonical dashed form; static pods keep the 32-hex
        /// config hash that the kubelet uses as their uid.
        pod_uid: String,
        /// "guaranteed", "burstable" or "besteffort" when the layout shows it.
        qos: Option<String>,
        /// Container id, runtime prefix stripped, when the path goes that deep.
        container_id: Option<String>,
    },
    /// libvirt domain, by the name part of libvirt's machine name (libvirt
    /// keeps only hostname characters and at most 64 bytes of it).
    LibvirtVm { name: String },
    /// systemd unit (unescaped), e.g. "foo.service" or "session-3.scope".
    SystemdUnit { unit: String },
    /// Anything else: the cgroup path as given, so nothing is dropped.
    Path { path: String },
}

/// Parent names that carry a pod's QoS class in both kubelet cgroup drivers.
const QOS: [(&str, &str); 3] = [
    ("kubepods", "guaranteed"),
    ("burstable", "burstable"),
    ("besteffort", "besteffort"),
];

/// Container cgroup prefixes of containerd, CRI-O (and its conmon) and
/// dockershim; longest first so "crio-conmon-" wins over "crio-".
const RUNTIME_PREFIXES: [&str; 4] = ["cri-containerd-", "crio-conmon-", "crio-", "docker-"];

/// libvirt drivers that put domains in cgroups.
const DRIVERS: [&str; 2] = ["qemu", "lxc"];

/// systemd unit types that own a cgroup with processes (slices never do).
const UNIT_SUFFIXES: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];

impl Tenant {
    /// Resolves a path relative to the cgroup2 root (as in /proc/PID/cgroup).
    /// Precedence is pod, then VM, then unit, then the path itself; odd input
    /// (empty, repeated or trailing slashes, broken escapes) never panics.
    pub fn from_cgroup_path(path: &str) -> Tenant {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if let Some(pod) = find_pod(&segs) {
            return pod;
        }
        if let Some(name) = segs
            .iter()
            .find_map(|s| scope_vm(s).or_else(|| cgroupfs_vm(s)))
        {
            return Tenant::LibvirtVm { name };
        }
        let unit = segs.iter().rev().find(|s| {
            UNIT_SUFFIXES
                .iter()
                .any(|suf| s.len() > suf.len() && s.ends_with(suf))
        });
        if let Some(unit) = unit {
            return Tenant::SystemdUnit {
                unit: unescape(unit),
            };
        }
        let path = if path.is_empty() { "/" } else { path };
        Tenant::Path {
            path: path.to_string(),
        }
    }

    /// Short human label for tables and metric attributes.
    pub fn label(&self) -> String {
        match self {
            Tenant::KubernetesPod { pod_uid, .. } => format!("pod/{pod_uid}"),
            Tenant::LibvirtVm { name } => format!("vm/{name}"),
            Tenant::SystemdUnit { unit } => format!("unit/{unit}"),
            Tenant::Path { path } => path.clone(),
        }
    }
}

/// A pod segment found in a path: uid, QoS class, and a container id when the
/// segment itself names one (containerd's "slice:prefix:id" form).
type PodSeg = (String, Option<&'static str>, Option<String>);

/// Finds the outermost pod segment wherever it sits, since prefixes (nested
/// runtimes, kind nodes, cgroup namespaces) vary; the outermost pod is the one
/// the host's kubelet knows about.
fn find_pod(segs: &[&str]) -> Option<Tenant> {
    segs.iter().enumerate().find_map(|(i, seg)| {
        let parent = i.checked_sub(1).map(|p| segs[p]);
        let (pod_uid, qos, inline) = slice_pod(seg).or_else(|| dir_pod(parent, seg))?;
        let next = segs.get(i + 1).and_then(|c| container_id(c));
        Some(Tenant::KubernetesPod {
            pod_uid,
            qos: qos.map(str::to_string),
            container_id: inline.or(next),
        })
    })
}

/// systemd driver: `<prefix>kubepods[-qos]-pod<uid_with_underscores>.slice`,
/// optionally followed by `:cri-containerd:<id>` when containerd could not hand
/// the cgroup to systemd (seen under /system.slice/containerd.service).
fn slice_pod(seg: &str) -> Option<PodSeg> {
    let (slice, runtime) = match seg.split_once(':') {
        Some((slice, runtime)) => (slice, Some(runtime)),
        None => (seg, None),
    };
    let stem = slice.strip_suffix(".slice")?;
    let (parent, uid) = stem
        .match_indices("-pod")
        .find_map(|(i, _)| Some((&stem[..i], canonical_uid(&stem[i + 4..])?)))?;
    // Slice names spell out their whole ancestry, so a real one names kubepods.
    if !parent.split('-').any(|p| p == "kubepods") {
        return None;
    }
    let qos = parent.rsplit('-').next().and_then(qos_of);
    let inline = runtime
        .and_then(|r| r.rsplit(':').next())
        .filter(|id| !id.is_empty());
    Some((uid, qos, inline.map(str::to_string)))
}

/// cgroupfs driver: a `pod<uid>` directory whose parent gives the QoS class
/// (unknown when a cgroup namespace hides the parent).
fn dir_pod(parent: Option<&str>, seg: &str) -> Option<PodSeg> {
    let uid = canonical_uid(seg.strip_prefix("pod")?)?;
    Some((uid, parent.and_then(qos_of), None))
}

/// Maps a pod's parent cgroup name to its QoS class; guaranteed pods sit
/// directly under kubepods.
fn qos_of(parent: &str) -> Option<&'static str> {
    QOS.iter().find(|(p, _)| *p == parent).map(|(_, q)| *q)
}

/// Accepts a UUID (the systemd driver writes '_' for '-') or a static pod's
/// 32-hex hash, and rejects everything else so "podcast" is never a pod.
fn canonical_uid(raw: &str) -> Option<String> {
    let uid = raw.replace('_', "-");
    let b = uid.as_bytes();
    let dashed = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    let hash = b.len() == 32 && b.iter().all(u8::is_ascii_hexdigit);
    (dashed || hash).then_some(uid)
}

/// The container id in the segment below a pod: `cri-containerd-<id>.scope`,
/// `crio-<id>`, or a bare id under cgroupfs.
fn container_id(seg: &str) -> Option<String> {
    let s = seg.strip_suffix(".scope").unwrap_or(seg);
    let id = RUNTIME_PREFIXES
        .iter()
        .find_map(|p| s.strip_prefix(p))
        .unwrap_or(s);
    (!id.is_empty()).then(|| id.to_string())
}

/// libvirt with systemd: `machine-<driver>\x2d<id>\x2d<name>.scope`, or the
/// pre-id form `machine-<driver>\x2d<name>.scope` of older libvirt.
fn scope_vm(seg: &str) -> Option<String> {
    let machine = unescape(seg.strip_prefix("machine-")?.strip_suffix(".scope")?);
    let rest = DRIVERS
        .iter()
        .find_map(|d| machine.strip_prefix(d)?.strip_prefix('-'))?;
    let name = after_id(rest).unwrap_or(rest);
    (!name.is_empty()).then(|| name.to_string())
}

/// libvirt without systemd: `<driver>-<id>-<name>.libvirt-<driver>`, or the
/// older `<name>.libvirt-<driver>`; a leading '_' is libvirt's own escape.
fn cgroupfs_vm(seg: &str) -> Option<String> {
    let (stem, driver) = seg.rsplit_once(".libvirt-")?;
    if !DRIVERS.contains(&driver) {
        return None;
    }
    let stem = stem.strip_prefix('_').unwrap_or(stem);
    let rest = stem.strip_prefix(driver).and_then(|s| s.strip_prefix('-'));
    let name = rest.and_then(after_id).unwrap_or(stem);
    (!name.is_empty()).then(|| name.to_string())
}

/// Drops the numeric domain id in "<id>-<name>"; names may contain dashes,
/// ids never do, so only the first dash splits.
fn after_id(rest: &str) -> Option<&str> {
    let (id, name) = rest.split_once('-')?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then_some(name)
}

/// Undoes systemd's `\xNN` escaping byte-wise (multi-byte UTF-8 is escaped per
/// byte); malformed escapes stay literal and bad UTF-8 becomes U+FFFD.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 2..i + 4)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        match (b[i], b.get(i + 1).copied(), hex) {
            (b'\\', Some(b'x'), Some(h)) => {
                // Two hex digits fit a byte: at most 15 * 16 + 15.
                let digit = |c: &u8| (*c as char).to_digit(16).unwrap_or(0) as u8;
                out.push(h.iter().fold(0, |acc, c| acc * 16 + digit(c)));
                i += 4;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2f5ef07b-8e3c-4c7a-9f1e-0a1b2c3d4e5f";
    const UID_: &str = "2f5ef07b_8e3c_4c7a_9f1e_0a1b2c3d4e5f";
    const CID: &str = "d4e8e05a546c86b6443f101966c618e47753ed01fa9929cae00d3b692f7a9f80";

    fn t(path: &str) -> Tenant {
        Tenant::from_cgroup_path(path)
    }

    fn pod(qos: Option<&str>, cid: Option<&str>) -> Tenant {
        Tenant::KubernetesPod {
            pod_uid: UID.to_string(),
            qos: qos.map(str::to_string),
            container_id: cid.map(str::to_string),
        }
    }

    fn vm(name: &str) -> Tenant {
        Tenant::LibvirtVm {
            name: name.to_string(),
        }
    }

    fn unit(u: &str) -> Tenant {
        Tenant::SystemdUnit {
            unit: u.to_string(),
        }
    }

    fn path(p: &str) -> Tenant {
        Tenant::Path {
            path: p.to_string(),
        }
    }

    #[test]
    fn cgroupfs_guaranteed_pod_sits_directly_under_kubepods() {
        let got = t(&format!("/kubepods/pod{UID}/{CID}"));
        assert_eq!(got, pod(Some("guaranteed"), Some(CID)));
    }

    #[test]
    fn cgroupfs_burstable_pod_with_container() {
        let got = t(&format!("/kubepods/burstable/pod{UID}/{CID}"));
        assert_eq!(got, pod(Some("burstable"), Some(CID)));
    }

    #[test]
    fn cgroupfs_besteffort_pod_without_container() {
        assert_eq!(
            t(&format!("/kubepods/besteffort/pod{UID}")),
            pod(Some("besteffort"), None)
        );
    }

    #[test]
    fn cgroupfs_crio_container_prefix_is_stripped() {
        let got = t(&format!("/kubepods/burstable/pod{UID}/crio-{CID}"));
        assert_eq!(got, pod(Some("burstable"), Some(CID)));
    }

    #[test]
    fn systemd_burstable_containerd_uid_gets_dashes_back() {
        let got = t(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ));
        assert_eq!(got, pod(Some("burstable"), Some(CID)));
    }

    #[test]
    fn systemd_guaranteed_crio() {
        let got = t(&format!(
            "/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope"
        ));
        assert_eq!(got, pod(Some("guaranteed"), Some(CID)));
    }

    #[test]
    fn systemd_besteffort_docker() {
        let got = t(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope"
        ));
        assert_eq!(got, pod(Some("besteffort"), Some(CID)));
    }

    #[test]
    fn systemd_crio_conmon_names_the_same_container() {
        let got = t(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope"
        ));
        assert_eq!(got, pod(Some("burstable"), Some(CID)));
    }

    #[test]
    fn systemd_pod_slice_without_container() {
        let got = t(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
        ));
        assert_eq!(got, pod(Some("burstable"), None));
    }

    #[test]
    fn nested_under_containerd_service_colon_form() {
        let got = t(&format!(
            "/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}"
        ));
        assert_eq!(got, pod(Some("besteffort"), Some(CID)));
    }

    #[test]
    fn kind_node_inside_docker_scope() {
        let got = t(&format!(
            "/system.slice/docker-{CID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ));
        assert_eq!(got, pod(Some("besteffort"), Some(CID)));
    }

    #[test]
    fn cgroup_namespace_relative_path_has_unknown_qos() {
        assert_eq!(t(&format!("/../pod{UID}/{CID}")), pod(None, Some(CID)));
        let got = t(&format!("/kubepods-pod{UID_}.slice:crio:{CID}"));
        assert_eq!(got, pod(Some("guaranteed"), Some(CID)));
    }

    #[test]
    fn static_pod_keeps_its_hash_uid() {
        let hash = "6e7f8ba0aa5ad5ec4e5e16d71d0d44f5";
        let got = t(&format!("/kubepods/burstable/pod{hash}/{CID}"));
        let want = Tenant::KubernetesPod {
            pod_uid: hash.to_string(),
            qos: Some("burstable".to_string()),
            container_id: Some(CID.to_string()),
        };
        assert_eq!(got, want);
    }

    #[test]
    fn kubevirt_vm_inside_pod_resolves_to_the_pod() {
        let base =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        let launcher = t(&format!("{base}/cri-containerd-{CID}.scope/housekeeping"));
        assert_eq!(launcher, pod(Some("burstable"), Some(CID)));
        let nested = t(&format!(
            "{base}/cri-containerd-{CID}.scope/machine.slice/machine-qemu\\x2d1\\x2dvmi.scope"
        ));
        assert_eq!(nested, pod(Some("burstable"), Some(CID)));
    }

    #[test]
    fn podcast_directory_is_not_a_pod() {
        assert_eq!(
            t("/kubepods/burstable/podcast"),
            path("/kubepods/burstable/podcast")
        );
        assert_eq!(t("/system.slice/podcast.service"), unit("podcast.service"));
        assert_eq!(
            t("/kubepods.slice/kubepods-podcast.slice"),
            path("/kubepods.slice/kubepods-podcast.slice")
        );
    }

    #[test]
    fn qos_slice_alone_is_not_a_pod() {
        let p = "/kubepods.slice/kubepods-burstable.slice";
        assert_eq!(t(p), path(p));
        assert_eq!(t("/kubepods/besteffort"), path("/kubepods/besteffort"));
    }

    #[test]
    fn pod_like_names_with_bad_uids_are_not_pods() {
        let p = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice";
        assert_eq!(t(p), path(p));
        // A UUID-shaped slice outside any kubepods hierarchy is not a pod either.
        let q = format!("/user.slice/user-pod{UID_}.slice");
        assert_eq!(t(&q), path(&q));
        let r = format!("/kubepods/pod{}", UID.replace('f', "g"));
        assert_eq!(t(&r), path(&r));
    }

    #[test]
    fn libvirt_scope_vcpu_thread() {
        assert_eq!(
            t(r"/machine.slice/machine-qemu\x2d1\x2dmyvm.scope/libvirt/vcpu0"),
            vm("myvm")
        );
        assert_eq!(
            t(r"/machine.slice/machine-qemu\x2d1\x2dmyvm.scope"),
            vm("myvm")
        );
    }

    #[test]
    fn libvirt_name_with_dashes_and_custom_partition() {
        let p = r"/machine.slice/machine-prod.slice/machine-qemu\x2d12\x2dweb\x2dfront\x2d01.scope/libvirt/emulator";
        assert_eq!(t(p), vm("web-front-01"));
    }

    #[test]
    fn libvirt_lxc_scope() {
        assert_eq!(
            t(r"/machine.slice/machine-lxc\x2d4242\x2dbuildbox.scope"),
            vm("buildbox")
        );
    }

    #[test]
    fn libvirt_pre_id_scope_name() {
        assert_eq!(
            t(r"/machine.slice/machine-qemu\x2dold\x2dvm.scope"),
            vm("old-vm")
        );
    }

    #[test]
    fn libvirt_legacy_cgroupfs_layouts() {
        assert_eq!(t("/machine/qemu-1-myvm.libvirt-qemu/emulator"), vm("myvm"));
        assert_eq!(t("/machine/qemu-7-a-b.libvirt-qemu/vcpu1"), vm("a-b"));
        assert_eq!(t("/machine/myvm.libvirt-qemu/vcpu0"), vm("myvm"));
        assert_eq!(t("/machine/ct1.libvirt-lxc"), vm("ct1"));
        // libvirt prefixes '_' when a name could clash with controller files.
        assert_eq!(t("/machine/_cpu.db.libvirt-qemu"), vm("cpu.db"));
    }

    #[test]
    fn non_libvirt_machine_scopes_are_units() {
        assert_eq!(
            t("/machine.slice/machine-fedora.scope"),
            unit("machine-fedora.scope")
        );
        assert_eq!(
            t(r"/machine.slice/machine-qemu\x2d1\x2d.scope"),
            unit("machine-qemu-1-.scope")
        );
        assert_eq!(
            t("/machine/vm.libvirt-xen"),
            path("/machine/vm.libvirt-xen")
        );
    }

    #[test]
    fn systemd_service_and_session_scope() {
        assert_eq!(t("/system.slice/nginx.service"), unit("nginx.service"));
        assert_eq!(
            t("/user.slice/user-1000.slice/session-2.scope"),
            unit("session-2.scope")
        );
        assert_eq!(t("/init.scope"), unit("init.scope"));
        assert_eq!(
            t(&format!("/system.slice/docker-{CID}.scope")),
            unit(&format!("docker-{CID}.scope"))
        );
    }

    #[test]
    fn systemd_escaped_unit_name_is_unescaped() {
        let p = r"/system.slice/system-systemd\x2dfsck.slice/systemd-fsck@dev-disk-by\x2duuid-1234.service";
        assert_eq!(t(p), unit("systemd-fsck@dev-disk-by-uuid-1234.service"));
    }

    #[test]
    fn deepest_unit_wins() {
        let p = "/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-42.scope";
        assert_eq!(t(p), unit("vte-spawn-42.scope"));
        assert_eq!(t("/system.slice/foo.service/worker"), unit("foo.service"));
    }

    #[test]
    fn plain_slices_and_custom_paths_are_paths() {
        assert_eq!(t("/system.slice"), path("/system.slice"));
        assert_eq!(
            t("/user.slice/user-1000.slice"),
            path("/user.slice/user-1000.slice")
        );
        assert_eq!(t("/machine.slice"), path("/machine.slice"));
        assert_eq!(t("/vmtrace/tenant-a"), path("/vmtrace/tenant-a"));
        assert_eq!(t("/.service"), path("/.service"));
    }

    #[test]
    fn root_and_empty_are_root() {
        assert_eq!(t("/"), path("/"));
        assert_eq!(t(""), path("/"));
    }

    #[test]
    fn slashes_do_not_matter_for_matching() {
        let got = t(&format!("//kubepods//burstable/pod{UID}/"));
        assert_eq!(got, pod(Some("burstable"), None));
        assert_eq!(t("/system.slice//nginx.service/"), unit("nginx.service"));
        assert_eq!(t("/vmtrace//a/"), path("/vmtrace//a/"));
    }

    #[test]
    fn broken_escapes_never_panic() {
        assert_eq!(t(r"/x/a\x.service"), unit(r"a\x.service"));
        assert_eq!(t(r"/x/a\x2.service"), unit(r"a\x2.service"));
        assert_eq!(t(r"/x/a\xZZ.service"), unit(r"a\xZZ.service"));
        assert_eq!(t(r"/x/a\x+f.service"), unit(r"a\x+f.service"));
        assert_eq!(t(r"/x/a\xff.service"), unit("a\u{FFFD}.service"));
        assert_eq!(t(r"/x/a\xc3\xa9.service"), unit("aé.service"));
        assert_eq!(t("/x/a\\xé.service"), unit("a\\xé.service"));
        assert_eq!(
            t(r"/machine.slice/machine-qemu\x2d1\x2d\xff.scope"),
            vm("\u{FFFD}")
        );
        for p in [
            r"\",
            r"\x",
            "pod",
            "-pod.slice",
            ":",
            "a.slice:",
            ".libvirt-qemu",
            "machine-.scope",
        ] {
            let _ = t(p).label();
        }
    }

    #[test]
    fn labels_are_short_and_typed() {
        assert_eq!(pod(None, Some(CID)).label(), format!("pod/{UID}"));
        assert_eq!(vm("myvm").label(), "vm/myvm");
        assert_eq!(unit("foo.service").label(), "unit/foo.service");
        assert_eq!(path("/vmtrace/tenant-a").label(), "/vmtrace/tenant-a");
    }
}
