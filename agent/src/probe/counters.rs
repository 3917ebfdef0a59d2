//! Reading the in-kernel counters: per-CPU values summed, keyed by cgroup and reported kind name.

use std::collections::BTreeMap;

use aya::{
    maps::{HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
    sys::SyscallError,
};
use serde::{Deserialize, Serialize};
use vmtrace_common::{
    ANY_QUEUE, DOORBELL_ADDRS_MAP, DOORBELLS_MAP, DROPS_MAP, Doorbell, DoorbellAddr, DoorbellKey,
    Drop, EXIT_COUNTS_MAP, EXIT_LATENCY_MAP, ExitKey, ExitKind, INFERRED_KICKS_MAP,
    IOMMU_FAULTS_MAP, IommuFaultKey, KICKS_MAP, KickKey, LatencyHistogram, LatencyKey, LatencyKind,
    MmioType, REMOVED_DOORBELLS_MAP, SPACE_PIO, THREAD_EXITS_MAP, THREAD_NAMES_MAP,
    VMM_PROCESSES_MAP,
};

use crate::{
    kind::Kind,
    probe::batch,
    probe::exit_counts::{KindCounts, aggregate},
    probe::exit_reasons::ExitReasonNames,
    probe::latency::merge,
    probe::map_access::{CountsError, absent_is_removed},
    probe::map_fill::{self, MapFill},
    probe::threads::{ThreadCounters, ThreadExits},
};

/// Latency histograms of one cgroup by kind, since the probes were attached.
pub type KindLatencies = BTreeMap<Kind, LatencyHistogram>;

/// Kicks of one doorbell queue of one VMM process, within one cgroup.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DoorbellKicks {
    /// The VMM's process id: the VM's owner.
    pub pid: u32,
    /// The VM's file descriptor in that process; 0 for a doorbell registered before the probes
    /// were attached, whose kicks are inferred from the kernel completing the writes.
    pub vm_fd: u32,
    /// "mmio" or "pio".
    pub space: String,
    /// Guest-physical address or port of the doorbell.
    pub addr: u64,
    /// The queue (the doorbell's datamatch); `None` for a doorbell without datamatch.
    pub queue: Option<u32>,
    pub kicks: u64,
}

/// IOMMU faults of one device with one set of flags.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IommuFaults {
    /// The device's name, e.g. `0000:65:00.0`.
    pub device: String,
    /// `IOMMU_FAULT_READ` (0) or `IOMMU_FAULT_WRITE` (1), as `iommu:io_page_fault` gives them.
    pub flags: u32,
    pub faults: u64,
}

/// Everything the probes have counted so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub by_cgroup: BTreeMap<u64, KindCounts>,
    pub latency_by_cgroup: BTreeMap<u64, KindLatencies>,
    pub kicks_by_cgroup: BTreeMap<u64, Vec<DoorbellKicks>>,
    /// Exits per VMM thread, by cgroup: only while `top` asks for them (else empty).
    pub threads_by_cgroup: BTreeMap<u64, Vec<ThreadExits>>,
    /// IOMMU faults by device (not by cgroup: they arrive in interrupt context).
    pub iommu_faults: Vec<IommuFaults>,
    /// Live VMM processes: tgid to the cgroup of their first KVM_RUN.
    pub vmm_processes: BTreeMap<u32, u64>,
    /// Events lost, by reason.
    pub drops: BTreeMap<&'static str, u64>,
    /// How full each hash map is, once this snapshot's removals are done.
    pub maps: Vec<MapFill>,
}

/// Read access to the counter maps.
pub struct Counters {
    exits: PerCpuHashMap<MapData, ExitKey, u64>,
    latency: PerCpuHashMap<MapData, LatencyKey, LatencyHistogram>,
    kicks: PerCpuHashMap<MapData, DoorbellKey, u64>,
    inferred_kicks: PerCpuHashMap<MapData, KickKey, u64>,
    doorbells: HashMap<MapData, DoorbellKey, Doorbell>,
    removed_doorbells: HashMap<MapData, DoorbellKey, Doorbell>,
    doorbell_addrs: HashMap<MapData, DoorbellAddr, u32>,
    /// Kicks of removed doorbells, collected from the kernel and deleted there.
    collected_kicks: BTreeMap<KickKey, u64>,
    /// Inferred kicks of exited VMMs, collected from the kernel and deleted there.
    collected_inferred: BTreeMap<KickKey, u64>,
    iommu_faults: PerCpuHashMap<MapData, IommuFaultKey, u64>,
    vmm_processes: HashMap<MapData, u32, u64>,
    threads: ThreadCounters,
    drops: PerCpuArray<MapData, u64>,
}

impl Counters {
    pub fn new(ebpf: &mut aya::Ebpf) -> Result<Self, CountsError> {
        Ok(Self {
            exits: take(ebpf, EXIT_COUNTS_MAP)?,
            latency: take(ebpf, EXIT_LATENCY_MAP)?,
            kicks: take(ebpf, KICKS_MAP)?,
            inferred_kicks: take(ebpf, INFERRED_KICKS_MAP)?,
            doorbells: take(ebpf, DOORBELLS_MAP)?,
            removed_doorbells: take(ebpf, REMOVED_DOORBELLS_MAP)?,
            doorbell_addrs: take(ebpf, DOORBELL_ADDRS_MAP)?,
            collected_kicks: BTreeMap::new(),
            collected_inferred: BTreeMap::new(),
            iommu_faults: take(ebpf, IOMMU_FAULTS_MAP)?,
            vmm_processes: take(ebpf, VMM_PROCESSES_MAP)?,
            threads: ThreadCounters::new(
                take(ebpf, THREAD_EXITS_MAP)?,
                take(ebpf, THREAD_NAMES_MAP)?,
            ),
            drops: take(ebpf, DROPS_MAP)?,
        })
    }

    pub fn read(&mut self, names: &ExitReasonNames) -> Result<Snapshot, CountsError> {
        let map_error = |name| move |e| CountsError::Map(name, e);
        let mut raw = batch::per_cpu_sums(&self.exits).map_err(map_error(EXIT_COUNTS_MAP))?;
        let exit_entries = raw.len();
        let mut live = BTreeMap::new();
        for entry in &self.doorbells {
            let (key, doorbell) = entry.map_err(map_error(DOORBELLS_MAP))?;
            live.insert(key, doorbell);
        }
        let inferred =
            batch::per_cpu_sums(&self.inferred_kicks).map_err(map_error(INFERRED_KICKS_MAP))?;
        // Read after the doorbells and the inferred kicks: the kernel side notes a VMM before it
        // stores its first doorbell or makes its first kick, and forgets it when it exits, so a
        // VMM noted live here owns every live doorbell and kick read above.
        let vmms = self.read_vmm_processes()?;
        let mut kicks = self.read_kicks(live, &vmms)?;
        // A kick is counted on its doorbell only, not also as the port or MMIO write it is.
        for (key, &count) in &kicks {
            let (kind, detail) = if key.space == SPACE_PIO {
                (ExitKind::Pio, 1)
            } else {
                (ExitKind::Mmio, MmioType::Write as u32)
            };
            let write = ExitKey {
                cgroup_id: key.cgroup_id,
                kind: kind as u32,
                detail,
                isa: 0,
                reserved: 0,
            };
            raw.push((write, count));
        }
        let inferred_entries = self.add_inferred_kicks(inferred, &vmms, &mut kicks, &mut raw)?;
        let mut snapshot = Snapshot {
            by_cgroup: aggregate(&raw, names),
            ..Snapshot::default()
        };
        let latency = batch::per_cpu_entries(&self.latency).map_err(map_error(EXIT_LATENCY_MAP))?;
        let latency_entries = latency.len();
        for (key, per_cpu) in latency {
            let Ok(latency_kind) = LatencyKind::try_from(key.kind) else {
                continue;
            };
            let kind = Kind::from_latency_key(latency_kind, key.isa, key.reason, names);
            let histogram = snapshot
                .latency_by_cgroup
                .entry(key.cgroup_id)
                .or_default()
                .entry(kind)
                .or_insert(LatencyHistogram::EMPTY);
            for cpu in &per_cpu {
                merge(histogram, cpu);
            }
        }
        for (key, kicks) in kicks {
            let queue = (key.queue != ANY_QUEUE).then_some(key.queue);
            let counts = snapshot.by_cgroup.entry(key.cgroup_id).or_default();
            *counts.entry(Kind::kick(key.queue)).or_default() += kicks;
            let doorbells = snapshot.kicks_by_cgroup.entry(key.cgroup_id).or_default();
            doorbells.push(DoorbellKicks {
                pid: key.tgid,
                vm_fd: key.vm_fd,
                space: if key.space == SPACE_PIO {
                    "pio"
                } else {
                    "mmio"
                }
                .to_owned(),
                addr: key.addr,
                queue,
                kicks,
            });
            doorbells.sort();
        }
        let iommu_faults =
            batch::per_cpu_sums(&self.iommu_faults).map_err(map_error(IOMMU_FAULTS_MAP))?;
        let iommu_entries = iommu_faults.len();
        for (key, faults) in iommu_faults {
            let length = key
                .device
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(key.device.len());
            snapshot.iommu_faults.push(IommuFaults {
                device: String::from_utf8_lossy(&key.device[..length]).into_owned(),
                flags: key.flags,
                faults,
            });
        }
        snapshot.iommu_faults.sort();
        let vmm_entries = vmms.len();
        snapshot.vmm_processes = vmms;
        snapshot.threads_by_cgroup = self.threads.read(names)?;
        for &reason in Drop::ALL {
            let per_cpu = self
                .drops
                .get(&(reason as u32), 0)
                .map_err(map_error(DROPS_MAP))?;
            snapshot.drops.insert(reason.name(), per_cpu.iter().sum());
        }
        snapshot.maps = self.fill(MapEntries {
            exits: exit_entries,
            latency: latency_entries,
            iommu_faults: iommu_entries,
            inferred_kicks: inferred_entries,
            vmm_processes: vmm_entries,
        });
        Ok(snapshot)
    }
}

/// How many entries the tick's batch reads found, by map.
struct MapEntries {
    exits: usize,
    latency: usize,
    iommu_faults: usize,
    inferred_kicks: usize,
    vmm_processes: usize,
}

impl Counters {
    /// The doorbells the probes know now.
    pub fn live_doorbells(&self) -> Result<Vec<(DoorbellKey, Doorbell)>, CountsError> {
        self.doorbells
            .iter()
            .map(|entry| entry.map_err(|e| CountsError::Map(DOORBELLS_MAP, e)))
            .collect()
    }

    /// Puts back doorbells learnt before a restart, as their registration would have made them
    /// (the doorbell, its address, its kick counter, and its VMM as a live one, which keeps the
    /// doorbell from being taken for one of an exited VMM). One the probes have learnt again
    /// meanwhile is left as it is. Returns how many were put back.
    pub fn restore_doorbells(
        &mut self,
        doorbells: &[(DoorbellKey, Doorbell)],
    ) -> Result<usize, CountsError> {
        const NOEXIST: u64 = 1;
        let mut restored = 0;
        for (key, doorbell) in doorbells {
            match self.doorbells.insert(key, doorbell, NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    continue;
                }
                Err(e) => return Err(CountsError::Map(DOORBELLS_MAP, e)),
            }
            let address = key.address();
            let count = self.doorbell_addrs.get(&address, 0).unwrap_or(0);
            self.doorbell_addrs
                .insert(address, count + 1, 0)
                .map_err(|e| CountsError::Map(DOORBELL_ADDRS_MAP, e))?;
            let cpus = aya::util::nr_cpus().map_or(1, |n| n);
            if let Ok(zeros) = aya::maps::PerCpuValues::try_from(vec![0u64; cpus]) {
                // NOEXIST: an entry left by the kernel meanwhile keeps its kicks.
                let _ = self.kicks.insert(key, zeros, NOEXIST);
            }
            let _ = self
                .vmm_processes
                .insert(key.tgid, doorbell.cgroup_id, NOEXIST);
            restored += 1;
        }
        Ok(restored)
    }

    /// How full each hash map is; the maps read whole this tick by the entries the read found.
    fn fill(&self, read: MapEntries) -> Vec<MapFill> {
        vec![
            map_fill::of(EXIT_COUNTS_MAP, self.exits.map(), read.exits),
            map_fill::of(EXIT_LATENCY_MAP, self.latency.map(), read.latency),
            map_fill::of_keys(DOORBELLS_MAP, self.doorbells.map(), self.doorbells.keys()),
            map_fill::of_keys(KICKS_MAP, self.kicks.map(), self.kicks.keys()),
            map_fill::of(
                INFERRED_KICKS_MAP,
                self.inferred_kicks.map(),
                read.inferred_kicks,
            ),
            map_fill::of_keys(
                DOORBELL_ADDRS_MAP,
                self.doorbell_addrs.map(),
                self.doorbell_addrs.keys(),
            ),
            map_fill::of_keys(
                REMOVED_DOORBELLS_MAP,
                self.removed_doorbells.map(),
                self.removed_doorbells.keys(),
            ),
            map_fill::of(
                VMM_PROCESSES_MAP,
                self.vmm_processes.map(),
                read.vmm_processes,
            ),
            map_fill::of(IOMMU_FAULTS_MAP, self.iommu_faults.map(), read.iommu_faults),
            self.threads.fill(),
        ]
    }

    /// Live VMM processes: tgid to cgroup id.
    fn read_vmm_processes(&self) -> Result<BTreeMap<u32, u64>, CountsError> {
        let entries = batch::entries(&self.vmm_processes)
            .map_err(|e| CountsError::Map(VMM_PROCESSES_MAP, e))?;
        Ok(entries.into_iter().collect())
    }

    /// Kicks per tenant, VM, doorbell and queue: those of live doorbells, and those of removed
    /// doorbells (deassigned, or of a VMM that has exited), which are collected here once and then
    /// deleted from the kernel's maps.
    /// `live`: the doorbells the probes know, read before `vmms`, the VMM processes.
    fn read_kicks(
        &mut self,
        mut live: BTreeMap<DoorbellKey, Doorbell>,
        vmms: &BTreeMap<u32, u64>,
    ) -> Result<BTreeMap<KickKey, u64>, CountsError> {
        let map_error = |name| move |e| CountsError::Map(name, e);
        // A VMM that exited without removing its doorbells: they go the same way.
        let exited: Vec<(DoorbellKey, Doorbell)> = live
            .iter()
            .filter(|(key, _)| !vmms.contains_key(&key.tgid))
            .map(|(key, doorbell)| (*key, *doorbell))
            .collect();
        for (key, doorbell) in exited {
            live.remove(&key);
            // A full removed-doorbell map leaves its kicks orphaned, as in the kernel (a counted
            // drop there); the doorbell goes regardless.
            let _ = self.removed_doorbells.insert(key, doorbell, 0);
            // The VMM may be deassigning the same doorbell at this moment.
            remove_if_present(&mut self.doorbells, &key, DOORBELLS_MAP)?;
            remove_if_present(&mut self.doorbell_addrs, &key.address(), DOORBELL_ADDRS_MAP)?;
        }
        let mut removed = BTreeMap::new();
        for entry in &self.removed_doorbells {
            let (key, doorbell) = entry.map_err(map_error(REMOVED_DOORBELLS_MAP))?;
            removed.insert(key, doorbell);
        }
        let mut kicks = self.collected_kicks.clone();
        let mut collected = Vec::new();
        let mut seen_kicks = std::collections::BTreeSet::new();
        for (key, total) in batch::per_cpu_sums(&self.kicks).map_err(map_error(KICKS_MAP))? {
            if let Some(doorbell) = live.get(&key) {
                *kicks.entry(kick_key(&key, doorbell)).or_default() += total;
            } else if let Some(doorbell) = removed.get(&key) {
                let kick = kick_key(&key, doorbell);
                *kicks.entry(kick).or_default() += total;
                collected.push((key, kick, total));
            } else if self.doorbells.get(&key, 0).is_ok() {
                // Registered after the doorbells were read above: live. Its entry is kept, so
                // its kicks so far are counted with the next sample.
            } else {
                // Removed while the removed-doorbell map was full (a counted drop): its owner is
                // unknown, so its entry only takes room.
                collected.push((key, kick_key(&key, &ORPHAN), 0));
            }
            seen_kicks.insert(key);
        }
        // Removed doorbells without a kick counter (its entry was never made, the map being
        // full) have nothing to collect: they would only take room.
        for key in removed.keys().filter(|k| !seen_kicks.contains(k)) {
            remove_if_present(&mut self.removed_doorbells, key, REMOVED_DOORBELLS_MAP)?;
        }
        for (key, kick, total) in collected {
            if total > 0 {
                *self.collected_kicks.entry(kick).or_default() += total;
            }
            remove_per_cpu_if_present(&mut self.kicks, &key, KICKS_MAP)?;
            if removed.contains_key(&key) {
                // The kernel deletes this entry itself when the VMM registers the doorbell again
                // (a guest's virtio reset makes it do so), which can happen since it was read.
                remove_if_present(&mut self.removed_doorbells, &key, REMOVED_DOORBELLS_MAP)?;
            }
        }
        // A doorbell that was never written has nothing to report.
        kicks.retain(|_, count| *count > 0);
        Ok(kicks)
    }

    /// Adds the kicks inferred for doorbells the probes did not see registered to `kicks`; those of
    /// exited VMMs are collected here once and deleted from the kernel's map. Each is an MMIO
    /// write too, which the probes counted as the kick alone: it is added to `raw`. An address
    /// written with more distinct values than a device has queues is not a doorbell (a coalesced
    /// MMIO zone, say): its writes stay in-kernel MMIO writes only. Returns the entries the map
    /// held.
    /// `entries`: the inferred kicks the kernel's map held, read before `vmms`.
    fn add_inferred_kicks(
        &mut self,
        entries: Vec<(KickKey, u64)>,
        vmms: &BTreeMap<u32, u64>,
        kicks: &mut BTreeMap<KickKey, u64>,
        raw: &mut Vec<(ExitKey, u64)>,
    ) -> Result<usize, CountsError> {
        let held = entries.len();
        let mut inferred = self.collected_inferred.clone();
        for (key, total) in entries {
            *inferred.entry(key).or_default() += total;
            if !vmms.contains_key(&key.tgid) {
                // A thread of the VMM may still make a kick after its main thread is gone: the
                // entry is then made again, and collected again.
                *self.collected_inferred.entry(key).or_default() += total;
                remove_per_cpu_if_present(&mut self.inferred_kicks, &key, INFERRED_KICKS_MAP)?;
            }
        }
        let mut values: BTreeMap<(u64, u32, u64), usize> = BTreeMap::new();
        for key in inferred.keys() {
            *values
                .entry((key.cgroup_id, key.tgid, key.addr))
                .or_default() += 1;
        }
        for (key, count) in inferred {
            let write = ExitKey {
                cgroup_id: key.cgroup_id,
                kind: ExitKind::Mmio as u32,
                detail: MmioType::Write as u32,
                isa: 0,
                reserved: 0,
            };
            raw.push((write, count));
            if values[&(key.cgroup_id, key.tgid, key.addr)] <= MAX_INFERRED_QUEUES {
                *kicks.entry(key).or_default() += count;
            }
        }
        Ok(held)
    }

    /// Deletes every counter of `cgroups` (removed tenants whose last counts were reported), so
    /// that the maps hold live tenants only.
    pub fn forget(&mut self, cgroups: &std::collections::HashSet<u64>) -> Result<(), CountsError> {
        let exits: Vec<ExitKey> = self
            .exits
            .keys()
            .filter_map(Result::ok)
            .filter(|k| cgroups.contains(&k.cgroup_id))
            .collect();
        for key in exits {
            remove_per_cpu_if_present(&mut self.exits, &key, EXIT_COUNTS_MAP)?;
        }
        let latency: Vec<LatencyKey> = self
            .latency
            .keys()
            .filter_map(Result::ok)
            .filter(|k| cgroups.contains(&k.cgroup_id))
            .collect();
        for key in latency {
            remove_per_cpu_if_present(&mut self.latency, &key, EXIT_LATENCY_MAP)?;
        }
        self.collected_kicks
            .retain(|key, _| !cgroups.contains(&key.cgroup_id));
        self.collected_inferred
            .retain(|key, _| !cgroups.contains(&key.cgroup_id));
        let inferred: Vec<KickKey> = self
            .inferred_kicks
            .keys()
            .filter_map(Result::ok)
            .filter(|k| cgroups.contains(&k.cgroup_id))
            .collect();
        for key in inferred {
            remove_per_cpu_if_present(&mut self.inferred_kicks, &key, INFERRED_KICKS_MAP)?;
        }
        let doorbells: Vec<DoorbellKey> = self
            .doorbells
            .iter()
            .chain(self.removed_doorbells.iter())
            .filter_map(Result::ok)
            .filter(|(_, d)| cgroups.contains(&d.cgroup_id))
            .map(|(k, _)| k)
            .collect();
        for key in doorbells {
            // Each key is in one of the two maps (the kernel may move it between them meanwhile);
            // its kicks were reported. Another doorbell of the same address may have taken its
            // address entry already.
            remove_if_present(&mut self.doorbells, &key, DOORBELLS_MAP)?;
            remove_if_present(&mut self.removed_doorbells, &key, REMOVED_DOORBELLS_MAP)?;
            remove_per_cpu_if_present(&mut self.kicks, &key, KICKS_MAP)?;
            remove_if_present(&mut self.doorbell_addrs, &key.address(), DOORBELL_ADDRS_MAP)?;
        }
        self.threads.forget(cgroups)
    }
}

/// Queues a doorbell address inferred from in-kernel writes may have: virtio devices have a few
/// (a multi-queue NIC two per vCPU and one more), far below this.
const MAX_INFERRED_QUEUES: usize = 256;

/// Deletes `key` from `map`; an entry that is not there (the kernel deleted it since it was read)
/// is already what was asked for.
fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), CountsError> {
    absent_is_removed(map.remove(key)).map_err(|e| CountsError::Map(name, e))
}

/// [`remove_if_present`] for a per-CPU map.
fn remove_per_cpu_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut PerCpuHashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), CountsError> {
    absent_is_removed(map.remove(key)).map_err(|e| CountsError::Map(name, e))
}

/// What an unknown doorbell is reported as.
const ORPHAN: Doorbell = Doorbell {
    queue: ANY_QUEUE,
    vm_fd: 0,
    eventfd: 0,
    reserved: 0,
    cgroup_id: 0,
};

/// The kick counter key of a doorbell.
fn kick_key(key: &DoorbellKey, doorbell: &Doorbell) -> KickKey {
    KickKey {
        cgroup_id: doorbell.cgroup_id,
        tgid: key.tgid,
        space: key.space,
        addr: key.addr,
        queue: doorbell.queue,
        vm_fd: doorbell.vm_fd,
    }
}

/// Takes a map out of the loaded object as the type the agent reads it with.
fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, CountsError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(CountsError::MissingMap(name))?;
    T::try_from(map).map_err(|e| CountsError::Map(name, e))
}
