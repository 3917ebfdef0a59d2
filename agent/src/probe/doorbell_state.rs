//! The doorbells the probes have learnt, kept in a file so that a restarted agent goes on counting
//! the kicks of VMs that were already running.
//!
//! Doorbells are learnt only from the `KVM_IOEVENTFD` calls the probes see, and the kernel offers no
//! way to list a VM's ioeventfds, so an agent that starts under running VMs (every restart, every
//! rollout) would count none of their kicks until their VMMs register again. The agent therefore
//! writes the live doorbells to `<state dir>/doorbells.json` whenever they change (at most once a
//! sample), and at start puts back those whose VMM process is still the same one: same pid, same
//! start time, same boot. What the state cannot hold: registrations made while no agent ran, and
//! removals then (a removed doorbell put back only counts writes that exit to the VMM anyway).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmtrace_common::{Doorbell, DoorbellKey};

/// The file in the state directory.
pub const FILE: &str = "doorbells.json";

/// Version of the file's layout; a file of another version is ignored.
const VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Saved {
    version: u32,
    /// `/proc/sys/kernel/random/boot_id`: state from another boot is of VMs long gone.
    boot_id: String,
    doorbells: Vec<SavedDoorbell>,
}

/// One doorbell and the process that registered it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct SavedDoorbell {
    tgid: u32,
    /// The process's start time (`/proc/<tgid>/stat` field 22, in clock ticks since boot): with
    /// the pid, it names one process for the life of the system.
    start_time: u64,
    space: u32,
    addr: u64,
    datamatch: u64,
    wildcard: u32,
    len: u32,
    queue: u32,
    vm_fd: u32,
    eventfd: u32,
    cgroup_id: u64,
}

impl SavedDoorbell {
    fn new(key: &DoorbellKey, doorbell: &Doorbell, start_time: u64) -> Self {
        Self {
            tgid: key.tgid,
            start_time,
            space: key.space,
            addr: key.addr,
            datamatch: key.datamatch,
            wildcard: key.wildcard,
            len: key.len,
            queue: doorbell.queue,
            vm_fd: doorbell.vm_fd,
            eventfd: doorbell.eventfd,
            cgroup_id: doorbell.cgroup_id,
        }
    }

    fn key(&self) -> DoorbellKey {
        DoorbellKey {
            tgid: self.tgid,
            space: self.space,
            addr: self.addr,
            datamatch: self.datamatch,
            wildcard: self.wildcard,
            len: self.len,
        }
    }

    fn doorbell(&self) -> Doorbell {
        Doorbell {
            queue: self.queue,
            vm_fd: self.vm_fd,
            eventfd: self.eventfd,
            reserved: 0,
            cgroup_id: self.cgroup_id,
        }
    }
}

/// Where the doorbells are kept, and what was written last.
#[derive(Debug)]
pub struct DoorbellState {
    path: PathBuf,
    /// The doorbells as last written, to write only on change.
    written: Option<Vec<SavedDoorbell>>,
    proc: PathBuf,
}

impl DoorbellState {
    /// Doorbells kept in `dir` (created if absent), for processes read from `/proc`.
    pub fn new(dir: &Path) -> Self {
        Self::with_proc(dir, Path::new("/proc"))
    }

    fn with_proc(dir: &Path, proc: &Path) -> Self {
        Self {
            path: dir.join(FILE),
            written: None,
            proc: proc.to_path_buf(),
        }
    }

    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.path
    }

    /// The saved doorbells whose process is still the one that registered them. A missing,
    /// unreadable or foreign file gives none (a fresh start), and says why when it is not simply
    /// absent.
    pub fn load(&self) -> (Vec<(DoorbellKey, Doorbell)>, Option<String>) {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Vec::new(), None),
            Err(e) => {
                return (
                    Vec::new(),
                    Some(format!("cannot read {}: {e}", self.path.display())),
                );
            }
        };
        let saved: Saved = match serde_json::from_str(&text) {
            Ok(saved) => saved,
            Err(e) => {
                return (
                    Vec::new(),
                    Some(format!(
                        "{} is not a doorbell state: {e}",
                        self.path.display()
                    )),
                );
            }
        };
        if saved.version != VERSION
            || Some(saved.boot_id.as_str()) != boot_id(&self.proc).as_deref()
        {
            return (Vec::new(), None);
        }
        let doorbells = saved
            .doorbells
            .iter()
            .filter(|d| start_time(&self.proc, d.tgid) == Some(d.start_time))
            .map(|d| (d.key(), d.doorbell()))
            .collect();
        (doorbells, None)
    }

    /// Writes `live` if it differs from what was written last. Doorbells of processes that are
    /// gone already are left out.
    pub fn save(&mut self, live: &[(DoorbellKey, Doorbell)]) -> Result<(), StateError> {
        // One /proc read per VMM, however many doorbells it has.
        let mut start_times = std::collections::HashMap::new();
        let mut doorbells: Vec<SavedDoorbell> = live
            .iter()
            .filter_map(|(key, doorbell)| {
                let start = *start_times
                    .entry(key.tgid)
                    .or_insert_with(|| start_time(&self.proc, key.tgid));
                Some(SavedDoorbell::new(key, doorbell, start?))
            })
            .collect();
        doorbells.sort();
        if self.written.as_ref() == Some(&doorbells) {
            return Ok(());
        }
        let saved = Saved {
            version: VERSION,
            boot_id: boot_id(&self.proc).unwrap_or_default(),
            doorbells,
        };
        write_atomically(&self.path, &serde_json::to_vec(&saved).unwrap_or_default()).map_err(
            |source| StateError::Write {
                path: self.path.clone(),
                source,
            },
        )?;
        self.written = Some(saved.doorbells);
        Ok(())
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`: a reader (or an
/// agent killed meanwhile) sees the old file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension(format!("json.{}", std::process::id()));
    let mut file = fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temporary, path)
}

fn boot_id(proc: &Path) -> Option<String> {
    fs::read_to_string(proc.join("sys/kernel/random/boot_id"))
        .ok()
        .map(|id| id.trim().to_owned())
}

/// Field 22 of `/proc/<tgid>/stat`, after the command name (which may hold spaces and parentheses,
/// so the fields are counted from its closing parenthesis).
fn start_time(proc: &Path, tgid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc.join(tgid.to_string()).join("stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow the name; the start time is field 22.
    after_name.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("vmtrace-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn key(tgid: u32, queue: u64) -> DoorbellKey {
        DoorbellKey {
            tgid,
            space: 0,
            addr: 0xd0050,
            datamatch: queue,
            wildcard: 0,
            len: 4,
        }
    }

    fn doorbell(queue: u32) -> Doorbell {
        Doorbell {
            queue,
            vm_fd: 4,
            eventfd: 7 + queue,
            reserved: 0,
            cgroup_id: 42,
        }
    }

    /// A /proc with a boot id and processes of given start times.
    fn proc(dir: &Path, boot: &str, processes: &[(u32, u64)]) {
        fs::create_dir_all(dir.join("sys/kernel/random")).unwrap();
        fs::write(dir.join("sys/kernel/random/boot_id"), format!("{boot}\n")).unwrap();
        for (tgid, start) in processes {
            fs::create_dir_all(dir.join(tgid.to_string())).unwrap();
            // A name with a space and a parenthesis, as a VMM's thread may have.
            let fields: Vec<String> = (3..=21).map(|i| i.to_string()).collect();
            fs::write(
                dir.join(format!("{tgid}/stat")),
                format!("{tgid} (qemu (vm) x) {} {start} 23 24\n", fields.join(" ")),
            )
            .unwrap();
        }
    }

    #[test]
    fn doorbells_come_back_only_for_the_same_processes_of_the_same_boot() {
        let dir = TempDir::new("doorbell-state");
        let proc_dir = dir.path().join("proc");
        proc(&proc_dir, "boot-1", &[(100, 5000), (200, 6000)]);
        let state_dir = dir.path().join("state");
        let mut state = DoorbellState::with_proc(&state_dir, &proc_dir);
        assert_eq!(
            state.load(),
            (Vec::new(), None),
            "no file yet: a fresh start"
        );
        let live = vec![
            (key(100, 0), doorbell(0)),
            (key(100, 1), doorbell(1)),
            (key(200, 0), doorbell(0)),
            // Gone before it could be saved.
            (key(300, 0), doorbell(0)),
        ];
        state.save(&live).unwrap();
        let (mut loaded, why) = DoorbellState::with_proc(&state_dir, &proc_dir).load();
        loaded.sort_by_key(|(k, _)| *k);
        assert_eq!(why, None);
        assert_eq!(loaded, live[..3].to_vec());

        // Process 200 is another one now (same pid, later start); 100 is as it was.
        proc(&proc_dir, "boot-1", &[(100, 5000), (200, 9999)]);
        let (loaded, _) = DoorbellState::with_proc(&state_dir, &proc_dir).load();
        assert_eq!(loaded.len(), 2);
        assert!(loaded.iter().all(|(k, _)| k.tgid == 100));

        // After a reboot nothing comes back.
        proc(&proc_dir, "boot-2", &[(100, 5000)]);
        assert_eq!(
            DoorbellState::with_proc(&state_dir, &proc_dir).load().0,
            Vec::new()
        );
    }

    #[test]
    fn an_unchanged_set_is_not_written_again_and_a_bad_file_is_said() {
        let dir = TempDir::new("doorbell-state-write");
        let proc_dir = dir.path().join("proc");
        proc(&proc_dir, "b", &[(100, 1)]);
        let mut state = DoorbellState::with_proc(dir.path(), &proc_dir);
        let live = vec![(key(100, 0), doorbell(0))];
        state.save(&live).unwrap();
        fs::remove_file(state.path()).unwrap();
        state.save(&live).unwrap();
        assert!(!state.path().exists(), "the same set is not written twice");
        state.save(&[]).unwrap();
        assert!(state.path().exists());
        fs::write(state.path(), "{not json").unwrap();
        let (loaded, why) = state.load();
        assert!(loaded.is_empty());
        assert!(why.unwrap().contains("is not a doorbell state"));
    }
}
