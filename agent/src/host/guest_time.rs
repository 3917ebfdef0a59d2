//! Guest time of VMM processes: the CPU time their threads spent in guest mode, which the kernel
//! accounts per thread (`guest_time`, field 43 of `/proc/<pid>/task/<tid>/stat`, in clock ticks).
//! Kept per cgroup and monotonic: a thread that ends keeps what it was last seen with.

use std::{collections::HashMap, path::Path};

use crate::host::{
    kept_files::KeptFiles,
    procfs::{VmmThread, clock_ticks_per_second, stat_field},
};

/// Guest time per cgroup of the VMM processes the probes found.
#[derive(Debug, Default)]
pub struct GuestTime {
    /// Last seen guest ticks of every live VMM thread, with its process's cgroup.
    threads: HashMap<(u32, u32), (u64, u64)>,
    /// Guest ticks of threads that have ended, per cgroup.
    ended: HashMap<u64, u64>,
    /// The threads' `stat` files.
    files: KeptFiles,
}

impl GuestTime {
    /// Reads the guest time of every thread in `threads` and returns the guest time per cgroup so
    /// far, in ns.
    pub fn update(&mut self, threads: &[VmmThread]) -> HashMap<u64, u64> {
        let mut seen = HashMap::new();
        for thread in threads {
            let path = format!("/proc/{}/task/{}/stat", thread.tgid, thread.tid);
            let stat = self.files.read(Path::new(&path)).unwrap_or_default();
            if let Some(ticks) = guest_ticks(&stat) {
                seen.insert((thread.tgid, thread.tid), (thread.cgroup_id, ticks));
            }
        }
        for (thread, (cgroup_id, ticks)) in &self.threads {
            if !seen.contains_key(thread) {
                *self.ended.entry(*cgroup_id).or_default() += ticks;
            }
        }
        self.threads = seen;
        self.files.close_unread();
        let mut by_cgroup = self.ended.clone();
        for (cgroup_id, ticks) in self.threads.values() {
            *by_cgroup.entry(*cgroup_id).or_default() += ticks;
        }
        let ns_per_tick = 1_000_000_000 / clock_ticks_per_second();
        by_cgroup
            .into_iter()
            .map(|(cgroup_id, ticks)| (cgroup_id, ticks * ns_per_tick))
            .collect()
    }
}

impl GuestTime {
    /// Drops the ended threads' guest time of cgroups for which `keep` says no (no longer
    /// referenced by any tenant), so that what is kept is bounded by the live tenants.
    pub fn retain_cgroups(&mut self, keep: impl Fn(u64) -> bool) {
        self.ended.retain(|cgroup_id, _| keep(*cgroup_id));
    }
}

/// `guest_time`, field 43, from the text of a `/proc/<pid>/task/<tid>/stat` file.
pub fn guest_ticks(stat: &str) -> Option<u64> {
    stat_field(stat, 43)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::procfs::vmm_threads;

    #[test]
    fn guest_time_is_field_43() {
        let fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        let stat = format!("1234 (vcpu 0 (x)) {}", fields.join(" "));
        assert_eq!(guest_ticks(&stat), Some(43));
        assert_eq!(guest_ticks("1234 (short) S 1 2"), None);
    }

    #[test]
    fn reads_this_process() {
        let mut guest = GuestTime::default();
        let me = std::process::id();
        let processes = [(me, 42u64)].into_iter().collect();
        let by_cgroup = guest.update(&vmm_threads(&processes));
        // Not a VMM: no guest time, but its threads were read.
        assert_eq!(by_cgroup.get(&42), Some(&0));
        assert!(!guest.threads.is_empty());
    }
}
