//! `vmtrace doctor`: can vmtrace run on this host, and what will it see?

use serde::Serialize;

use crate::{
    host::{self, KvmDetection, KvmFlavour, Privileges},
    probe::load::{ExitSource, ProbeOptions, ProbeStatus, Probes},
    probe::tracefs,
    tenant::cgroup_index::find_v2_mount,
};

/// Everything doctor found.
#[derive(Debug, Serialize)]
pub struct Diagnosis {
    pub kernel: String,
    pub btf: bool,
    pub tracefs: Result<String, String>,
    pub kvm: KvmDetection,
    /// Whether `kvm:kvm_exit` fires here, and why we think so.
    pub kvm_exit: String,
    pub exit_source: Option<ExitSource>,
    pub cgroup_v2: Option<String>,
    pub privileges: Privileges,
    pub hardware_perf_counters: Result<(), String>,
    pub probes: Vec<ProbeStatus>,
    /// Why vmtrace cannot run here; empty when it can.
    pub blockers: Vec<String>,
}

pub fn diagnose() -> Diagnosis {
    let kvm = host::detect_kvm();
    let privileges = host::privileges();
    let tracefs = tracefs::find_or_mount()
        .map(|p| p.display().to_string())
        .map_err(|e| e.to_string());
    let cgroup_v2 = find_v2_mount().map(|p| p.display().to_string());
    let mut blockers = Vec::new();
    if !privileges.can_trace() {
        blockers.push(
            "missing privileges: run as root, or grant CAP_BPF and CAP_PERFMON (e.g. `setcap cap_bpf,cap_perfmon+ep vmtrace`)"
                .to_owned(),
        );
    }
    if kvm.flavour == KvmFlavour::None || !kvm.dev_kvm {
        blockers.push(format!(
            "no KVM on this host ({}; /dev/kvm {}): there are no guests to watch",
            kvm.evidence,
            if kvm.dev_kvm { "present" } else { "absent" }
        ));
    }
    if cgroup_v2.is_none() {
        blockers.push(
            "no cgroup v2 hierarchy is mounted: tenants are cgroup v2 groups (mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`)"
                .to_owned(),
        );
    }
    let (probes, exit_source) = if privileges.can_trace() {
        match Probes::attach(&kvm, &ProbeOptions::default()) {
            Ok(p) => (p.status.clone(), Some(p.exit_source)),
            Err(e) => {
                blockers.push(format!("the probes cannot be attached: {e}"));
                (Vec::new(), None)
            }
        }
    } else {
        (Vec::new(), None)
    };
    let kvm_exit = match kvm.flavour {
        KvmFlavour::Vmx | KvmFlavour::Svm => "fires on every exit (VMX/SVM emit it)".to_owned(),
        KvmFlavour::Pvm => "silent: PVM never emits kvm_exit or kvm_entry; exits are derived from the events that fire".to_owned(),
        KvmFlavour::None => "no KVM".to_owned(),
    };
    Diagnosis {
        kernel: host::kernel_release(),
        btf: host::has_btf(),
        tracefs,
        kvm,
        kvm_exit,
        exit_source,
        cgroup_v2,
        privileges,
        hardware_perf_counters: crate::host::dtlb::availability(),
        probes,
        blockers,
    }
}

/// The diagnosis as people read it.
pub fn render(d: &Diagnosis) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<15} {value}\n"));
    line("kernel", d.kernel.clone());
    line(
        "BTF",
        format!("{} (/sys/kernel/btf/vmlinux)", yes_no(d.btf)),
    );
    line(
        "tracefs",
        match &d.tracefs {
            Ok(p) => p.clone(),
            Err(e) => format!("unavailable: {e}"),
        },
    );
    line(
        "KVM",
        format!(
            "{} ({}; /dev/kvm {})",
            d.kvm.flavour.name(),
            d.kvm.evidence,
            if d.kvm.dev_kvm { "present" } else { "absent" }
        ),
    );
    line("kvm:kvm_exit", d.kvm_exit.clone());
    line(
        "exit source",
        d.exit_source
            .map_or("unknown (probes not loaded)".to_owned(), |s| {
                s.describe().to_owned()
            }),
    );
    line(
        "cgroup v2",
        d.cgroup_v2
            .clone()
            .unwrap_or_else(|| "not mounted".to_owned()),
    );
    let p = &d.privileges;
    line(
        "privileges",
        format!(
            "euid {}; CAP_BPF {}, CAP_PERFMON {}, CAP_SYS_ADMIN {}",
            p.euid,
            yes_no(p.cap_bpf),
            yes_no(p.cap_perfmon),
            yes_no(p.cap_sys_admin)
        ),
    );
    line(
        "perf counters",
        match &d.hardware_perf_counters {
            Ok(()) => "hardware dTLB-miss counters available".to_owned(),
            Err(e) => e.clone(),
        },
    );
    for (i, probe) in d.probes.iter().enumerate() {
        let state = match &probe.error {
            None => "attached".to_owned(),
            // Optional probes that are off by choice are not failures.
            Some(e) if e.starts_with("off ") => e.clone(),
            Some(e) => format!("NOT attached: {e}"),
        };
        line(
            if i == 0 { "probes" } else { "" },
            format!("{:<32} {:<15} {state}", probe.tracepoint, probe.attach_type),
        );
    }
    if d.blockers.is_empty() {
        out.push_str("\nready: vmtrace can run on this host\n");
    } else {
        out.push_str("\nvmtrace cannot run on this host:\n");
        for b in &d.blockers {
            out.push_str(&format!("  - {b}\n"));
        }
    }
    out
}
