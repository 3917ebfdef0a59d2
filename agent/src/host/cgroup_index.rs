//! cgroup v2: where it is mounted and which path a cgroup id (its directory's inode number, what
//! `bpf_get_current_cgroup_id` returns) stands for.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use vmtrace_common::mounts::MountTable;

/// Finds the cgroup v2 mount: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones.
pub fn find_v2_mount() -> Option<PathBuf> {
    let table = MountTable::read().ok()?;
    table.cgroup2().map(|mount| mount.mount_point.clone())
}

/// Maps cgroup ids to paths relative to the cgroup v2 root ("/kubepods/...").
///
/// Paths are remembered after their cgroup is removed, so a tenant that has exited keeps its name.
#[derive(Debug)]
pub struct CgroupIndex {
    root: PathBuf,
    paths: HashMap<u64, String>,
    /// Cgroups seen removed (cgroup_rmdir).
    removed: HashSet<u64>,
}

impl CgroupIndex {
    pub fn new(root: PathBuf) -> Self {
        let mut index = Self {
            removed: HashSet::new(),
            root,
            paths: HashMap::new(),
        };
        index.rescan();
        index
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `id`, rescanning the hierarchy once if it is not known yet.
    pub fn resolve(&mut self, id: u64) -> Option<&str> {
        if !self.paths.contains_key(&id) {
            self.rescan();
        }
        self.paths.get(&id).map(String::as_str)
    }

    /// Records a cgroup's path as the kernel reported it (cgroup_mkdir, cgroup_attach_task).
    pub fn insert(&mut self, id: u64, path: String) {
        self.paths.insert(id, path);
    }

    /// Records that a cgroup was removed; its path stays known.
    pub fn remove(&mut self, id: u64, path: String) {
        self.paths.entry(id).or_insert(path);
        self.removed.insert(id);
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.contains(&id)
    }

    /// Forgets a removed cgroup once its last counts were reported.
    pub fn forget(&mut self, id: u64) {
        self.paths.remove(&id);
        self.removed.remove(&id);
    }

    /// Walks the hierarchy and records every cgroup's id. Cgroups removed meanwhile are skipped.
    pub fn rescan(&mut self) {
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let relative = dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
            self.paths
                .insert(meta.ino(), format!("/{}", relative.display()));
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_ids_of_directories_and_keeps_removed_ones() {
        let root = std::env::temp_dir().join(format!("vmtrace-cgroups-{}", std::process::id()));
        let child = root.join("tenant-a/vm");
        fs::create_dir_all(&child).unwrap();
        let mut index = CgroupIndex::new(root.clone());
        let id = fs::metadata(&child).unwrap().ino();
        assert_eq!(index.resolve(id), Some("/tenant-a/vm"));
        let root_id = fs::metadata(&root).unwrap().ino();
        assert_eq!(index.resolve(root_id), Some("/"));
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(index.resolve(id), Some("/tenant-a/vm"));
        assert_eq!(index.resolve(u64::MAX), None);
    }
}
