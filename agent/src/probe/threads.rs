//! Exits per VMM thread (each vCPU is one), for `vmtrace top`'s per-vCPU view, as `perf kvm stat`
//! gives them per vCPU. The probes count them only while `top` asks (a global set at load), in a map
//! of bounded size; the agent keeps it to live threads: an ended thread's entries are taken out of
//! the kernel and its last counts are shown for [`ENDED_KEPT`] more, marked ended. A thread's name
//! is /proc's while it lives, else the one the probes noted at its first exit.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, IterableMap, MapData, PerCpuHashMap};
use serde::{Deserialize, Serialize};
use vmtrace_common::{ExitKey, THREAD_EXITS_MAP, THREAD_NAMES_MAP, ThreadExitKey};

use super::{
    batch,
    exit_counts::{KindCounts, aggregate},
    exit_reasons::ExitReasonNames,
    map_access::{CountsError, absent_is_removed},
    map_fill::{self, MapFill},
};

/// How long an ended thread's last counts stay in the view.
pub const ENDED_KEPT: Duration = Duration::from_mins(1);
/// At most this many ended threads are kept (the oldest go first): a host whose VMMs churn
/// through threads cannot swell the agent.
const MAX_ENDED: usize = 4096;

/// One VMM thread's exit events by kind, since the probes were attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadExits {
    pub tid: u32,
    /// The thread's name (`comm`), e.g. `vcpu0`; absent if neither /proc nor the probes had it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The thread has ended; these are its last counts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ended: bool,
    pub counts: KindCounts,
}

/// An ended thread's last counts, until [`ENDED_KEPT`] has passed.
struct Ended {
    cgroup_id: u64,
    exits: ThreadExits,
    at: Instant,
}

/// Read access to the per-thread map, and the ended threads' last counts.
pub struct ThreadCounters {
    map: PerCpuHashMap<MapData, ThreadExitKey, u64>,
    /// The names the probes noted, by thread id.
    names: HashMap<MapData, u32, [u8; 16]>,
    ended: Vec<Ended>,
    /// Whether /proc shows the host's threads; if not, none is taken for ended.
    host_proc: bool,
    /// Entries of `map` at its last read.
    entries: usize,
}

impl ThreadCounters {
    pub fn new(
        map: PerCpuHashMap<MapData, ThreadExitKey, u64>,
        names: HashMap<MapData, u32, [u8; 16]>,
    ) -> Self {
        Self {
            map,
            names,
            entries: 0,
            ended: Vec::new(),
            host_proc: crate::host::figures::foreign_pid_namespace().is_none(),
        }
    }

    /// Every thread's exits by cgroup, live ones first by thread id, then ended ones.
    pub fn read(
        &mut self,
        names: &ExitReasonNames,
    ) -> Result<BTreeMap<u64, Vec<ThreadExits>>, CountsError> {
        let mut raw: BTreeMap<(u64, u32), Vec<(ExitKey, u64)>> = BTreeMap::new();
        let mut keys: BTreeMap<(u64, u32), Vec<ThreadExitKey>> = BTreeMap::new();
        let entries =
            batch::per_cpu_sums(&self.map).map_err(|e| CountsError::Map(THREAD_EXITS_MAP, e))?;
        self.entries = entries.len();
        for (key, total) in entries {
            // The per-cgroup logic turns raw events into kinds (in-kernel MMIO writes are the
            // writes that did not exit): here the "cgroup" is the thread.
            let exit = ExitKey {
                cgroup_id: u64::from(key.tid),
                kind: key.kind,
                detail: key.detail,
                isa: key.isa,
                reserved: 0,
            };
            raw.entry((key.cgroup_id, key.tid))
                .or_default()
                .push((exit, total));
            keys.entry((key.cgroup_id, key.tid)).or_default().push(key);
        }
        let now = Instant::now();
        let mut by_cgroup: BTreeMap<u64, Vec<ThreadExits>> = BTreeMap::new();
        for ((cgroup_id, tid), events) in raw {
            let counts = aggregate(&events, names)
                .remove(&u64::from(tid))
                .unwrap_or_default();
            let live_name = self.live_name(tid);
            let ended = self.host_proc && live_name.is_none();
            let exits = ThreadExits {
                tid,
                name: live_name.or_else(|| self.noted_name(tid)),
                ended: false,
                counts,
            };
            if ended {
                // Its counts are final. Its entries leave the kernel's maps.
                for key in keys.remove(&(cgroup_id, tid)).unwrap_or_default() {
                    absent_is_removed(self.map.remove(&key))
                        .map_err(|e| CountsError::Map(THREAD_EXITS_MAP, e))?;
                }
                absent_is_removed(self.names.remove(&tid))
                    .map_err(|e| CountsError::Map(THREAD_NAMES_MAP, e))?;
                self.ended.push(Ended {
                    cgroup_id,
                    exits: ThreadExits {
                        ended: true,
                        ..exits
                    },
                    at: now,
                });
                continue;
            }
            by_cgroup.entry(cgroup_id).or_default().push(exits);
        }
        self.ended.retain(|e| now.duration_since(e.at) < ENDED_KEPT);
        let excess = self.ended.len().saturating_sub(MAX_ENDED);
        self.ended.drain(..excess);
        for ended in &self.ended {
            by_cgroup
                .entry(ended.cgroup_id)
                .or_default()
                .push(ended.exits.clone());
        }
        Ok(by_cgroup)
    }

    /// Deletes every thread counter of `cgroups` (removed tenants).
    pub fn forget(&mut self, cgroups: &std::collections::HashSet<u64>) -> Result<(), CountsError> {
        let keys: Vec<ThreadExitKey> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| cgroups.contains(&k.cgroup_id))
            .collect();
        for key in keys {
            absent_is_removed(self.map.remove(&key))
                .map_err(|e| CountsError::Map(THREAD_EXITS_MAP, e))?;
            absent_is_removed(self.names.remove(&key.tid))
                .map_err(|e| CountsError::Map(THREAD_NAMES_MAP, e))?;
        }
        self.ended.retain(|e| !cgroups.contains(&e.cgroup_id));
        Ok(())
    }

    pub fn fill(&self) -> MapFill {
        map_fill::of(THREAD_EXITS_MAP, self.map.map(), self.entries)
    }

    /// The name the probes noted for the thread, up to its first NUL.
    fn noted_name(&self, tid: u32) -> Option<String> {
        let comm = self.names.get(&tid, 0).ok()?;
        let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        Some(String::from_utf8_lossy(&comm[..len]).into_owned())
    }

    /// The thread's name in /proc, `None` if it has ended (or /proc does not show the host's threads).
    fn live_name(&self, tid: u32) -> Option<String> {
        if !self.host_proc {
            return None;
        }
        std::fs::read_to_string(format!("/proc/{tid}/comm"))
            .ok()
            .map(|name| name.trim_end().to_owned())
    }
}
