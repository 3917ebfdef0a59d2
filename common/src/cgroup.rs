//! A process's cgroups, from the text of `/proc/PID/cgroup`: one `hierarchy-id:controllers:path`
//! line per hierarchy, `0::/path` for cgroup v2 and e.g. `4:memory:/path` for a v1 hierarchy.

/// The suffix the kernel appends to the path of a cgroup that was removed while the process is in it.
const DELETED: &str = " (deleted)";

/// One line of `/proc/PID/cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership<'a> {
    /// The hierarchy id: 0 for cgroup v2.
    pub hierarchy: u32,
    /// The v1 controllers of the hierarchy, comma-separated (`cpu,cpuacct`, `name=systemd`);
    /// empty for cgroup v2.
    pub controllers: &'a str,
    /// The cgroup's path inside the hierarchy (`/a/b`), which may itself contain `:`.
    pub path: &'a str,
}

impl<'a> Membership<'a> {
    /// Parses one line; `None` if it is not of the form `N:controllers:path`.
    pub fn parse(line: &'a str) -> Option<Self> {
        let mut parts = line.splitn(3, ':');
        let hierarchy = parts.next()?.parse().ok()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        Some(Self {
            hierarchy,
            controllers,
            path: path.strip_suffix(DELETED).unwrap_or(path),
        })
    }

    /// Whether this is the cgroup v2 line (`0::/path`).
    pub fn is_v2(&self) -> bool {
        self.hierarchy == 0 && self.controllers.is_empty()
    }

    /// Whether this v1 hierarchy has `controller` (e.g. `memory`).
    pub fn has_controller(&self, controller: &str) -> bool {
        self.controllers.split(',').any(|c| c == controller)
    }
}

/// Every line of `proc_cgroup` (the text of `/proc/PID/cgroup`) that parses.
pub fn memberships(proc_cgroup: &str) -> impl Iterator<Item = Membership<'_>> {
    proc_cgroup.lines().filter_map(Membership::parse)
}

/// The cgroup v2 path (of the `0::/path` line) in `proc_cgroup`.
pub fn v2_path(proc_cgroup: &str) -> Option<&str> {
    memberships(proc_cgroup).find_map(|m| m.is_v2().then_some(m.path))
}

/// The path in the cgroup v1 hierarchy with `controller` (a `N:controller,...:/path` line) in
/// `proc_cgroup`.
pub fn v1_path<'a>(proc_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    memberships(proc_cgroup)
        .find_map(|m| (!m.is_v2() && m.has_controller(controller)).then_some(m.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process of this machine's hybrid layout.
    const HYBRID: &str = "\
12:cpu,cpuacct:/a
4:memory:/t/a
1:name=systemd:/x
0::/t/a
";

    #[test]
    fn v2_line() {
        assert_eq!(v2_path(HYBRID), Some("/t/a"));
        assert_eq!(v2_path("0::/\n"), Some("/"));
        assert_eq!(v2_path("1:cpu:/\n"), None);
        assert_eq!(v2_path(""), None);
        assert_eq!(v2_path("0::/gone (deleted)\n"), Some("/gone"));
    }

    #[test]
    fn v1_lines() {
        assert_eq!(v1_path(HYBRID, "memory"), Some("/t/a"));
        assert_eq!(v1_path(HYBRID, "cpu"), Some("/a"));
        assert_eq!(v1_path(HYBRID, "cpuacct"), Some("/a"));
        assert_eq!(v1_path(HYBRID, "name=systemd"), Some("/x"));
        assert_eq!(v1_path(HYBRID, "pids"), None);
        assert_eq!(v1_path("0::/t/a\n", "memory"), None);
        // Paths may contain ':'.
        assert_eq!(v1_path("4:memory:/a:b\n", "memory"), Some("/a:b"));
        assert_eq!(v1_path("4:memory:/a (deleted)\n", "memory"), Some("/a"));
    }

    #[test]
    fn bad_lines_are_skipped() {
        assert_eq!(memberships("garbage\nx:memory:/a\n4:memory\n").count(), 0);
        let m = Membership::parse("7:pids:/p").unwrap();
        assert_eq!((m.hierarchy, m.controllers, m.path), (7, "pids", "/p"));
        assert!(!m.is_v2());
    }
}
