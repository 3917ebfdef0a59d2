//! `vmtrace doctor`: can vmtrace run on this host, and what will it see?

use serde::Serialize;

use crate::{
    host::cgroup_index::find_v2_mount,
    host::{self, KvmDetection, KvmFlavour, Privileges},
    probe::load::{BtfArgs, ExitSource, ProbeOptions, ProbeStatus, Probes},
    probe::spec::{HostTraits, KVM_EXIT, PROBES, Silence, When},
    probe::tracefs,
};

/// Everything doctor found.
#[derive(Debug, Serialize)]
pub struct Diagnosis {
    pub kernel: String,
    pub btf: bool,
    /// Whether the raw tracepoints' arguments were checked against the kernel's BTF.
    pub btf_arguments: String,
    pub tracefs: Result<String, String>,
    pub kvm: KvmDetection,
    /// Whether `kvm:kvm_exit` fires here, and why we think so.
    pub kvm_exit: String,
    pub exit_source: Option<ExitSource>,
    pub cgroup_v2: Option<String>,
    pub privileges: Privileges,
    pub hardware_perf_counters: Result<(), String>,
    /// Figures beyond the probes that the agent cannot give here, and why.
    pub figures_unavailable: Vec<crate::host::figures::Unavailable>,
    pub probes: Vec<ProbeStatus>,
    /// Probes that should be attached here and are not (`category:event`): vmtrace runs degraded.
    pub probes_not_attached: Vec<String>,
    /// Why vmtrace cannot run here; empty when it can.
    pub blockers: Vec<String>,
}

pub fn diagnose() -> Diagnosis {
    let kvm = host::detect_kvm();
    let privileges = host::privileges();
    let tracefs = tracefs::find_or_mount()
        .map(|location| location.to_string())
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
    let (probes, exit_source, btf_read) = if privileges.can_trace() {
        match Probes::attach(&kvm, &ProbeOptions::default()) {
            Ok(p) => (p.status.clone(), Some(p.exit_source), Some(p.btf.clone())),
            Err(e) => {
                blockers.push(format!("the probes cannot be attached: {e}"));
                (Vec::new(), None, None)
            }
        }
    } else {
        (Vec::new(), None, None)
    };
    Diagnosis {
        kernel: host::kernel_release(),
        btf: host::has_btf(),
        btf_arguments: btf_arguments(btf_read.as_ref(), &probes),
        tracefs,
        kvm_exit: kvm_exit(kvm.flavour),
        figures_unavailable: figures_unavailable(kvm.flavour),
        kvm,
        exit_source,
        cgroup_v2,
        privileges,
        hardware_perf_counters: crate::host::dtlb::availability(),
        probes_not_attached: probes
            .iter()
            .filter(|p| p.degraded())
            .map(|p| p.tracepoint.clone())
            .collect(),
        probes,
        blockers,
    }
}

/// What the agent would report as unavailable figures, as its sampler decides them.
fn figures_unavailable(flavour: KvmFlavour) -> Vec<crate::host::figures::Unavailable> {
    use crate::host::figures;
    let pid_namespace = figures::foreign_pid_namespace();
    let dtlb = figures::dtlb_availability(pid_namespace.as_deref()).err();
    figures::on_host(flavour, pid_namespace.as_deref(), dtlb.as_deref())
}

/// Whether `kvm:kvm_exit` fires on this KVM flavour, from the probe table: where it is silent, so
/// are the other probes the table marks silent on exactly the same flavours.
fn kvm_exit(flavour: KvmFlavour) -> String {
    let host = HostTraits {
        kvm: flavour,
        iommu: crate::host::IommuHost::None,
    };
    if flavour == KvmFlavour::None {
        return "no KVM".to_owned();
    }
    if KVM_EXIT.silent_on(host).is_none() {
        return format!("fires on every exit ({} emits it)", flavour.name());
    }
    // The probes silent exactly where kvm_exit is (kvm_fast_mmio, silent on SVM too, is not one).
    let kvm_exit_silence = match KVM_EXIT.when {
        When::Silent(Silence::OnKvm(flavours)) => flavours,
        _ => &[],
    };
    let others = PROBES.iter().filter(|p| {
        p.program != KVM_EXIT.program
            && matches!(p.when, When::Silent(Silence::OnKvm(flavours)) if flavours == kvm_exit_silence)
    });
    let silent: Vec<&str> = std::iter::once(KVM_EXIT.event)
        .chain(others.map(|p| p.event))
        .collect();
    format!(
        "silent: {} never emits {}; exits are derived from the events that fire",
        flavour.name(),
        or_list(&silent)
    )
}

/// `a`, `a or b`, `a, b or c`.
fn or_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// How the raw tracepoints' arguments compare with the kernel's BTF, in one line.
fn btf_arguments(btf_read: Option<&Result<(), String>>, probes: &[ProbeStatus]) -> String {
    // An optional probe that is off is neither checked nor attached: it is not counted.
    let raw = probes
        .iter()
        .filter(|p| p.attach_type == "raw_tracepoint" && p.off_until.is_none())
        .count();
    let count = |wanted: fn(&BtfArgs) -> bool| {
        probes
            .iter()
            .filter(|p| p.btf_args.as_ref().is_some_and(wanted))
            .count()
    };
    match btf_read {
        None => "arguments not checked (probes not loaded)".to_owned(),
        Some(Err(e)) => format!(
            "arguments NOT checked ({e}): the {raw} raw tracepoints were attached without the check"
        ),
        Some(Ok(())) => {
            let checked = count(|a| *a == BtfArgs::Checked);
            let mismatched = count(|a| *a == BtfArgs::Mismatch);
            let mut text = format!("arguments of {checked} of {raw} raw tracepoints checked");
            if mismatched > 0 {
                text.push_str(&format!(", {mismatched} mismatched (not attached)"));
            }
            if checked + mismatched < raw {
                text.push_str(&format!(
                    ", {} unchecked (see probes)",
                    raw - checked - mismatched
                ));
            }
            text
        }
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
        format!(
            "{} (/sys/kernel/btf/vmlinux); {}",
            yes_no(d.btf),
            d.btf_arguments
        ),
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
    line(&KVM_EXIT.tracepoint(), d.kvm_exit.clone());
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
            "euid {}; CAP_BPF {}, CAP_PERFMON {}, CAP_SYS_ADMIN {}; {}",
            p.euid,
            yes_no(p.cap_bpf),
            yes_no(p.cap_perfmon),
            yes_no(p.cap_sys_admin),
            if p.seccomp_filter {
                "under a seccomp filter"
            } else {
                "no seccomp filter"
            }
        ),
    );
    line(
        "perf counters",
        match &d.hardware_perf_counters {
            Ok(()) => "hardware dTLB-miss counters available".to_owned(),
            Err(e) => e.clone(),
        },
    );
    if d.figures_unavailable.is_empty() {
        line(
            "figures",
            "every figure beyond the probes is available".to_owned(),
        );
    }
    for (i, figure) in d.figures_unavailable.iter().enumerate() {
        line(
            if i == 0 { "figures" } else { "" },
            format!("{} unavailable: {}", figure.figure, figure.reason),
        );
    }
    for (i, probe) in d.probes.iter().enumerate() {
        line(
            if i == 0 { "probes" } else { "" },
            format!(
                "{:<32} {:<15} {}",
                probe.tracepoint,
                probe.attach_type,
                probe_state(probe)
            ),
        );
    }
    if !d.probes_not_attached.is_empty() {
        out.push_str(&format!(
            "\ndegraded: {} probes not attached ({}): their figures will be missing\n",
            d.probes_not_attached.len(),
            d.probes_not_attached.join(", ")
        ));
    }
    if d.blockers.is_empty() && !d.probes_not_attached.is_empty() {
        out.push_str("\nvmtrace can run on this host, degraded: its figures lack those probes\n");
    } else if d.blockers.is_empty() {
        out.push_str("\nready: vmtrace can run on this host\n");
    } else {
        out.push_str("\nvmtrace cannot run on this host:\n");
        for b in &d.blockers {
            out.push_str(&format!("  - {b}\n"));
        }
    }
    out
}

/// One probe's state: attached or why not, whether it fires here, how its arguments were checked.
fn probe_state(probe: &ProbeStatus) -> String {
    let mut state = match (&probe.error, &probe.silent) {
        (None, _) => "attached".to_owned(),
        // Optional probes that are off by choice are not failures.
        (Some(e), _) if probe.off_until.is_some() => e.clone(),
        (Some(e), Some(silent)) if probe.failure_expected() => {
            format!("not attached ({silent} anyway): {e}")
        }
        (Some(e), _) => format!("NOT attached: {e}"),
    };
    if probe.error.is_none()
        && let Some(silent) = &probe.silent
    {
        state.push_str(&format!("; silent here: {silent}"));
    }
    if let Some(BtfArgs::Unchecked(why)) = &probe.btf_args {
        state.push_str(&format!("; arguments unchecked: {why}"));
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::spec::Reads;

    fn status(error: Option<&str>) -> ProbeStatus {
        ProbeStatus {
            tracepoint: "kvm:kvm_mmio".to_owned(),
            attach_type: "raw_tracepoint",
            error: error.map(str::to_owned),
            program: "kvm_mmio",
            silent: None,
            off_until: None,
            btf_args: Some(BtfArgs::Checked),
        }
    }

    #[test]
    fn kvm_exit_line_comes_from_the_table() {
        assert_eq!(
            kvm_exit(KvmFlavour::Pvm),
            "silent: PVM never emits kvm_exit, kvm_entry or kvm_page_fault; exits are derived from the events that fire"
        );
        assert_eq!(
            kvm_exit(KvmFlavour::Svm),
            "fires on every exit (SVM emits it)"
        );
        assert_eq!(kvm_exit(KvmFlavour::None), "no KVM");
    }

    #[test]
    fn probe_states_say_what_is_expected() {
        assert_eq!(probe_state(&status(None)), "attached");
        let off = ProbeStatus {
            off_until: Some("--kick-latency"),
            btf_args: None,
            ..status(Some("off (enable with --kick-latency)"))
        };
        assert_eq!(probe_state(&off), "off (enable with --kick-latency)");
        let silent = ProbeStatus {
            silent: Some("PVM never emits it".to_owned()),
            ..status(None)
        };
        assert_eq!(
            probe_state(&silent),
            "attached; silent here: PVM never emits it"
        );
        let failed_silent = ProbeStatus {
            silent: Some("PVM never emits it".to_owned()),
            ..status(Some("ENOENT"))
        };
        assert_eq!(
            probe_state(&failed_silent),
            "not attached (PVM never emits it anyway): ENOENT"
        );
        // A BTF mismatch is a failure even where the probe would be silent.
        let mismatch = ProbeStatus {
            btf_args: Some(BtfArgs::Mismatch),
            ..failed_silent
        };
        assert_eq!(probe_state(&mismatch), "NOT attached: ENOENT");
        let unchecked = ProbeStatus {
            btf_args: Some(BtfArgs::Unchecked("no BTF".to_owned())),
            ..status(None)
        };
        assert_eq!(
            probe_state(&unchecked),
            "attached; arguments unchecked: no BTF"
        );
    }

    #[test]
    fn btf_line_counts_checks_and_says_when_btf_is_unreadable() {
        let raw = PROBES
            .iter()
            .filter(|p| matches!(p.reads, Reads::Raw { .. }))
            .count();
        let all_checked: Vec<ProbeStatus> = (0..raw).map(|_| status(None)).collect();
        assert_eq!(
            btf_arguments(Some(&Ok(())), &all_checked),
            format!("arguments of {raw} of {raw} raw tracepoints checked")
        );
        let mut one_differs = all_checked.clone();
        one_differs[0].btf_args = Some(BtfArgs::Mismatch);
        one_differs[1].btf_args = Some(BtfArgs::Unchecked("no typedef".to_owned()));
        assert_eq!(
            btf_arguments(Some(&Ok(())), &one_differs),
            format!(
                "arguments of {} of {raw} raw tracepoints checked, 1 mismatched (not attached), 1 unchecked (see probes)",
                raw - 2
            )
        );
        let mut one_off = all_checked.clone();
        one_off[0] = ProbeStatus {
            off_until: Some("--service-time"),
            btf_args: None,
            ..status(Some("off (enable with --service-time)"))
        };
        assert_eq!(
            btf_arguments(Some(&Ok(())), &one_off),
            format!("arguments of {0} of {0} raw tracepoints checked", raw - 1)
        );
        let unreadable = btf_arguments(Some(&Err("cannot read BTF".to_owned())), &[]);
        assert!(unreadable.starts_with("arguments NOT checked (cannot read BTF)"));
    }
}
