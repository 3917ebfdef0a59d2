//! Which tenant holds a device through VFIO, to attribute its IOMMU faults (they arrive in interrupt
//! context, so the kernel side knows only the device). A VMM holds a device by having its VFIO
//! group (`/dev/vfio/<group>`, the group from the device's `iommu_group` link) or its VFIO device
//! node (`/dev/vfio/devices/vfioN`, from the device's `vfio-dev` directory) open.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// The host's sysfs and procfs, or a copy of them for tests.
#[derive(Debug, Clone)]
pub struct Roots {
    pub sys: PathBuf,
    pub proc: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
        }
    }
}

impl Roots {
    /// The device nodes through which a process can hold `device` (e.g. `0000:65:00.0`).
    pub fn device_nodes(&self, device: &str) -> Vec<PathBuf> {
        let sys_device = self.sys.join("bus/pci/devices").join(device);
        let mut nodes = Vec::new();
        if let Ok(group) = fs::read_link(sys_device.join("iommu_group"))
            && let Some(name) = group.file_name()
        {
            nodes.push(Path::new("/dev/vfio").join(name));
        }
        if let Ok(entries) = fs::read_dir(sys_device.join("vfio-dev")) {
            for entry in entries.flatten() {
                nodes.push(Path::new("/dev/vfio/devices").join(entry.file_name()));
            }
        }
        nodes
    }

    /// Processes that have one of `nodes` open, lowest pid first.
    pub fn holders(&self, nodes: &[PathBuf]) -> Vec<u32> {
        let mut pids = Vec::new();
        if nodes.is_empty() {
            return pids;
        }
        let Ok(processes) = fs::read_dir(&self.proc) else {
            return pids;
        };
        for process in processes.flatten() {
            let Some(pid) = process.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(fds) = fs::read_dir(process.path().join("fd")) else {
                continue;
            };
            let holds = fds
                .flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok())
                .any(|target| nodes.contains(&target));
            if holds {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids
    }

    /// The cgroup v2 path of process `pid` (`/machine.slice/...`).
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        let text = fs::read_to_string(self.proc.join(pid.to_string()).join("cgroup")).ok()?;
        vmtrace_common::cgroup::v2_path(&text).map(str::to_owned)
    }

    /// The cgroup path of the first process that holds `device`, if any does.
    pub fn owner_cgroup(&self, device: &str) -> Option<String> {
        let pid = *self.holders(&self.device_nodes(device)).first()?;
        self.cgroup_of(pid)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn a_device_is_attributed_to_the_process_holding_its_group_or_node() {
        let dir = std::env::temp_dir().join(format!("vmtrace-vfio-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let roots = Roots {
            sys: dir.join("sys"),
            proc: dir.join("proc"),
        };
        let devices = roots.sys.join("bus/pci/devices");
        let legacy = devices.join("0000:65:00.0");
        let cdev = devices.join("0000:66:00.0");
        fs::create_dir_all(&legacy).unwrap();
        fs::create_dir_all(cdev.join("vfio-dev/vfio3")).unwrap();
        symlink(
            "../../../kernel/iommu_groups/42",
            legacy.join("iommu_group"),
        )
        .unwrap();
        for (pid, cgroup, target) in [
            (700, "/machine.slice/vm-a", "/dev/vfio/42"),
            (800, "/machine.slice/vm-b", "/dev/vfio/devices/vfio3"),
            (900, "/system.slice/other", "/dev/null"),
        ] {
            let fd = roots.proc.join(format!("{pid}/fd"));
            fs::create_dir_all(&fd).unwrap();
            symlink(target, fd.join("7")).unwrap();
            fs::write(
                roots.proc.join(format!("{pid}/cgroup")),
                format!("12:memory:{cgroup}\n0::{cgroup}\n"),
            )
            .unwrap();
        }
        assert_eq!(
            roots.device_nodes("0000:65:00.0"),
            vec![PathBuf::from("/dev/vfio/42")]
        );
        assert_eq!(
            roots.owner_cgroup("0000:65:00.0").as_deref(),
            Some("/machine.slice/vm-a")
        );
        assert_eq!(
            roots.owner_cgroup("0000:66:00.0").as_deref(),
            Some("/machine.slice/vm-b")
        );
        assert_eq!(roots.owner_cgroup("0000:67:00.0"), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
