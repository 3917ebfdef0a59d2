//! Guest-physical memory layout and I/O ports shared by the guest programs and the VMM.

/// Size of the guest RAM at GPA 0.
pub const MEM_SIZE: usize = 0x1_0000;
/// Where the guest program is loaded; every vCPU starts here with CS base 0.
pub const CODE_GPA: u64 = 0x1000;
/// Start of the per-vCPU 32-bit operation counters: vCPU `i` counts at `COUNTERS_GPA + 4 * i`.
pub const COUNTERS_GPA: u64 = 0x8000;
/// How many vCPU counters fit between [`COUNTERS_GPA`] and the end of guest RAM.
pub const MAX_VCPUS_BY_LAYOUT: u32 = ((MEM_SIZE as u64 - COUNTERS_GPA) / 4) as u32;

/// The page of guest RAM that `--write-protect-cycles` write-protects: no guest program uses it
/// (the vCPU counters below it end there at most).
pub const WRITE_PROTECT_GPA: u64 = 0xF000;
/// vCPUs whose counters end below [`WRITE_PROTECT_GPA`].
pub const MAX_VCPUS_WITH_WRITE_PROTECT: u32 = ((WRITE_PROTECT_GPA - COUNTERS_GPA) / 4) as u32;

/// Port written once per operation in the `pio` scenario.
pub const OP_PORT: u16 = 0x10;
/// Port the guest writes when it has finished; the VMM stops that vCPU.
pub const DONE_PORT: u16 = 0x11;
/// Port written after every operation when a rate is set; the VMM sleeps there to hold it.
pub const PACE_PORT: u16 = 0x12;

/// Real-mode segment through which the guest reaches the MMIO window (base 0xE0000).
pub const MMIO_SEGMENT: u16 = 0xE000;
/// Unbacked address written once per operation in the `mmio` scenario (exits to the VMM).
pub const MMIO_GPA: u64 = 0xE_0000;
/// Address of the ioeventfd doorbell written once per operation in the `doorbell` scenario.
pub const DOORBELL_GPA: u64 = 0xE_1000;
/// Length registered for the doorbell ioeventfd.
pub const DOORBELL_LEN: u32 = 1;

/// Guest address of vCPU `index`'s operation counter.
pub fn counter_gpa(index: u32) -> u64 {
    COUNTERS_GPA + 4 * u64::from(index)
}

/// Port the virtio guest driver writes, with a reason code in AL, when it finds something wrong
/// (see [`crate::guest::virtio::FailCode`]); the VMM turns it into an error.
pub const FAIL_PORT: u16 = 0x14;

/// Port the `balloon` guest writes between its two phases; the VMM returns the first
/// `--balloon-mib` MiB of the touch region to the host there (one `madvise(MADV_DONTNEED)`).
/// (0x13 is left unused: tests write it as a port no scenario accepts.)
pub const BALLOON_PORT: u16 = 0x15;

/// Guest-physical base of the `touch` and `balloon` scenarios' region: 16 MiB, far above what
/// real-mode segments reach (the guest uses 32-bit addresses with a 4 GiB DS limit).
pub const TOUCH_REGION_GPA: u64 = 0x100_0000;
/// The `mmio-sweep` scenario's first address: unbacked, above the largest touch region
/// (`TOUCH_REGION_GPA` + 1 GiB), and with 2 GiB of addresses below 4 GiB after it.
pub const SWEEP_GPA: u64 = 0x8000_0000;
/// Addresses the `mmio-sweep` scenario may write, from [`SWEEP_GPA`] to 4 GiB.
pub const SWEEP_ADDRESSES: u64 = 0x8000_0000;
/// KVM memory slot of the touch region (slot 0 is the guest RAM at GPA 0).
pub const TOUCH_REGION_SLOT: u32 = 1;
/// The page size the guest touches with and the host faults in (base pages: no THP).
pub const PAGE_SIZE: u64 = 4096;
/// Bytes per MiB, the unit of `--mib` and `--balloon-mib`.
pub const MIB: u64 = 1 << 20;
/// Pages per MiB.
pub const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE;
/// Byte the guest writes at the start of every page on its first touch (phase 1).
pub const TOUCH_PATTERN: u8 = 0x5A;
/// Byte the `balloon` guest writes at the start of every returned page when it touches it
/// again (phase 2).
pub const RETOUCH_PATTERN: u8 = 0xA5;

/// Guest RAM of the `virtio` scenario: everything below the device window (real mode reaches
/// 1 MiB through segments; the other scenarios use [`MEM_SIZE`]).
pub const VIRTIO_MEM_SIZE: usize = 0xD_0000;
/// Guest-physical base of the virtio-mmio register window (unbacked: accesses exit to the VMM,
/// except QueueNotify writes, which the queues' ioeventfds complete in the kernel).
pub const VIRTIO_MMIO_GPA: u64 = 0xD_0000;
/// Real-mode segment through which the guest reaches the virtio-mmio window.
pub const VIRTIO_MMIO_SEGMENT: u16 = 0xD000;
/// Size of the virtio-mmio window (registers 0x000-0x0FF, device config from 0x100).
pub const VIRTIO_MMIO_LEN: u64 = 0x1000;
/// Offset of the QueueNotify register in the virtio-mmio window.
pub const VIRTIO_QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Guest-physical address of QueueNotify: the doorbell, one ioeventfd per queue on it.
pub const VIRTIO_NOTIFY_GPA: u64 = VIRTIO_MMIO_GPA + VIRTIO_QUEUE_NOTIFY_OFFSET;
/// Length of the QueueNotify write and of its ioeventfds.
pub const VIRTIO_NOTIFY_LEN: u32 = 4;

/// Code area of the `virtio` scenario: one driver program per vCPU, packed from [`CODE_GPA`].
pub const VIRTIO_CODE_END: u64 = COUNTERS_GPA;
/// Start of the per-queue blocks (rings, request header, status byte, guest kick counter).
pub const VIRTIO_QUEUES_GPA: u64 = 0x1_0000;
/// Size of one queue block; queue `q`'s block starts at `VIRTIO_QUEUES_GPA + q * stride`.
pub const VIRTIO_QUEUE_STRIDE: u64 = 0x400;
/// The most queues the layout (and the `--queues` flag) allows.
pub const VIRTIO_MAX_QUEUES: u32 = 32;
/// Start of the per-vCPU data buffers (write buffer then read buffer, `--request-size` each).
pub const VIRTIO_BUFFERS_GPA: u64 = 0x2_0000;
/// End of the data buffer area: the device window.
pub const VIRTIO_BUFFERS_END: u64 = VIRTIO_MMIO_GPA;

/// Offsets inside a queue block. The rings are laid out as a virtio 1.x split virtqueue of
/// [`VIRTIO_QUEUE_SIZE`] entries; the rest is the guest driver's own per-queue state.
pub mod queue_block {
    /// Descriptor table: 16 bytes per descriptor, 16-byte aligned.
    pub const DESC: u64 = 0x000;
    /// Available (driver) ring: flags, idx, `ring[size]`, used_event.
    pub const AVAIL: u64 = 0x100;
    /// Used (device) ring: flags, idx, `ring[size]` of {id, len}, avail_event; 4-byte aligned.
    pub const USED: u64 = 0x180;
    /// The virtio-blk request header {type, reserved, sector} the driver fills per request.
    pub const HEADER: u64 = 0x280;
    /// The status byte the device writes.
    pub const STATUS: u64 = 0x290;
    /// The guest's own count of its QueueNotify writes for this queue (32 bits).
    pub const GUEST_KICKS: u64 = 0x2A0;
}

/// Entries per virtqueue (what the VMM-side driver writes to QueueNum).
pub const VIRTIO_QUEUE_SIZE: u16 = 16;
/// QueueNumMax the device offers.
pub const VIRTIO_QUEUE_MAX_SIZE: u16 = 256;
