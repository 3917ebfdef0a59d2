//! Giving up capabilities once they have served. Capabilities belong to threads: the sampling
//! thread keeps what reading the probes' maps and opening new VMM threads' counters takes; the
//! others (the endpoint, OTLP, the Kubernetes watch) need none.

use anyhow::{Context, Result};
use caps::{CapSet, Capability, CapsHashSet};

/// Keeps only `keep` in the calling thread's effective, permitted and inheritable sets (the
/// ambient set follows); returns what it held and gave up, by name (`CAP_...`).
pub fn keep_only(keep: &[Capability]) -> Result<Vec<String>> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    let held = caps::read(None, CapSet::Permitted).context("reading this thread's capabilities")?;
    let mut dropped: Vec<String> = held.difference(&keep).map(ToString::to_string).collect();
    dropped.sort();
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
        let now = caps::read(None, set).context("reading this thread's capabilities")?;
        caps::set(None, set, &now.intersection(&keep).copied().collect())
            .with_context(|| format!("giving up capabilities ({set:?})"))?;
    }
    Ok(dropped)
}

/// What the sampling thread needs once the probes are attached (of what it holds): CAP_BPF to
/// read and delete map entries (before Linux 6.5 every bpf() command checks it while
/// kernel.unprivileged_bpf_disabled is set, the distributions' default); CAP_PERFMON only where
/// per-thread hardware counters are opened for new VMM threads; CAP_SYS_PTRACE, which only root
/// holds, only where IOMMU faults may need the VMM holding a device (its /proc/<pid>/fd).
/// CAP_DAC_READ_SEARCH served to read tracefs at attach time.
pub fn needed_by_the_sampler(hardware_counters: bool, iommu: bool) -> Vec<Capability> {
    let mut needed = vec![Capability::CAP_BPF];
    if hardware_counters {
        needed.push(Capability::CAP_PERFMON);
    }
    if iommu {
        needed.push(Capability::CAP_SYS_PTRACE);
    }
    needed
}

/// `CAP_A, CAP_B`, or `none`.
pub fn names(capabilities: &[Capability]) -> String {
    if capabilities.is_empty() {
        return "none".to_owned();
    }
    capabilities
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_only_what_it_is_told() {
        // On a thread of its own, so that the test process keeps its capabilities.
        std::thread::spawn(|| {
            let before = caps::read(None, CapSet::Permitted).unwrap();
            let dropped = keep_only(&[Capability::CAP_BPF]).unwrap();
            let after = caps::read(None, CapSet::Permitted).unwrap();
            assert!(after.is_subset(&[Capability::CAP_BPF].into_iter().collect()));
            assert_eq!(
                dropped.len(),
                before.difference(&after).count(),
                "{dropped:?}"
            );
            assert!(
                caps::read(None, CapSet::Effective)
                    .unwrap()
                    .is_subset(&after)
            );
        })
        .join()
        .unwrap();
    }
}
