//! Guest-physical memory layout and I/O ports shared by the guest programs and the VMM.

/// Size of the guest RAM at GPA 0.
pub const MEM_SIZE: usize = 0x1_0000;
/// Where the guest program is loaded; every vCPU starts here with CS base 0.
pub const CODE_GPA: u64 = 0x1000;
/// Start of the per-vCPU 32-bit operation counters: vCPU `i` counts at `COUNTERS_GPA + 4 * i`.
pub const COUNTERS_GPA: u64 = 0x8000;
/// How many vCPU counters fit between [`COUNTERS_GPA`] and the end of guest RAM.
pub const MAX_VCPUS_BY_LAYOUT: u32 = ((MEM_SIZE as u64 - COUNTERS_GPA) / 4) as u32;

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
