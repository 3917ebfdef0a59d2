//! cgroup v2: where it is mounted and which path a cgroup id (its directory's inode number, what
//! `bpf_get_current_cgroup_id` returns) stands for.
//!
//! The index holds the paths of the cgroups the counters reference, not of every cgroup of the
//! host: a host that makes and removes cgroups all day would otherwise grow it without end. Paths
//! come from the kernel's cgroup events (kept a short while in case counts follow) and, for an id
//! no event named, from a walk of the hierarchy that keeps only the ids asked for. An id that a
//! walk started after its counts were read does not find is gone: its cgroup existed when it was
//! counted, and ids are never reused.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use vmtrace_common::mounts::MountTable;

/// Finds the cgroup v2 mount: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones.
pub fn find_v2_mount() -> Option<PathBuf> {
    let table = MountTable::read().ok()?;
    table.cgroup2().map(|mount| mount.mount_point.clone())
}

/// Two walks of the hierarchy are at least this far apart, however many new ids the counters
/// show: a walk reads every directory of the hierarchy. An id that neither an event nor the
/// index names waits for the next walk, at most this long.
pub const WALK_MIN_GAP: Duration = Duration::from_secs(1);
/// The hierarchy is walked at least this often while the counters reference cgroups, to find the
/// referenced cgroups that are gone although no rmdir event said so (the event ring overran).
pub const AUDIT_EVERY: Duration = Duration::from_secs(10);
/// How long a path the kernel reported (mkdir, attach, rmdir) is kept for an id the counters do
/// not reference yet: a cgroup is made, then a process moved in, then its first event counted.
pub const RECENT_TTL: Duration = Duration::from_secs(10);
/// At most this many such paths are kept (the oldest go first): about four ticks' worth of the
/// kernel's event ring at its fullest.
pub const RECENT_CAPACITY: usize = 4096;

/// Sizes of the index, for the agent's health report and its memory bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSizes {
    /// Paths of referenced cgroups.
    pub paths: usize,
    /// Paths from recent events, of cgroups not referenced (yet).
    pub recent: usize,
    /// Referenced ids waiting for the next walk to name them.
    pub waiting: usize,
}

/// A path the kernel reported for a cgroup the counters did not reference at the time.
#[derive(Debug)]
struct Recent {
    path: String,
    removed: bool,
    at: Instant,
}

/// Maps the cgroup ids the counters reference to paths relative to the cgroup v2 root
/// ("/kubepods/...").
///
/// A referenced cgroup's path is remembered after it is removed, so a tenant that has exited keeps
/// its name; it is forgotten once the counters no longer reference the id ([`Self::retain`]).
#[derive(Debug)]
pub struct CgroupIndex {
    root: PathBuf,
    paths: HashMap<u64, String>,
    /// Referenced cgroups seen removed (cgroup_rmdir).
    removed: HashSet<u64>,
    /// Paths from the kernel's events for ids not referenced, newest last in `recent_order`.
    recent: HashMap<u64, Recent>,
    recent_order: VecDeque<(u64, Instant)>,
    /// Referenced ids waiting for a walk.
    waiting: HashSet<u64>,
    last_walk: Option<Instant>,
}

impl CgroupIndex {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            paths: HashMap::new(),
            removed: HashSet::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            waiting: HashSet::new(),
            last_walk: None,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `id`, if it is referenced and known: call [`Self::refresh`] first.
    pub fn path(&self, id: u64) -> Option<&str> {
        self.paths.get(&id).map(String::as_str)
    }

    /// Makes the ids in `wanted` known: from recent events, else by one walk of the hierarchy,
    /// which names those it finds and marks the others removed (nameless). Without a walk (one
    /// ran less than [`WALK_MIN_GAP`] ago) the ids left are not known yet: they are returned, to
    /// be reported once the next walk has named them, so that no tenant is reported under a
    /// stand-in label first and its name later.
    pub fn refresh(&mut self, wanted: &BTreeSet<u64>, now: Instant) -> HashSet<u64> {
        let mut missing = HashSet::new();
        for &id in wanted {
            if self.paths.contains_key(&id) || self.nameless(id) {
                continue;
            }
            if let Some(recent) = self.recent.remove(&id) {
                if recent.removed {
                    self.removed.insert(id);
                }
                self.paths.insert(id, recent.path);
                continue;
            }
            missing.insert(id);
        }
        let since_walk = self.last_walk.map(|at| now.duration_since(at));
        let walk_allowed = since_walk.is_none_or(|gap| gap >= WALK_MIN_GAP);
        let audit_due = since_walk.is_none_or(|gap| gap >= AUDIT_EVERY) && !self.paths.is_empty();
        if !walk_allowed || (missing.is_empty() && !audit_due) {
            self.waiting.clone_from(&missing);
            return missing;
        }
        self.last_walk = Some(now);
        let walk = walk(&self.root, &missing);
        if let Some(present) = &walk.present {
            // Known, yet in no directory now: removed, and its rmdir event lost.
            for id in self.paths.keys() {
                if !present.contains(id) {
                    self.removed.insert(*id);
                }
            }
        }
        for (id, path) in walk.found {
            self.paths.insert(id, path);
            missing.remove(&id);
        }
        // Counted, yet in no directory now: removed before its path was learnt.
        self.removed.extend(missing);
        self.waiting.clear();
        HashSet::new()
    }

    /// Whether `id` is known to be gone without a path.
    fn nameless(&self, id: u64) -> bool {
        self.removed.contains(&id) && !self.paths.contains_key(&id)
    }

    /// The path of `id`: [`Self::refresh`] for that id alone, then [`Self::path`].
    #[cfg(test)]
    fn resolve(&mut self, id: u64) -> Option<&str> {
        self.refresh(&BTreeSet::from([id]), Instant::now());
        self.path(id)
    }

    /// Records a cgroup's path as the kernel reported it (cgroup_mkdir, cgroup_attach_task).
    pub fn insert(&mut self, id: u64, path: String) {
        self.note(id, path, false, Instant::now());
    }

    /// Records that a cgroup was removed; its path stays known while it is referenced.
    pub fn remove(&mut self, id: u64, path: String) {
        self.note(id, path, true, Instant::now());
    }

    /// An event of the kernel's: updates a referenced cgroup, or keeps the path a while for one
    /// that the counters may reference soon.
    fn note(&mut self, id: u64, path: String, removed: bool, now: Instant) {
        if let Some(known) = self.paths.get_mut(&id) {
            if removed {
                self.removed.insert(id);
            } else {
                *known = path;
            }
            return;
        }
        // A removal keeps the removed mark even if an attach of the same id is seen after it.
        let removed = removed || self.recent.get(&id).is_some_and(|r| r.removed);
        self.recent.insert(
            id,
            Recent {
                path,
                removed,
                at: now,
            },
        );
        self.recent_order.push_back((id, now));
        self.expire_recent(now);
    }

    /// Drops recent paths older than [`RECENT_TTL`], and the oldest beyond [`RECENT_CAPACITY`].
    fn expire_recent(&mut self, now: Instant) {
        while let Some(&(id, at)) = self.recent_order.front() {
            let stale = now.duration_since(at) >= RECENT_TTL;
            if !stale && self.recent.len() <= RECENT_CAPACITY {
                break;
            }
            self.recent_order.pop_front();
            // An id noted again later has a newer entry in the order: only that one removes it.
            if self.recent.get(&id).is_some_and(|r| r.at == at) {
                self.recent.remove(&id);
            }
        }
        // Entries of ids that became referenced left `recent` already; keep the queue in step.
        if self.recent_order.len() > 2 * RECENT_CAPACITY {
            let recent = &self.recent;
            self.recent_order
                .retain(|(id, at)| recent.get(id).is_some_and(|r| r.at == *at));
        }
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.contains(&id)
    }

    /// Forgets every referenced id not in `referenced` (their counters were deleted), and expires
    /// old recent paths.
    pub fn retain(&mut self, referenced: &BTreeSet<u64>, now: Instant) {
        self.paths.retain(|id, _| referenced.contains(id));
        self.removed.retain(|id| referenced.contains(id));
        self.waiting.retain(|id| referenced.contains(id));
        self.expire_recent(now);
    }

    /// Forgets a cgroup once its last counts were reported.
    pub fn forget(&mut self, id: u64) {
        self.paths.remove(&id);
        self.removed.remove(&id);
        self.waiting.remove(&id);
    }

    pub fn sizes(&self) -> IndexSizes {
        IndexSizes {
            paths: self.paths.len(),
            recent: self.recent.len(),
            waiting: self.waiting.len(),
        }
    }
}

/// What a walk of the hierarchy found.
struct Walk {
    /// The paths of the ids asked for that exist.
    found: Vec<(u64, String)>,
    /// Every id in the hierarchy, or `None` if a directory could not be read (other than for
    /// having been removed meanwhile): the walk then cannot tell what is gone.
    present: Option<HashSet<u64>>,
}

/// Walks the hierarchy below `root`: the paths of the ids in `wanted`, and every id there is.
/// Cgroups removed meanwhile are skipped.
fn walk(root: &Path, wanted: &HashSet<u64>) -> Walk {
    let mut found = Vec::new();
    let mut present = Some(HashSet::new());
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        if wanted.contains(&meta.ino()) {
            let relative = dir.strip_prefix(root).unwrap_or(Path::new(""));
            found.push((meta.ino(), format!("/{}", relative.display())));
        }
        if let Some(present) = &mut present {
            present.insert(meta.ino());
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    present = None;
                }
                continue;
            }
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    Walk { found, present }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmtrace-cgroups-{name}-{}", std::process::id()))
    }

    #[test]
    fn resolves_ids_of_directories_and_keeps_removed_ones() {
        let root = temp_root("resolve");
        let child = root.join("tenant-a/vm");
        fs::create_dir_all(&child).unwrap();
        let mut index = CgroupIndex::new(root.clone());
        let id = fs::metadata(&child).unwrap().ino();
        assert_eq!(index.resolve(id), Some("/tenant-a/vm"));
        let root_id = fs::metadata(&root).unwrap().ino();
        index.last_walk = None;
        assert_eq!(index.resolve(root_id), Some("/"));
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(index.resolve(id), Some("/tenant-a/vm"));
        assert_eq!(index.resolve(u64::MAX), None);
    }

    #[test]
    fn holds_only_referenced_ids() {
        let root = temp_root("referenced");
        for name in ["a", "b", "c/d"] {
            fs::create_dir_all(root.join(name)).unwrap();
        }
        let ino = |name: &str| fs::metadata(root.join(name)).unwrap().ino();
        let mut index = CgroupIndex::new(root.clone());
        let now = Instant::now();
        index.refresh(&BTreeSet::from([ino("a"), ino("c/d")]), now);
        assert_eq!(index.path(ino("c/d")), Some("/c/d"));
        assert_eq!(index.path(ino("b")), None, "not asked for");
        assert_eq!(index.sizes().paths, 2);
        index.retain(&BTreeSet::from([ino("a")]), now);
        assert_eq!(index.sizes().paths, 1);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ids_wait_for_the_next_walk_and_those_it_does_not_find_are_gone() {
        let root = temp_root("walks");
        fs::create_dir_all(&root).unwrap();
        let mut index = CgroupIndex::new(root.clone());
        let start = Instant::now();
        // Not in the hierarchy: gone, without a name.
        assert!(index.refresh(&BTreeSet::from([1]), start).is_empty());
        assert_eq!(index.path(1), None);
        assert!(index.is_removed(1));
        // A new cgroup is not walked for before the gap has passed: it waits, unreported.
        fs::create_dir_all(root.join("late")).unwrap();
        let late = fs::metadata(root.join("late")).unwrap().ino();
        let waiting = index.refresh(&BTreeSet::from([1, late]), start + WALK_MIN_GAP / 2);
        assert_eq!(waiting, HashSet::from([late]));
        assert_eq!(index.sizes().waiting, 1);
        let walked = index.last_walk;
        assert!(
            index
                .refresh(&BTreeSet::from([1, late]), start + WALK_MIN_GAP)
                .is_empty()
        );
        assert_ne!(index.last_walk, walked, "walked once the gap had passed");
        assert_eq!(index.path(late), Some("/late"));
        assert_eq!(index.sizes().waiting, 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_cgroup_gone_without_an_event_is_found_gone_by_the_next_audit() {
        let root = temp_root("audit");
        fs::create_dir_all(root.join("kept")).unwrap();
        fs::create_dir_all(root.join("gone")).unwrap();
        let ino = |name: &str| fs::metadata(root.join(name)).unwrap().ino();
        let (kept, gone) = (ino("kept"), ino("gone"));
        let mut index = CgroupIndex::new(root.clone());
        let start = Instant::now();
        let both = BTreeSet::from([kept, gone]);
        index.refresh(&both, start);
        fs::remove_dir(root.join("gone")).unwrap();
        index.refresh(&both, start + AUDIT_EVERY / 2);
        assert!(!index.is_removed(gone), "no walk before the audit is due");
        index.refresh(&both, start + AUDIT_EVERY);
        assert!(index.is_removed(gone));
        assert!(!index.is_removed(kept));
        assert_eq!(
            index.path(gone),
            Some("/gone"),
            "its name stays while referenced"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn event_paths_wait_a_while_for_counts_then_go() {
        let mut index = CgroupIndex::new(temp_root("events"));
        let start = Instant::now();
        index.note(7, "/brief".into(), false, start);
        index.note(7, "/brief".into(), true, start);
        index.note(8, "/other".into(), false, start);
        index.refresh(&BTreeSet::from([7]), start);
        assert_eq!(index.path(7), Some("/brief"));
        assert!(index.is_removed(7), "its removal is kept");
        assert_eq!(index.sizes().recent, 1);
        index.retain(&BTreeSet::from([7]), start + RECENT_TTL);
        assert_eq!(index.sizes().recent, 0, "an unreferenced path expires");
        for id in 0..(RECENT_CAPACITY as u64 + 100) {
            index.note(1000 + id, format!("/churn/{id}"), id % 2 == 0, start);
        }
        assert_eq!(index.sizes().recent, RECENT_CAPACITY, "bounded");
        assert!(index.recent_order.len() <= 2 * RECENT_CAPACITY + 1);
    }
}
