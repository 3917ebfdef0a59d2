//! Where this host mounts its cgroup hierarchies, from /proc/self/mounts.

use std::path::PathBuf;

/// The mount point of the first mount whose fields (device, dir, fstype, options) satisfy `matches`.
fn find(matches: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (dir, fstype, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        matches(fstype, options).then(|| PathBuf::from(dir))
    })
}

/// The cgroup v2 hierarchy.
pub fn cgroup2_mount() -> Option<PathBuf> {
    find(|fstype, _| fstype == "cgroup2")
}

/// The cgroup v1 memory hierarchy (hybrid hosts), where `vmtrace-vmm --cgroup` also creates and
/// joins the tenant's path.
pub fn memory_v1_mount() -> Option<PathBuf> {
    find(|fstype, options| fstype == "cgroup" && options.split(',').any(|o| o == "memory"))
}
