//! What the kernel accounts per cgroup, read from cgroupfs for a tenant's cgroups: CPU time (cgroup
//! v2 `cpu.stat`, present on every v2 cgroup whether or not the cpu controller is enabled) and memory
//! (v2 `memory.current` / `memory.stat` / `memory.events` where the memory controller is on v2, else
//! the v1 memory controller's cgroup at the same path, as on hybrid hosts). The files are kept
//! open between ticks ([`KeptFiles`]).

use std::{
    fs,
    path::{Path, PathBuf},
};

use vmtrace_common::mounts::MountTable;

use super::kept_files::KeptFiles;

/// One cgroup's CPU time since it was created, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStat {
    pub user_usec: u64,
    pub system_usec: u64,
}

/// One cgroup's memory: usage now, and events since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStat {
    pub usage_bytes: u64,
    /// Page faults charged to the cgroup: every fault, including those KVM takes on a guest's behalf
    /// through get_user_pages, which no exception tracepoint sees.
    pub pgfault: u64,
    pub pgmajfault: u64,
    /// Times an allocation hit the limit (v2 `max` events, v1 `failcnt`).
    pub limit_hits: u64,
    pub oom_kills: u64,
}

impl std::ops::AddAssign for CpuStat {
    fn add_assign(&mut self, other: Self) {
        self.user_usec += other.user_usec;
        self.system_usec += other.system_usec;
    }
}

/// The figures of several disjoint cgroups add up.
impl std::ops::AddAssign for MemoryStat {
    fn add_assign(&mut self, other: Self) {
        self.usage_bytes += other.usage_bytes;
        self.pgfault += other.pgfault;
        self.pgmajfault += other.pgmajfault;
        self.limit_hits += other.limit_hits;
        self.oom_kills += other.oom_kills;
    }
}

/// Where a host keeps its cgroup files, and those read so far, kept open.
#[derive(Debug)]
pub struct CgroupFs {
    /// The cgroup v2 mount.
    v2: PathBuf,
    /// Whether the v2 hierarchy has the memory controller (else no v2 cgroup has memory files).
    v2_memory: bool,
    /// The cgroup v1 mount of the memory controller, on hybrid hosts.
    v1_memory: Option<PathBuf>,
    files: KeptFiles,
}

impl CgroupFs {
    /// Finds the v1 memory controller beside the given v2 mount.
    pub fn new(v2: PathBuf) -> Self {
        let v1_memory = MountTable::read()
            .ok()
            .and_then(|table| v1_memory_mount(&table));
        let v2_memory = fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|text| text.split_whitespace().any(|c| c == "memory"));
        Self::at(v2, v2_memory, v1_memory)
    }

    /// The cgroup files under `v2` (with memory files if `v2_memory`) and `v1_memory`.
    pub fn at(v2: PathBuf, v2_memory: bool, v1_memory: Option<PathBuf>) -> Self {
        Self {
            v2,
            v2_memory,
            v1_memory,
            files: KeptFiles::default(),
        }
    }

    /// CPU time of the cgroup at `path` (relative to the v2 root, e.g. `/machine.slice/x`).
    pub fn cpu(&mut self, path: &str) -> Option<CpuStat> {
        let text = self
            .files
            .read(&self.v2.join(relative(path)).join("cpu.stat"))?;
        Some(CpuStat {
            user_usec: field(&text, "user_usec")?,
            system_usec: field(&text, "system_usec")?,
        })
    }

    /// Whether the cgroup at `path` has tasks, from v2 `cgroup.events`; `None` if unknown.
    pub fn populated(&mut self, path: &str) -> Option<bool> {
        let text = self
            .files
            .read(&self.v2.join(relative(path)).join("cgroup.events"))?;
        populated_in(&text)
    }

    /// Memory of the cgroup at `path`: from v2 if the memory controller is enabled there, else from
    /// the v1 memory controller's cgroup of the same path; `None` if neither has it.
    pub fn memory(&mut self, path: &str) -> Option<MemoryStat> {
        let v2 = self.v2.join(relative(path));
        if let Some(current) = self
            .v2_memory
            .then(|| self.files.read(&v2.join("memory.current")))
            .flatten()
        {
            let stat = self.files.read(&v2.join("memory.stat")).unwrap_or_default();
            let events = self
                .files
                .read(&v2.join("memory.events"))
                .unwrap_or_default();
            return Some(MemoryStat {
                usage_bytes: current.trim().parse().ok()?,
                pgfault: field(&stat, "pgfault").unwrap_or(0),
                pgmajfault: field(&stat, "pgmajfault").unwrap_or(0),
                limit_hits: field(&events, "max").unwrap_or(0),
                oom_kills: field(&events, "oom_kill").unwrap_or(0),
            });
        }
        let v1 = self.v1_memory.as_ref()?.join(relative(path));
        let usage = self.files.read(&v1.join("memory.usage_in_bytes"))?;
        let stat = self.files.read(&v1.join("memory.stat")).unwrap_or_default();
        let failcnt = self
            .files
            .read(&v1.join("memory.failcnt"))
            .unwrap_or_default();
        let oom = self
            .files
            .read(&v1.join("memory.oom_control"))
            .unwrap_or_default();
        Some(MemoryStat {
            usage_bytes: usage.trim().parse().ok()?,
            // The `total_` fields include child cgroups, as v2's do.
            pgfault: field(&stat, "total_pgfault")
                .or_else(|| field(&stat, "pgfault"))
                .unwrap_or(0),
            pgmajfault: field(&stat, "total_pgmajfault")
                .or_else(|| field(&stat, "pgmajfault"))
                .unwrap_or(0),
            limit_hits: failcnt.trim().parse().unwrap_or(0),
            oom_kills: field(&oom, "oom_kill").unwrap_or(0),
        })
    }

    /// Closes the files of cgroups not read since the last call: called once per tick.
    pub fn close_unread(&mut self) {
        self.files.close_unread();
    }
}

fn relative(path: &str) -> &Path {
    Path::new(path.trim_start_matches('/'))
}

/// The value of `name` in a flat-keyed cgroup file (`name value` per line).
/// `populated` of a `cgroup.events` text.
pub fn populated_in(text: &str) -> Option<bool> {
    field(text, "populated").map(|v| v != 0)
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// The mount point of the v1 hierarchy that has the memory controller.
pub fn v1_memory_mount(table: &MountTable) -> Option<PathBuf> {
    table
        .cgroup_v1_mounts("memory")
        // Only a mount of the hierarchy's root shows every cgroup at its path.
        .find(|mount| mount.root == Path::new("/"))
        .map(|mount| mount.mount_point.clone())
}

/// The cgroups of `paths` that are not inside another of them: a parent's figures include its
/// children's, so summing both would count the children twice.
pub fn outermost<'a>(paths: &[&'a str]) -> Vec<&'a str> {
    paths
        .iter()
        .copied()
        .filter(|path| {
            !paths.iter().any(|other| {
                other != path
                    && (*other == "/"
                        || path
                            .strip_prefix(other)
                            .is_some_and(|rest| rest.starts_with('/')))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
37 33 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:14 - cgroup cgroup rw,cpu,cpuacct
41 33 0:36 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:18 - cgroup cgroup rw,memory
";

    #[test]
    fn finds_the_v1_memory_controller() {
        assert_eq!(
            v1_memory_mount(&MountTable::parse(MOUNTINFO)),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        let unified_only = MOUNTINFO
            .lines()
            .filter(|l| !l.contains("rw,memory"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(v1_memory_mount(&MountTable::parse(&unified_only)), None);
    }

    #[test]
    fn reads_flat_keyed_files() {
        let text = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n";
        assert_eq!(field(text, "user_usec"), Some(1000));
        assert_eq!(field(text, "usage_usec"), Some(1500));
        assert_eq!(field(text, "missing"), None);
    }

    #[test]
    fn reads_v2_and_v1_cgroups() {
        let dir = std::env::temp_dir().join(format!("vmtrace-cgroup-stats-{}", std::process::id()));
        let v2 = dir.join("v2/tenant");
        let v1 = dir.join("v1/other");
        fs::create_dir_all(&v2).unwrap();
        fs::create_dir_all(&v1).unwrap();
        fs::write(
            v2.join("cpu.stat"),
            "usage_usec 30\nuser_usec 10\nsystem_usec 20\n",
        )
        .unwrap();
        fs::write(v2.join("memory.current"), "4096\n").unwrap();
        fs::write(v2.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        fs::write(
            v2.join("memory.stat"),
            "anon 4096\npgfault 7\npgmajfault 1\n",
        )
        .unwrap();
        fs::write(
            v2.join("memory.events"),
            "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(v1.join("memory.usage_in_bytes"), "8192\n").unwrap();
        fs::write(v1.join("memory.stat"), "pgfault 3\ntotal_pgfault 9\n").unwrap();
        fs::write(v1.join("memory.failcnt"), "4\n").unwrap();
        fs::write(
            v1.join("memory.oom_control"),
            "oom_kill_disable 0\noom_kill 2\n",
        )
        .unwrap();
        let mut cgroups = CgroupFs::at(dir.join("v2"), true, Some(dir.join("v1")));
        assert_eq!(
            cgroups.cpu("/tenant"),
            Some(CpuStat {
                user_usec: 10,
                system_usec: 20
            })
        );
        let v2_memory = cgroups.memory("/tenant").unwrap();
        assert_eq!(
            (
                v2_memory.usage_bytes,
                v2_memory.pgfault,
                v2_memory.limit_hits,
                v2_memory.oom_kills
            ),
            (4096, 7, 2, 1)
        );
        let v1_memory = cgroups.memory("/other").unwrap();
        assert_eq!(
            (
                v1_memory.usage_bytes,
                v1_memory.pgfault,
                v1_memory.limit_hits,
                v1_memory.oom_kills
            ),
            (8192, 9, 4, 2)
        );
        assert_eq!(cgroups.memory("/absent"), None);
        assert_eq!(cgroups.populated("/tenant"), Some(false));
        assert_eq!(cgroups.populated("/absent"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn children_of_listed_cgroups_are_left_out() {
        assert_eq!(
            outermost(&["/a", "/a/b", "/ab", "/c/d"]),
            vec!["/a", "/ab", "/c/d"]
        );
        assert_eq!(outermost(&["/", "/a"]), vec!["/"]);
    }
}
