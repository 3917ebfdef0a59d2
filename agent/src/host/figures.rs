//! The figures that need more than the probes: the VMM threads' `/proc` entries (guest time,
//! per-thread dTLB counters, the VMM holding a faulting device), and hardware counters. Where the
//! agent cannot give one, it says which and why (doctor, the log, vmtrace.agent.figure.available)
//! instead of leaving it empty.

use std::fs;

use serde::{Deserialize, Serialize};

use super::KvmFlavour;

/// A figure the agent cannot give on this host, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unavailable {
    /// What is missing: `cpu.guest`, `tlb.dtlb_misses` or `iommu.fault.owner`.
    pub figure: String,
    pub reason: String,
}

/// The figures of [`Unavailable::figure`], in the order they are reported.
pub const FIGURES: [&str; 3] = ["cpu.guest", "tlb.dtlb_misses", "iommu.fault.owner"];

/// The inode of the host's (the initial) PID namespace: fixed by the kernel
/// (`PROC_PID_INIT_INO` in include/linux/proc_ns.h).
const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";

/// Why `/proc` does not show the host's processes, if it does not: the agent is in a PID
/// namespace of its own (a container without hostPID), so it sees none of the VMMs' threads.
/// (`NSpid` in /proc/self/status cannot tell: it starts at the namespace /proc was mounted for.)
pub fn foreign_pid_namespace() -> Option<String> {
    let namespace = fs::read_link("/proc/self/ns/pid").ok()?;
    pid_namespace_reason(&namespace.to_string_lossy())
}

/// [`foreign_pid_namespace`] from the link `/proc/self/ns/pid`.
fn pid_namespace_reason(namespace: &str) -> Option<String> {
    (namespace != INITIAL_PID_NAMESPACE).then(|| {
        "the agent runs in a PID namespace of its own (a container without hostPID), so /proc \
         shows none of the VMMs' threads; run it with hostPID (deploy/patches/host-pid.yaml)"
            .to_owned()
    })
}

/// Whether per-thread hardware dTLB counters can be opened here: not from a PID namespace of its
/// own, nor on a host without hardware counters.
pub fn dtlb_availability(pid_namespace: Option<&str>) -> Result<(), String> {
    match pid_namespace {
        Some(reason) => Err(reason.to_owned()),
        None => super::dtlb::availability(),
    }
}

/// Why the VMM threads' guest time is unknown here, if it is: the KVM flavour's reason first.
pub fn guest_time_unknown(flavour: KvmFlavour, pid_namespace: Option<&str>) -> Option<&str> {
    flavour.guest_time_unknown().or(pid_namespace)
}

/// The figures this host cannot give, from its KVM flavour, the agent's PID namespace and the
/// dTLB counters' availability (`dtlb`: why not, if not): what the sampler reports and doctor
/// shows.
pub fn on_host(
    flavour: KvmFlavour,
    pid_namespace: Option<&str>,
    dtlb: Option<&str>,
) -> Vec<Unavailable> {
    let reasons = [
        guest_time_unknown(flavour, pid_namespace),
        dtlb,
        pid_namespace,
    ];
    FIGURES
        .iter()
        .zip(reasons)
        .filter_map(|(figure, reason)| {
            reason.map(|r| Unavailable {
                figure: (*figure).to_owned(),
                reason: r.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_initial_pid_namespace_shows_the_hosts_processes() {
        assert_eq!(pid_namespace_reason("pid:[4026531836]"), None);
        let nested = pid_namespace_reason("pid:[4026532249]").expect("nested");
        assert!(nested.contains("hostPID"), "{nested}");
    }

    #[test]
    fn only_the_figures_with_a_reason_are_listed() {
        let listed = on_host(KvmFlavour::Svm, None, Some("no PMU"));
        assert_eq!(listed.len(), 1);
        let listed = on_host(KvmFlavour::Svm, Some("no host /proc"), Some("no PMU"));
        assert_eq!(
            listed.iter().map(|u| u.figure.as_str()).collect::<Vec<_>>(),
            ["cpu.guest", "tlb.dtlb_misses", "iommu.fault.owner"]
        );
    }
}
