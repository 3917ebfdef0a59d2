//! Raw exit counter entries turned into named counts per cgroup, with the figures derived from them
//! (MMIO writes completed in the kernel, TLB-touching exits). Both the per-cgroup and the per-thread
//! counters go through here.

use std::collections::BTreeMap;

use vmtrace_common::{ExitKey, ExitKind};

use crate::{
    kind::{ExitReason, Kind, KvmExitReason, MmioAccess, TlbEvent},
    probe::exit_reasons::ExitReasonNames,
};

/// Counts of one cgroup by kind, since the probes were attached.
pub type KindCounts = BTreeMap<Kind, u64>;

/// Turns raw (key, total) pairs into named counts per cgroup, adding the derived in-kernel MMIO writes.
pub fn aggregate(raw: &[(ExitKey, u64)], names: &ExitReasonNames) -> BTreeMap<u64, KindCounts> {
    let mut by_cgroup: BTreeMap<u64, KindCounts> = BTreeMap::new();
    for (key, total) in raw {
        let Ok(kind) = ExitKind::try_from(key.kind) else {
            continue;
        };
        let kind = Kind::from_exit_key(kind, key.isa, key.detail, names);
        *by_cgroup
            .entry(key.cgroup_id)
            .or_default()
            .entry(kind)
            .or_default() += total;
    }
    for counts in by_cgroup.values_mut() {
        let get = |kind: Kind| counts.get(&kind).copied().unwrap_or(0);
        // Every MMIO exit to the VMM is a read, which KVM logs as unsatisfied before exiting, or a
        // write; the writes that did not exit were completed in the kernel. A write can be counted
        // exiting before its kvm_mmio is read by this snapshot, so never go below zero.
        let writes_to_vmm = get(Kind::Exit(ExitReason::MMIO))
            .saturating_sub(get(Kind::Mmio(MmioAccess::ReadUnsatisfied)));
        let in_kernel = get(Kind::Mmio(MmioAccess::Write)).saturating_sub(writes_to_vmm);
        if in_kernel > 0 {
            counts.insert(Kind::Mmio(MmioAccess::WriteKernel), in_kernel);
        }
        let tlb_exits: u64 = counts
            .iter()
            .filter(|(kind, _)| {
                kind.kvm_exit_reason()
                    .is_some_and(KvmExitReason::touches_tlb)
            })
            .map(|(_, count)| count)
            .sum();
        if tlb_exits > 0 {
            counts.insert(Kind::Tlb(TlbEvent::Exit), tlb_exits);
        }
    }
    by_cgroup
}

#[cfg(test)]
mod tests {
    use vmtrace_common::MmioType;

    use super::*;

    fn key(cgroup_id: u64, kind: ExitKind, detail: u32) -> ExitKey {
        ExitKey {
            cgroup_id,
            kind: kind as u32,
            detail,
            isa: 0,
            reserved: 0,
        }
    }

    #[test]
    fn in_kernel_writes_are_the_writes_that_did_not_exit() {
        let raw = [
            // 150 writes and 30 reads; 100 writes and the 30 reads exited to the VMM.
            (key(7, ExitKind::Mmio, MmioType::Write as u32), 150),
            (key(7, ExitKind::Mmio, MmioType::ReadUnsatisfied as u32), 30),
            (key(7, ExitKind::Mmio, MmioType::Read as u32), 30),
            (key(7, ExitKind::Userspace, 6), 130),
            (key(8, ExitKind::Mmio, MmioType::Write as u32), 40),
            (key(8, ExitKind::Cpuid, 0), 3),
        ];
        let by_cgroup = aggregate(&raw, &ExitReasonNames::builtin());
        let kind = |name: &str| name.parse::<Kind>().unwrap();
        assert_eq!(by_cgroup[&7][&kind("mmio.write")], 150);
        assert_eq!(by_cgroup[&7][&kind("mmio.write.kernel")], 50);
        assert_eq!(by_cgroup[&7][&kind("exit.mmio")], 130);
        assert_eq!(by_cgroup[&8][&kind("mmio.write.kernel")], 40);
        assert_eq!(by_cgroup[&8][&Kind::Cpuid], 3);
        assert_eq!(by_cgroup[&8].get(&kind("exit.mmio")), None);
    }
}
