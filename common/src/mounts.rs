//! The host's mount table: where cgroup v2, a cgroup v1 controller, tracefs and debugfs are mounted.
//!
//! It is read from `/proc/self/mountinfo` rather than `/proc/self/mounts` because only mountinfo
//! gives each mount's root (field 4), the directory of the filesystem it shows at its mount point:
//! a cgroup hierarchy bind-mounted from a sub-tree, or seen from a cgroup namespace, shows the
//! cgroup `/a/b` of `/proc/PID/cgroup` at `<mount point>/<b relative to root>`, which only the
//! root says. Both files escape space, tab, newline and backslash in paths the same way
//! (`\040`, `\011`, `\012`, `\134`), and [`unescape`] undoes it.

use std::{
    ffi::OsString,
    io,
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
    string::String,
    vec::Vec,
};

/// Where the mount table of this process's mount namespace is.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo: `id parent major:minor root mount_point options [optional...] - fstype
/// source super_options`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the filesystem shown at the mount point (`/` unless bind-mounted from a
    /// sub-tree or namespaced).
    pub root: PathBuf,
    /// Where it is mounted, e.g. `/sys/fs/cgroup/unified`.
    pub mount_point: PathBuf,
    /// The filesystem type, e.g. `cgroup2`, `cgroup`, `tracefs`.
    pub fstype: String,
    /// The mount source, e.g. `cgroup2`, `nodev`, `/dev/sda1`.
    pub source: String,
    /// The filesystem's own options; for cgroup v1 they include the controllers (`rw,memory`).
    pub super_options: String,
}

impl Mount {
    /// Parses one mountinfo line; `None` if it does not have the fields of one.
    pub fn parse(line: &str) -> Option<Self> {
        let (left, right) = line.split_once(" - ")?;
        let mut left = left.split_whitespace();
        let root = left.nth(3)?;
        let mount_point = left.next()?;
        let mut right = right.split_whitespace();
        let fstype = right.next()?;
        let source = right.next()?;
        // Some filesystems print no super options.
        let super_options = right.next().unwrap_or("");
        Some(Self {
            root: unescape(root).into(),
            mount_point: unescape(mount_point).into(),
            fstype: unescape_lossy(fstype),
            source: unescape_lossy(source),
            super_options: unescape_lossy(super_options),
        })
    }

    /// Whether this is a cgroup v1 hierarchy with `controller` (e.g. `memory`) among its options.
    pub fn is_cgroup_v1_with(&self, controller: &str) -> bool {
        self.fstype == "cgroup" && self.super_options.split(',').any(|o| o == controller)
    }

    /// The directory of the cgroup `relative` of this hierarchy (a path such as `/a/b`, as
    /// `/proc/PID/cgroup` shows it).
    pub fn dir_of(&self, relative: &Path) -> PathBuf {
        let inside = relative.strip_prefix(&self.root).unwrap_or(relative);
        let inside = inside.strip_prefix("/").unwrap_or(inside);
        if inside.as_os_str().is_empty() {
            self.mount_point.clone()
        } else {
            self.mount_point.join(inside)
        }
    }

    /// The path inside the hierarchy of the directory `dir` under the mount point (the inverse
    /// of [`Self::dir_of`]).
    pub fn relative_of(&self, dir: &Path) -> PathBuf {
        let inside = dir.strip_prefix(&self.mount_point).unwrap_or(dir);
        self.root.join(inside)
    }
}

/// Every mount of a mount table, in its order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountTable {
    pub mounts: Vec<Mount>,
}

impl MountTable {
    /// Parses the text of a mountinfo file, skipping lines that are not mounts.
    pub fn parse(mountinfo: &str) -> Self {
        Self {
            mounts: mountinfo.lines().filter_map(Mount::parse).collect(),
        }
    }

    /// Reads this process's mount table from [`MOUNTINFO`].
    pub fn read() -> io::Result<Self> {
        std::fs::read_to_string(MOUNTINFO).map(|text| Self::parse(&text))
    }

    /// The first mount of filesystem type `fstype`.
    pub fn first_of_type(&self, fstype: &str) -> Option<&Mount> {
        self.mounts.iter().find(|m| m.fstype == fstype)
    }

    /// The cgroup v2 hierarchy: `/sys/fs/cgroup` on pure v2 hosts, `/sys/fs/cgroup/unified` on
    /// hybrid ones.
    pub fn cgroup2(&self) -> Option<&Mount> {
        self.first_of_type("cgroup2")
    }

    /// Every cgroup v1 mount with `controller` (e.g. `memory`), in table order; a hierarchy may be
    /// mounted more than once, with different roots.
    pub fn cgroup_v1_mounts<'a>(
        &'a self,
        controller: &'a str,
    ) -> impl Iterator<Item = &'a Mount> + 'a {
        self.mounts
            .iter()
            .filter(move |m| m.is_cgroup_v1_with(controller))
    }

    /// The first cgroup v1 mount with `controller` (e.g. `/sys/fs/cgroup/memory` on hybrid hosts).
    pub fn cgroup_v1(&self, controller: &str) -> Option<&Mount> {
        self.mounts.iter().find(|m| m.is_cgroup_v1_with(controller))
    }

    /// The first tracefs mount.
    pub fn tracefs(&self) -> Option<&Mount> {
        self.first_of_type("tracefs")
    }

    /// The first debugfs mount (older kernels show tracefs in its `tracing` directory).
    pub fn debugfs(&self) -> Option<&Mount> {
        self.first_of_type("debugfs")
    }
}

/// Undoes the kernel's octal escapes of a mount table field (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash; any `\` followed by three octal digits). A backslash not followed
/// by three octal digits stays as it is. The result is bytes, as a path may be any bytes.
pub fn unescape(field: &str) -> OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
            && let Ok(value) =
                u8::try_from(digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0')))
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

fn unescape_lossy(field: &str) -> String {
    unescape(field).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's layout: v1 controllers under /sys/fs/cgroup/<controller>, v2 without
    /// controllers at /sys/fs/cgroup/unified, tracefs not mounted.
    const HYBRID: &str = "\
22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 28 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:29 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
34 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
35 31 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
36 31 0:32 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
";

    /// A current distribution: cgroup v2 only, with tracefs and debugfs.
    const PURE_V2: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
38 25 0:12 / /sys/kernel/tracing rw,nosuid,nodev,noexec,relatime shared:17 - tracefs tracefs rw
39 25 0:7 / /sys/kernel/debug rw,nosuid,nodev,noexec,relatime shared:18 - debugfs debugfs rw
";

    #[test]
    fn hybrid_layout() {
        let table = MountTable::parse(HYBRID);
        let v2 = table.cgroup2().unwrap();
        assert_eq!(v2.mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(v2.root, Path::new("/"));
        assert_eq!(v2.super_options, "rw,nsdelegate");
        let memory = table.cgroup_v1("memory").unwrap();
        assert_eq!(memory.mount_point, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(
            table.cgroup_v1("cpuacct").unwrap().mount_point,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        // A named hierarchy is no controller, and v2 is not v1.
        assert!(table.cgroup_v1("systemd").is_none());
        assert!(table.cgroup_v1("name=systemd").is_some());
        assert!(table.cgroup_v1("io").is_none());
        assert!(table.tracefs().is_none());
        assert!(table.debugfs().is_none());
        assert_eq!(table.mounts.len(), 9);
    }

    #[test]
    fn pure_v2_layout() {
        let table = MountTable::parse(PURE_V2);
        let v2 = table.cgroup2().unwrap();
        assert_eq!(v2.mount_point, Path::new("/sys/fs/cgroup"));
        assert_eq!(v2.dir_of(Path::new("/")), Path::new("/sys/fs/cgroup"));
        assert_eq!(
            v2.dir_of(Path::new("/t/a")),
            Path::new("/sys/fs/cgroup/t/a")
        );
        // "memory" appears only as a prefix of a v2 option: no v1 memory controller.
        assert!(table.cgroup_v1("memory").is_none());
        assert_eq!(
            table.tracefs().unwrap().mount_point,
            Path::new("/sys/kernel/tracing")
        );
        assert_eq!(
            table.debugfs().unwrap().mount_point,
            Path::new("/sys/kernel/debug")
        );
    }

    #[test]
    fn mount_points_with_escapes() {
        // The kernel's escapes of a space, a tab, a newline and a backslash.
        let text = "\
40 31 0:40 / /mnt/my\\040cgroup rw,relatime - cgroup2 none rw
41 31 0:41 / /mnt/tab\\011and\\012newline rw - tracefs nodev rw
42 31 0:42 /lxc/c\\134d /mnt/back\\134slash rw shared:12 - cgroup my\\040source rw,memory
";
        let table = MountTable::parse(text);
        assert_eq!(
            table.cgroup2().unwrap().mount_point,
            Path::new("/mnt/my cgroup")
        );
        assert_eq!(
            table.tracefs().unwrap().mount_point,
            Path::new("/mnt/tab\tand\nnewline")
        );
        let memory = table.cgroup_v1("memory").unwrap();
        assert_eq!(memory.mount_point, Path::new("/mnt/back\\slash"));
        assert_eq!(memory.root, Path::new("/lxc/c\\d"));
        assert_eq!(memory.source, "my source");
        assert_eq!(
            memory.dir_of(Path::new("/lxc/c\\d/t")),
            Path::new("/mnt/back\\slash/t")
        );
        assert_eq!(
            memory.relative_of(Path::new("/mnt/back\\slash/t")),
            Path::new("/lxc/c\\d/t")
        );
    }

    #[test]
    fn unescapes_only_three_octal_digits() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("\\134\\040"), "\\ ");
        // Not escapes: too few digits, not octal, out of a byte's range.
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\089"), "a\\089");
        assert_eq!(unescape("a\\777"), "a\\777");
        assert_eq!(unescape("\\"), "\\");
        // Bytes that are not UTF-8 survive in paths.
        assert_eq!(unescape("\\377").into_vec(), [0xff]);
    }

    #[test]
    fn several_mounts_of_a_hierarchy() {
        // A sub-tree bind-mounted first, then the hierarchy's root.
        let text = "\
50 31 0:31 /lxc/c1 /var/lib/lxc/c1/memory rw - cgroup cgroup rw,memory
51 31 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        let table = MountTable::parse(text);
        assert_eq!(
            table.cgroup_v1("memory").unwrap().root,
            Path::new("/lxc/c1")
        );
        let roots: Vec<_> = table
            .cgroup_v1_mounts("memory")
            .map(|m| m.root.clone())
            .collect();
        assert_eq!(roots, [PathBuf::from("/lxc/c1"), PathBuf::from("/")]);
    }

    #[test]
    fn bad_lines_are_skipped() {
        let text = "garbage\n\n1 2 3 - cgroup2\n33 31 0:29 / /x rw - cgroup cgroup rw,memory\n";
        let table = MountTable::parse(text);
        assert_eq!(table.mounts.len(), 1);
        assert!(table.cgroup2().is_none());
        assert!(MountTable::parse("").cgroup2().is_none());
        assert_eq!(
            Mount::parse("33 31 0:29 / /x rw - proc proc").map(|m| m.super_options),
            Some(String::new())
        );
    }
}
