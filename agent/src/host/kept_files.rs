//! Files read every tick for every tenant (its cgroups' files, its VMM threads' `stat`), kept open
//! between reads. Opening a file by path is much of the cost of reading it (the path walk through
//! kernfs or procfs, then close), while reading an open one again from offset 0 makes the kernel
//! print it afresh. A removed cgroup's open file answers `ENODEV`, an ended thread's `ESRCH`: it is
//! then opened by path again, which fails as it is gone (or finds the path's new owner).

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

/// Files kept open by every [`KeptFiles`] of the process together.
static KEPT: AtomicUsize = AtomicUsize::new(0);

/// Open files by path. All of them together take at most half the process's open-file limit (the
/// agent raises it to its hard value at start; the limit is read when a file is to be kept, so
/// raising it later counts): beyond, files are read by path. A file not read for a whole round is
/// closed.
#[derive(Debug, Default)]
pub struct KeptFiles {
    open: HashMap<PathBuf, Kept>,
    /// The current round; see [`KeptFiles::close_unread`].
    round: u64,
}

#[derive(Debug)]
struct Kept {
    file: File,
    /// The last round in which the file was read.
    read_in: u64,
}

impl KeptFiles {
    /// The text of the file at `path` now; `None` if it cannot be read (absent, removed).
    pub fn read(&mut self, path: &Path) -> Option<String> {
        if let Some(kept) = self.open.get_mut(path) {
            kept.read_in = self.round;
            match read_from_start(&kept.file) {
                Ok(text) => return Some(text),
                Err(_) => {
                    self.open.remove(path);
                }
            }
        }
        let file = File::open(path).ok()?;
        let text = read_from_start(&file).ok()?;
        if KEPT.load(Ordering::Relaxed) < most_kept() {
            KEPT.fetch_add(1, Ordering::Relaxed);
            let read_in = self.round;
            self.open.insert(path.to_owned(), Kept { file, read_in });
        }
        Some(text)
    }

    /// Closes the files not read since the last call, and starts a new round: called once per
    /// tick, it keeps open only the files of the cgroups still asked for.
    pub fn close_unread(&mut self) {
        let round = self.round;
        self.open.retain(|_, kept| kept.read_in == round);
        self.round += 1;
    }

    /// How many files are open.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.len()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        KEPT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Half the soft open-file limit: the other half is left to sockets, BPF maps and the rest.
fn most_kept() -> usize {
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(limit / 2).unwrap_or(usize::MAX)
}

/// The whole file from offset 0, in one `pread` for a file of up to 4 KiB (cgroup and `stat` files
/// are a few dozen bytes to a few KiB). A read shorter than asked is the end: a `seq_file` fills
/// the buffer while it has more to print (`seq_read_iter()`), and so does a regular file.
fn read_from_start(file: &File) -> io::Result<String> {
    let mut bytes = vec![0u8; 4096];
    let mut len = 0;
    loop {
        len += file.read_at(&mut bytes[len..], len as u64)?;
        if len < bytes.len() {
            break;
        }
        bytes.resize(bytes.len() * 2, 0);
    }
    bytes.truncate(len);
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real cgroup of the v2 hierarchy, made, entered, left and removed while its file stays
    /// open; `None` (said) where there is no writable cgroup v2 hierarchy.
    #[test]
    fn an_open_file_follows_its_cgroup_until_it_is_removed() {
        let Some(root) = writable_v2_root() else {
            return;
        };
        let name = format!("vmtrace-kept-test-{}", std::process::id());
        let dir = root.join(&name);
        std::fs::create_dir(&dir).unwrap();
        let events = dir.join("cgroup.events");
        let populated =
            |files: &mut KeptFiles| files.read(&events).map(|text| text.contains("populated 1"));
        let mut files = KeptFiles::default();
        assert_eq!(populated(&mut files), Some(false));
        assert_eq!(files.len(), 1, "the file is kept open");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        assert_eq!(populated(&mut files), Some(true));
        child.kill().unwrap();
        child.wait().unwrap();
        // The kernel updates `populated` once the task has left, asynchronously to wait().
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while populated(&mut files) != Some(false) {
            assert!(std::time::Instant::now() < deadline, "never empty again");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(populated(&mut files), None);
        assert_eq!(files.len(), 0, "a removed cgroup's file is closed");
    }

    #[test]
    fn files_not_read_for_a_round_are_closed() {
        let dir = std::env::temp_dir().join(format!("vmtrace-kept-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "a 1\n").unwrap();
        // Longer than one read: read whole.
        let long = "x".repeat(10_000);
        std::fs::write(&b, &long).unwrap();
        let mut files = KeptFiles::default();
        assert_eq!(files.read(&a).as_deref(), Some("a 1\n"));
        assert_eq!(files.read(&b), Some(long));
        files.close_unread();
        assert_eq!(files.len(), 2, "both were read in the round that ended");
        // Read again from the start: a file's new contents, through the open file.
        std::fs::write(&a, "a 2\n").unwrap();
        assert_eq!(files.read(&a).as_deref(), Some("a 2\n"));
        files.close_unread();
        assert_eq!(files.len(), 1, "b was not read in the last round");
        assert_eq!(files.read(&dir.join("absent")), None);
        assert_eq!(files.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn writable_v2_root() -> Option<PathBuf> {
        let root = vmtrace_common::mounts::MountTable::read()
            .ok()
            .and_then(|t| t.cgroup2().map(|m| m.mount_point.clone()))?;
        let probe = root.join(format!("vmtrace-kept-probe-{}", std::process::id()));
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
