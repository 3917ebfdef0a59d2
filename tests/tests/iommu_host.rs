//! A real IOMMU: Debian's 6.1 kernel booted as the emulated host (tests/src/svm_host.rs) on a q35
//! machine with QEMU's AMD IOMMU, and again with its Intel one, each with QEMU's `edu` PCI device.
//! The edu device is bound to vfio-pci; one tenant's reference VMM takes it through VFIO
//! (`--vfio`), maps guest memory for its DMA and drives its DMA engine, twice through mapped IOVAs
//! (the data it carries is checked) and once to an IOVA it never mapped. Another tenant's VMM runs
//! without a device. The kernel's own trace of the `iommu:*` events (tracefs) is the record the
//! agent's counts are held to; docs/iommu.md says what each emulated IOMMU does with the fault.

use std::{collections::BTreeMap, sync::OnceLock};

use vmtrace_tests::{
    have,
    svm_host::{self, Iommu, Run},
};
use vmtrace_vmm::Report;

/// The tenant whose VMM holds the device, and the one without.
const WITH_DEVICE: &str = "dma";
const WITHOUT_DEVICE: &str = "plain";

/// The guest's job: bind the edu device to vfio-pci, start `watch --json`, run both tenants'
/// VMMs one after the other, then stop watch for its last report.
const JOB: &str = r#"echo "+cpu +memory" > /sys/fs/cgroup/cgroup.subtree_control
edu=
for device in /sys/bus/pci/devices/*; do
    [ "$(cat $device/vendor):$(cat $device/device)" = "0x1234:0x11e8" ] && edu=$(basename $device)
done
emit edu echo $edu
echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id
emit group readlink /sys/bus/pci/devices/$edu/iommu_group
emit vfio ls /dev/vfio
emit doctor vmtrace doctor
echo 1 > /sys/kernel/tracing/events/iommu/enable
vmtrace watch --json --interval 200ms > /tmp/watch.json 2> /tmp/watch.err &
watch=$!
tries=0
until grep -q "vmtrace: watching" /tmp/watch.err; do
    tries=$((tries + 1))
    [ $tries -gt 600 ] && break
    sleep 0.2
done
mkdir -p /sys/fs/cgroup/dma /sys/fs/cgroup/plain
# The device's VMM holds it a while after its DMA, so that the agent's attribution can find it.
emit vmm.dma vmtrace-vmm --scenario pio --count 300 --cgroup dma --vfio $edu --vfio-dma --vm-setup-delay-ms 1500 --quiet
emit vmm.plain vmtrace-vmm --scenario pio --count 300 --cgroup plain --quiet
sleep 3
kill -INT $watch
wait $watch
emit watch tail -n 1 /tmp/watch.json
emit watch.stderr cat /tmp/watch.err
emit trace cat /sys/kernel/tracing/trace
emit dmesg dmesg
"#;

/// Debian 12's kernel on a machine with `iommu`, booted once for all the tests of this process.
fn run(iommu: Iommu) -> &'static Run {
    static AMD: OnceLock<Run> = OnceLock::new();
    static INTEL: OnceLock<Run> = OnceLock::new();
    let cell = match iommu {
        Iommu::Amd => &AMD,
        Iommu::Intel => &INTEL,
    };
    cell.get_or_init(|| {
        let kernel = svm_host::offered_kernels()
            .into_iter()
            .find(|k| k.release().starts_with("6.1."))
            .expect("apt offers no Debian 12 kernel (linux-image-6.1.0-*-amd64)");
        let run = svm_host::boot_with_iommu(&kernel, iommu, JOB);
        assert!(
            !run.sections.contains_key("insmod.failed"),
            "{iommu:?}: modules failed to load: {:?}\n{}",
            run.section("insmod.failed"),
            run.console
        );
        run
    })
}

fn can_boot(test: &str) -> bool {
    vmtrace_tests::privileged_host(test)
        && have(
            test,
            svm_host::qemu_available(),
            "qemu-system-x86_64, apt-get and dpkg-deb are needed (cargo xtask setup installs them)",
        )
}

fn report(run: &Run, iommu: Iommu, tenant: &str) -> Report {
    let section = format!("vmm.{tenant}");
    assert_eq!(
        run.status(&section),
        0,
        "{iommu:?}: vmtrace-vmm for {tenant} failed: {}\ndmesg:\n{}",
        run.text(&section),
        run.text("dmesg")
    );
    serde_json::from_str(&run.text(&section))
        .unwrap_or_else(|e| panic!("{iommu:?}: {tenant}'s report: {e}: {}", run.text(&section)))
}

/// The agent's last `watch --json` report.
fn last_report(run: &Run, iommu: Iommu) -> serde_json::Value {
    let text = run.text("watch");
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{iommu:?}: the last watch report: {e}: {text}\nwatch's stderr:\n{}",
            run.text("watch.stderr")
        )
    })
}

/// One `map` or `unmap` event of the kernel's trace.
#[derive(Debug)]
struct TraceEvent {
    pid: u32,
    event: String,
    iova: u64,
    /// `size` of a map, `unmapped_size` of an unmap: what vmtrace counts as bytes.
    bytes: u64,
}

/// The `iommu:*` events of the guest's trace buffer, e.g. `vmtrace-vmm-161 [000] ..... 5.85:
/// map: IOMMU: iova=0x100000 - 0x101000 paddr=0x107654000 size=4096`.
fn trace_events(run: &Run) -> Vec<TraceEvent> {
    run.section("trace")
        .iter()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let task = words.next()?;
            let pid = task.rsplit('-').next()?.parse().ok()?;
            // The first `name:` after the timestamp (`5.85:`).
            let event = words
                .filter_map(|w| w.strip_suffix(':'))
                .find(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))?
                .to_owned();
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| match v.strip_prefix("0x") {
                        Some(hex) => u64::from_str_radix(hex, 16).ok(),
                        None => v.parse().ok(),
                    })
            };
            let bytes = match event.as_str() {
                "map" => field("size=")?,
                "unmap" => field("unmapped_size=")?,
                _ => 0,
            };
            Some(TraceEvent {
                pid,
                event,
                iova: field("iova=").unwrap_or(0),
                bytes,
            })
        })
        .collect()
}

/// Events and bytes of kind `event` among `events`.
fn tally<'a>(events: impl Iterator<Item = &'a TraceEvent>, event: &str) -> (u64, u64) {
    events
        .filter(|e| e.event == event)
        .fold((0, 0), |(n, bytes), e| (n + 1, bytes + e.bytes))
}

fn iommu_counts(last: &serde_json::Value, tenant: &str) -> BTreeMap<String, u64> {
    vmtrace_tests::all_agent_counts(last, &format!("/{tenant}"))
        .unwrap_or_else(|| panic!("tenant /{tenant} not reported: {last}"))
        .into_iter()
        .filter(|(kind, _)| kind.starts_with("iommu."))
        .collect()
}

#[test]
fn a_tenants_dma_mappings_are_counted_exactly_and_a_tenant_without_a_device_has_none() {
    let test = "a_tenants_dma_mappings_are_counted_exactly_and_a_tenant_without_a_device_has_none";
    if !can_boot(test) {
        return;
    }
    for iommu in [Iommu::Amd, Iommu::Intel] {
        let run = run(iommu);
        let vmm = report(run, iommu, WITH_DEVICE);
        let vfio = vmm.vfio.as_ref().expect("the VMM's vfio report");
        let dma = vfio.dma.as_ref().expect("the VMM's DMA report");
        assert_eq!((vfio.maps, dma.transfers), (4, 2), "{iommu:?}: {vfio:?}");
        let events = trace_events(run);
        let of_vmm: Vec<&TraceEvent> = events.iter().filter(|e| e.pid == vmm.pid).collect();
        let at_its_iovas = || {
            of_vmm
                .iter()
                .copied()
                .filter(|e| vfio.mappings.iter().any(|m| m.iova == e.iova))
        };
        // The kernel made exactly the mappings the VMM says it asked for...
        assert_eq!(
            (tally(at_its_iovas(), "map"), tally(at_its_iovas(), "unmap")),
            ((vfio.maps, vfio.map_bytes), (vfio.unmaps, vfio.unmap_bytes)),
            "{iommu:?}: the kernel's trace of the VMM's IOVAs: {of_vmm:?}"
        );
        // ...and the agent counts for the tenant every one the kernel made in its VMM's
        // ioctls: those and the container's own (VFIO_SET_IOMMU probes a new domain with a
        // mapping at IOVA 0, docs/iommu.md).
        let (maps, map_bytes) = tally(of_vmm.iter().copied(), "map");
        let (unmaps, unmap_bytes) = tally(of_vmm.iter().copied(), "unmap");
        let last = last_report(run, iommu);
        let counts = iommu_counts(&last, WITH_DEVICE);
        let expected: BTreeMap<String, u64> = [
            ("iommu.map", maps),
            ("iommu.map_bytes", map_bytes),
            ("iommu.unmap", unmaps),
            ("iommu.unmap_bytes", unmap_bytes),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(counts, expected, "{iommu:?}: /{WITH_DEVICE}");
        let _ = report(run, iommu, WITHOUT_DEVICE);
        assert_eq!(
            iommu_counts(&last, WITHOUT_DEVICE),
            BTreeMap::new(),
            "{iommu:?}: /{WITHOUT_DEVICE} holds no device"
        );
        eprintln!(
            "{iommu:?}: /{WITH_DEVICE} {counts:?} (the VMM: {} maps, {} bytes; {} unmaps, {} \
             bytes; {} DMA transfers checked, {} to an unmapped IOVA); /{WITHOUT_DEVICE} none",
            vfio.maps,
            vfio.map_bytes,
            vfio.unmaps,
            vfio.unmap_bytes,
            dma.transfers,
            dma.unmapped_transfers
        );
    }
}

/// The DMA to an unmapped IOVA reaches no probe on either emulated IOMMU, for the reasons
/// docs/iommu.md gives from their sources: QEMU 7.2's AMD IOMMU logs no event, and Linux's VT-d
/// driver reports its fault in the kernel log only. There the agent counts it from the log, for
/// the tenant whose VMM holds the device. Should the AMD side change, this fails, and the fault
/// must then be counted through `iommu:io_page_fault`.
#[test]
fn the_devices_fault_at_an_unmapped_iova_is_counted_where_the_kernel_reports_it() {
    if !can_boot("the_devices_fault_at_an_unmapped_iova_is_counted_where_the_kernel_reports_it") {
        return;
    }
    for iommu in [Iommu::Amd, Iommu::Intel] {
        let run = run(iommu);
        let vmm = report(run, iommu, WITH_DEVICE);
        let dma = vmm.vfio.as_ref().and_then(|v| v.dma.as_ref()).unwrap();
        assert_eq!(dma.unmapped_transfers, 1);
        let events = trace_events(run);
        let traced: Vec<&TraceEvent> = events
            .iter()
            .filter(|e| e.event == "io_page_fault")
            .collect();
        assert!(
            traced.is_empty(),
            "{iommu:?}: iommu:io_page_fault fired ({traced:?}): it must now be counted for \
             /{WITH_DEVICE}"
        );
        let dmesg = run.text("dmesg");
        let edu = run.text("edu").trim().to_owned();
        let logged: Vec<&str> = dmesg
            .lines()
            .filter(|l| l.contains("DMAR: [DMA Write NO_PASID] Request device"))
            .collect();
        let last = last_report(run, iommu);
        let counted: Vec<serde_json::Value> =
            last["iommu_faults"].as_array().cloned().unwrap_or_default();
        let doctor = run.text("doctor");
        let probe = doctor
            .lines()
            .find(|l| l.contains("iommu:io_page_fault"))
            .unwrap_or_else(|| panic!("{iommu:?}: doctor lists no iommu:io_page_fault:\n{doctor}"));
        match iommu {
            Iommu::Amd => {
                assert!(
                    !dmesg.contains("IO_PAGE_FAULT") && logged.is_empty(),
                    "AMD: the kernel logged an I/O page fault, which QEMU 7.2 never reports: \
                     {dmesg}"
                );
                assert_eq!(counted, Vec::<serde_json::Value>::new(), "AMD: {last}");
                assert_eq!(
                    last["drops"].get("iommu_fault_log_lost"),
                    None,
                    "AMD: {last}"
                );
                assert!(!probe.contains("silent here"), "AMD: doctor: {probe}");
            }
            Iommu::Intel => {
                // One DMA, one fault: the device's address, the IOVA, and a write.
                let bus_device = edu.trim_start_matches("0000:");
                assert!(
                    logged.len() == 1
                        && logged[0].contains(&format!("[{bus_device}]"))
                        && logged[0].contains(&format!("fault addr {:#x}", dma.unmapped_iova)),
                    "Intel: the kernel logged {logged:?} for one DMA of {edu} to {:#x}",
                    dma.unmapped_iova
                );
                let expected = serde_json::json!([{
                    "tenant": format!("/{WITH_DEVICE}"),
                    "device": edu,
                    "flags": 1,
                    "faults": dma.unmapped_transfers,
                }]);
                assert_eq!(
                    serde_json::Value::Array(counted.clone()),
                    expected,
                    "Intel: the agent's IOMMU faults"
                );
                assert_eq!(last["drops"]["iommu_fault_log_lost"], 0, "Intel: {last}");
                assert!(
                    probe.contains(
                        "silent here: Intel VT-d reports IOMMU faults in the kernel log only; \
                         they are counted from its DMAR lines"
                    ),
                    "Intel: doctor: {probe}"
                );
            }
        }
        eprintln!(
            "{iommu:?}: kernel log {logged:?}; the agent's IOMMU faults {counted:?}; doctor: \
             {probe}"
        );
    }
}
