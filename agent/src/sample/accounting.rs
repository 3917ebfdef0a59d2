//! Adds to each tenant what the kernel accounts per cgroup: CPU time by mode, from which the
//! virtualisation tax, and memory usage and events; and, where the host has hardware counters, the
//! dTLB misses of its VMM threads.
//!
//! The virtualisation tax is the host CPU a tenant uses outside guest mode: its cgroup's system time
//! (KVM's exit handling and instruction emulation, the VMM's system calls) plus its user time that
//! was not guest time (the VMM serving exits in user space). Guest time is accounted as user time
//! by the kernel, per thread. These are the cgroup's totals since it was created, in ns.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::{
    host::cgroupfs::{CgroupFs, CpuStat, MemoryStat, outermost},
    host::guest_time::GuestTime,
    host::procfs::vmm_threads,
    host::{KvmFlavour, dtlb::DtlbCounters, figures},
    kind::{CpuMode, Gauge, Kind, MemcgEvent},
    probe::exit_counts::KindCounts,
    tenant::aggregate::TenantCounts,
};

/// CPU time in guest mode (ns): measured by the probes where `kvm_entry`/`kvm_exit` fire.
const CPU_GUEST: Kind = Kind::Cpu(CpuMode::Guest);
/// Tax: CPU time in the kernel (ns).
const TAX_KERNEL: Kind = Kind::Cpu(CpuMode::TaxKernel);
/// Tax: CPU time in user space outside guest mode (ns).
const TAX_VMM: Kind = Kind::Cpu(CpuMode::TaxVmm);

/// One cgroup's CPU and memory figures, where it has them.
type Figures = (Option<CpuStat>, Option<MemoryStat>);

/// How long a cgroup must have been empty before its figures are final. The kernel hands a
/// cgroup's memory events to readers of `memory.stat` once it has more than 64 updates per CPU
/// pending, and otherwise only from a worker that flushes every 2 s (mm/memcontrol.c:
/// `mem_cgroup_flush_stats`, `flush_memcg_stats_dwork`, `FLUSH_TIME`): the last faults of a VMM
/// can appear up to 2 s after it exited. CPU time is flushed on every read.
const SETTLE: Duration = Duration::from_secs(4);

/// Reads cgroup files, VMM threads' guest time and dTLB counters for the tenants of each sample.
pub struct Accounting {
    cgroups: CgroupFs,
    /// The VMM threads' guest time, where the kernel accounts it (not on PVM, nor from a PID
    /// namespace of the agent's own): elsewhere reading their `stat` files every tick would
    /// be a third of a live tenant's tick for nothing.
    guest: Option<GuestTime>,
    /// `Err` with the reason where the host cannot count dTLB misses.
    dtlb: Result<DtlbCounters, String>,
    /// Last figures of each cgroup path, and since when the cgroup has been empty: a cgroup
    /// without tasks uses no CPU and takes no faults, so once it has been empty for [`SETTLE`]
    /// its figures are kept while it stays empty. A cgroup that is gone keeps its last figures while its tenant
    /// references it, so that the tenant's counters never go down when one of its cgroups goes.
    /// Bounded by the cgroups of the tenants of the last sample.
    last: HashMap<String, (Figures, Option<Instant>)>,
}

impl Accounting {
    /// `pid_namespace`: why the VMMs' threads are not in this agent's /proc, when they are not;
    /// then no thread can be counted.
    pub fn new(cgroups: CgroupFs, flavour: KvmFlavour, pid_namespace: Option<&str>) -> Self {
        Self {
            cgroups,
            guest: figures::guest_time_unknown(flavour, pid_namespace)
                .is_none()
                .then(GuestTime::default),
            dtlb: figures::dtlb_availability(pid_namespace).map(|()| DtlbCounters::default()),
            last: HashMap::new(),
        }
    }

    /// CPU and memory figures of the cgroup at `path`.
    fn read(&mut self, path: &str) -> Figures {
        let now = Instant::now();
        let empty = self.cgroups.populated(path) == Some(false);
        let empty_since = match self.last.get(path) {
            Some((figures, Some(since))) if empty => {
                if now.duration_since(*since) >= SETTLE {
                    return *figures;
                }
                Some(*since)
            }
            _ => empty.then_some(now),
        };
        let mut figures = (self.cgroups.cpu(path), self.cgroups.memory(path));
        // Removed (the files are gone): its counters keep their last values, and it no longer
        // holds any memory.
        if let Some(((cpu, memory), _)) = self.last.get(path) {
            if figures.0.is_none() {
                figures.0 = *cpu;
            }
            if figures.1.is_none() {
                figures.1 = memory.map(|m| MemoryStat {
                    usage_bytes: 0,
                    ..m
                });
            }
        }
        self.last.insert(path.to_owned(), (figures, empty_since));
        figures
    }

    /// Why dTLB misses are not counted, if they are not.
    pub fn dtlb_unavailable(&self) -> Option<&str> {
        self.dtlb.as_ref().err().map(String::as_str)
    }

    /// Adds CPU, tax and memory figures to every tenant; a tenant's removed cgroups count with
    /// their last figures. `vmm_processes` maps the VMM processes the probes know to their cgroup
    /// ids.
    pub fn add_to(&mut self, tenants: &mut [TenantCounts], vmm_processes: &BTreeMap<u32, u64>) {
        let threads = if self.guest.is_some() || self.dtlb.is_ok() {
            vmm_threads(vmm_processes)
        } else {
            Vec::new()
        };
        let guest_by_cgroup = match &mut self.guest {
            Some(guest) => guest.update(&threads),
            None => HashMap::default(),
        };
        let dtlb_misses = match &mut self.dtlb {
            Ok(counters) => counters.update(&threads),
            Err(_) => HashMap::default(),
        };
        // What ended threads left is kept for the cgroups still referenced only.
        let referenced: HashSet<u64> = tenants
            .iter()
            .flat_map(|t| t.cgroups.iter().map(|c| c.id))
            .chain(vmm_processes.values().copied())
            .collect();
        if let Some(guest) = &mut self.guest {
            guest.retain_cgroups(|id| referenced.contains(&id));
        }
        if let Ok(counters) = &mut self.dtlb {
            counters.retain_cgroups(|id| referenced.contains(&id));
        }
        for tenant in tenants.iter_mut() {
            for ((cgroup_id, kind), misses) in &dtlb_misses {
                if tenant.cgroups.iter().any(|c| c.id == *cgroup_id) {
                    *tenant.counts.entry(kind.clone()).or_default() += misses;
                }
            }
        }
        let mut seen = HashSet::new();
        for tenant in tenants.iter_mut() {
            // The root cgroup holds the whole host (its kernel threads age and reclaim guest
            // memory there): it is no tenant's to account.
            let paths: Vec<&str> = tenant
                .cgroups
                .iter()
                .filter_map(|c| c.path.as_deref())
                .filter(|path| *path != "/")
                .collect();
            let mut cpu: Option<CpuStat> = None;
            let mut memory: Option<MemoryStat> = None;
            for path in outermost(&paths) {
                seen.insert(path.to_owned());
                let (cpu_stat, memory_stat) = self.read(path);
                if let Some(stat) = cpu_stat {
                    *cpu.get_or_insert_default() += stat;
                }
                if let Some(stat) = memory_stat {
                    *memory.get_or_insert_default() += stat;
                }
            }
            if let Some(cpu) = cpu {
                // Guest time as the probes measured it (entry to exit, VMX and SVM), else as the
                // kernel accounted it to the VMM threads.
                let from_threads: u64 = tenant
                    .cgroups
                    .iter()
                    .filter_map(|c| guest_by_cgroup.get(&c.id))
                    .sum();
                let from_probes = tenant.counts.get(&CPU_GUEST).copied().unwrap_or(0);
                let guest_ns = from_probes.max(from_threads);
                let user_ns = cpu.user_usec * 1000;
                insert_counts(
                    &mut tenant.counts,
                    [
                        (CPU_GUEST, guest_ns.min(user_ns)),
                        (TAX_KERNEL, cpu.system_usec * 1000),
                        (TAX_VMM, user_ns.saturating_sub(guest_ns)),
                    ],
                );
            }
            if let Some(memory) = memory {
                tenant
                    .gauges
                    .insert(Gauge::MemoryUsage, memory.usage_bytes as f64);
                insert_counts(
                    &mut tenant.counts,
                    [
                        (Kind::Memcg(MemcgEvent::Pgfault), memory.pgfault),
                        (Kind::Memcg(MemcgEvent::Pgmajfault), memory.pgmajfault),
                        (Kind::Memcg(MemcgEvent::LimitHits), memory.limit_hits),
                        (Kind::Memcg(MemcgEvent::OomKills), memory.oom_kills),
                    ],
                );
            }
        }
        self.last.retain(|path, _| seen.contains(path));
        self.cgroups.close_unread();
    }

    /// Cgroup paths whose figures are kept.
    pub fn cgroups_kept(&self) -> usize {
        self.last.len()
    }
}

/// Adds the counters that are above zero: like the probes' kinds, a counter appears once it has
/// counted something, which keeps idle tenants small.
fn insert_counts<const N: usize>(counts: &mut KindCounts, values: [(Kind, u64); N]) {
    for (kind, value) in values {
        if value > 0 {
            counts.insert(kind, value);
        }
    }
}
