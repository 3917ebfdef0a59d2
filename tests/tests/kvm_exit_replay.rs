//! The in-kernel kvm_exit logic, driven for real with synthetic VMX, SVM and PVM records through
//! `BPF_PROG_TEST_RUN` (kvm_exit never fires on this PVM host), read back through the agent: reason
//! names, counts and latency histogram buckets per tenant, the TLB-relevant exits among them, and
//! the time in the guest between each entry and the next exit.

use std::{collections::BTreeMap, os::unix::fs::MetadataExt};

use vmtrace::{
    host,
    host::cgroup_index::CgroupIndex,
    kind::Kind,
    probe::counters::Counters,
    probe::latency::LatencySummary,
    probe::load::{ProbeOptions, Probes},
    tenant::aggregate::by_tenant,
};
use vmtrace_tests::{TenantCgroup, cgroup2_root, privileged_host};

const VMX: u64 = 1;
const SVM: u64 = 2;
const PVM: u64 = 3;

/// Time in the guest between an entry and the thread's next exit in these records.
const GUEST_GAP_NS: u64 = 10_000;

/// One vCPU thread's exits: (isa, reason, latency ns), each followed by the matching entry, and
/// that by the next exit [`GUEST_GAP_NS`] later.
fn exits_then_entries(cgroup_id: u64, tid: u64, exits: &[(u64, u64, u64)]) -> Vec<[u64; 6]> {
    let mut time = 1_000_000_000;
    let mut records = Vec::new();
    for &(isa, reason, latency) in exits {
        records.push([0, cgroup_id, tid, time, isa, reason]);
        time += latency;
        records.push([1, 0, tid, time, 0, 0]);
        time += GUEST_GAP_NS;
    }
    records
}

/// The guest time of one thread's [`exits_then_entries`]: every entry but the last is followed by
/// an exit.
fn guest_ns(exits: &[(u64, u64, u64)]) -> u64 {
    (exits.len() as u64 - 1) * GUEST_GAP_NS
}

fn repeat(n: usize, exit: (u64, u64, u64)) -> Vec<(u64, u64, u64)> {
    vec![exit; n]
}

#[test]
fn kvm_exit_records_of_every_isa_give_reasons_counts_and_latency_histograms() {
    if !privileged_host("kvm_exit_records_of_every_isa_give_reasons_counts_and_latency_histograms")
    {
        return;
    }
    let base = format!("vmtrace-test-replay-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenants: Vec<TenantCgroup> = ["vmx", "svm", "pvm"]
        .iter()
        .map(|isa| TenantCgroup::new(&format!("{base}/{isa}")))
        .collect();
    let id = |t: &TenantCgroup| std::fs::metadata(&t.path).unwrap().ino();

    // Thread ids far above pid_max, so no real vCPU thread's entry can end these exits.
    let mut vmx_exits = repeat(500, (VMX, 30, 1_500)); // IO_INSTRUCTION, bucket 2^10
    vmx_exits.extend(repeat(20, (VMX, 48, 100_000))); // EPT_VIOLATION, bucket 2^16
    vmx_exits.extend(repeat(3, (VMX, 0x8000_0021, 3_000))); // INVALID_STATE | FAILED_VMENTRY
    vmx_exits.extend(repeat(11, (VMX, 28, 800))); // CR_ACCESS: TLB-relevant
    vmx_exits.extend(repeat(4, (VMX, 14, 900))); // INVLPG: TLB-relevant
    let mut svm_exits = repeat(300, (SVM, 0x7b, 700)); // io, bucket 2^9
    svm_exits.extend(repeat(7, (SVM, 0x400, 40_000))); // npf, bucket 2^15
    svm_exits.extend(repeat(6, (SVM, 0x13, 600))); // write_cr3: TLB-relevant
    let mut pvm_exits = repeat(200, (PVM, 1 << 16, 300)); // syscall, bucket 2^8
    pvm_exits.extend(repeat(9, (PVM, 14, 5_000_000))); // page fault vector, bucket 2^22
    let mut records = exits_then_entries(id(&tenants[0]), 0x4000_0001, &vmx_exits);
    records.extend(exits_then_entries(id(&tenants[1]), 0x4000_0002, &svm_exits));
    records.extend(exits_then_entries(id(&tenants[2]), 0x4000_0003, &pvm_exits));
    // An entry with no exit before it (a vCPU's first entry) records nothing; an exit whose entry
    // is never seen is counted without a latency.
    records.push([1, 0, 0x4000_0004, 5, 0, 0]);
    records.push([0, id(&tenants[2]), 0x4000_0005, 7, PVM, 14]);

    let mut probes = Probes::attach(&host::detect_kvm(), &ProbeOptions::default())
        .expect("attaching the probes");
    let mut counters = Counters::new(&mut probes.ebpf).unwrap();
    probes.replay_kvm_exit(&records).expect("BPF_PROG_TEST_RUN");
    let snapshot = counters.read(&probes.reason_names).unwrap();
    let mut index = CgroupIndex::new(cgroup2_root().unwrap());
    let reported = by_tenant(&snapshot, &mut index);
    let tenant = |t: &TenantCgroup| -> Reported {
        let found = reported
            .iter()
            .find(|r| r.tenant == t.agent_path())
            .unwrap_or_else(|| panic!("{} missing from {reported:#?}", t.agent_path()));
        Reported {
            counts: by_name(&found.counts),
            latency: by_name(&found.latency),
        }
    };
    let counts = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
        pairs
            .iter()
            .map(|(k, v)| (format!("kvm_exit.{k}"), *v))
            .collect()
    };

    let vmx = tenant(&tenants[0]);
    let mut expected = counts(&[
        ("IO_INSTRUCTION", 500),
        ("EPT_VIOLATION", 20),
        (VMX_FAILED_INVALID_STATE, 3),
        ("CR_ACCESS", 11),
        ("INVLPG", 4),
    ]);
    expected.insert("tlb.exit".to_owned(), 15);
    // Guest time: from each entry to the thread's next exit, 10 µs apart in these records.
    expected.insert("cpu.guest".to_owned(), guest_ns(&vmx_exits));
    assert_eq!(vmx.counts, expected);
    let io = &vmx.latency["kvm_exit.IO_INSTRUCTION"];
    assert_eq!(
        (io.count, io.max_ns, io.p50_ns, io.p99_ns),
        (500, 1_500, 1_500, 1_500)
    );
    assert_eq!(io.buckets, vec![(1024, 500)]);
    let ept = &vmx.latency["kvm_exit.EPT_VIOLATION"];
    assert_eq!((ept.count, ept.buckets.clone()), (20, vec![(65_536, 20)]));

    let svm = tenant(&tenants[1]);
    let mut expected = counts(&[("io", 300), ("npf", 7), ("write_cr3", 6)]);
    expected.insert("tlb.exit".to_owned(), 6);
    expected.insert("cpu.guest".to_owned(), guest_ns(&svm_exits));
    assert_eq!(svm.counts, expected);
    assert_eq!(svm.latency["kvm_exit.io"].buckets, vec![(512, 300)]);
    assert_eq!(svm.latency["kvm_exit.npf"].buckets, vec![(32_768, 7)]);

    let pvm = tenant(&tenants[2]);
    let mut expected = counts(&[(PVM_SYSCALL, 200), (PVM_PAGE_FAULT, 10)]);
    expected.insert("cpu.guest".to_owned(), guest_ns(&pvm_exits));
    assert_eq!(pvm.counts, expected);
    assert_eq!(
        pvm.latency[&format!("kvm_exit.{PVM_SYSCALL}")].buckets,
        vec![(256, 200)]
    );
    let pf = &pvm.latency[&format!("kvm_exit.{PVM_PAGE_FAULT}")];
    assert_eq!(
        (pf.count, pf.buckets.clone(), pf.max_ns),
        (9, vec![(4_194_304, 9)], 5_000_000)
    );

    for (name, count) in &snapshot.drops {
        assert_eq!(*count, 0, "events lost: {name}");
    }
}

/// A tenant's counts and latencies by kind name, as the agent reports them.
struct Reported {
    counts: BTreeMap<String, u64>,
    latency: BTreeMap<String, LatencySummary>,
}

fn by_name<V: Clone>(map: &BTreeMap<Kind, V>) -> BTreeMap<String, V> {
    map.iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// VMX basic reason 33 (INVALID_STATE) with the FAILED_VMENTRY flag bit.
const VMX_FAILED_INVALID_STATE: &str = "INVALID_STATE|FAILED_VMENTRY";
/// PVM reason codes: SYSCALL = 1 << 16; exception vector 14 is a page fault.
const PVM_SYSCALL: &str = "syscall";
const PVM_PAGE_FAULT: &str = "PF excp";
