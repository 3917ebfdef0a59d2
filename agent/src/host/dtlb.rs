//! Hardware dTLB misses of VMM threads, through perf events (one counter per thread and event),
//! where the host's PMU exposes them. Many virtual machines and some hosts have no hardware counters;
//! there the agent says so once, with the kernel's reason, instead of reporting zeros.

use std::collections::HashMap;

use perf_event::{
    Builder, Counter,
    events::{Cache, CacheOp, CacheResult, WhichCache},
};

use crate::{
    host::procfs::VmmThread,
    kind::{Kind, TlbEvent},
};

/// The counted events and the kinds they are reported under.
const EVENTS: [(CacheOp, Kind); 2] = [
    (CacheOp::READ, Kind::Tlb(TlbEvent::DtlbLoadMiss)),
    (CacheOp::WRITE, Kind::Tlb(TlbEvent::DtlbStoreMiss)),
];

fn dtlb_miss(operation: CacheOp) -> Cache {
    Cache {
        which: WhichCache::DTLB,
        operation,
        result: CacheResult::MISS,
    }
}

/// Whether this host can count dTLB misses of a thread: `Err` with the reason when it cannot.
pub fn availability() -> Result<(), String> {
    let opened = Builder::new()
        .kind(dtlb_miss(CacheOp::READ))
        .observe_self()
        .build();
    opened.map(drop).map_err(|e| {
        format!(
            "perf_event_open of a hardware dTLB-miss counter failed ({e}); this host \
             exposes no hardware performance counters"
        )
    })
}

/// One thread's counters, one per event of [`EVENTS`], with their last readings.
type ThreadCounters = Vec<(Counter, u64)>;

/// Open counters of VMM threads, read each sample.
#[derive(Default)]
pub struct DtlbCounters {
    /// Per live thread (tgid, tid): its process's cgroup, its counters and their last readings.
    threads: HashMap<(u32, u32), (u64, ThreadCounters)>,
    /// Misses of threads that ended, per cgroup and kind.
    ended: HashMap<(u64, Kind), u64>,
}

impl DtlbCounters {
    /// Opens counters on new threads of `threads`, reads all of them and returns the misses per
    /// cgroup and kind so far.
    pub fn update(&mut self, threads: &[VmmThread]) -> HashMap<(u64, Kind), u64> {
        let mut live = HashMap::new();
        for thread in threads {
            let key = (thread.tgid, thread.tid);
            let entry = match self.threads.remove(&key) {
                Some(entry) => entry,
                None => match open(thread.tid) {
                    Some(counters) => (thread.cgroup_id, counters),
                    None => continue,
                },
            };
            live.insert(key, entry);
        }
        // Threads not seen any more keep their last readings.
        for (cgroup_id, counters) in self.threads.values() {
            for ((_, last), (_, kind)) in counters.iter().zip(EVENTS) {
                *self.ended.entry((*cgroup_id, kind)).or_default() += last;
            }
        }
        self.threads = live;
        let mut misses = self.ended.clone();
        for (cgroup_id, counters) in self.threads.values_mut() {
            for ((counter, last), (_, kind)) in counters.iter_mut().zip(EVENTS) {
                if let Ok(value) = counter.read() {
                    *last = value;
                }
                *misses.entry((*cgroup_id, kind)).or_default() += *last;
            }
        }
        misses
    }
}

impl DtlbCounters {
    /// Drops the ended threads' misses of cgroups for which `keep` says no (no longer referenced
    /// by any tenant), so that what is kept is bounded by the live tenants.
    pub fn retain_cgroups(&mut self, keep: impl Fn(u64) -> bool) {
        self.ended.retain(|(cgroup_id, _), _| keep(*cgroup_id));
    }
}

/// Counters of thread `tid`, enabled; `None` if the thread is gone or the PMU refuses.
fn open(tid: u32) -> Option<ThreadCounters> {
    EVENTS
        .iter()
        .map(|&(operation, _)| {
            let mut counter = Builder::new()
                .kind(dtlb_miss(operation))
                .observe_pid(tid as i32)
                .build()
                .ok()?;
            counter.enable().ok()?;
            Some((counter, 0))
        })
        .collect()
}
