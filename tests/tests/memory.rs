//! Memory as the host sees it, per tenant, against the reference VMM's `touch` and `balloon` ground
//! truth: host page faults, kvmmmu page-table pages, memory returned to the host and taken back, and
//! the memory cgroup's own counts; an idle tenant's stay at zero.
//!
//! The expected relations, for a guest that writes one byte into each page of N MiB of fresh memory
//! (P = N x 256 pages of 4 KiB, the VMM maps it without huge pages):
//! - A guest that is not PVM-aware runs in KVM's instruction emulator on a PVM host (as here): each
//!   first write is KVM writing the VMM's mapping from the vCPU thread, which faults once in the
//!   kernel on a user address. So `fault.kernel` grows by one per page: P plus the few (here 1 or
//!   2) the VMM's own set-up takes. kvmmmu builds no page-table pages for them: `mmu.page.created`
//!   does not depend on N.
//! - On VMX/SVM hosts the guest writes through EPT/NPT instead: `fault.guest` >= P (one violation
//!   per page) and `mmu.page.created` grows by at least N/2 (one leaf table per 2 MiB).
//! - Everywhere, the memory cgroup charges every fault: `memcg.pgfault` >= P, and the VMM's own
//!   start-up adds only a few dozen.
//! - A balloon returning M MiB with one madvise: `mem.returned_bytes` = M MiB, `mem.returned` = 1,
//!   and the guest's retouch of those pages is M x 256 refaults (`mem.refault`).
//! - A tenant whose VMM runs meanwhile without touching new memory takes no new faults at all, and
//!   its kvmmmu pages and balloon counts do not move.
//! - Every tenant's every kind matches the VMM's own accounting (`vmtrace_tests::expect`): host
//!   faults equal its getrusage faults since its first memory slot, plus the one its exit takes.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use vmtrace_tests::{
    Agent, TenantCgroup, agent_report, all_agent_counts,
    expect::{self, HostKvm},
    privileged_host, run_vmm,
};

const PAGE: u64 = 4096;
/// Kernel faults of the VMM's own set-up (measured here: 1).
const OWN_KERNEL_FAULTS: u64 = 16;
/// Host-side kinds that must not move while a VMM touches no new memory.
const STILL_WHEN_IDLE: [&str; 8] = [
    "fault.user",
    "fault.kernel",
    "fault.guest",
    "memcg.pgfault",
    "mmu.page.created",
    "mem.refault",
    "mem.returned",
    "mem.returned_bytes",
];

#[test]
fn touch_and_balloon_faults_refaults_and_returned_memory_match_the_vmm() {
    if !privileged_host("touch_and_balloon_faults_refaults_and_returned_memory_match_the_vmm") {
        return;
    }
    let base = format!("vmtrace-test-memory-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let small = TenantCgroup::new(&format!("{base}/touch-16"));
    let large = TenantCgroup::new(&format!("{base}/touch-64"));
    let balloon = TenantCgroup::new(&format!("{base}/balloon"));
    let idle = TenantCgroup::new(&format!("{base}/idle"));

    let agent = Agent::start(&[]);
    // The idle tenant's VMM runs throughout (40 port writes at 10 a second); the others start once
    // it has been seen.
    let idle_run = std::thread::spawn({
        let relative = idle.relative.clone();
        move || {
            run_vmm(&[
                "--scenario",
                "pio",
                "--count",
                "40",
                "--rate",
                "10",
                "--cgroup",
                &relative,
            ])
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let touch_started = unix_now();
    let touch = |mib: &str, tenant: &TenantCgroup| {
        run_vmm(&[
            "--scenario",
            "touch",
            "--mib",
            mib,
            "--cgroup",
            &tenant.relative,
        ])
    };
    let (small_report, large_report, balloon_report, touch_ended) = std::thread::scope(|s| {
        let small_run = s.spawn(|| touch("16", &small));
        let large_run = s.spawn(|| touch("64", &large));
        let balloon_run = s.spawn(|| {
            run_vmm(&[
                "--scenario",
                "balloon",
                "--mib",
                "32",
                "--balloon-mib",
                "12",
                "--cgroup",
                &balloon.relative,
            ])
        });
        (
            small_run.join().unwrap(),
            large_run.join().unwrap(),
            balloon_run.join().unwrap(),
            unix_now(),
        )
    });
    let idle_report = idle_run.join().unwrap();
    let idle_ended = unix_now();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let samples = agent.stop();
    let last = samples.last().unwrap();
    let counts = |t: &TenantCgroup| -> BTreeMap<String, u64> {
        all_agent_counts(last, &t.agent_path())
            .unwrap_or_else(|| panic!("{} missing from {last}", t.agent_path()))
    };
    let get = |c: &BTreeMap<String, u64>, kind: &str| c.get(kind).copied().unwrap_or(0);
    let pvm = HostKvm::of_this_host() == HostKvm::Pvm;

    let mut created = Vec::new();
    let mut kernel_faults = Vec::new();
    for (tenant, report) in [(&small, &small_report), (&large, &large_report)] {
        let memory = report.memory.as_ref().expect("touch reports its memory");
        let pages = memory.pages_touched;
        assert_eq!(pages, memory.region_bytes / PAGE);
        let c = counts(tenant);
        eprintln!("{}: {pages} pages touched; agent: {c:?}", tenant.relative);
        if pvm {
            let faults = get(&c, "fault.kernel");
            assert!(
                (pages..pages + OWN_KERNEL_FAULTS).contains(&faults),
                "{}: {faults} kernel faults for {pages} pages",
                tenant.relative
            );
            kernel_faults.push((faults, pages));
        } else {
            assert!(get(&c, "fault.guest") >= pages, "{}", tenant.relative);
        }
        created.push(get(&c, "mmu.page.created"));
    }
    let mib_more = (large_report.memory.as_ref().unwrap().region_bytes
        - small_report.memory.as_ref().unwrap().region_bytes)
        >> 20;
    if pvm {
        let [(small_faults, small_pages), (large_faults, large_pages)] = kernel_faults[..] else {
            unreachable!()
        };
        // One fault per page; the VMMs' own set-up adds the same handful to both (give or take one).
        let slope = (large_faults - small_faults).abs_diff(large_pages - small_pages);
        assert!(
            slope < OWN_KERNEL_FAULTS,
            "{large_faults} - {small_faults} kernel faults for {large_pages} - {small_pages} pages"
        );
        assert_eq!(
            created[0], created[1],
            "kvmmmu pages must not depend on the touched size under emulation"
        );
    } else {
        assert!(created[1] - created[0] >= mib_more / 2, "{created:?}");
    }

    let memory = balloon_report.memory.as_ref().unwrap();
    let c = counts(&balloon);
    eprintln!("balloon: {memory:?}; agent: {c:?}");
    assert_eq!(get(&c, "mem.refault") * PAGE, memory.bytes_retouched);
    if pvm {
        let pages = memory.pages_touched + memory.pages_retouched;
        let faults = get(&c, "fault.kernel");
        assert!(
            (pages..pages + OWN_KERNEL_FAULTS).contains(&faults),
            "{faults} kernel faults for {pages} pages"
        );
    }

    // The idle tenant, from before the others started to after they ended, while its VMM still
    // ran: no new fault of any kind.
    let idle_at = |when: &dyn Fn(f64) -> bool| {
        samples
            .iter()
            .rfind(|s| when(s["timestamp"].as_f64().unwrap()))
            .and_then(|s| all_agent_counts(s, &idle.agent_path()))
    };
    let before = idle_at(&|t| t < touch_started).expect("the idle tenant seen before the others");
    let after = idle_at(&|t| t > touch_ended && t < idle_ended - 0.5)
        .expect("the idle tenant seen after the others ended, before its own end");
    eprintln!("idle: before {before:?}, after {after:?}");
    for kind in STILL_WHEN_IDLE {
        assert_eq!(
            get(&before, kind),
            get(&after, kind),
            "idle tenant's {kind}"
        );
    }

    // Every kind of every tenant, against the VMMs' own accounting.
    let runs = [small_report, large_report, balloon_report, idle_report];
    let checked: Vec<_> = [&small, &large, &balloon, &idle]
        .iter()
        .zip(&runs)
        .map(|(t, r)| (t.agent_path(), std::slice::from_ref(r)))
        .collect();
    expect::assert_tenants(last, &format!("/{base}"), &checked);

    // Memory usage is a gauge of every tenant with a memory cgroup (v2, or v1 on hybrid hosts).
    for tenant in [&small, &large, &balloon, &idle] {
        let report = agent_report(last, &tenant.agent_path()).unwrap();
        assert!(
            report["gauges"]["memory.usage_bytes"].as_f64().is_some(),
            "{} has no memory usage: {report}",
            tenant.relative
        );
    }
    assert_eq!(last["drops"]["returned_ranges_full"], 0);
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
