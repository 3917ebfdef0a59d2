//! The benchmark's tenant cgroups, all under `<cgroup2 mount>/vmtrace-bench`, removed when dropped
//! (their processes first), and at the start in case an earlier run was killed.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use vmtrace_common::mounts::MountTable;

pub const ROOT: &str = "vmtrace-bench";

pub struct Cgroups {
    root: PathBuf,
    /// The cgroup v1 memory hierarchy (hybrid hosts), where `vmtrace-vmm --cgroup` also creates
    /// and joins the tenant's path.
    memory_v1: Option<PathBuf>,
}

impl Cgroups {
    pub fn new() -> Result<Self> {
        let table = MountTable::read().context("reading the mount table")?;
        let mount = table
            .cgroup2()
            .context("no cgroup v2 hierarchy is mounted")?;
        let cgroups = Self {
            root: mount.mount_point.join(ROOT),
            memory_v1: table.cgroup_v1("memory").map(|m| m.mount_point.clone()),
        };
        cgroups.remove_all();
        std::fs::create_dir_all(&cgroups.root)
            .with_context(|| format!("creating {}", cgroups.root.display()))?;
        Ok(cgroups)
    }

    /// Creates `vmtrace-bench/<rel>` and returns the path to give `vmtrace-vmm --cgroup` (relative
    /// to the cgroup2 mount).
    pub fn create(&self, rel: &str) -> Result<String> {
        let dir = self.root.join(rel);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(format!("{ROOT}/{rel}"))
    }

    /// Removes `vmtrace-bench/<rel>` and everything below it (and its cgroup v1 memory twin).
    pub fn remove(&self, rel: &str) {
        remove_tree(&self.root.join(rel));
        if let Some(memory) = &self.memory_v1 {
            remove_tree(&memory.join(ROOT).join(rel));
        }
    }

    fn remove_all(&self) {
        remove_tree(&self.root);
        if let Some(memory) = &self.memory_v1 {
            remove_tree(&memory.join(ROOT));
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// Kills what still runs in the tree (only the benchmark's own VMMs run there), then removes the
/// directories, deepest first.
fn remove_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in &dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .lines()
            .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is a process in the
            // benchmark's own cgroup, which only the benchmark's VMMs join.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for d in &dirs {
        // A killed process leaves its cgroup a moment after the signal.
        for _ in 0..50 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if dir.exists() {
        eprintln!(
            "bench: could not remove every cgroup under {}",
            dir.display()
        );
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}
