//! cgroup v2: finding the hierarchy, resolving `--cgroup`, joining a cgroup and naming the one
//! the process is in. A cgroup's id is its directory's inode number, which is what
//! `bpf_get_current_cgroup_id()` returns for tasks in it.
//!
//! On hybrid hosts (cgroup v2 without controllers, the controllers in cgroup v1 hierarchies) the
//! memory controller is a cgroup v1 hierarchy: there [`enter`] also joins the same path in it,
//! as systemd does, so that the VMM's memory is charged to the tenant in both.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use vmtrace_common::cgroup as proc_cgroup;
use vmtrace_common::mounts::{self, Mount, MountTable};

use crate::error::Error;
use crate::report::CgroupReport;

/// A cgroup2 mount found in `/proc/self/mountinfo`: its `mount_point` (e.g. `/sys/fs/cgroup` or
/// `/sys/fs/cgroup/unified`) and the cgroup it shows there (`root`, `/` unless bind-mounted or
/// namespaced).
pub type Cgroup2Mount = Mount;

/// A cgroup v1 hierarchy with the memory controller, found in `/proc/self/mountinfo` (hybrid
/// and legacy hosts), e.g. at `/sys/fs/cgroup/memory`.
pub type MemoryV1Mount = Mount;

fn read_proc(path: &str) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|e| Error::Cgroup {
        path: path.into(),
        msg: format!("cannot read: {e}"),
    })
}

fn mount_table() -> Result<MountTable, Error> {
    Ok(MountTable::parse(&read_proc(mounts::MOUNTINFO)?))
}

/// The cgroup2 mount of this process's mount namespace, if there is one.
pub fn find_mount() -> Result<Option<Cgroup2Mount>, Error> {
    Ok(mount_table()?.cgroup2().cloned())
}

/// The cgroup v1 memory hierarchy of this process's mount namespace, if one is mounted.
pub fn find_memory_v1_mount() -> Result<Option<MemoryV1Mount>, Error> {
    Ok(mount_table()?.cgroup_v1("memory").cloned())
}

/// The cgroup v2 path (`0::/path` line) in `proc_cgroup`, the text of `/proc/PID/cgroup`.
pub fn parse_proc_cgroup(proc_cgroup: &str) -> Option<PathBuf> {
    proc_cgroup::v2_path(proc_cgroup).map(PathBuf::from)
}

/// The path of the cgroup v1 hierarchy with `controller` (a `N:controller,...:/path` line) in
/// `proc_cgroup`, the text of `/proc/PID/cgroup`.
pub fn parse_proc_cgroup_v1(proc_cgroup: &str, controller: &str) -> Option<PathBuf> {
    proc_cgroup::v1_path(proc_cgroup, controller).map(PathBuf::from)
}

/// The id of cgroup directory `dir`: its inode number.
pub fn id_of(dir: &Path) -> Result<u64, Error> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|e| Error::Cgroup {
            path: dir.into(),
            msg: format!("cannot stat: {e}"),
        })
}

/// The cgroup v2 cgroup this process is in (with its cgroup v1 memory cgroup where that
/// hierarchy is mounted), or `None` if no cgroup2 hierarchy is mounted.
pub fn current() -> Result<Option<CgroupReport>, Error> {
    let Some(mount) = find_mount()? else {
        return Ok(None);
    };
    current_in(&mount)
}

fn current_in(mount: &Cgroup2Mount) -> Result<Option<CgroupReport>, Error> {
    let text = read_proc("/proc/self/cgroup")?;
    let Some(relative) = parse_proc_cgroup(&text) else {
        return Ok(None);
    };
    let dir = mount.dir_of(&relative);
    let memory_v1_path = match find_memory_v1_mount()? {
        Some(memory) => parse_proc_cgroup_v1(&text, "memory").map(|r| memory.dir_of(&r)),
        None => None,
    };
    Ok(Some(CgroupReport {
        id: id_of(&dir)?,
        path: dir,
        relative_path: relative,
        memory_v1_path,
    }))
}

/// The cgroup v1 memory cgroup directory this process is in.
fn current_memory_v1(mount: &MemoryV1Mount) -> Result<Option<PathBuf>, Error> {
    let text = read_proc("/proc/self/cgroup")?;
    Ok(parse_proc_cgroup_v1(&text, "memory").map(|r| mount.dir_of(&r)))
}

/// Moves this whole process into cgroup `requested` (`--cgroup`: see [`resolve`]), creating it
/// if absent, and where a cgroup v1 memory hierarchy is mounted also into the cgroup of the
/// same path there (created if absent), so that its memory is charged to the tenant in both
/// hierarchies. Call it before creating the VM, its memory and its threads: the cgroup v1
/// memory controller leaves pages charged before a move where they were.
pub fn enter(requested: &Path) -> Result<CgroupReport, Error> {
    let mount = find_mount()?.ok_or_else(|| Error::Cgroup {
        path: requested.into(),
        msg: "no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo); mount one or drop \
              --cgroup"
            .into(),
    })?;
    let dir = resolve(requested, &mount)?;
    let mut report = join(&dir, &mount)?;
    if let Some(memory) = find_memory_v1_mount()? {
        report.memory_v1_path = Some(join_memory_v1(&report.relative_path, &memory)?);
    }
    Ok(report)
}

/// Creates the cgroup v1 memory cgroup `relative` (a path inside the hierarchy, e.g. `/t/a`) if
/// absent and moves this whole process into it, then checks `/proc/self/cgroup` agrees.
/// Returns its directory.
pub fn join_memory_v1(relative: &Path, mount: &MemoryV1Mount) -> Result<PathBuf, Error> {
    let dir = mount.dir_of(relative);
    let fail = |msg: String| Error::Cgroup {
        path: dir.clone(),
        msg: format!("cannot join this cgroup v1 memory cgroup (the tenant's twin): {msg}"),
    };
    fs::create_dir_all(&dir).map_err(|e| {
        fail(format!(
            "cannot create it: {e} (run as root or choose a cgroup you may create)"
        ))
    })?;
    let procs = dir.join("cgroup.procs");
    let pid = std::process::id();
    fs::write(&procs, format!("{pid}\n")).map_err(|e| {
        fail(format!(
            "cannot write process {pid} to {}: {e}",
            procs.display()
        ))
    })?;
    match current_memory_v1(mount)? {
        Some(now) if now == dir => Ok(dir),
        other => Err(fail(format!(
            "after joining it /proc/self/cgroup names {} instead",
            other.map_or_else(
                || "no memory cgroup".to_string(),
                |p| p.display().to_string()
            )
        ))),
    }
}

/// The directory `--cgroup requested` names: an absolute directory inside `mount`, or a path
/// relative to its mount point.
pub fn resolve(requested: &Path, mount: &Cgroup2Mount) -> Result<PathBuf, Error> {
    let bad = |msg: String| Error::Cgroup {
        path: requested.into(),
        msg,
    };
    if requested
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(bad("use a path without '.' or '..' components".into()));
    }
    if requested.is_absolute() {
        if !requested.starts_with(&mount.mount_point) {
            return Err(bad(format!(
                "not inside the cgroup v2 hierarchy, which is mounted at {}; give a directory \
                 under it or a path relative to it (without the leading '/')",
                mount.mount_point.display()
            )));
        }
        Ok(requested.to_path_buf())
    } else {
        Ok(mount.mount_point.join(requested))
    }
}

/// Creates cgroup directory `dir` if absent and moves this whole process into it (by writing
/// its pid to `cgroup.procs`), then checks `/proc/self/cgroup` agrees. Call it before creating
/// threads that must be in the cgroup (moving the process moves existing threads too, but
/// doing it first leaves no window where they run elsewhere).
pub fn join(dir: &Path, mount: &Cgroup2Mount) -> Result<CgroupReport, Error> {
    let fail = |path: &Path, msg: String| Error::Cgroup {
        path: path.into(),
        msg,
    };
    fs::create_dir_all(dir).map_err(|e| {
        fail(
            dir,
            format!("cannot create it: {e} (run as root or choose a cgroup you may create)"),
        )
    })?;
    let procs = dir.join("cgroup.procs");
    if !procs.exists() {
        return Err(fail(
            dir,
            "it has no cgroup.procs, so it is not a cgroup v2 directory".into(),
        ));
    }
    let pid = std::process::id();
    fs::write(&procs, format!("{pid}\n")).map_err(|e| {
        let hint = match e.kind() {
            ErrorKind::PermissionDenied => {
                "run as root or as the owner of this cgroup and of its parent's cgroup.procs"
            }
            ErrorKind::ResourceBusy => {
                "it has controllers enabled for children (cgroup.subtree_control): use a leaf cgroup"
            }
            _ => "check that it is a live cgroup v2 directory you may write",
        };
        fail(
            &procs,
            format!("cannot move process {pid} into it: {e} ({hint})"),
        )
    })?;
    let want = id_of(dir)?;
    let now = current_in(mount)?;
    match now {
        Some(report) if report.id == want => Ok(report),
        other => Err(fail(
            dir,
            format!(
                "after joining it /proc/self/cgroup names {} instead",
                other.map_or_else(
                    || "no cgroup v2 cgroup".to_string(),
                    |r| r.path.display().to_string()
                )
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first cgroup v1 memory hierarchy of a mountinfo text, as [`find_memory_v1_mount`] finds it.
    fn memory_v1(mountinfo: &str) -> Option<MemoryV1Mount> {
        MountTable::parse(mountinfo).cgroup_v1("memory").cloned()
    }

    /// A hierarchy's root mounted at `mount_point`.
    fn mount(mount_point: &str) -> Mount {
        Mount {
            root: "/".into(),
            mount_point: mount_point.into(),
            fstype: "cgroup".into(),
            source: "cgroup".into(),
            super_options: "rw,memory".into(),
        }
    }

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
";

    #[test]
    fn finds_hybrid_mount() {
        let m = MountTable::parse(HYBRID).cgroup2().cloned().unwrap();
        assert_eq!(m.mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m.root, Path::new("/"));
        assert_eq!(
            m.dir_of(Path::new("/")),
            Path::new("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            m.dir_of(Path::new("/t/a")),
            Path::new("/sys/fs/cgroup/unified/t/a")
        );
        assert_eq!(
            m.relative_of(Path::new("/sys/fs/cgroup/unified/t/a")),
            Path::new("/t/a")
        );
    }

    #[test]
    fn finds_memory_v1_mount() {
        let m = memory_v1(HYBRID).unwrap();
        assert_eq!(m.mount_point, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(m.root, Path::new("/"));
        assert_eq!(
            m.dir_of(Path::new("/t/a")),
            Path::new("/sys/fs/cgroup/memory/t/a")
        );
        // Controllers mounted together, a bind mount of a sub-tree, escapes.
        let text = "\
40 31 0:40 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
41 31 0:41 /lxc/c1 /sys/fs/cgroup/mem\\040ory rw,relatime shared:12 - cgroup none rw,memory,memsw
";
        let m = memory_v1(text).unwrap();
        assert_eq!(m.mount_point, Path::new("/sys/fs/cgroup/mem ory"));
        assert_eq!(m.root, Path::new("/lxc/c1"));
        assert_eq!(
            m.dir_of(Path::new("/lxc/c1/t")),
            Path::new("/sys/fs/cgroup/mem ory/t")
        );
        // Not the memory controller: a named hierarchy, another controller, cgroup2 with
        // "memory" in its options, an option that only starts with memory.
        let none = "\
40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
42 31 0:39 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,memory_recursiveprot
43 31 0:40 / /sys/fs/cgroup/x rw - cgroup cgroup rw,memory_x
44 31 0:41 / /mnt/memory rw - tmpfs memory rw,memory
";
        assert!(memory_v1(none).is_none());
        assert!(memory_v1("").is_none());
        assert!(memory_v1("garbage - cgroup\n").is_none());
    }

    #[test]
    fn proc_cgroup_v1() {
        let text = "12:cpu,cpuacct:/a\n4:memory:/t/a\n1:name=systemd:/x\n0::/t/a\n";
        assert_eq!(
            parse_proc_cgroup_v1(text, "memory").unwrap(),
            Path::new("/t/a")
        );
        assert_eq!(parse_proc_cgroup_v1(text, "cpu").unwrap(), Path::new("/a"));
        assert!(parse_proc_cgroup_v1(text, "pids").is_none());
        assert!(parse_proc_cgroup_v1("0::/t/a\n", "memory").is_none());
        // Paths may contain ':'.
        assert_eq!(
            parse_proc_cgroup_v1("4:memory:/a:b\n", "memory").unwrap(),
            Path::new("/a:b")
        );
    }

    /// Failing to join the memory cgroup names its directory; a directory that is not a
    /// cgroup is caught by reading /proc/self/cgroup back (the process stays where it is).
    #[test]
    fn memory_v1_join_errors_name_the_directory() {
        let nowhere = mount("/proc/vmtrace-no-such-hierarchy");
        let err = join_memory_v1(Path::new("/t/a"), &nowhere)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cgroup /proc/vmtrace-no-such-hierarchy/t/a: cannot join this cgroup v1 memory cgroup")
                && err.contains("cannot create it"),
            "{err}"
        );
        let fake = std::env::temp_dir().join(format!("vmtrace-v1-{}", std::process::id()));
        let not_cgroup = mount(&fake.display().to_string());
        let err = join_memory_v1(Path::new("/t"), &not_cgroup);
        fs::remove_dir_all(&fake).unwrap();
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains(&format!("{}/t", fake.display()))
                && err.contains("after joining it /proc/self/cgroup names"),
            "{err}"
        );
    }

    #[test]
    fn unescapes_and_skips_v1() {
        let text = "40 1 0:40 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        let m = MountTable::parse(text).cgroup2().cloned().unwrap();
        assert_eq!(m.mount_point, Path::new("/mnt/my cg"));
        assert!(
            MountTable::parse("33 31 0:29 / /x rw - cgroup cgroup rw,memory\n")
                .cgroup2()
                .is_none()
        );
    }

    #[test]
    fn proc_cgroup() {
        let text = "12:memory:/user.slice\n1:name=systemd:/x\n0::/t/a\n";
        assert_eq!(parse_proc_cgroup(text).unwrap(), Path::new("/t/a"));
        assert!(parse_proc_cgroup("1:cpu:/\n").is_none());
    }

    #[test]
    fn resolves() {
        let m = mount("/sys/fs/cgroup");
        assert_eq!(
            resolve(Path::new("t/a"), &m).unwrap(),
            Path::new("/sys/fs/cgroup/t/a")
        );
        assert_eq!(
            resolve(Path::new("/sys/fs/cgroup/t"), &m).unwrap(),
            Path::new("/sys/fs/cgroup/t")
        );
        assert!(resolve(Path::new("/tmp/t"), &m).is_err());
        assert!(resolve(Path::new("t/../../etc"), &m).is_err());
    }
}
