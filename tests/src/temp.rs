//! Files and directories a test creates, removed when it ends, whether it passes or panics.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// A directory of the test's own under the system's temporary directory, removed with its
/// contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `vmtrace-test-<name>-<pid>` (emptied first, in case an earlier run was killed).
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("vmtrace-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A cgroup directory removed on drop, once its children and tasks are gone: the parent of a
/// test's tenant cgroups, declared before them so that it is dropped after them.
pub struct RmdirOnDrop(pub PathBuf);

impl Drop for RmdirOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// Copies the tree `from` to `to`, creating `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copying to {}: {e}", target.display()));
        }
    }
}
