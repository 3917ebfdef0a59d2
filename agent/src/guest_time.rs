//! Guest time of VMM processes: the CPU time their threads spent in guest mode, which the kernel
//! accounts per thread (`guest_time`, field 43 of `/proc/<pid>/task/<tid>/stat`, in clock ticks).
//! Kept per cgroup and monotonic: a thread that ends keeps what it was last seen with.

use std::{collections::HashMap, fs};

/// Guest time per cgroup of the VMM processes the probes found.
#[derive(Debug, Default)]
pub struct GuestTime {
    /// Last seen guest ticks of every live VMM thread, with its process's cgroup.
    threads: HashMap<(u32, u32), (u64, u64)>,
    /// Guest ticks of threads that have ended, per cgroup.
    ended: HashMap<u64, u64>,
}

impl GuestTime {
    /// Reads the guest time of every thread of `processes` (tgid to cgroup id) and returns the
    /// guest time per cgroup so far, in ns.
    pub fn update(
        &mut self,
        processes: &std::collections::BTreeMap<u32, u64>,
    ) -> HashMap<u64, u64> {
        let mut seen = HashMap::new();
        for (&tgid, &cgroup_id) in processes {
            let Ok(tasks) = fs::read_dir(format!("/proc/{tgid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let Some(tid) = task
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let stat = fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                if let Some(ticks) = guest_ticks(&stat) {
                    seen.insert((tgid, tid), (cgroup_id, ticks));
                }
            }
        }
        for (thread, (cgroup_id, ticks)) in &self.threads {
            if !seen.contains_key(thread) {
                *self.ended.entry(*cgroup_id).or_default() += ticks;
            }
        }
        self.threads = seen;
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

/// `guest_time` from the text of a `/proc/<pid>/task/<tid>/stat` file. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from the last `)`.
pub fn guest_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts with field 3 (state); guest_time is field 43.
    rest.split_whitespace().nth(43 - 3)?.parse().ok()
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let by_cgroup = guest.update(&processes);
        // Not a VMM: no guest time, but its threads were read.
        assert_eq!(by_cgroup.get(&42), Some(&0));
        assert!(!guest.threads.is_empty());
    }
}
