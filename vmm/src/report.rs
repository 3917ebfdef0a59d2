//! The JSON report of ground truth the VMM prints at exit. Other crates parse it with
//! `serde_json::from_str::<vmtrace_vmm::report::Report>(..)`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Scenario;
pub use crate::exits::ExitCounts;
pub use crate::protect::WriteProtectReport;
use crate::usage::Usage;
pub use crate::vfio::{DmaMapping, DmaReport, VfioReport};

/// Everything known for certain about one VMM run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// What the guest did per operation.
    pub scenario: Scenario,
    /// The VMM's process id.
    pub pid: u32,
    /// Requested operations per vCPU (touch: pages per vCPU; balloon: pages written in both
    /// phases).
    pub count: u64,
    /// Requested rate, operations per second per vCPU.
    pub rate: Option<f64>,
    /// The cgroup v2 cgroup the VMM (all its threads) ran in; `None` without a cgroup2 mount.
    pub cgroup: Option<CgroupReport>,
    /// The KVM VM file descriptor number in the VMM process.
    pub vm_fd: i32,
    /// Every ioeventfd registered with KVM_IOEVENTFD.
    pub ioeventfds: Vec<IoEventFdReport>,
    /// One entry per vCPU, by index.
    pub vcpus: Vec<VcpuReport>,
    /// Sums over the vCPUs.
    pub total: TotalReport,
    /// The doorbell eventfd's counter at the end (doorbell scenario only).
    pub doorbell_signals: Option<u64>,
    /// Wall time from starting the first vCPU to the last vCPU stopping.
    pub duration_secs: f64,
    /// Microseconds the run loop slept after every exit before re-entering KVM_RUN (0 = none).
    #[serde(default)]
    pub exit_delay_us: u64,
    /// Milliseconds slept between VM setup and starting the vCPUs (0 = none).
    #[serde(default)]
    pub vm_setup_delay_ms: u64,
    /// The virtio device and its queues (virtio scenario only).
    #[serde(default)]
    pub virtio: Option<VirtioReport>,
    /// The touch region and what happened to it (touch and balloon scenarios only).
    #[serde(default)]
    pub memory: Option<MemoryReport>,
    /// What `--write-protect-cycles` did.
    #[serde(default)]
    pub write_protect: Option<WriteProtectReport>,
    /// The device passed through with `--vfio`, and what was mapped and transferred for it.
    #[serde(default)]
    pub vfio: Option<VfioReport>,
    /// What the kernel accounted to this process, read by the VMM of itself at the end.
    #[serde(default)]
    pub process: ProcessReport,
}

/// The kernel's accounting of this VMM process over three spans, all ending when the vCPU
/// threads have ended. What the process does after that (writing this report, exiting) is in
/// none of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessReport {
    /// Since the process started.
    pub lifetime: Usage,
    /// Since it joined its cgroup (`--cgroup`; without it, since it started): what its cgroup
    /// accounts of it.
    pub in_cgroup: Usage,
    /// Since just before its first `KVM_SET_USER_MEMORY_REGION`, the first ioctl of the three
    /// (memory slot, ioeventfd, KVM_RUN) that make a process a VMM to a tracer of them all.
    pub as_vmm: Usage,
    /// Since just after the first return of its vCPUs' first `KVM_RUN`: a tracer that sees
    /// `KVM_RUN` alone has known it as a VMM for at least this span (all of it, if no vCPU ran).
    /// Absent from reports written before it existed.
    #[serde(default)]
    pub running: Usage,
}

/// The touch region of the `touch` and `balloon` scenarios.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Its KVM memory slot (1).
    pub slot: u32,
    /// Its guest-physical address.
    pub region_gpa: u64,
    /// The host virtual address of its mapping in the VMM process.
    pub region_hva: u64,
    /// Its size (`--mib` MiB).
    pub region_bytes: u64,
    /// The page size the guest touches with and the host faults in (4096).
    pub page_size: u64,
    /// Pages the guest wrote for the first time (every page of the region, all vCPUs).
    pub pages_touched: u64,
    /// Bytes returned to the host: the length of the `madvise(MADV_DONTNEED)` (balloon:
    /// `--balloon-mib` MiB; touch: 0).
    pub bytes_returned: u64,
    /// The host virtual address that `madvise` started at (the region's); `None` for touch.
    pub returned_hva: Option<u64>,
    /// `madvise(MADV_DONTNEED)` calls (balloon: 1; touch: 0).
    pub madvise_calls: u64,
    /// Returned pages the guest wrote again (balloon: `--balloon-mib` x 256; touch: 0).
    pub pages_retouched: u64,
    /// Their bytes (balloon: `--balloon-mib` MiB; touch: 0).
    pub bytes_retouched: u64,
    /// The region's pages resident in host memory (mincore) before the vCPUs started.
    pub resident_pages_before: u64,
    /// The same right after the `madvise` (balloon only).
    pub resident_pages_after_return: Option<u64>,
    /// The same after the vCPUs stopped.
    pub resident_pages_end: u64,
}

/// The virtio-blk device of the `virtio` scenario.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioReport {
    /// Device type and transport: `virtio-blk` over `virtio-mmio`.
    pub device: String,
    /// Guest-physical base of the virtio-mmio register window.
    pub mmio_base: u64,
    /// Size of the window.
    pub mmio_len: u64,
    /// Guest-physical address of QueueNotify, the doorbell of every queue.
    pub notify_addr: u64,
    /// Entries per virtqueue.
    pub queue_size: u16,
    /// Data bytes per request.
    pub request_size: u32,
    /// Size of the memory-backed disk.
    pub disk_bytes: u64,
    /// One entry per queue, by index.
    pub queues: Vec<VirtioQueueReport>,
}

/// One virtqueue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioQueueReport {
    /// Queue index (also the value the guest writes to QueueNotify, the ioeventfd's datamatch).
    pub index: u32,
    /// The vCPU whose guest driver uses this queue (and no other vCPU does).
    pub vcpu: u32,
    /// Where the guest kicks this queue.
    pub notify_addr: u64,
    /// The datamatch of the queue's ioeventfd.
    pub datamatch: u64,
    /// Sum of the values read from the queue's eventfd: every QueueNotify write for it.
    pub kicks: u64,
    /// How many reads of the eventfd returned a value; fewer than `kicks` when several kicks
    /// coalesced into one read.
    pub eventfd_reads: u64,
    /// The guest's own count of its QueueNotify writes for this queue.
    pub guest_kicks: u64,
    /// Descriptor chains (requests) the device served.
    pub requests: u64,
    /// Of which writes (VIRTIO_BLK_T_OUT).
    pub writes: u64,
    /// Of which reads (VIRTIO_BLK_T_IN).
    pub reads: u64,
    /// Data bytes moved between guest memory and the disk.
    pub bytes: u64,
}

/// A cgroup v2 cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupReport {
    /// Its directory, e.g. `/sys/fs/cgroup/unified/t/a`.
    pub path: PathBuf,
    /// Its path inside the hierarchy, as `/proc/PID/cgroup` shows it, e.g. `/t/a`.
    pub relative_path: PathBuf,
    /// Its id: the directory's inode number, as `bpf_get_current_cgroup_id()` returns it.
    pub id: u64,
    /// The cgroup v1 memory controller's cgroup directory the VMM ran in, e.g.
    /// `/sys/fs/cgroup/memory/t/a`, where such a hierarchy is mounted (hybrid hosts); `None`
    /// otherwise.
    #[serde(default)]
    pub memory_v1_path: Option<PathBuf>,
}

/// One KVM_IOEVENTFD registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoEventFdReport {
    /// `mmio` or `pio`.
    pub space: String,
    /// Guest-physical address or port.
    pub addr: u64,
    /// Access length in bytes (0 = any).
    pub len: u32,
    /// Value the write must carry to signal, if any.
    pub datamatch: Option<u64>,
}

/// What one vCPU did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuReport {
    /// vCPU index (also its KVM vCPU id).
    pub index: u32,
    /// Thread id of the host thread that ran it (the one that issued KVM_RUN).
    pub tid: u32,
    /// Operations counted by the guest itself, read back from guest memory.
    pub guest_ops: u64,
    /// Operations the VMM saw as exits (io on port 0x10, mmio at 0xE0000, hlt); `None` where
    /// they do not reach the VMM (doorbell, cpuid).
    pub vmm_observed_ops: Option<u64>,
    /// Every KVM_RUN return by exit reason name.
    pub exits: ExitCounts,
    /// The thread's guest time when its last KVM_RUN had returned, ns (in 10 ms steps: see
    /// [`crate::usage::thread_guest_ns`]).
    #[serde(default)]
    pub guest_ns: u64,
}

/// Sums over all vCPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotalReport {
    /// Sum of the vCPUs' `guest_ops`.
    pub guest_ops: u64,
    /// Sum of the vCPUs' `exits`.
    pub exits: ExitCounts,
}

impl Report {
    /// Parses a report from its JSON text.
    pub fn from_json(text: &str) -> serde_json::Result<Report> {
        serde_json::from_str(text)
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        // A Report has string keys and plain values only, so serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The report as indented JSON.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The vCPU that ran on thread `tid`, if any.
    pub fn vcpu_by_tid(&self, tid: u32) -> Option<&VcpuReport> {
        self.vcpus.iter().find(|v| v.tid == tid)
    }

    /// Microseconds of wall time per operation of one vCPU.
    pub fn micros_per_op(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.duration_secs * 1e6 / self.count as f64
    }
}

/// The exits one vCPU makes when it runs `scenario` for `count` operations, paced or not: what
/// a correct KVM and VMM produce (the VMM checks it never differs in the counts it observes).
pub fn expected_vcpu_exits(scenario: Scenario, count: u64, paced: bool) -> ExitCounts {
    let mut exits = ExitCounts::new();
    let mut add = |reason: &str, n: u64| {
        if n > 0 {
            *exits.entry(reason.to_string()).or_default() += n;
        }
    };
    add("io", 1); // DONE
    if scenario == Scenario::Balloon {
        add("io", 1); // BALLOON
    }
    if paced {
        add("io", count);
    }
    match scenario {
        Scenario::Pio | Scenario::PioIn => add("io", count),
        Scenario::Mmio | Scenario::MmioSweep => add("mmio", count),
        Scenario::Hlt => add("hlt", count),
        Scenario::Virtio => add("mmio", crate::guest::virtio::PROBE_READS),
        // Signal: as many EINTRs as signals arrived in KVM_RUN, at least one per operation.
        Scenario::Signal
        | Scenario::Doorbell
        | Scenario::Cpuid
        | Scenario::Touch
        | Scenario::Balloon => {}
    }
    exits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let vcpu = VcpuReport {
            index: 0,
            tid: 124,
            guest_ops: 1000,
            vmm_observed_ops: Some(1000),
            exits: ExitCounts::from([("io".into(), 1001)]),
            guest_ns: 20_000_000,
        };
        let report = Report {
            scenario: Scenario::Pio,
            pid: 123,
            count: 1000,
            rate: None,
            cgroup: Some(CgroupReport {
                path: "/sys/fs/cgroup/unified/t/a".into(),
                relative_path: "/t/a".into(),
                id: 4242,
                memory_v1_path: Some("/sys/fs/cgroup/memory/t/a".into()),
            }),
            vm_fd: 4,
            ioeventfds: vec![],
            total: TotalReport {
                guest_ops: 1000,
                exits: vcpu.exits.clone(),
            },
            vcpus: vec![vcpu],
            doorbell_signals: None,
            duration_secs: 0.5,
            exit_delay_us: 0,
            vm_setup_delay_ms: 0,
            virtio: None,
            memory: None,
            write_protect: None,
            vfio: None,
            process: ProcessReport {
                lifetime: Usage {
                    user_us: 30_000,
                    minor_faults: 700,
                    ..Usage::default()
                },
                ..ProcessReport::default()
            },
        };
        let json = report.to_json();
        assert!(
            json.starts_with(r#"{"scenario":"pio","pid":123,"#),
            "{json}"
        );
        assert!(json.contains(r#""exits":{"io":1001}"#), "{json}");
        assert_eq!(Report::from_json(&json).unwrap(), report);
        assert_eq!(report.vcpu_by_tid(124).unwrap().index, 0);
        // Reports written before the delays, virtio, the memory and process sections, guest
        // time and the cgroup v1 memory path existed still parse.
        let process = serde_json::to_string(&report.process).unwrap();
        let old = json
            .replace(&format!(r#","process":{process}"#), "")
            .replace(r#","guest_ns":20000000"#, "")
            .replace(r#","exit_delay_us":0"#, "")
            .replace(r#","vm_setup_delay_ms":0"#, "")
            .replace(r#","virtio":null"#, "")
            .replace(r#","memory":null"#, "")
            .replace(r#","memory_v1_path":"/sys/fs/cgroup/memory/t/a""#, "");
        assert!(
            !old.contains("virtio") && !old.contains("memory") && !old.contains("guest_ns"),
            "{old}"
        );
        assert!(
            !old.contains("process") && !old.contains("user_us"),
            "{old}"
        );
        let mut without = report.clone();
        without.cgroup.as_mut().unwrap().memory_v1_path = None;
        without.process = ProcessReport::default();
        without.vcpus[0].guest_ns = 0;
        assert_eq!(Report::from_json(&old).unwrap(), without);
    }

    #[test]
    fn expectations() {
        assert_eq!(
            expected_vcpu_exits(Scenario::Pio, 5, true),
            ExitCounts::from([("io".into(), 11)])
        );
        assert_eq!(
            expected_vcpu_exits(Scenario::Hlt, 5, false),
            ExitCounts::from([("io".into(), 1), ("hlt".into(), 5)])
        );
        assert_eq!(
            expected_vcpu_exits(Scenario::Virtio, 5, true),
            ExitCounts::from([("io".into(), 6), ("mmio".into(), 4)])
        );
        assert_eq!(
            expected_vcpu_exits(Scenario::Touch, 512, false),
            ExitCounts::from([("io".into(), 1)])
        );
        assert_eq!(
            expected_vcpu_exits(Scenario::Balloon, 5, true),
            ExitCounts::from([("io".into(), 7)])
        );
    }
}
