//! Command line and VM configuration. [`Cli`] is what the user typed; [`VmmConfig`] is the
//! validated description of the VM that [`crate::Vmm::try_from`] turns into live KVM objects.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::layout::{
    MAX_VCPUS_BY_LAYOUT, MAX_VCPUS_WITH_WRITE_PROTECT, MIB, PAGES_PER_MIB, SWEEP_ADDRESSES,
    VIRTIO_BUFFERS_END, VIRTIO_BUFFERS_GPA, VIRTIO_MAX_QUEUES,
};
use crate::region;

/// What the guest does once per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// `out 0x10, al`: one KVM_EXIT_IO to the VMM per operation.
    Pio,
    /// `in al, 0x10`: one KVM_EXIT_IO (a read, which the VMM answers) per operation.
    #[serde(rename = "pio-in")]
    #[value(name = "pio-in")]
    PioIn,
    /// Byte write to the unbacked GPA 0xE0000: one KVM_EXIT_MMIO to the VMM per operation.
    Mmio,
    /// Byte write to a new unbacked address every operation, from GPA 0x80000000 up (32-bit
    /// addresses in unreal mode; vCPU i writes 0x80000000 + i, then every --vcpus bytes): one
    /// KVM_EXIT_MMIO to the VMM per operation, never twice at one address. --count x --vcpus is
    /// at most 2147483648.
    #[serde(rename = "mmio-sweep")]
    MmioSweep,
    /// Byte write to GPA 0xE1000, an ioeventfd doorbell (KVM_IOEVENTFD, MMIO, len 1, no
    /// datamatch): completed in the kernel, no exit to the VMM; the eventfd counts the writes.
    Doorbell,
    /// `cpuid` with EAX=0: handled in the kernel, no exit to the VMM.
    Cpuid,
    /// `hlt`: one KVM_EXIT_HLT to the VMM per operation (there is no in-kernel irqchip).
    Hlt,
    /// The guest spins until EBX changes; a thread of the VMM sends the vCPU thread SIGUSR1
    /// every 500 µs, KVM_RUN returns EINTR, and the VMM writes the count of EINTRs it has seen
    /// into EBX before it re-enters. Each change the guest sees is one operation, so there is at
    /// least one EINTR per operation (a signal that arrives outside KVM_RUN makes none); the
    /// report gives every EINTR the VMM saw (`intr`).
    Signal,
    /// One virtio-blk request per operation on a virtio-mmio device at GPA 0xD0000: the guest
    /// driver fills a descriptor chain, publishes it on the available ring, kicks QueueNotify
    /// (a 4-byte write completed in the kernel by the queue's ioeventfd, datamatch = queue
    /// index) and polls the used ring; a VMM worker thread moves the data.
    Virtio,
    /// One byte (0x5A) written at the start of every 4 KiB page of a --mib MiB region of fresh
    /// anonymous host memory (KVM slot 1 at GPA 0x1000000, MADV_NOHUGEPAGE), through 32-bit
    /// addresses with a 4 GiB DS limit ("unreal mode"): one operation per page, each the
    /// page's first touch (one host page fault), no exit to the VMM. vCPU i writes pages i,
    /// i + --vcpus, ... (--vcpus must divide the --mib x 256 pages); --count does not apply.
    Touch,
    /// One vCPU touches every page of the --mib MiB region as in touch, then writes port 0x15
    /// (BALLOON): there the VMM returns the first --balloon-mib MiB to the host with one
    /// madvise(MADV_DONTNEED) and re-enters, and the guest writes 0xA5 into every page of
    /// those MiB again (each a new first touch for the host), then DONE. Operations are the
    /// pages written in both phases; --count does not apply.
    Balloon,
}

impl Scenario {
    /// Every scenario, in a fixed order.
    pub const ALL: [Scenario; 11] = [
        Scenario::Pio,
        Scenario::PioIn,
        Scenario::Mmio,
        Scenario::MmioSweep,
        Scenario::Doorbell,
        Scenario::Cpuid,
        Scenario::Hlt,
        Scenario::Signal,
        Scenario::Virtio,
        Scenario::Touch,
        Scenario::Balloon,
    ];

    /// The lowercase name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Pio => "pio",
            Scenario::PioIn => "pio-in",
            Scenario::Mmio => "mmio",
            Scenario::MmioSweep => "mmio-sweep",
            Scenario::Doorbell => "doorbell",
            Scenario::Cpuid => "cpuid",
            Scenario::Hlt => "hlt",
            Scenario::Signal => "signal",
            Scenario::Virtio => "virtio",
            Scenario::Touch => "touch",
            Scenario::Balloon => "balloon",
        }
    }

    /// Whether the guest writes pages of the touch region (touch, balloon) instead of doing
    /// --count operations.
    pub fn touches_memory(self) -> bool {
        matches!(self, Scenario::Touch | Scenario::Balloon)
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const AFTER_HELP: &str = "\
Each vCPU runs the same real-mode loop at 0x1000: one operation, then `inc dword [edi]` (the
guest's own counter at 0x8000 + 4*vCPU), `dec esi`, loop; at the end it writes port 0x11 (DONE)
and the VMM stops that vCPU. With --rate the guest also writes port 0x12 (PACE) after every
operation and the VMM sleeps there to hold the rate.

VIRTIO SCENARIO (--scenario virtio): one operation is one virtio-blk request. The device is a
virtio-mmio transport (virtio 1.x \"modern\", version 2) at GPA 0xD0000 whose block device is a
disk in VMM memory; it has --queues split virtqueues of 16 entries. Queue q belongs to vCPU
q mod --vcpus, so --queues must be at least --vcpus and no two vCPUs ever share a ring; each
vCPU goes round-robin over its own queues. The VMM does the driver's initialisation itself,
from the host side but through the same register handlers the guest's MMIO exits reach, as the
driver would: reset, ACKNOWLEDGE, DRIVER, features VERSION_1 + MQ, FEATURES_OK, then per queue
QueueSel, QueueNum, descriptor/driver/device ring addresses (in guest RAM at 0x10000 +
0x400*q), QueueReady, and finally DRIVER_OK. It registers one ioeventfd per queue on
QueueNotify (0xD0050, MMIO, length 4, datamatch = queue index). Each vCPU's driver program
(its own copy, packed from 0x1000) first reads MagicValue, Version, DeviceID and Status (four
MMIO read exits the VMM serves), then per request: writes the header (even requests OUT =
write, odd requests IN = read back of the same sectors), a chain of three descriptors (header,
--request-size data bytes, status byte), puts the head on the available ring, bumps avail.idx,
writes the queue index to QueueNotify (a 4-byte MMIO write the ioeventfd completes in the
kernel: no exit), counts the kick, polls used.idx, then checks the used entry, the status byte
and, after a read, that the data came back (it writes port 0x14 with a reason code if not). A
VMM worker thread waits in epoll on the queues' eventfds, reads each one (the value is the
number of kicks since the last read), serves every available descriptor chain with rust-vmm's
virtio-queue and writes the used ring. There are no interrupts (no irqchip): the guest polls.

TOUCH AND BALLOON SCENARIOS (--scenario touch|balloon): the guest RAM gets a second KVM memory
slot (slot 1) at GPA 0x1000000 (16 MiB): --mib MiB of its own anonymous mapping, which nothing
has touched, with madvise(MADV_NOHUGEPAGE) so that the host faults it in 4 KiB page by 4 KiB
page whatever the transparent huge page setting. The vCPUs start with a 4 GiB DS limit
(\"unreal mode\") and EBX = the address of their first page, and per page run `mov byte
[ebx], al` (32-bit address), `inc dword [edi]`, `add ebx, stride`, `dec esi`, `dec ecx`,
`jnz`. One operation is one page written, so --count does not apply: touch writes 0x5A into
every page once, vCPU i taking pages i, i + --vcpus, ... (--vcpus must divide --mib x 256);
balloon (one vCPU) does the same, then writes port 0x15 (BALLOON), where the VMM, on the vCPU
thread, returns the first --balloon-mib MiB to the host with exactly one
madvise(MADV_DONTNEED) and re-enters KVM_RUN; the guest then writes 0xA5 into every page of
those MiB again (the retouch) and writes DONE. At the end the VMM reads the first byte of every
page: 0xA5 in the returned MiB, 0x5A elsewhere.

REPORT (JSON, one line unless --pretty; written only if all ground truth agrees):
  scenario           the scenario name
  pid                the VMM's process id
  count, rate        the requested operations per vCPU and rate (ops/s per vCPU, or null);
                     touch: the pages each vCPU writes (--mib x 256 / --vcpus); balloon: the
                     pages written in both phases ((--mib + --balloon-mib) x 256)
  cgroup             {path, relative_path, id, memory_v1_path}: the cgroup v2 directory the VMM
                     ran in, its path inside the hierarchy and its id (the directory's inode
                     number, what bpf_get_current_cgroup_id() returns); memory_v1_path is the
                     cgroup v1 memory controller's directory the VMM ran in when such a
                     hierarchy is mounted (hybrid hosts: with --cgroup the VMM also joins the
                     same path there, as systemd does, so memory is charged to the tenant in
                     both hierarchies), else null; cgroup is null if no cgroup v2 is mounted
  vm_fd              the KVM VM file descriptor number in the VMM process
  ioeventfds         [{space, addr, len, datamatch}] registered with KVM_IOEVENTFD (virtio:
                     one per queue, addr 0xD0050, len 4, datamatch = queue index)
  vcpus[]            {index, tid, guest_ops, vmm_observed_ops, exits}: tid is the vCPU thread's
                     id (it issues KVM_RUN), guest_ops the guest's own counter read back from
                     guest memory (touch, balloon: pages written, the retouched ones included),
                     vmm_observed_ops the operations the VMM saw as exits (null where they are
                     not visible to it: doorbell, cpuid, virtio, touch, balloon), exits the
                     count of every KVM_RUN return by reason (io, mmio, hlt, intr, shutdown,
                     ...), including the DONE, PACE and BALLOON port writes and the virtio
                     probe reads
  total              {guest_ops, exits} summed over the vCPUs
  doorbell_signals   the doorbell eventfd's counter at the end (doorbell scenario), else null
  duration_secs      wall time from the first vCPU start to the last vCPU stop
  exit_delay_us      the --exit-delay-us the run loop slept after every exit (0 = none)
  vm_setup_delay_ms  the --vm-setup-delay-ms slept before the vCPUs started (0 = none)
  write_protect      (with --write-protect-cycles, else null) {gpa, hva, cycles,
                     cycles_while_vcpus_ran}: the page written once, then write-protected and
                     made writable again `cycles` times (two mprotect calls each), of which
                     `cycles_while_vcpus_ran` before any vCPU finished
  virtio             (virtio scenario, else null) {device, mmio_base, mmio_len, notify_addr,
                     queue_size, request_size, disk_bytes, queues[]}; queues[] is {index, vcpu,
                     notify_addr, datamatch, kicks, eventfd_reads, guest_kicks, requests, writes,
                     reads, bytes} per queue: kicks is the sum of the values read from the
                     queue's eventfd (by the worker, plus any left at the end), eventfd_reads
                     how many of those reads returned a value (fewer than kicks when kicks
                     coalesced), guest_kicks the guest's own count of its QueueNotify writes,
                     requests the descriptor chains the device served (writes + reads), bytes
                     the data moved (requests x request_size)
  memory             (touch and balloon, else null) the touch region:
    slot               its KVM memory slot (1)
    region_gpa         its guest-physical address (0x1000000)
    region_hva         the host virtual address of its mapping in the VMM process
    region_bytes       its size (--mib MiB)
    page_size          4096: the guest writes one byte per page, the host faults in 4 KiB pages
    pages_touched      pages the guest wrote for the first time: --mib x 256, all vCPUs together
    bytes_returned     the length of the madvise(MADV_DONTNEED) that returned memory to the host
                       (balloon: --balloon-mib MiB; touch: 0)
    returned_hva       the host address that madvise started at (the region's; touch: null)
    madvise_calls      MADV_DONTNEED calls (balloon: 1; touch: 0)
    pages_retouched    returned pages the guest wrote again (balloon: --balloon-mib x 256;
                       touch: 0); they are counted in guest_ops too
    bytes_retouched    their bytes (balloon: --balloon-mib MiB; touch: 0)
    resident_pages_before
                       the region's pages resident in host memory (mincore(2)) when the vCPUs
                       start: 0, the memory is fresh
    resident_pages_after_return
                       the same right after the madvise (balloon: (--mib - --balloon-mib) x
                       256; touch: null)
    resident_pages_end the same after the vCPUs stopped: --mib x 256 (the resident_pages_*
                       are measurements: they would be lower if the host reclaimed pages)
  vfio               (with --vfio, else null) the passed-through device:
    device, group      its PCI address and IOMMU group (/dev/vfio/<group>)
    mappings[]         {iova, gpa, bytes} per VFIO_IOMMU_MAP_DMA: a page each
    maps, map_bytes    VFIO_IOMMU_MAP_DMA calls and bytes (4, 16384): each one IOMMU mapping,
                       one iommu:map event
    unmaps, unmap_bytes
                       VFIO_IOMMU_UNMAP_DMA calls and bytes, at the end (4, 16384); the
                       container's setup (VFIO_SET_IOMMU) maps and unmaps a probe of its own,
                       not counted here (docs/iommu.md)
    dma                (with --vfio-dma, else null) {transfers, bytes, unmapped_transfers,
                       unmapped_iova}: the edu device's DMA through mapped IOVAs (2 transfers
                       of 2 KiB, the data checked) and to the unmapped IOVA 0x400000 (1)

The VMM fails (exit status 1, no report) if a guest counter differs from the requested count or
from what the VMM observed, or on an unexpected exit; for virtio also if, for any queue, kicks,
guest_kicks and requests differ from each other or from the plan, if bytes differ from requests
x request_size, or if any byte of the disk or of the guest's buffers differs from the pattern
the requests must have left; for touch and balloon if any page's first byte differs from the
pattern the guest must have written last, or if the BALLOON exit did not come exactly once;
with --vfio-dma if the page the device moved did not arrive whole.
Usage errors exit with status 2.";

/// Default `--queues`.
pub const DEFAULT_QUEUES: u32 = 2;
/// Default `--request-size`.
pub const DEFAULT_REQUEST_SIZE: u32 = 4096;
/// Sector size: `--request-size` must be a multiple of it.
pub const SECTOR_SIZE: u32 = 512;
/// Largest `--request-size`.
pub const MAX_REQUEST_SIZE: u32 = 0x1_0000;
/// Largest `--exit-delay-us` (1 s).
pub const MAX_EXIT_DELAY_US: u64 = 1_000_000;
/// Largest `--vm-setup-delay-ms` (1 h).
pub const MAX_VM_SETUP_DELAY_MS: u64 = 3_600_000;
/// Default `--count`.
pub const DEFAULT_COUNT: u64 = 10_000;
/// Default `--mib`.
pub const DEFAULT_MIB: u32 = 16;
/// Largest `--mib`.
pub const MAX_MIB: u32 = 1024;

/// Reference VMM for vmtrace: runs a tiny real-mode KVM guest that performs a known number of
/// operations, then prints a JSON report of the ground truth (guest operations, exits by reason,
/// vCPU thread ids, cgroup id, virtio kicks per queue) for checking what a tracer saw.
#[derive(Debug, Clone, Parser)]
#[command(name = "vmtrace-vmm", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// What the guest does once per operation
    #[arg(long, value_enum)]
    pub scenario: Scenario,

    /// Number of vCPUs, each run by its own host thread
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u32,

    /// Operations per vCPU (1 to 4294967295); here each guest instruction costs about 1 µs.
    /// For virtio: requests per vCPU. Not for touch and balloon, whose operations are the
    /// pages of --mib [default: 10000]
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// touch and balloon only: MiB of fresh guest memory the guest touches, one byte per 4 KiB
    /// page, 1 to 1024 [default: 16]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub mib: Option<u32>,

    /// balloon only: MiB at the start of the region that the VMM returns to the host
    /// (madvise(MADV_DONTNEED)) and the guest then touches again, 1 to --mib [default: half
    /// of --mib, rounded up]
    #[arg(long, value_name = "M", allow_negative_numbers = true)]
    pub balloon_mib: Option<u32>,

    /// Hold each vCPU to at most this many operations per second (adds one PACE port exit per
    /// operation, counted in the report like any other exit)
    #[arg(long, value_name = "OPS", allow_negative_numbers = true)]
    pub rate: Option<f64>,

    /// virtio only: number of virtqueues, 1 to 32 and at least --vcpus; queue q belongs to
    /// vCPU q mod --vcpus [default: 2]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub queues: Option<u32>,

    /// virtio only: data bytes per request, a multiple of 512 from 512 to 65536 (the vCPUs'
    /// buffers, 2 x BYTES each, must fit in the 704 KiB below the device) [default: 4096]
    #[arg(long, value_name = "BYTES", allow_negative_numbers = true)]
    pub request_size: Option<u32>,

    /// A slow VMM: after every exit to userspace the vCPU thread sleeps N µs (at least; up to
    /// 1000000) before it re-enters KVM_RUN
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub exit_delay_us: u64,

    /// Sleep N ms after creating the VM and registering its ioeventfds, before starting the
    /// vCPUs (e.g. to start a tracer after setup); unless --quiet, a line on stderr says when
    /// the sleep starts
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub vm_setup_delay_ms: u64,

    /// While the vCPUs run, a VMM thread write-protects a page of guest RAM (GPA 0xF000, which no
    /// guest program uses) and makes it writable again N times: each write-protection is one
    /// TLB flush of the VMM's address space, on its CPU and by IPI on the others that run it
    /// (0 = none; --vcpus at most 7168)
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub write_protect_cycles: u64,

    /// Run in this cgroup v2 cgroup, created if absent: an absolute directory inside the cgroup2
    /// mount, or a path relative to the cgroup2 mount point found in /proc/self/mountinfo. The
    /// VMM moves its whole process there before it creates the VM. Where the memory controller
    /// is a cgroup v1 hierarchy (hybrid hosts) it also joins the same path there, created if
    /// absent.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Pass the PCI device at BDF (e.g. 0000:00:03.0, bound to vfio-pci) through to the VM, as
    /// a VMM passes a NIC VF or a GPU: its IOMMU group is opened in a VFIO type1 container and
    /// guest memory is mapped for its DMA (four VFIO_IOMMU_MAP_DMA of a page each, GPA 0x9000
    /// to 0xCFFF at IOVA 0x100000, 0x200000, 0x300000 and 0x380000), unmapped when the VM ends.
    /// Not with --scenario virtio or --write-protect-cycles; --vcpus at most 1024
    #[arg(long, value_name = "BDF")]
    pub vfio: Option<String>,

    /// With --vfio on QEMU's edu device (1234:11e8): DMA a page from one mapping into the
    /// device and back into another (checked), then to IOVA 0x400000, which is not mapped: one
    /// I/O page fault for the IOMMU
    #[arg(long, requires = "vfio")]
    pub vfio_dma: bool,

    /// Write the JSON report to FILE instead of stdout
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// Indent the JSON report
    #[arg(long)]
    pub pretty: bool,

    /// Do not print the one-line summary on stderr
    #[arg(long, short)]
    pub quiet: bool,
}

/// Validated description of one VM run. Build it with [`VmmConfig::new`] and struct update
/// syntax, or from the command line with `VmmConfig::try_from(&cli)`.
#[derive(Debug, Clone, PartialEq)]
pub struct VmmConfig {
    /// What the guest does per operation.
    pub scenario: Scenario,
    /// Number of vCPUs (threads).
    pub vcpus: u32,
    /// Operations per vCPU. Ignored by touch and balloon, whose operations are pages: see
    /// [`VmmConfig::ops_per_vcpu`].
    pub count: u64,
    /// Optional rate limit, operations per second per vCPU.
    pub rate: Option<f64>,
    /// Optional cgroup v2 path to move the process into (see [`Cli::cgroup`]).
    pub cgroup: Option<PathBuf>,
    /// Virtqueues of the virtio device (virtio scenario only).
    pub queues: u32,
    /// Data bytes per virtio-blk request (virtio scenario only).
    pub request_size: u32,
    /// Microseconds the run loop sleeps after every exit before re-entering KVM_RUN.
    pub exit_delay_us: u64,
    /// Milliseconds to sleep between VM setup and starting the vCPUs.
    pub vm_setup_delay_ms: u64,
    /// Size of the touch region in MiB (touch and balloon only).
    pub mib: u32,
    /// MiB returned to the host and touched again (balloon only); `None` = half of `mib`,
    /// rounded up.
    pub balloon_mib: Option<u32>,
    /// Times a VMM thread write-protects the page at `WRITE_PROTECT_GPA` while the vCPUs run.
    pub write_protect_cycles: u64,
    /// The PCI device (BDF) passed through with VFIO (see [`Cli::vfio`]).
    pub vfio: Option<String>,
    /// Whether the passed-through edu device does its DMA transfers (see [`Cli::vfio_dma`]).
    pub vfio_dma: bool,
}

impl VmmConfig {
    /// The defaults of the command line: 1 vCPU, 10000 operations, no rate, no cgroup, 2
    /// queues of 4096-byte requests (virtio), no delays, a 16 MiB region of which half is
    /// returned (touch, balloon).
    pub fn new(scenario: Scenario) -> Self {
        VmmConfig {
            scenario,
            vcpus: 1,
            count: DEFAULT_COUNT,
            rate: None,
            cgroup: None,
            queues: DEFAULT_QUEUES,
            request_size: DEFAULT_REQUEST_SIZE,
            exit_delay_us: 0,
            vm_setup_delay_ms: 0,
            mib: DEFAULT_MIB,
            balloon_mib: None,
            write_protect_cycles: 0,
            vfio: None,
            vfio_dma: false,
        }
    }

    /// MiB the balloon scenario returns: `balloon_mib`, or half of `mib` rounded up.
    pub fn balloon_mib(&self) -> u32 {
        self.balloon_mib.unwrap_or(self.mib.div_ceil(2))
    }

    /// What the touch and balloon guests do, `None` for the other scenarios (not validated:
    /// see [`VmmConfig::validate`]).
    pub fn region_plan(&self) -> Option<region::Plan> {
        let returned_mib = match self.scenario {
            Scenario::Touch => 0,
            Scenario::Balloon => self.balloon_mib(),
            _ => return None,
        };
        Some(region::Plan {
            vcpus: self.vcpus,
            region_bytes: u64::from(self.mib) * MIB,
            returned_bytes: u64::from(returned_mib) * MIB,
        })
    }

    /// Operations each vCPU does: `count`, or for touch and balloon the pages it writes.
    pub fn ops_per_vcpu(&self) -> u64 {
        match self.region_plan() {
            Some(plan) if self.vcpus > 0 => plan.ops_per_vcpu(),
            _ => self.count,
        }
    }

    /// Checks what can be checked without KVM.
    fn validate_vfio(&self) -> Result<(), Error> {
        if self.vfio.is_none() {
            if self.vfio_dma {
                return Err(Error::Config("--vfio-dma needs --vfio <BDF>".into()));
            }
            return Ok(());
        }
        let max_vcpus = ((crate::vfio::DMA_GPA - crate::layout::COUNTERS_GPA) / 4) as u32;
        if self.scenario == Scenario::Virtio {
            Err(Error::Config(
                "--vfio maps guest memory that --scenario virtio's rings and buffers use".into(),
            ))
        } else if self.write_protect_cycles > 0 {
            Err(Error::Config(
                "--vfio maps the page --write-protect-cycles write-protects (GPA 0xF000)".into(),
            ))
        } else if self.vcpus > max_vcpus {
            Err(Error::Config(format!(
                "--vfio needs --vcpus {max_vcpus} or fewer: the counters of more vCPUs reach the \
                 guest memory it maps (GPA 0x9000)"
            )))
        } else {
            Ok(())
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 {
            return Err(Error::Config("--vcpus must be at least 1".into()));
        }
        if self.vcpus > MAX_VCPUS_BY_LAYOUT {
            return Err(Error::Config(format!(
                "--vcpus {} is too many: the guest layout has room for {MAX_VCPUS_BY_LAYOUT}",
                self.vcpus
            )));
        }
        if self.write_protect_cycles > 0 && self.vcpus > MAX_VCPUS_WITH_WRITE_PROTECT {
            return Err(Error::Config(format!(
                "--write-protect-cycles needs --vcpus {MAX_VCPUS_WITH_WRITE_PROTECT} or fewer: the \
                 counters of more vCPUs reach the page it write-protects"
            )));
        }
        self.validate_vfio()?;
        if self.scenario.touches_memory() {
            self.validate_region()?;
        } else if self.count == 0 {
            return Err(Error::Config("--count must be at least 1".into()));
        } else if self.count > u64::from(u32::MAX) {
            return Err(Error::Config(format!(
                "--count {} is too large: the guest counts in 32 bits, use at most {}",
                self.count,
                u32::MAX
            )));
        }
        if self.scenario == Scenario::MmioSweep
            && self.count.saturating_mul(u64::from(self.vcpus)) > SWEEP_ADDRESSES
        {
            return Err(Error::Config(format!(
                "--scenario mmio-sweep writes --count x --vcpus distinct addresses below 4 GiB: \
                 at most {SWEEP_ADDRESSES}, not {} x {}",
                self.count, self.vcpus
            )));
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(Error::Config(format!(
                "--rate {rate} is not a positive number of operations per second"
            )));
        }
        if let Some(path) = &self.cgroup
            && path.as_os_str().is_empty()
        {
            return Err(Error::Config("--cgroup must not be empty".into()));
        }
        if self.exit_delay_us > MAX_EXIT_DELAY_US {
            return Err(Error::Config(format!(
                "--exit-delay-us {} is too large: use at most {MAX_EXIT_DELAY_US} (1 s)",
                self.exit_delay_us
            )));
        }
        if self.vm_setup_delay_ms > MAX_VM_SETUP_DELAY_MS {
            return Err(Error::Config(format!(
                "--vm-setup-delay-ms {} is too large: use at most {MAX_VM_SETUP_DELAY_MS} (1 h)",
                self.vm_setup_delay_ms
            )));
        }
        if self.scenario == Scenario::Virtio {
            self.validate_virtio()?;
        }
        Ok(())
    }

    fn validate_region(&self) -> Result<(), Error> {
        if self.mib == 0 || self.mib > MAX_MIB {
            return Err(Error::Config(format!(
                "--mib {} is out of range: use 1 to {MAX_MIB}",
                self.mib
            )));
        }
        if self.scenario == Scenario::Balloon {
            if self.vcpus != 1 {
                return Err(Error::Config(format!(
                    "--scenario balloon runs on one vCPU, not --vcpus {}",
                    self.vcpus
                )));
            }
            let m = self.balloon_mib();
            if m == 0 || m > self.mib {
                return Err(Error::Config(format!(
                    "--balloon-mib {m} is out of range: use 1 to --mib ({})",
                    self.mib
                )));
            }
        } else {
            let pages = u64::from(self.mib) * PAGES_PER_MIB;
            if !pages.is_multiple_of(u64::from(self.vcpus)) {
                return Err(Error::Config(format!(
                    "--mib {} has {pages} pages, which --vcpus {} cannot share evenly: use a                      vCPU count that divides {pages}",
                    self.mib, self.vcpus
                )));
            }
        }
        Ok(())
    }

    fn validate_virtio(&self) -> Result<(), Error> {
        if self.queues == 0 || self.queues > VIRTIO_MAX_QUEUES {
            return Err(Error::Config(format!(
                "--queues {} is out of range: use 1 to {VIRTIO_MAX_QUEUES}",
                self.queues
            )));
        }
        if self.queues < self.vcpus {
            return Err(Error::Config(format!(
                "--queues {} is fewer than --vcpus {}: every vCPU needs a queue of its own",
                self.queues, self.vcpus
            )));
        }
        let size = self.request_size;
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) || size > MAX_REQUEST_SIZE {
            return Err(Error::Config(format!(
                "--request-size {size} is not a multiple of {SECTOR_SIZE} from {SECTOR_SIZE} to \
                 {MAX_REQUEST_SIZE}"
            )));
        }
        let room = VIRTIO_BUFFERS_END - VIRTIO_BUFFERS_GPA;
        let needed = 2 * u64::from(self.vcpus) * u64::from(size);
        if needed > room {
            return Err(Error::Config(format!(
                "--request-size {size} with --vcpus {} needs {} KiB of guest buffers (2 per \
                 vCPU), more than the {} KiB real mode leaves: use a smaller --request-size or \
                 fewer vCPUs",
                self.vcpus,
                needed / 1024,
                room / 1024
            )));
        }
        Ok(())
    }

    /// The delay after every exit, if any.
    pub fn exit_delay(&self) -> Option<Duration> {
        (self.exit_delay_us > 0).then(|| Duration::from_micros(self.exit_delay_us))
    }

    /// The delay between VM setup and the vCPUs' start, if any.
    pub fn vm_setup_delay(&self) -> Option<Duration> {
        (self.vm_setup_delay_ms > 0).then(|| Duration::from_millis(self.vm_setup_delay_ms))
    }
}

impl TryFrom<&Cli> for VmmConfig {
    type Error = Error;

    fn try_from(cli: &Cli) -> Result<Self, Error> {
        if cli.scenario != Scenario::Virtio {
            for (flag, given) in [
                ("--queues", cli.queues.is_some()),
                ("--request-size", cli.request_size.is_some()),
            ] {
                if given {
                    return Err(Error::Config(format!(
                        "{flag} applies to --scenario virtio only, not {}",
                        cli.scenario
                    )));
                }
            }
        }
        let scenario = cli.scenario;
        let memory = scenario.touches_memory();
        let misplaced = [
            (
                memory && cli.count.is_some(),
                format!(
                    "--count does not apply to --scenario {scenario}: its operations are the \
                     pages of --mib"
                ),
            ),
            (
                !memory && cli.mib.is_some(),
                format!("--mib applies to --scenario touch and balloon only, not {scenario}"),
            ),
            (
                scenario != Scenario::Balloon && cli.balloon_mib.is_some(),
                format!("--balloon-mib applies to --scenario balloon only, not {scenario}"),
            ),
        ];
        if let Some((_, msg)) = misplaced.into_iter().find(|(wrong, _)| *wrong) {
            return Err(Error::Config(msg));
        }
        let mut config = VmmConfig {
            scenario: cli.scenario,
            vcpus: cli.vcpus,
            count: cli.count.unwrap_or(DEFAULT_COUNT),
            rate: cli.rate,
            cgroup: cli.cgroup.clone(),
            queues: cli.queues.unwrap_or(DEFAULT_QUEUES),
            request_size: cli.request_size.unwrap_or(DEFAULT_REQUEST_SIZE),
            exit_delay_us: cli.exit_delay_us,
            vm_setup_delay_ms: cli.vm_setup_delay_ms,
            write_protect_cycles: cli.write_protect_cycles,
            mib: cli.mib.unwrap_or(DEFAULT_MIB),
            balloon_mib: cli.balloon_mib,
            vfio: cli.vfio.clone(),
            vfio_dma: cli.vfio_dma,
        };
        config.validate()?;
        // The configuration says what runs: for touch and balloon, the pages.
        config.count = config.ops_per_vcpu();
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmmConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("vmtrace-vmm").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        VmmConfig::try_from(&cli).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(&["--scenario", "pio"]).unwrap();
        assert_eq!(c, VmmConfig::new(Scenario::Pio));
    }

    #[test]
    fn rejects_impossible_requests() {
        assert!(parse(&["--scenario", "pio", "--count", "0"]).is_err());
        assert!(parse(&["--scenario", "pio", "--count", "4294967296"]).is_err());
        assert!(parse(&["--scenario", "pio", "--vcpus", "0"]).is_err());
        assert!(parse(&["--scenario", "pio", "--rate", "0"]).is_err());
        assert!(parse(&["--scenario", "pio", "--rate", "NaN"]).is_err());
        assert!(parse(&["--scenario", "nope"]).is_err());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--scenario", "pio", "--exit-delay-us", "1000001"]).is_err());
        assert!(parse(&["--scenario", "pio", "--vm-setup-delay-ms", "3600001"]).is_err());
        // Two vCPUs of 2^30 addresses fill the 2 GiB below 4 GiB; one more does not fit.
        let sweep = |vcpus: &str, count: &str| {
            parse(&[
                "--scenario",
                "mmio-sweep",
                "--vcpus",
                vcpus,
                "--count",
                count,
            ])
        };
        assert!(sweep("2", "1073741824").is_ok());
        let err = sweep("3", "1073741824").unwrap_err();
        assert!(err.contains("distinct addresses"), "{err}");
        // The write-protected page sits above the counters of 7168 vCPUs.
        let protect = |vcpus: &str| {
            parse(&[
                "--scenario",
                "pio",
                "--vcpus",
                vcpus,
                "--write-protect-cycles",
                "1",
            ])
        };
        assert!(protect("7168").is_ok());
        let err = protect("7169").unwrap_err();
        assert!(err.contains("--vcpus 7168 or fewer"), "{err}");
    }

    #[test]
    fn virtio_flags() {
        let c = parse(&["--scenario", "virtio"]).unwrap();
        assert_eq!((c.queues, c.request_size), (2, 4096));
        let c = parse(&[
            "--scenario",
            "virtio",
            "--vcpus",
            "2",
            "--queues",
            "4",
            "--request-size",
            "512",
            "--exit-delay-us",
            "20",
            "--vm-setup-delay-ms",
            "5",
        ])
        .unwrap();
        assert_eq!((c.vcpus, c.queues, c.request_size), (2, 4, 512));
        assert_eq!(c.exit_delay(), Some(Duration::from_micros(20)));
        assert_eq!(c.vm_setup_delay(), Some(Duration::from_millis(5)));
        let bad: [&[&str]; 8] = [
            &["--queues", "0"],
            &["--queues", "33"],
            &["--vcpus", "3", "--queues", "2"],
            &["--request-size", "0"],
            &["--request-size", "1000"],
            &["--request-size", "65537"],
            &["--request-size", "131072"],
            &["--vcpus", "8", "--queues", "8", "--request-size", "65536"],
        ];
        for args in bad {
            let mut all = vec!["--scenario", "virtio"];
            all.extend(args);
            assert!(parse(&all).is_err(), "{args:?} was accepted");
        }
        for flag in ["--queues", "--request-size"] {
            let err = parse(&["--scenario", "pio", flag, "1024"]).unwrap_err();
            assert!(err.contains("virtio only"), "{err}");
        }
    }

    #[test]
    fn touch_and_balloon_flags() {
        let c = parse(&["--scenario", "touch"]).unwrap();
        assert_eq!((c.mib, c.count, c.ops_per_vcpu()), (16, 4096, 4096));
        let c = parse(&["--scenario", "touch", "--mib", "2", "--vcpus", "4"]).unwrap();
        assert_eq!((c.mib, c.count), (2, 128));
        let plan = c.region_plan().unwrap();
        assert_eq!((plan.pages(), plan.returned_bytes), (512, 0));
        let c = parse(&["--scenario", "touch", "--mib", "1024", "--vcpus", "3"]);
        assert!(c.unwrap_err().contains("cannot share evenly"));
        // Balloon: M defaults to half of N, rounded up; operations are both phases' pages.
        let c = parse(&["--scenario", "balloon"]).unwrap();
        assert_eq!((c.mib, c.balloon_mib(), c.count), (16, 8, (16 + 8) * 256));
        let c = parse(&["--scenario", "balloon", "--mib", "1"]).unwrap();
        assert_eq!(c.balloon_mib(), 1);
        let c = parse(&["--scenario", "balloon", "--mib", "4", "--balloon-mib", "2"]).unwrap();
        assert_eq!((c.balloon_mib, c.count), (Some(2), 1536));
        assert_eq!(c.region_plan().unwrap().returned_pages(), 512);
        let c = parse(&["--scenario", "balloon", "--mib", "5", "--balloon-mib", "5"]).unwrap();
        assert_eq!(c.count, 2560);
        assert_eq!(
            parse(&["--scenario", "balloon", "--rate", "100"])
                .unwrap()
                .rate,
            Some(100.0)
        );

        let bad: [(&[&str], &str); 18] = [
            (
                &["--scenario", "touch", "--mib", "0"],
                "--mib 0 is out of range",
            ),
            (&["--scenario", "touch", "--mib", "1025"], "use 1 to 1024"),
            (&["--scenario", "touch", "--mib", "-1"], "--mib"),
            (&["--scenario", "balloon", "--mib", "0"], "--mib 0"),
            (
                &["--scenario", "touch", "--count", "5"],
                "--count does not apply",
            ),
            (
                &["--scenario", "balloon", "--count", "5"],
                "--count does not apply",
            ),
            (
                &["--scenario", "pio", "--mib", "4"],
                "touch and balloon only",
            ),
            (&["--scenario", "virtio", "--mib", "4"], "not virtio"),
            (
                &["--scenario", "touch", "--balloon-mib", "1"],
                "balloon only, not touch",
            ),
            (&["--scenario", "hlt", "--balloon-mib", "1"], "balloon only"),
            (
                &["--scenario", "balloon", "--mib", "4", "--balloon-mib", "5"],
                "use 1 to --mib (4)",
            ),
            // Without --mib the region is 16 MiB.
            (
                &["--scenario", "balloon", "--balloon-mib", "17"],
                "use 1 to --mib (16)",
            ),
            (
                &["--scenario", "balloon", "--balloon-mib", "0"],
                "--balloon-mib 0",
            ),
            (&["--scenario", "balloon", "--vcpus", "2"], "one vCPU"),
            (&["--scenario", "pio", "--vfio-dma"], "--vfio <BDF>"),
            (
                &["--scenario", "virtio", "--vfio", "0000:00:04.0"],
                "--scenario virtio's rings",
            ),
            (
                &[
                    "--scenario",
                    "pio",
                    "--vfio",
                    "0000:00:04.0",
                    "--write-protect-cycles",
                    "3",
                ],
                "write-protects",
            ),
            (
                &[
                    "--scenario",
                    "pio",
                    "--vfio",
                    "0000:00:04.0",
                    "--vcpus",
                    "1025",
                ],
                "--vcpus 1024 or fewer",
            ),
        ];
        for (args, needle) in bad {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
        }
        // A library configuration's count is ignored for touch, checked for the others.
        let c = VmmConfig {
            count: 0,
            mib: 1,
            ..VmmConfig::new(Scenario::Touch)
        };
        assert!(c.validate().is_ok());
        assert_eq!(c.ops_per_vcpu(), 256);
        assert!(
            VmmConfig {
                count: 0,
                ..VmmConfig::new(Scenario::Pio)
            }
            .validate()
            .is_err()
        );
        assert_eq!(VmmConfig::new(Scenario::Pio).region_plan(), None);
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
