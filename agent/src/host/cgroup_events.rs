//! Whether tenants' cgroups have tasks, from `cgroup.events` files kept open. The agent asks every
//! tick for every tenant, exited ones included; opening the file by path is most of the cost of
//! asking (the path walk through kernfs, then close), while reading an open one again from offset 0
//! makes the kernel print it afresh. A removed cgroup's open file answers `ENODEV`: the cgroup is
//! then asked for by path, which fails as it did before.

use std::{collections::HashMap, fs::File, os::unix::fs::FileExt};

use super::cgroupfs::{CgroupFs, populated_in};

/// Open `cgroup.events` files by cgroup path, at most half the process's open-file limit (which
/// the agent raises to its hard value at start): beyond, cgroups are asked for by path.
pub struct CgroupEvents {
    open: HashMap<String, File>,
    most: usize,
}

impl Default for CgroupEvents {
    fn default() -> Self {
        let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
        Self {
            open: HashMap::new(),
            most: usize::try_from(limit / 2).unwrap_or(usize::MAX),
        }
    }
}

impl CgroupEvents {
    /// Whether the cgroup at `path` has tasks; `None` if unknown (removed, or no cgroup v2 file).
    pub fn populated(&mut self, cgroups: &CgroupFs, path: &str) -> Option<bool> {
        if let Some(file) = self.open.get(path) {
            match read(file) {
                Some(populated) => return Some(populated),
                None => {
                    self.open.remove(path);
                }
            }
        }
        if self.open.len() < self.most
            && let Ok(file) = File::open(cgroups.events_file(path))
        {
            let populated = read(&file);
            if populated.is_some() {
                self.open.insert(path.to_owned(), file);
            }
            return populated;
        }
        cgroups.populated(path)
    }

    /// Closes the files of cgroups no longer asked for.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.open.retain(|path, _| keep(path));
    }
}

/// `populated` as the open file says it now.
fn read(file: &File) -> Option<bool> {
    // "populated 0\nfrozen 0\n": a few dozen bytes.
    let mut buf = [0u8; 128];
    let len = file.read_at(&mut buf, 0).ok()?;
    populated_in(std::str::from_utf8(&buf[..len]).ok()?)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A real cgroup of the v2 hierarchy, made, entered, left and removed while its file stays
    /// open; `None` (said) where there is no writable cgroup v2 hierarchy.
    #[test]
    fn an_open_file_follows_its_cgroup_until_it_is_removed() {
        let Some(root) = writable_v2_root() else {
            return;
        };
        let name = format!("vmtrace-events-test-{}", std::process::id());
        let dir = root.join(&name);
        std::fs::create_dir(&dir).unwrap();
        let cgroups = CgroupFs::new(root.clone());
        let path = format!("/{name}");
        let mut events = CgroupEvents::default();
        assert_eq!(events.populated(&cgroups, &path), Some(false));
        assert_eq!(events.open.len(), 1, "the file is kept open");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        assert_eq!(events.populated(&cgroups, &path), Some(true));
        child.kill().unwrap();
        child.wait().unwrap();
        // The kernel updates `populated` once the task has left, asynchronously to wait().
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while events.populated(&cgroups, &path) != Some(false) {
            assert!(std::time::Instant::now() < deadline, "never empty again");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(events.populated(&cgroups, &path), None);
        assert!(events.open.is_empty(), "a removed cgroup's file is closed");
    }

    fn writable_v2_root() -> Option<PathBuf> {
        let root = vmtrace_common::mounts::MountTable::read()
            .ok()
            .and_then(|t| t.cgroup2().map(|m| m.mount_point.clone()))?;
        let probe = root.join(format!("vmtrace-events-probe-{}", std::process::id()));
        match std::fs::create_dir(&probe) {
            Ok(()) => {
                let _ = std::fs::remove_dir(&probe);
                Some(root)
            }
            Err(e) => {
                assert!(
                    std::env::var("VMTRACE_REQUIRE_CAPS").as_deref() != Ok("1"),
                    "cannot make a cgroup under {} ({e}) and VMTRACE_REQUIRE_CAPS=1 requires it",
                    root.display()
                );
                eprintln!(
                    "skipped: cannot make a cgroup under {} ({e})",
                    root.display()
                );
                None
            }
        }
    }
}
