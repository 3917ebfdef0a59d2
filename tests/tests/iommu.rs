//! IOMMU faults and mappings. No IOMMU exists on the hosts this project runs its tests on, so
//! `iommu:io_page_fault` cannot fire: the in-kernel logic is driven for real through
//! `BPF_PROG_TEST_RUN` with synthetic faults, and the agent side (attribution to tenants, metrics)
//! is checked on a recorded stream from a host with one.

use std::collections::BTreeMap;

use serde_json::json;
use vmtrace::{
    export::metrics::{self, AgentHealth, IOMMU_FAULTS, IOMMU_MAPPED, IOMMU_MAPPINGS, Value},
    host,
    probe::counters::{Counters, IommuFaults},
    probe::load::{ProbeOptions, Probes},
    sample::sampler::Sample,
};
use vmtrace_tests::privileged_host;

#[test]
fn synthetic_iommu_faults_are_counted_per_device_and_flags_in_the_kernel() {
    if !privileged_host("synthetic_iommu_faults_are_counted_per_device_and_flags_in_the_kernel") {
        return;
    }
    let mut probes = Probes::attach(&host::detect_kvm(), &ProbeOptions::default())
        .expect("attaching the probes");
    for tracepoint in ["iommu:io_page_fault", "iommu:map", "iommu:unmap"] {
        let status = probes
            .status
            .iter()
            .find(|s| s.tracepoint == tracepoint)
            .unwrap_or_else(|| panic!("{tracepoint} is not among the probes"));
        assert_eq!(status.error, None, "{tracepoint} did not attach");
    }
    let mut counters = Counters::new(&mut probes.ebpf).unwrap();
    // Names far from any real device of this host, so a real fault cannot mix in.
    for _ in 0..5 {
        probes.replay_io_page_fault("ffff:65:00.0", 2).unwrap();
    }
    for _ in 0..3 {
        probes.replay_io_page_fault("ffff:65:00.0", 1).unwrap();
    }
    // The longest name a key holds, and one more byte is refused with a clear error.
    let longest = "d".repeat(vmtrace_common::DEVICE_NAME_LEN - 1);
    probes.replay_io_page_fault(&longest, 1).unwrap();
    let err = probes
        .replay_io_page_fault(&"d".repeat(vmtrace_common::DEVICE_NAME_LEN), 1)
        .unwrap_err();
    assert!(err.to_string().contains("longer than 31 bytes"), "{err}");

    let snapshot = counters.read(&probes.reason_names).unwrap();
    let mine: Vec<&IommuFaults> = snapshot
        .iommu_faults
        .iter()
        .filter(|f| f.device.starts_with("ffff:") || f.device == longest)
        .collect();
    let fault = |device: &str, flags: u32, faults: u64| IommuFaults {
        device: device.to_owned(),
        flags,
        faults,
    };
    assert_eq!(
        mine,
        vec![
            &fault(&longest, 1, 1),
            &fault("ffff:65:00.0", 1, 3),
            &fault("ffff:65:00.0", 2, 5),
        ]
    );
    assert_eq!(snapshot.drops["iommu_fault_lost"], 0);
}

/// Samples as an agent on a host with an IOMMU records them: a VMM mapping guest memory for a VFIO
/// device (iommu.* counts in its tenant) and faults of its device attributed to it.
#[test]
fn a_recorded_iommu_stream_becomes_tenant_metrics() {
    let sample: Sample = serde_json::from_value(json!({
        "timestamp": 1735787046.0, "elapsed_secs": 1.0, "interval_secs": 1.0, "kvm": "vmx",
        "exit_source": "kvm_exit", "drops": {}, "last": false,
        "tenants": [{
            "tenant": "vm/db", "identity": {"kind": "libvirt_vm", "name": "db"},
            "cgroups": [{"id": 4243, "path": "/machine.slice/machine-qemu\\x2d2\\x2ddb.scope"}],
            "counts": {"iommu.map": 12, "iommu.map_bytes": 50331648, "iommu.unmap": 2,
                       "iommu.unmap_bytes": 4194304},
            "rates": {}
        }],
        "iommu_faults": [
            {"tenant": "vm/db", "device": "0000:65:00.0", "flags": 2, "faults": 7},
            {"tenant": "unattributed", "device": "0000:66:00.0", "flags": 1, "faults": 1}
        ]
    }))
    .expect("a recorded sample");
    let families = metrics::families(&sample, &AgentHealth::default());
    let points = |def: metrics::MetricDef| -> BTreeMap<String, u64> {
        families
            .iter()
            .find(|f| f.def == def)
            .unwrap()
            .points
            .iter()
            .map(|p| {
                let labels: Vec<String> = p
                    .attributes
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let Value::Int(v) = p.value else {
                    panic!("{} is not an integer", def.name)
                };
                (labels.join(","), v)
            })
            .collect()
    };
    assert_eq!(
        points(IOMMU_FAULTS),
        BTreeMap::from([
            (
                "tenant=unattributed,tenant.name=unattributed,iommu.device=0000:66:00.0,iommu.flags=1".to_owned(),
                1
            ),
            (
                "tenant=vm/db,tenant.name=vm/db,vm.name=db,iommu.device=0000:65:00.0,iommu.flags=2".to_owned(),
                7
            ),
        ])
    );
    assert_eq!(
        points(IOMMU_MAPPINGS),
        BTreeMap::from([
            (
                "tenant=vm/db,tenant.name=vm/db,vm.name=db,iommu.operation=map".to_owned(),
                12
            ),
            (
                "tenant=vm/db,tenant.name=vm/db,vm.name=db,iommu.operation=unmap".to_owned(),
                2
            ),
        ])
    );
    assert_eq!(
        points(IOMMU_MAPPED),
        BTreeMap::from([
            (
                "tenant=vm/db,tenant.name=vm/db,vm.name=db,iommu.operation=map".to_owned(),
                50331648
            ),
            (
                "tenant=vm/db,tenant.name=vm/db,vm.name=db,iommu.operation=unmap".to_owned(),
                4194304
            ),
        ])
    );
}
