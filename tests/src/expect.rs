//! What a test expects the agent to report for one tenant: every kind, each with its value or its
//! relation to the reference VMM's ground truth, and nothing else. The kinds and their families
//! are written here, by the tests: no test asks the agent which of its outputs to compare.
//!
//! The relations and their tolerances are explained in docs/ground-truth.md.

use std::collections::BTreeMap;

use vmtrace_vmm::{Report, Scenario, usage::Usage};

use crate::expected_agent_counts;

/// The families of kinds that count what guests did: the VMM knows each of them exactly.
pub const GUEST_SIDE_FAMILIES: [&str; 7] = [
    "exit.",
    "kvm_exit.",
    "run_error.",
    "pio.",
    "mmio.",
    "cpuid",
    "kick.",
];

/// The KVM a host runs, read from the modules the kernel has (not from the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvm {
    /// KVM's PVM flavour: no `kvm_exit`/`kvm_entry`, no guest page faults, no guest time.
    Pvm,
    /// Intel VT-x or AMD-V, where `kvm_exit` fires and the kernel accounts guest time.
    Hardware,
}

impl HostKvm {
    pub fn of_this_host() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            Self::Pvm
        } else {
            Self::Hardware
        }
    }
}

/// CPU time the VMM's exit path adds after its last reading of itself (writing the report,
/// unmapping guest memory, destroying the VM), and the slack of the kernel's split of CPU time
/// into user and system, which it makes in proportion to timer ticks (`cputime_adjust`,
/// kernel/sched/cputime.c) separately for the process and for its cgroup: 20 ms per VMM.
pub const CPU_SLACK_NS: u64 = 20_000_000;
/// Page faults the VMM takes after its last reading of itself: writing its report and exiting.
/// Measured: 1 for every scenario, on this host's kernel.
pub const EXIT_FAULTS: u64 = 8;

/// Memory cgroup events a reader of `memory.stat` may not see yet: the kernel flushes a cgroup's
/// per-CPU counters to readers once more than 64 updates per CPU are pending
/// (`MEMCG_CHARGE_BATCH × num_online_cpus()`, mm/memcontrol.c `memcg_vmstats_needs_flush`), and
/// the rest only from a worker every 2 s (`flush_memcg_stats_dwork`).
pub fn memcg_unflushed() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    64 * cpus as u64
}

/// What one kind, or the sum of a few, must be.
#[derive(Debug, Clone)]
struct Rule {
    kinds: Kinds,
    min: u64,
    max: u64,
    /// Why this is the value or the bound.
    why: String,
    /// A guest-side count from [`expected_agent_counts`].
    guest_side: bool,
}

#[derive(Debug, Clone)]
enum Kinds {
    /// The sum of these kinds.
    Named(Vec<String>),
    /// The sum of every kind whose name starts so.
    Prefix(&'static str),
}

impl Kinds {
    fn covers(&self, kind: &str) -> bool {
        match self {
            Self::Named(names) => names.iter().any(|n| n == kind),
            Self::Prefix(prefix) => kind.starts_with(prefix),
        }
    }
}

/// Every kind a tenant may report, with its value or bound.
#[derive(Debug, Clone, Default)]
pub struct Expectation {
    rules: Vec<Rule>,
    exact: BTreeMap<String, u64>,
    /// How many VMMs wrote the reports.
    vmms: u64,
}

impl Expectation {
    /// A tenant whose cgroups held only the VMMs that wrote `reports`, run to their end, on a host
    /// with `kvm`.
    pub fn of_vmms(reports: &[Report], kvm: HostKvm) -> Self {
        let mut e = Self::default();
        e = e.with_exact(expected_agent_counts(reports));
        let sum = |f: &dyn Fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
        let vmms = reports.len() as u64;
        e.vmms = vmms;
        let as_vmm = sum_usage(reports, |r| r.process.as_vmm);
        let in_cgroup = sum_usage(reports, |r| r.process.in_cgroup);
        let memory = |f: &dyn Fn(&vmtrace_vmm::report::MemoryReport) -> u64| {
            sum(&|r| r.memory.as_ref().map_or(0, f))
        };
        let guest_pages = sum(&guest_pages);
        if kvm == HostKvm::Hardware {
            e.hardware_exits(reports, guest_pages);
        }

        // CPU: the cgroup's totals, with guest time taken out of user time.
        // PVM accounts next to no guest time, but not none: a timer tick that lands while a vCPU
        // is in the guest is accounted as such (seen: 10 ms in a 10 s run). The agent gives no
        // guest time there (the figure is unavailable), so that stray tick is in `tax.vmm`.
        let guest_ns = match kvm {
            HostKvm::Pvm => 0,
            HostKvm::Hardware => sum(&|r| r.vcpus.iter().map(|v| v.guest_ns).sum()),
        };
        let vcpus = sum(&|r| r.vcpus.len() as u64);
        let cpu_slack = vmms * CPU_SLACK_NS;
        if guest_ns == 0 {
            e.exactly(
                "cpu.guest",
                0,
                "no guest time: the kernel accounted none, or the agent gives none on this host",
            );
        } else {
            // The agent reads each thread's guest time once per interval (200 ms in the tests);
            // the VMM reads it once its last KVM_RUN has returned.
            e.within(
                &["cpu.guest"],
                guest_ns.saturating_sub(vcpus * 200_000_000),
                guest_ns,
                "the vCPU threads' guest time, read up to one interval before the VMM did",
            );
        }
        let user_ns = in_cgroup.user_us * 1000;
        let system_ns = in_cgroup.system_us * 1000;
        if reports.iter().any(|r| r.rate.is_some()) {
            // A paced guest's VMM sleeps on timers between operations and runs for a few µs
            // after each wake-up: the timer ticks by which the kernel splits CPU time into user
            // and system can miss it every time, and then the split says nothing (seen: the
            // process all system time, its cgroup all user). Only the sum holds.
            for kind in ["tax.kernel", "tax.vmm"] {
                e.within(
                    &[kind],
                    0,
                    user_ns + system_ns + cpu_slack,
                    "a part of the VMMs' CPU time: a paced VMM's user/system split is not known",
                );
            }
        } else {
            // The kernel splits the process's and the cgroup's CPU time into user and system each
            // in proportion to its own tick samples, so the two splits drift apart with the total
            // (seen: 3 ms beyond the slack in 12 s of system time); the sum is held apart.
            let split_slack = cpu_slack + (user_ns + system_ns) / 200;
            e.within(
                &["tax.kernel"],
                system_ns.saturating_sub(split_slack),
                system_ns + split_slack,
                "the VMMs' system time since joining the cgroup",
            );
            e.within(
                &["tax.vmm"],
                user_ns.saturating_sub(guest_ns + split_slack),
                user_ns.saturating_sub(guest_ns) + split_slack,
                "the VMMs' user time since joining the cgroup, less guest time",
            );
        }
        e.within(
            &["cpu.guest", "tax.kernel", "tax.vmm"],
            (user_ns + system_ns).saturating_sub(cpu_slack),
            user_ns + system_ns + cpu_slack,
            "all the VMMs' CPU time since joining the cgroup, which both count to the ns",
        );

        // Host page faults, while each process was a VMM.
        // The agent knows a VMM from its first KVM_RUN (with --vm-ioctls, from its first memory
        // slot): at least its faults since then, at most those since its first slot.
        let running = sum_usage(reports, |r| r.process.running);
        let touched = memory(&|m| m.pages_touched + m.pages_retouched);
        // With nested paging KVM faults the pages the guest touches in through get_user_pages,
        // which getrusage counts (mm_account_fault(), mm/memory.c) but which passes no
        // exceptions:page_fault_* tracepoint: those are in the exception handler
        // (trace_page_fault_entries(), arch/x86/mm/fault.c), and get_user_pages calls
        // handle_mm_fault() directly.
        let gup_faults = match kvm {
            HostKvm::Pvm => 0,
            HostKvm::Hardware => touched,
        };
        e.within(
            &["fault.user", "fault.kernel"],
            running.faults().saturating_sub(gup_faults),
            as_vmm.faults() + vmms * EXIT_FAULTS,
            "the VMMs' own page faults (getrusage) since their first KVM_RUN, at most since \
             their first memory slot, less KVM's get_user_pages faults on nested-paging hosts",
        );
        match kvm {
            HostKvm::Pvm => e.exactly(
                "fault.guest",
                0,
                "no nested paging under PVM: kvm_page_fault never fires",
            ),
            HostKvm::Hardware => e.within(
                &["fault.guest"],
                touched,
                u64::MAX,
                "one EPT/NPT violation per page the guest touched, at least",
            ),
        }
        if kvm == HostKvm::Pvm && touched > 0 {
            // KVM's emulator writes each page the guest touches through the VMM's mapping.
            e.within(
                &["fault.kernel"],
                touched,
                as_vmm.faults() + vmms * EXIT_FAULTS,
                "one kernel fault per page the emulated guest touched",
            );
        }
        // The memory cgroup counts every fault of the VMMs' memory: their own, and KVM's on
        // their behalf through get_user_pages, at most one per guest page. A reader sees them
        // late by up to 64 per CPU (MEMCG_UNFLUSHED) until the kernel's 2 s flush.
        let unflushed = memcg_unflushed();
        e.within(
            &["memcg.pgfault"],
            in_cgroup.faults().saturating_sub(unflushed),
            in_cgroup.faults() + guest_pages + vmms * EXIT_FAULTS,
            "the VMMs' faults since joining the cgroup, plus KVM's on guest pages, less those \
             not yet flushed",
        );
        e.within(
            &["memcg.pgmajfault"],
            in_cgroup.major_faults.saturating_sub(unflushed),
            in_cgroup.major_faults + guest_pages + vmms * EXIT_FAULTS,
            "the VMMs' major faults since joining the cgroup, plus KVM's on guest pages, less \
             those not yet flushed",
        );
        e.exactly("memcg.limit_hits", 0, "the tenant's cgroup has no limit");
        e.exactly("memcg.oom_kills", 0, "the tenant's cgroup has no limit");

        // Memory the VMMs returned and took back.
        let returned_bytes = memory(&|m| m.bytes_returned);
        e.exactly(
            "mem.returned",
            memory(&|m| m.madvise_calls),
            "the VMM's madvise calls on guest memory",
        );
        e.exactly(
            "mem.returned_bytes",
            returned_bytes,
            "the bytes the VMM returned",
        );
        match kvm {
            HostKvm::Pvm => e.exactly(
                "mem.refault",
                memory(&|m| m.pages_retouched),
                "the pages the guest touched again",
            ),
            HostKvm::Hardware => e.exactly(
                "mem.refault",
                0,
                "with nested paging the guest's touches are KVM's get_user_pages faults, which \
                 fire no page-fault tracepoint (docs/memory-and-tlb.md)",
            ),
        }
        // Each write-protection cycle is two mprotect calls of a page of guest memory.
        let protect_calls = 2 * sum(&|r| r.write_protect.map_or(0, |w| w.cycles));
        e.within(
            &["mem.unmap"],
            memory(&|m| m.madvise_calls) + protect_calls,
            u64::MAX,
            "every madvise and mprotect of guest memory is an invalidation; so are the host's \
             own (copy-on-write, compaction), which the VMM cannot see",
        );
        e.within(
            &["mem.unmap_bytes"],
            returned_bytes + protect_calls * 4096,
            u64::MAX,
            "every byte returned was invalidated; the host's own invalidations add to it",
        );
        e.exactly(
            "mem.age",
            0,
            "reclaim ages memory from kernel threads, in the root cgroup",
        );
        e.exactly(
            "mem.test_age",
            0,
            "reclaim ages memory from kernel threads, in the root cgroup",
        );

        // KVM's page-table pages: their number depends on KVM's MMU, not on what the VMM sees.
        e.within(
            &["mmu.page.created", "mmu.page.reused", "mmu.page.zapped"],
            0,
            u64::MAX,
            "KVM's own page-table pages; the VMM cannot see them",
        );

        // Host TLB flushes: on switching tasks, and after the VMMs' own unmaps and protections,
        // which its allocator and thread stacks make too. No figure of the VMM bounds them: a
        // switch to a thread of the same process flushes nothing, and some kernels flush for
        // reasons of their own (tlb.flush.reason_5 on this PVM kernel). tests/tests/tlb.rs counts
        // the flushes of a known operation.
        e = e.allow_family(
            "tlb.flush.",
            0,
            u64::MAX,
            "host TLB flushes: no figure of the VMM bounds them",
        );
        e.within(
            &["tlb.flush.local_mm_shootdown"],
            sum(&|r| r.write_protect.map_or(0, |w| w.cycles)),
            u64::MAX,
            "each write-protection of a present page flushes it on the VMM thread's own CPU",
        );
        e.exactly(
            "tlb.pv_flush",
            0,
            "the reference guest makes no paravirtual flush",
        );
        e.exactly(
            "tlb.pv_flush.skipped",
            0,
            "the reference guest makes no paravirtual flush",
        );
        e.exactly("tlb.hv_flush", 0, "the reference guest is no Hyper-V guest");
        e.exactly(
            "tlb.hv_flush_ex",
            0,
            "the reference guest is no Hyper-V guest",
        );
        if kvm == HostKvm::Pvm {
            e.exactly("tlb.exit", 0, "no kvm_exit under PVM");
        } else {
            e.within(
                &["tlb.exit"],
                0,
                u64::MAX,
                "exits that touch the TLB, from kvm_exit",
            );
        }
        let dtlb = crate::dtlb_counters();
        for kind in ["tlb.dtlb_load_miss", "tlb.dtlb_store_miss"] {
            match &dtlb {
                Ok(()) => e.within(&[kind], 0, u64::MAX, "hardware counters"),
                Err(_) => e.exactly(kind, 0, "this host has no dTLB counters"),
            }
        }
        for kind in [
            "iommu.map",
            "iommu.map_bytes",
            "iommu.unmap",
            "iommu.unmap_bytes",
        ] {
            e.exactly(kind, 0, "the reference VMM has no device behind an IOMMU");
        }
        e
    }

    /// The same, with `exact` as the guest-side counts instead.
    #[must_use]
    pub fn with_exact(mut self, exact: BTreeMap<String, u64>) -> Self {
        self.rules.retain(|r| !r.guest_side);
        for (kind, &n) in &exact {
            self.rules.push(Rule {
                kinds: Kinds::Named(vec![kind.clone()]),
                min: n,
                max: n,
                why: "the VMM's count".to_owned(),
                guest_side: true,
            });
        }
        self.exact = exact;
        self
    }

    /// The same, for an agent that learns doorbells from their registration (`--vm-ioctls`):
    /// see [`crate::expected_agent_counts_learnt`].
    #[must_use]
    pub fn with_learnt_doorbells(self, reports: &[Report]) -> Self {
        self.with_exact(crate::expected_agent_counts_learnt(reports))
    }

    /// The same, for VMMs that became VMMs before the agent started: what the probes count of
    /// the host's side (faults, memory, TLB, KVM's pages) may have happened unseen, so only the
    /// upper bounds hold; and as the agent did not see their memory slots set, every madvise of
    /// theirs counts as memory returned (docs/memory-and-tlb.md), so those have no upper bound.
    #[must_use]
    pub fn seen_from_mid_run(mut self) -> Self {
        let slots_unseen = ["mem.returned", "mem.returned_bytes", "mem.refault"];
        let probed = |kind: &String| {
            ["fault.", "mem.", "mmu.", "tlb."]
                .iter()
                .any(|f| kind.starts_with(f))
        };
        for rule in &mut self.rules {
            if let Kinds::Named(kinds) = &rule.kinds
                && kinds.iter().all(probed)
            {
                rule.min = 0;
                if kinds.iter().all(|k| slots_unseen.contains(&k.as_str())) {
                    rule.max = u64::MAX;
                }
            }
        }
        self
    }

    /// Where `kvm_exit` fires: every exit the guests made, with its hardware reason. `guest_pages`
    /// is the number of 4 KiB pages of the VMMs' guest memory.
    fn hardware_exits(&mut self, reports: &[Report], guest_pages: u64) {
        let exits = |reason: &str| {
            reports
                .iter()
                .map(|r| r.total.exits.get(reason).copied().unwrap_or(0))
                .sum::<u64>()
        };
        let exact = |kind: &str| self.exact.get(kind).copied().unwrap_or(0);
        let cpuid = exact("cpuid");
        // Every MMIO access the guest makes is a nested page fault, whether KVM completes it (an
        // ioeventfd) or the VMM does.
        let mmio = exact("mmio.write") + exact("mmio.read_unsatisfied");
        let vcpus: u64 = reports.iter().map(|r| r.vcpus.len() as u64).sum();
        self.exactly(
            "kvm_exit.io",
            exits("io"),
            "every port access the guests made exits, to the VMM or not",
        );
        self.exactly("kvm_exit.hlt", exits("hlt"), "every hlt the guests made");
        self.exactly("kvm_exit.cpuid", cpuid, "every cpuid the guests made");
        // The guests' first touch of each page of their RAM is a nested page fault too: at least
        // the code page of each VMM, at most every page, once more for each other vCPU that
        // faulted on it at the same time, and once more for each page returned and touched again.
        let retouched: u64 = reports
            .iter()
            .filter_map(|r| r.memory.as_ref())
            .map(|m| m.pages_retouched)
            .sum();
        self.within(
            &["kvm_exit.npf"],
            mmio + reports.len() as u64,
            mmio + guest_pages + retouched + vcpus,
            "every MMIO access, and the first touches of guest RAM and of memory it took back",
        );
        let known = exits("io") + exits("hlt") + cpuid + mmio;
        self.rules.push(Rule {
            kinds: Kinds::Prefix("kvm_exit."),
            min: known,
            max: u64::MAX,
            why: "the guests' own exits, and asynchronous ones (interrupts, ...) the VMM cannot \
                  see"
            .to_owned(),
            guest_side: false,
        });
    }

    /// The same, on a host emulated by QEMU's TCG (tests/src/svm_host.rs), whose kernel accounts
    /// CPU time by timer ticks of a machine ten times slower than this one: there the split into
    /// guest, system and user time is not known (seen: a VMM's user time all accounted to guest
    /// time, and the other way round), and the VMM's exit path takes longer than
    /// [`CPU_SLACK_NS`] (seen: up to 10 ms more). Single-threaded TCG (docs/svm-host.md) also
    /// charges a running task for the time the other vCPU ran in its stead (seen: 65 ms more for
    /// a VMM of 0.5 s). Only the total holds, to 7 × the slack.
    #[must_use]
    pub fn on_emulated_host(mut self) -> Self {
        let cpu = |kind: &String| kind == "cpu.guest" || kind.starts_with("tax.");
        for rule in &mut self.rules {
            let Kinds::Named(kinds) = &rule.kinds else {
                continue;
            };
            if !kinds.iter().all(cpu) {
                continue;
            }
            if kinds.len() == 1 {
                rule.min = 0;
                rule.max = u64::MAX;
                rule.why = format!(
                    "a part of the CPU time, split by an emulated host's ticks ({})",
                    rule.why
                );
            } else {
                rule.max = rule.max.saturating_add(6 * self.vmms * CPU_SLACK_NS);
                rule.why = format!("{}, with an emulated host's slower exit path", rule.why);
            }
        }
        self
    }

    fn exactly(&mut self, kind: &str, n: u64, why: &str) {
        self.within(&[kind], n, n, why);
    }

    fn within(&mut self, kinds: &[&str], min: u64, max: u64, why: &str) {
        self.rules.push(Rule {
            kinds: Kinds::Named(kinds.iter().map(|k| (*k).to_owned()).collect()),
            min,
            max,
            why: why.to_owned(),
            guest_side: false,
        });
    }

    /// Allows every kind starting with `prefix`, with its sum within `min..=max`.
    #[must_use]
    pub fn allow_family(mut self, prefix: &'static str, min: u64, max: u64, why: &str) -> Self {
        self.rules.push(Rule {
            kinds: Kinds::Prefix(prefix),
            min,
            max,
            why: why.to_owned(),
            guest_side: false,
        });
        self
    }

    /// The guest-side counts, known exactly: what a test can wait for.
    pub fn exact(&self) -> &BTreeMap<String, u64> {
        &self.exact
    }

    /// Every mismatch of `counts` (a tenant's counts by kind) with this expectation: a rule whose
    /// kinds sum outside its bounds, or a kind no rule names.
    pub fn mismatches(&self, counts: &BTreeMap<String, u64>) -> Vec<String> {
        let mut wrong = Vec::new();
        for rule in &self.rules {
            let sum: u64 = counts
                .iter()
                .filter(|(kind, _)| rule.kinds.covers(kind))
                .map(|(_, n)| n)
                .sum();
            if !(rule.min..=rule.max).contains(&sum) {
                let bound = if rule.min == rule.max {
                    format!("{}", rule.min)
                } else if rule.max == u64::MAX {
                    format!(">= {}", rule.min)
                } else {
                    format!("{}..={}", rule.min, rule.max)
                };
                wrong.push(format!(
                    "{:?} is {sum}, expected {bound} ({})",
                    rule.kinds, rule.why
                ));
            }
        }
        for kind in counts.keys() {
            if !self.rules.iter().any(|r| r.kinds.covers(kind)) {
                wrong.push(format!("{kind} = {} was not expected", counts[kind]));
            }
        }
        wrong
    }

    /// Whether `shown`, a kind as a view shows it (cut short with `…` where it is too long), is
    /// one this expectation has a value or bound for.
    pub fn names(&self, shown: &str) -> bool {
        let Some(cut) = shown.strip_suffix('…') else {
            return self.rules.iter().any(|r| r.kinds.covers(shown));
        };
        self.rules.iter().any(|r| match &r.kinds {
            Kinds::Named(names) => names.iter().any(|n| n.starts_with(cut)),
            Kinds::Prefix(prefix) => cut.starts_with(prefix) || prefix.starts_with(cut),
        })
    }

    /// Panics with every mismatch of the tenant `who`'s `counts`.
    pub fn assert_matches(&self, who: &str, counts: &BTreeMap<String, u64>) {
        let wrong = self.mismatches(counts);
        assert!(
            wrong.is_empty(),
            "tenant {who}:\n  {}\nagent's counts: {counts:?}",
            wrong.join("\n  ")
        );
    }
}

fn sum_usage(reports: &[Report], f: impl Fn(&Report) -> Usage) -> Usage {
    reports.iter().fold(Usage::default(), |acc, r| {
        let u = f(r);
        Usage {
            user_us: acc.user_us + u.user_us,
            system_us: acc.system_us + u.system_us,
            minor_faults: acc.minor_faults + u.minor_faults,
            major_faults: acc.major_faults + u.major_faults,
            voluntary_switches: acc.voluntary_switches + u.voluntary_switches,
            involuntary_switches: acc.involuntary_switches + u.involuntary_switches,
        }
    })
}

/// The 4 KiB pages of one VMM's guest memory: its RAM and, for touch and balloon, its region.
fn guest_pages(report: &Report) -> u64 {
    let ram = if report.scenario == Scenario::Virtio {
        vmtrace_vmm::layout::VIRTIO_MEM_SIZE
    } else {
        vmtrace_vmm::layout::MEM_SIZE
    } as u64;
    (ram + report.memory.as_ref().map_or(0, |m| m.region_bytes)) / 4096
}

/// Whether a kind counts what guests did (as opposed to what the host did for them), by the
/// tests' own list of families.
pub fn is_guest_side(kind: &str) -> bool {
    GUEST_SIDE_FAMILIES.iter().any(|f| kind.starts_with(f))
}

/// Whether a kind is one of a tenant's exits as `top`, `watch` and the report sum them on a host
/// without `kvm_exit`: every return of KVM_RUN to the VMM (`exit.*`), and the exits KVM completes
/// itself that the probes see (in-kernel MMIO writes, CPUID). Where `kvm_exit` fires, a tenant's
/// exits are its `kvm_exit.*` instead, which hold all of these (docs/exits.md).
pub fn is_exit_without_kvm_exit(kind: &str) -> bool {
    kind.starts_with("exit.") || kind == "mmio.write.kernel" || kind == "cpuid"
}

/// Whether a kind counts virtio kicks (`kick.q<N>`, `kick.any`).
pub fn is_kick(kind: &str) -> bool {
    kind.starts_with("kick.")
}

/// Asserts that `sample` (one `watch --json` line) reports no tenant at or under the cgroup
/// `base` (an agent path, `/...`) but `tenants`: nothing is counted on the tests' parent cgroup or
/// on a tenant that ran nothing.
pub fn assert_only_tenants(sample: &serde_json::Value, base: &str, tenants: &[String]) {
    let reported = sample["tenants"].as_array().into_iter().flatten();
    for tenant in reported {
        let path = tenant["tenant"].as_str().unwrap_or_default();
        let under = path == base || path.starts_with(&format!("{base}/"));
        assert!(
            !under || tenants.iter().any(|t| t == path),
            "{path} was reported, but only {tenants:?} ran VMMs: {tenant}"
        );
    }
}

/// The expectation of every tenant, checked against the agent's last report `sample`: for each
/// `(agent path, its VMMs' reports)`, every kind it has matches, and no other tenant under `base`
/// was reported.
pub fn assert_tenants(sample: &serde_json::Value, base: &str, tenants: &[(String, &[Report])]) {
    let kvm = HostKvm::of_this_host();
    for (path, reports) in tenants {
        let counts = crate::all_agent_counts(sample, path)
            .unwrap_or_else(|| panic!("tenant {path} missing from the agent's report: {sample}"));
        Expectation::of_vmms(reports, kvm).assert_matches(path, &counts);
    }
    let paths: Vec<String> = tenants.iter().map(|(p, _)| p.clone()).collect();
    assert_only_tenants(sample, base, &paths);
}
