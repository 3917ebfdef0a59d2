//! The agent's one source of data: attaches the probes and, on each call, turns the in-kernel
//! counters into a [`Sample`] per tenant. `watch`, the exporters, `top` and recordings all consume
//! samples, so they all report the same numbers.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    host::cgroup_index::{CgroupIndex, IndexSizes, find_v2_mount},
    host::cgroupfs::CgroupFs,
    host::{self, IommuHost, KvmDetection, KvmFlavour, kernel_log::DmarFaults},
    host::{figures, heap, vfio},
    probe::counters::{Counters, IommuFaults},
    probe::doorbell_state::DoorbellState,
    probe::lifecycle::CgroupEvents,
    probe::load::{ExitSource, ProbeOptions, Probes},
    sample::accounting::Accounting,
    tenant::aggregate::{PreviousCounts, TenantCap, TenantCounts, add_rates, by_tenant},
    tenant::resolve::Tenant,
};

/// Everything known at one instant: totals since the probes were attached, and rates over the
/// interval since the previous sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub timestamp: f64,
    /// Seconds since the probes were attached; counts are totals since then.
    pub elapsed_secs: f64,
    /// Seconds since the previous sample, over which the rates are computed.
    pub interval_secs: f64,
    pub kvm: KvmFlavour,
    pub exit_source: ExitSource,
    pub tenants: Vec<TenantCounts>,
    /// Why the hardware dTLB-miss counters are not counted on this host; absent where they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtlb_unavailable: Option<String>,
    /// Why this host's guest time, and so every tenant's tax ratio, is unknown; absent where it
    /// is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_time_unavailable: Option<String>,
    /// Figures the agent cannot give on this host, with why; absent when it gives them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub figures_unavailable: Vec<figures::Unavailable>,
    /// IOMMU faults by device, with the tenant that holds the device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iommu_faults: Vec<TenantIommuFaults>,
    /// Events the probes could not count, by reason.
    pub drops: BTreeMap<String, u64>,
    /// True on the last sample, taken when the agent stops.
    #[serde(default)]
    pub last: bool,
    /// Probes that should be attached on this host and are not, with why: while any is listed the
    /// figures are incomplete. Absent when every probe is attached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes_not_attached: Vec<ProbeFailure>,
    /// Probes attached (`category:event`), for the per-probe metric; not recorded.
    #[serde(skip)]
    pub probes_attached: Vec<String>,
    /// How full each kernel hash map is, for the map fill metrics; not recorded.
    #[serde(skip)]
    pub maps: Vec<crate::probe::map_fill::MapFill>,
    /// How much per-cgroup and per-tenant state the agent holds; not recorded.
    #[serde(skip)]
    pub state: StateSizes,
}

/// A probe that should be attached and is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeFailure {
    /// The tracepoint, as `category:event`.
    pub probe: String,
    /// Why it is not attached.
    pub reason: String,
}

/// `degraded: N probes not attached (a, b, c)`, or nothing when every probe is attached: the
/// marker the views put in their headers.
pub fn degraded_marker(failures: &[ProbeFailure]) -> Option<String> {
    if failures.is_empty() {
        return None;
    }
    let names: Vec<&str> = failures.iter().map(|f| f.probe.as_str()).collect();
    Some(format!(
        "degraded: {} probe{} not attached ({})",
        failures.len(),
        if failures.len() == 1 { "" } else { "s" },
        names.join(", ")
    ))
}

/// IOMMU faults of one device, attributed to a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantIommuFaults {
    /// The tenant whose VMM holds the device through VFIO, or `unattributed`.
    pub tenant: String,
    pub device: String,
    pub flags: u32,
    pub faults: u64,
}

/// How much state the sampler holds, for its memory bound (docs/memory-bound.md): everything per
/// cgroup or tenant is bounded by the tenants of the last sample and the cgroups they reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateSizes {
    pub index: IndexSizes,
    /// Tenants reported by name, and tenants summed into the overflow tenant.
    pub tenants_kept: usize,
    pub tenants_overflowed: usize,
    /// Cgroups whose CPU and memory figures are kept.
    pub accounted_cgroups: usize,
    /// Tenants whose counts the next rates are computed against.
    pub previous_tenants: usize,
    /// Devices whose owner is cached.
    pub iommu_owners: usize,
}

impl StateSizes {
    /// Each size by the name the `vmtrace.agent.state.entries` metric gives it.
    pub fn entries(&self) -> [(&'static str, usize); 8] {
        [
            ("cgroup_paths", self.index.paths),
            ("recent_cgroup_paths", self.index.recent),
            ("cgroups_awaiting_walk", self.index.waiting),
            ("named_tenants", self.tenants_kept),
            ("overflowed_tenants", self.tenants_overflowed),
            ("accounted_cgroups", self.accounted_cgroups),
            ("previous_tenants", self.previous_tenants),
            ("iommu_owners", self.iommu_owners),
        ]
    }
}

/// The drop reason of kernel log records overwritten before they were read, on hosts whose IOMMU
/// faults are counted from the log (Intel VT-d).
const DMAR_FAULT_LOG_LOST: &str = "iommu_fault_log_lost";

/// Attached probes and what is needed to read them.
pub struct Sampler {
    probes: Probes,
    counters: Counters,
    cgroup_events: CgroupEvents,
    /// Removed cgroups already reported in a sample marked `removed`: dropped from the next one.
    reported_removed: HashSet<u64>,
    index: CgroupIndex,
    accounting: Accounting,
    vfio: vfio::Roots,
    /// The tenant holding each faulting device, and when it was looked up: finding it scans every
    /// process's open files, so it is done once a minute per device at most.
    iommu_owners: HashMap<String, (Instant, String)>,
    /// Where the IOMMU's driver reports faults in the kernel log only (Intel VT-d): the faults
    /// logged since the start.
    dmar_faults: Option<DmarFaults>,
    kvm: KvmDetection,
    started: Instant,
    /// When the previous sample was taken, and its counts.
    previous: Option<(Instant, PreviousCounts)>,
    /// Where the learnt doorbells are kept across restarts, when they are.
    doorbell_state: Option<DoorbellState>,
    doorbell_state_failing: bool,
    /// Which tenants are reported by name.
    cap: TenantCap,
    /// Why /proc does not show the VMMs' threads, when it does not (a container without hostPID).
    pid_namespace: Option<String>,
}

impl Sampler {
    /// Attaches the probes; counting starts now.
    pub fn start(options: &ProbeOptions) -> Result<Self> {
        let kvm = host::detect_kvm();
        let mut probes = Probes::attach(&kvm, options).context("cannot start the probes")?;
        let counters = Counters::new(&mut probes.ebpf)?;
        let cgroup_events = CgroupEvents::new(&mut probes.ebpf)?;
        let root = find_v2_mount().context(
            "no cgroup v2 hierarchy is mounted (mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`)",
        )?;
        // Optional probes left off and those that never fire on this host may fail harmlessly.
        for failed in probes.not_attached() {
            tracing::warn!(tracepoint = %failed.tracepoint, error = ?failed.error, "probe not attached");
        }
        if let Err(e) = &probes.btf {
            tracing::warn!(error = %e, "raw tracepoint arguments not checked against the kernel's BTF");
        }
        let dmar_faults = (host::detect_iommu() == IommuHost::IntelVtd)
            .then(|| {
                DmarFaults::open()
                    .inspect_err(|e| {
                        tracing::warn!(
                            "IOMMU faults are not counted on this Intel VT-d host, whose driver \
                             reports them in the kernel log only: /dev/kmsg: {e} (reading it takes \
                             CAP_SYSLOG where kernel.dmesg_restrict is set)"
                        );
                    })
                    .ok()
            })
            .flatten();
        let pid_namespace = figures::foreign_pid_namespace();
        let accounting = Accounting::new(
            CgroupFs::new(root.clone()),
            kvm.flavour,
            pid_namespace.as_deref(),
        );
        for figure in figures::on_host(
            kvm.flavour,
            pid_namespace.as_deref(),
            accounting.dtlb_unavailable(),
        ) {
            tracing::warn!(figure = %figure.figure, reason = %figure.reason, "figure unavailable");
        }
        Ok(Self {
            probes,
            counters,
            cgroup_events,
            reported_removed: HashSet::new(),
            accounting,
            vfio: vfio::Roots::default(),
            iommu_owners: HashMap::new(),
            dmar_faults,
            index: CgroupIndex::new(root),
            kvm,
            started: Instant::now(),
            previous: None,
            doorbell_state: None,
            doorbell_state_failing: false,
            cap: TenantCap::default(),
            pid_namespace,
        })
    }

    /// Keeps the learnt doorbells in `dir` from now on, after putting back those saved there by
    /// an earlier agent whose VMMs still run. Returns how many came back. A directory that cannot
    /// be written is a warning, not an error: the agent then counts as if it had no state.
    pub fn keep_doorbells(&mut self, dir: &Path) -> usize {
        let mut state = DoorbellState::new(dir);
        let (saved, problem) = state.load();
        if let Some(problem) = problem {
            tracing::warn!("doorbell state ignored: {problem}");
        }
        let restored = match self.counters.restore_doorbells(&saved) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("doorbells saved before the restart not restored: {e:#}");
                0
            }
        };
        match self.counters.live_doorbells() {
            Ok(live) => match state.save(&live) {
                Ok(()) => self.doorbell_state = Some(state),
                Err(e) => tracing::warn!(
                    "learnt doorbells will not be kept across restarts: {e} (set --state-dir to \
                     a writable directory, or `off`)"
                ),
            },
            Err(e) => tracing::warn!("learnt doorbells will not be kept across restarts: {e:#}"),
        }
        restored
    }

    /// Reports at most `max` tenants by name, the others summed into the overflow tenant
    /// ([`crate::tenant::aggregate::OVERFLOW_TENANT`]); 1000 unless set.
    pub fn limit_tenants(&mut self, max: usize) {
        if max != self.cap.max() {
            self.cap = TenantCap::new(max);
        }
    }

    /// How much per-cgroup and per-tenant state is held now.
    pub fn state_sizes(&self) -> StateSizes {
        let (tenants_kept, tenants_overflowed) = self.cap.sizes();
        StateSizes {
            index: self.index.sizes(),
            tenants_kept,
            tenants_overflowed,
            accounted_cgroups: self.accounting.cgroups_kept(),
            previous_tenants: self.previous.as_ref().map_or(0, |(_, p)| p.len()),
            iommu_owners: self.iommu_owners.len(),
        }
    }

    pub fn kvm(&self) -> &KvmDetection {
        &self.kvm
    }

    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// Reads the counters now.
    pub fn sample(&mut self) -> Result<Sample> {
        let now = Instant::now();
        self.cgroup_events.drain(&mut self.index);
        // Removed tenants were reported once, marked removed: their series end here.
        if !self.reported_removed.is_empty() {
            self.counters.forget(&self.reported_removed)?;
            let forgotten = self.reported_removed.len();
            for id in self.reported_removed.drain() {
                self.index.forget(id);
            }
            if forgotten >= heap::MASS_FORGET {
                heap::return_freed_memory();
            }
        }
        let mut snapshot = self.counters.read(&self.probes.reason_names)?;
        if let Some(state) = &mut self.doorbell_state {
            // A failed write leaves the previous file, which is still right but for the latest
            // changes; the next sample tries again.
            match state.save(&self.counters.live_doorbells()?) {
                // One line per outage.
                Err(e) if !self.doorbell_state_failing => {
                    tracing::warn!(
                        "{e}; the learnt doorbells will be written again once it can be"
                    );
                    self.doorbell_state_failing = true;
                }
                Err(_) => {}
                Ok(()) => self.doorbell_state_failing = false,
            }
        }
        let no_counts = PreviousCounts::new();
        let (since, previous) = match &self.previous {
            Some((at, counts)) => (*at, counts),
            None => (self.started, &no_counts),
        };
        let interval_secs = now.duration_since(since).as_secs_f64();
        let mut tenants = by_tenant(&snapshot, &mut self.index);
        self.accounting
            .add_to(&mut tenants, &snapshot.vmm_processes);
        for tenant in tenants.iter().filter(|t| t.removed) {
            self.reported_removed
                .extend(tenant.cgroups.iter().map(|c| c.id));
        }
        let mut tenants = self.cap.apply(tenants);
        let guest_time_unknown =
            figures::guest_time_unknown(self.kvm.flavour, self.pid_namespace.as_deref());
        add_rates(
            &mut tenants,
            previous,
            interval_secs,
            guest_time_unknown.is_none(),
        );
        let mut iommu_faults = std::mem::take(&mut snapshot.iommu_faults);
        if let Some(dmar) = &mut self.dmar_faults {
            dmar.read();
            iommu_faults.extend(dmar.faults());
        }
        let mut sample = Sample {
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            elapsed_secs: now.duration_since(self.started).as_secs_f64(),
            interval_secs,
            kvm: self.kvm.flavour,
            exit_source: self.probes.exit_source,
            tenants,
            dtlb_unavailable: self.accounting.dtlb_unavailable().map(str::to_owned),
            guest_time_unavailable: guest_time_unknown.map(str::to_owned),
            figures_unavailable: figures::on_host(
                self.kvm.flavour,
                self.pid_namespace.as_deref(),
                self.accounting.dtlb_unavailable(),
            ),
            iommu_faults: self.attribute_iommu_faults(&iommu_faults, now),
            drops: snapshot
                .drops
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .chain(
                    self.dmar_faults
                        .as_ref()
                        .map(|dmar| (DMAR_FAULT_LOG_LOST.to_owned(), dmar.records_lost)),
                )
                .collect(),
            last: false,
            probes_not_attached: self.probes_not_attached(),
            probes_attached: self
                .probes
                .status
                .iter()
                .filter(|s| s.error.is_none())
                .map(|s| s.tracepoint.clone())
                .collect(),
            maps: std::mem::take(&mut snapshot.maps),
            state: StateSizes::default(),
        };
        let counts = sample
            .tenants
            .iter()
            .map(|t| (t.tenant.clone(), t.counts.clone()))
            .collect();
        self.previous = Some((now, counts));
        sample.state = self.state_sizes();
        Ok(sample)
    }

    /// Whether hardware counters are opened on VMM threads as they come (which takes
    /// CAP_PERFMON for as long as the agent runs).
    pub fn counts_hardware_events(&self) -> bool {
        self.accounting.dtlb_unavailable().is_none()
    }

    /// The probes that should be attached here and are not.
    pub fn probes_not_attached(&self) -> Vec<ProbeFailure> {
        self.probes
            .not_attached()
            .map(|s| ProbeFailure {
                probe: s.tracepoint.clone(),
                reason: s.error.clone().unwrap_or_default(),
            })
            .collect()
    }

    /// Names the tenant of each faulting device: the one whose VMM holds it through VFIO.
    fn attribute_iommu_faults(
        &mut self,
        faults: &[IommuFaults],
        now: Instant,
    ) -> Vec<TenantIommuFaults> {
        // Only the devices that fault are cached: the kernel's map of faults is bounded, and a
        // device that is gone from it is forgotten here too.
        self.iommu_owners
            .retain(|device, _| faults.iter().any(|f| &f.device == device));
        faults
            .iter()
            .map(|fault| {
                let owner = match self.iommu_owners.get(&fault.device) {
                    Some((at, tenant)) if now.duration_since(*at) < IOMMU_OWNER_TTL => {
                        tenant.clone()
                    }
                    _ => {
                        let tenant = self.vfio.owner_cgroup(&fault.device).map_or_else(
                            || "unattributed".to_owned(),
                            |path| Tenant::from_cgroup_path(&path).label(),
                        );
                        self.iommu_owners
                            .insert(fault.device.clone(), (now, tenant.clone()));
                        tenant
                    }
                };
                TenantIommuFaults {
                    tenant: owner,
                    device: fault.device.clone(),
                    flags: fault.flags,
                    faults: fault.faults,
                }
            })
            .collect()
    }
}

/// How long the owner of a faulting device is trusted before it is looked up again.
const IOMMU_OWNER_TTL: std::time::Duration = std::time::Duration::from_mins(1);
