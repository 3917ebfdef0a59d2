//! The figures that need more than the probes: the VMM threads' `/proc` entries (guest time,
//! per-thread dTLB counters, the VMM holding a faulting device), and hardware counters. Where the
//! agent cannot give one, it says which and why (doctor, the log, vmtrace.agent.figure.available)
//! instead of leaving it empty.

use std::fs;

use serde::{Deserialize, Serialize};

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

/// The unavailable figures, from the reasons the sampler knows.
pub fn unavailable(
    guest_time: Option<&str>,
    dtlb: Option<&str>,
    iommu_owner: Option<&str>,
) -> Vec<Unavailable> {
    FIGURES
        .iter()
        .zip([guest_time, dtlb, iommu_owner])
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
        let listed = unavailable(None, Some("no PMU"), Some("no host /proc"));
        assert_eq!(
            listed.iter().map(|u| u.figure.as_str()).collect::<Vec<_>>(),
            ["tlb.dtlb_misses", "iommu.fault.owner"]
        );
    }
}
