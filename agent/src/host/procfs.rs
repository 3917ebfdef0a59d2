//! Reading `/proc`: the threads of the VMM processes, and the fields of a `stat` file.

use std::{collections::BTreeMap, fs};

/// A thread of a VMM process, with the cgroup id the probes know its process by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmThread {
    pub tgid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
}

/// Every live thread of `processes` (tgid to cgroup id).
pub fn vmm_threads(processes: &BTreeMap<u32, u64>) -> Vec<VmmThread> {
    let mut threads = Vec::new();
    for (&tgid, &cgroup_id) in processes {
        let Ok(tasks) = fs::read_dir(format!("/proc/{tgid}/task")) else {
            continue;
        };
        threads.extend(
            tasks
                .flatten()
                .filter_map(|t| t.file_name().to_str()?.parse().ok())
                .map(|tid| VmmThread {
                    tgid,
                    tid,
                    cgroup_id,
                }),
        );
    }
    threads
}

/// Field `n` (numbered from 1, as in proc(5)) of the text of a `stat` file, from field 3 on. The
/// command name (field 2) may hold spaces and parentheses, so fields are counted from its last `)`.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// Clock ticks per second, the unit of the times in `stat` files.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_after_the_command_name() {
        let fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        let stat = format!("1234 (vcpu 0 (x)) {}", fields.join(" "));
        assert_eq!(stat_field(&stat, 3), Some("3"));
        assert_eq!(stat_field(&stat, 43), Some("43"));
        assert_eq!(stat_field("1234 (short) S 1 2", 43), None);
        assert_eq!(stat_field(&stat, 2), None);
    }

    #[test]
    fn lists_this_process_threads() {
        let me = std::process::id();
        let threads = vmm_threads(&[(me, 42)].into_iter().collect());
        assert!(threads.iter().any(|t| t.tid == me && t.cgroup_id == 42));
    }
}
