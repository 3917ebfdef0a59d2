//! The contract between the agent and the eBPF object it embeds, checked on the built object itself,
//! parsed but not loaded (no privileges, no BPF system calls): every map, program and global the
//! agent names is in it, each map of the type the agent opens it as, with the key and value sizes of
//! the types it reads it with and the capacity `common` gives it; and the object has no map or
//! program this table does not name.

use std::collections::{BTreeSet, HashMap};

use aya_obj::{
    EbpfSectionKind, Object, ProgramSection,
    generated::bpf_map_type::{
        self, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_RINGBUF,
    },
};
use vmtrace_common::{
    DOORBELLS_CAPACITY, DROP_REASONS, Doorbell, DoorbellAddr, DoorbellKey, EXIT_COUNTS_CAPACITY,
    EXIT_LATENCY_CAPACITY, EventfdKey, ExitKey, ExitStart, GuestEntry, GuestMemory,
    IOMMU_FAULTS_CAPACITY, IommuFaultKey, KickKey, LatencyHistogram, LatencyKey,
    PENDING_KICKS_CAPACITY, PendingKick, REMOVED_DOORBELLS_CAPACITY, ReturnedRanges,
    THREAD_EXITS_CAPACITY, THREAD_SLOTS, ThreadExitKey, ThreadSlot, VMM_MEMORY_CAPACITY,
    VMM_PROCESSES_CAPACITY,
    names::{maps, programs},
};

use super::{
    load::OBJECT,
    spec::{PROBES, Reads},
};

/// A map as the agent and the kernel side must both see it.
struct MapSpec {
    name: &'static str,
    map_type: bpf_map_type,
    key_size: usize,
    /// Per CPU for the per-CPU maps.
    value_size: usize,
    /// `None` where `common` has no constant for it.
    max_entries: Option<u32>,
}

const fn map<K, V>(name: &'static str, map_type: bpf_map_type, max: Option<u32>) -> MapSpec {
    MapSpec {
        name,
        map_type,
        key_size: size_of::<K>(),
        value_size: size_of::<V>(),
        max_entries: max,
    }
}

/// A ring buffer has neither key nor value: its records are sized when written.
const fn ring_buffer(name: &'static str) -> MapSpec {
    MapSpec {
        name,
        map_type: BPF_MAP_TYPE_RINGBUF,
        key_size: 0,
        value_size: 0,
        max_entries: None,
    }
}

const MAPS: &[MapSpec] = &[
    map::<ExitKey, u64>(
        maps::EXIT_COUNTS,
        BPF_MAP_TYPE_PERCPU_HASH,
        Some(EXIT_COUNTS_CAPACITY),
    ),
    map::<LatencyKey, LatencyHistogram>(
        maps::EXIT_LATENCY,
        BPF_MAP_TYPE_PERCPU_HASH,
        Some(EXIT_LATENCY_CAPACITY),
    ),
    map::<u32, u64>(maps::DROPS, BPF_MAP_TYPE_PERCPU_ARRAY, Some(DROP_REASONS)),
    map::<DoorbellKey, Doorbell>(maps::DOORBELLS, BPF_MAP_TYPE_HASH, Some(DOORBELLS_CAPACITY)),
    map::<DoorbellKey, u64>(
        maps::KICKS,
        BPF_MAP_TYPE_PERCPU_HASH,
        Some(DOORBELLS_CAPACITY),
    ),
    map::<DoorbellAddr, u32>(
        maps::DOORBELL_ADDRS,
        BPF_MAP_TYPE_HASH,
        Some(DOORBELLS_CAPACITY),
    ),
    map::<DoorbellKey, Doorbell>(
        maps::REMOVED_DOORBELLS,
        BPF_MAP_TYPE_HASH,
        Some(REMOVED_DOORBELLS_CAPACITY),
    ),
    ring_buffer(maps::CGROUP_EVENTS),
    map::<u32, u64>(
        maps::VMM_PROCESSES,
        BPF_MAP_TYPE_HASH,
        Some(VMM_PROCESSES_CAPACITY),
    ),
    map::<IommuFaultKey, u64>(
        maps::IOMMU_FAULTS,
        BPF_MAP_TYPE_PERCPU_HASH,
        Some(IOMMU_FAULTS_CAPACITY),
    ),
    map::<ThreadExitKey, u64>(
        maps::THREAD_EXITS,
        BPF_MAP_TYPE_PERCPU_HASH,
        Some(THREAD_EXITS_CAPACITY),
    ),
    map::<u32, [u8; 16]>(
        maps::THREAD_NAMES,
        BPF_MAP_TYPE_HASH,
        Some(THREAD_EXITS_CAPACITY),
    ),
    map::<u32, ExitStart>(maps::EXIT_STARTS, BPF_MAP_TYPE_ARRAY, Some(THREAD_SLOTS)),
    map::<u32, ThreadSlot>(maps::THREAD_STATE, BPF_MAP_TYPE_ARRAY, Some(THREAD_SLOTS)),
    map::<u32, GuestEntry>(maps::GUEST_ENTRIES, BPF_MAP_TYPE_ARRAY, Some(THREAD_SLOTS)),
    map::<KickKey, u64>(
        maps::INFERRED_KICKS,
        BPF_MAP_TYPE_PERCPU_HASH,
        Some(DOORBELLS_CAPACITY),
    ),
    map::<EventfdKey, PendingKick>(
        maps::PENDING_KICKS,
        BPF_MAP_TYPE_LRU_HASH,
        Some(PENDING_KICKS_CAPACITY),
    ),
    map::<u32, ReturnedRanges>(maps::RETURNED, BPF_MAP_TYPE_HASH, Some(VMM_MEMORY_CAPACITY)),
    map::<u32, GuestMemory>(
        maps::GUEST_MEMORY,
        BPF_MAP_TYPE_HASH,
        Some(VMM_MEMORY_CAPACITY),
    ),
];

/// How a program is attached, as its section says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    RawTracePoint,
    TracePoint,
}

/// Every program the agent loads: the probe table's, and the replay programs it runs through
/// `BPF_PROG_TEST_RUN` without attaching them.
fn programs() -> Vec<(&'static str, Attach)> {
    let replays = [programs::REPLAY_KVM_EXIT, programs::REPLAY_IO_PAGE_FAULT];
    PROBES
        .iter()
        .map(|spec| {
            let attach = match spec.reads {
                Reads::Raw { .. } => Attach::RawTracePoint,
                Reads::Classic { .. } => Attach::TracePoint,
            };
            (spec.program, attach)
        })
        .chain(replays.map(|name| (name, Attach::RawTracePoint)))
        .collect()
}

/// The globals the agent overrides at load, all `u32`: the probe table's field offsets and the
/// switches.
fn globals() -> BTreeSet<&'static str> {
    let mut globals = BTreeSet::from([vmtrace_common::names::globals::SWITCHES]);
    for spec in PROBES {
        if let Reads::Classic { fields } = spec.reads {
            globals.extend(fields.iter().map(|field| field.global));
        }
    }
    globals
}

fn object() -> Object {
    Object::parse(OBJECT).expect("the embedded eBPF object parses")
}

/// The data sections (`.rodata`, `.bss`, `.data`) are maps too, holding the globals.
fn is_data_section(map: &aya_obj::Map) -> bool {
    matches!(
        map.section_kind(),
        EbpfSectionKind::Rodata | EbpfSectionKind::Data | EbpfSectionKind::Bss
    )
}

#[test]
fn every_map_has_the_type_sizes_and_capacity_the_agent_expects() {
    let object = object();
    let mut problems = Vec::new();
    for spec in MAPS {
        let Some(map) = object.maps.get(spec.name) else {
            problems.push(format!("no map `{}`", spec.name));
            continue;
        };
        let expected = (
            spec.map_type as u32,
            spec.key_size as u32,
            spec.value_size as u32,
        );
        let found = (map.map_type(), map.key_size(), map.value_size());
        if found != expected {
            problems.push(format!(
                "map `{}`: (type, key size, value size) is {found:?}, the agent expects {expected:?}",
                spec.name
            ));
        }
        if let Some(max) = spec.max_entries
            && map.max_entries() != max
        {
            problems.push(format!(
                "map `{}` has {} entries, common says {max}",
                spec.name,
                map.max_entries()
            ));
        }
    }
    let named: BTreeSet<&str> = MAPS.iter().map(|spec| spec.name).collect();
    for (name, map) in &object.maps {
        if !is_data_section(map) && !named.contains(name.as_str()) {
            problems.push(format!(
                "map `{name}` is not in vmtrace_common::names::maps"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_program_is_there_with_its_attach_type() {
    let object = object();
    let mut problems = Vec::new();
    for &(name, attach) in &programs() {
        let Some(program) = object.programs.get(name) else {
            problems.push(format!("no program `{name}`"));
            continue;
        };
        let found = match program.section {
            ProgramSection::RawTracePoint => Some(Attach::RawTracePoint),
            ProgramSection::TracePoint => Some(Attach::TracePoint),
            _ => None,
        };
        if found != Some(attach) {
            problems.push(format!(
                "program `{name}` is in a {:?} section, the agent attaches it as {attach:?}",
                program.section
            ));
        }
    }
    let named: BTreeSet<&str> = programs().iter().map(|&(name, _)| name).collect();
    for name in object.programs.keys() {
        if !named.contains(name.as_str()) {
            problems.push(format!(
                "program `{name}` is neither in the probe table nor a replay program"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_global_the_agent_sets_is_a_u32_in_the_object() {
    // The loader's own check: override_global with `must_exist` fails on a missing global and on
    // one whose size differs from the value's.
    let mut object = object();
    let value = [0u8; size_of::<u32>()];
    let problems: Vec<String> = globals()
        .into_iter()
        .filter_map(|name| {
            let globals = HashMap::from([(name, (&value[..], true))]);
            object
                .patch_map_data(globals)
                .err()
                .map(|e| format!("global `{name}`: {e}"))
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
