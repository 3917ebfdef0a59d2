//! The guest side of the `virtio` scenario: one real-mode virtio-blk driver program per vCPU,
//! with that vCPU's queues, buffers and disk region built in as constants (see
//! [`crate::virtio::plan`]).
//!
//! On entry ESI holds the number of requests and EDI the address of the vCPU's request counter
//! (DS base 0), as in the other scenarios. GS reaches the device window, FS the vCPU's write
//! buffer, ES the queue block of the request being made (or the read buffer while checking
//! it); EBP numbers the requests. The program first probes the device like a driver would
//! (MagicValue, Version, DeviceID, then Status, which must show DRIVER_OK: four MMIO read
//! exits), then, unrolled over the vCPU's queues in round-robin order, per request:
//!
//! ```text
//!         header := {type: EBP odd ? IN : OUT, 0, sector: base + ((EBP/2) mod 8) * sectors}
//!         [write: tag the write buffer: inc dword fs:[0]; inc dword fs:[size-4]]
//!         desc[0] := {header, 16, NEXT, 1}
//!         desc[1] := {write ? wbuf : rbuf, size, NEXT | (read ? WRITE : 0), 2}
//!         desc[2] := {status, 1, WRITE, 0}; status := 0xFF
//!         avail.ring[avail.idx mod 16] := 0; avail.idx += 1
//!         mov dword gs:[0x50], queue              ; the kick: no exit (ioeventfd)
//!         inc dword es:[guest_kicks]
//! poll:   cmp used.idx, avail.idx; jne poll
//!         check used.ring[last] = {0, read ? size + 1 : 1} and status = OK
//!         [read: the first and last words of rbuf and wbuf agree]
//!         [out 0x12, al]                          ; PACE, only with a rate
//!         inc dword [edi]; inc ebp; dec esi; jz done
//! ```
//!
//! and writes port 0x11 (DONE) at the end. When a check fails it writes port 0x14 with a
//! [`FailCode`] in AL.

use iced_x86::IcedError;
use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, al, ax, byte_ptr, cx, dword_ptr, eax, ebp, ebx, ecx, edi, es, esi,
    fs, gs, word_ptr,
};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::Program;
use crate::error::Error;
use crate::layout::{
    CODE_GPA, DONE_PORT, FAIL_PORT, PACE_PORT, VIRTIO_CODE_END, VIRTIO_MMIO_SEGMENT,
    VIRTIO_QUEUE_NOTIFY_OFFSET, VIRTIO_QUEUE_SIZE, queue_block,
};
use crate::virtio::mmio::{DEVICE_ID, MAGIC, VERSION};
use crate::virtio::plan::{Plan, SLOTS};

/// MMIO reads each vCPU's program makes before its first request (each one exit to the VMM).
pub const PROBE_READS: u64 = 4;
/// The device status the probe requires: ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK.
const STATUS_LIVE: u32 = 0xF;
/// Size of one split-ring descriptor.
const DESC_LEN: u64 = 16;

/// Why the guest driver gave up (the value it writes to [`FAIL_PORT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FailCode {
    /// MagicValue, Version or DeviceID is not that of a virtio 1.x block device.
    NotVirtioBlk = 1,
    /// Status does not show a live device (DRIVER_OK without NEEDS_RESET).
    NotLive = 2,
    /// The used ring entry is not {head 0, expected length}.
    UsedEntry = 3,
    /// The request's status byte is not VIRTIO_BLK_S_OK.
    Status = 4,
    /// The data read back differs from the data written.
    Data = 5,
}

impl FailCode {
    /// What code `code` means.
    pub fn describe(code: u8) -> String {
        let what = match code {
            1 => "the device at 0xD0000 is not a virtio 1.x block device",
            2 => "the device status does not show DRIVER_OK (or shows NEEDS_RESET)",
            3 => "the used ring entry is not the request's head with the expected length",
            4 => "a request completed with a status other than VIRTIO_BLK_S_OK",
            5 => "the data read back differs from the data written",
            _ => "unknown reason",
        };
        format!("guest driver failure {code}: {what}")
    }
}

/// Assembles every vCPU's program for `plan`, packed one after the other (16-byte aligned)
/// from [`CODE_GPA`]. With `paced` each request is followed by a PACE port write.
pub fn programs(plan: &Plan, paced: bool) -> Result<Vec<Program>, Error> {
    let mut entry = CODE_GPA;
    let mut programs = Vec::with_capacity(plan.vcpus as usize);
    for vcpu in 0..plan.vcpus {
        let bytes = assemble(plan, vcpu, paced, entry).map_err(|e| Error::Assemble("virtio", e))?;
        let end = entry + bytes.len() as u64;
        if end > VIRTIO_CODE_END {
            return Err(Error::Config(format!(
                "the guest driver programs of {} vCPU(s) with {} queues need more than the \
                 {} bytes of code space: use fewer queues",
                plan.vcpus,
                plan.queues,
                VIRTIO_CODE_END - CODE_GPA
            )));
        }
        programs.push(Program { entry, bytes });
        entry = end.next_multiple_of(16);
    }
    Ok(programs)
}

/// The real-mode segment whose base is `gpa` (16-byte aligned, below 1 MiB).
fn segment(gpa: u64) -> u32 {
    debug_assert!(gpa.is_multiple_of(16) && gpa < 0x10_0000);
    (gpa >> 4) as u32
}

/// The labels the request blocks jump to.
struct Exits {
    done: CodeLabel,
    used_entry: CodeLabel,
    status: CodeLabel,
    data: CodeLabel,
}

fn assemble(plan: &Plan, vcpu: u32, paced: bool, ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    let mut not_virtio_blk = a.create_label();
    let mut not_live = a.create_label();
    let mut exits = Exits {
        done: a.create_label(),
        used_entry: a.create_label(),
        status: a.create_label(),
        data: a.create_label(),
    };

    // Probe the device.
    a.mov(ax, u32::from(VIRTIO_MMIO_SEGMENT))?;
    a.mov(gs, ax)?;
    for (register, value) in [(0x000u64, MAGIC), (0x004, VERSION), (0x008, DEVICE_ID)] {
        a.cmp(dword_ptr(register).gs(), value)?;
        a.jne(not_virtio_blk)?;
    }
    a.mov(eax, dword_ptr(0x070u64).gs())?;
    a.cmp(eax, STATUS_LIVE)?;
    a.jne(not_live)?;
    a.mov(ax, segment(plan.write_buffer_gpa(vcpu)))?;
    a.mov(fs, ax)?;
    a.xor(ebp, ebp)?;

    let mut again = a.create_label();
    a.set_label(&mut again)?;
    for queue in plan.queues_of(vcpu) {
        request(&mut a, plan, vcpu, queue, paced, &mut exits)?;
    }
    a.jmp(again)?;

    a.set_label(&mut exits.done)?;
    a.out(u32::from(DONE_PORT), al)?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    for (label, code) in [
        (&mut not_virtio_blk, FailCode::NotVirtioBlk),
        (&mut not_live, FailCode::NotLive),
        (&mut exits.used_entry, FailCode::UsedEntry),
        (&mut exits.status, FailCode::Status),
        (&mut exits.data, FailCode::Data),
    ] {
        a.set_label(label)?;
        a.mov(al, code as u32)?;
        a.out(u32::from(FAIL_PORT), al)?;
        a.jmp(halt)?;
    }
    a.assemble(ip)
}

/// One request on `queue`, then the bookkeeping; jumps to `exits.done` after the last.
fn request(
    a: &mut CodeAssembler,
    plan: &Plan,
    vcpu: u32,
    queue: u32,
    paced: bool,
    exits: &mut Exits,
) -> Result<(), IcedError> {
    use queue_block::{AVAIL, DESC, GUEST_KICKS, HEADER, STATUS, USED};
    let block = Plan::queue_gpa(queue);
    let size = plan.request_size;
    let last_word = u64::from(size) - 4;
    let next = VRING_DESC_F_NEXT;
    let write = VRING_DESC_F_WRITE;
    let desc = |i: u64, field: u64| DESC + i * DESC_LEN + field;

    a.mov(ax, segment(block))?;
    a.mov(es, ax)?;
    // The header: type OUT for even request numbers, IN for odd ones.
    debug_assert_eq!((VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_IN), (1, 0));
    a.mov(eax, ebp)?;
    a.and(eax, 1)?;
    a.xor(eax, 1)?;
    a.mov(dword_ptr(HEADER).es(), eax)?;
    a.mov(dword_ptr(HEADER + 4).es(), 0u32)?;
    // sector = base + ((request / 2) mod SLOTS) * sectors per request
    a.mov(eax, ebp)?;
    a.shr(eax, 1)?;
    a.and(eax, SLOTS - 1)?;
    a.imul_3(eax, eax, plan.sectors_per_request())?;
    a.add(eax, plan.base_sector(vcpu) as u32)?;
    a.mov(dword_ptr(HEADER + 8).es(), eax)?;
    a.mov(dword_ptr(HEADER + 12).es(), 0u32)?;

    // The data descriptor: the tagged write buffer, or the read buffer (device-writable).
    let mut is_read = a.create_label();
    let mut data_rest = a.create_label();
    a.test(ebp, 1)?;
    a.jnz(is_read)?;
    a.inc(dword_ptr(0u64).fs())?;
    a.inc(dword_ptr(last_word).fs())?;
    a.mov(
        dword_ptr(desc(1, 0)).es(),
        plan.write_buffer_gpa(vcpu) as u32,
    )?;
    a.mov(dword_ptr(desc(1, 12)).es(), next | (2 << 16))?;
    a.jmp(data_rest)?;
    a.set_label(&mut is_read)?;
    a.mov(
        dword_ptr(desc(1, 0)).es(),
        plan.read_buffer_gpa(vcpu) as u32,
    )?;
    a.mov(dword_ptr(desc(1, 12)).es(), next | write | (2 << 16))?;
    a.set_label(&mut data_rest)?;
    a.mov(dword_ptr(desc(1, 4)).es(), 0u32)?;
    a.mov(dword_ptr(desc(1, 8)).es(), size)?;
    // The header descriptor, then the status descriptor and a status the device must change.
    a.mov(dword_ptr(desc(0, 0)).es(), (block + HEADER) as u32)?;
    a.mov(dword_ptr(desc(0, 4)).es(), 0u32)?;
    a.mov(dword_ptr(desc(0, 8)).es(), 16u32)?;
    a.mov(dword_ptr(desc(0, 12)).es(), next | (1 << 16))?;
    a.mov(dword_ptr(desc(2, 0)).es(), (block + STATUS) as u32)?;
    a.mov(dword_ptr(desc(2, 4)).es(), 0u32)?;
    a.mov(dword_ptr(desc(2, 8)).es(), 1u32)?;
    a.mov(dword_ptr(desc(2, 12)).es(), write)?;
    a.mov(byte_ptr(STATUS).es(), 0xFFu32)?;

    // Make head 0 available: ring[idx mod size] = 0, then idx + 1 (ECX keeps the new idx).
    let qmask = u32::from(VIRTIO_QUEUE_SIZE) - 1;
    a.movzx(ebx, word_ptr(AVAIL + 2).es())?;
    a.mov(ecx, ebx)?;
    a.inc(ecx)?;
    a.and(ebx, qmask)?;
    a.mov(word_ptr(ebx * 2 + (AVAIL + 4) as i32).es(), 0u32)?;
    a.mov(word_ptr(AVAIL + 2).es(), cx)?;
    // The kick, and the guest's own count of it.
    a.mov(dword_ptr(VIRTIO_QUEUE_NOTIFY_OFFSET).gs(), queue)?;
    a.inc(dword_ptr(GUEST_KICKS).es())?;
    // Poll the used ring until the device has caught up.
    let mut poll = a.create_label();
    a.set_label(&mut poll)?;
    a.cmp(word_ptr(USED + 2).es(), cx)?;
    a.jne(poll)?;
    // used.ring[(idx - 1) mod size] must be {id 0, len 1 (write) or size + 1 (read)}.
    a.movzx(ebx, cx)?;
    a.dec(ebx)?;
    a.and(ebx, qmask)?;
    a.cmp(dword_ptr(ebx * 8 + (USED + 4) as i32).es(), 0u32)?;
    a.jne(exits.used_entry)?;
    a.mov(eax, ebp)?;
    a.and(eax, 1)?;
    a.imul_3(eax, eax, size)?;
    a.inc(eax)?;
    a.cmp(dword_ptr(ebx * 8 + (USED + 8) as i32).es(), eax)?;
    a.jne(exits.used_entry)?;
    a.cmp(byte_ptr(STATUS).es(), 0u32)?;
    a.jne(exits.status)?;
    // After a read, the tags written with the pair's write must have come back.
    let mut checked = a.create_label();
    a.test(ebp, 1)?;
    a.jz(checked)?;
    a.mov(ax, segment(plan.read_buffer_gpa(vcpu)))?;
    a.mov(es, ax)?;
    for at in [0, last_word] {
        a.mov(eax, dword_ptr(at).es())?;
        a.cmp(eax, dword_ptr(at).fs())?;
        a.jne(exits.data)?;
    }
    a.set_label(&mut checked)?;

    if paced {
        a.out(u32::from(PACE_PORT), al)?;
    }
    a.inc(dword_ptr(edi))?;
    a.inc(ebp)?;
    a.dec(esi)?;
    a.jz(exits.done)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(vcpus: u32, queues: u32) -> Plan {
        Plan {
            vcpus,
            queues,
            count: 10,
            request_size: 4096,
        }
    }

    #[test]
    fn programs_are_packed_and_distinct() {
        let p = plan(2, 4);
        let progs = programs(&p, false).unwrap();
        assert_eq!(progs.len(), 2);
        assert_eq!(progs[0].entry, CODE_GPA);
        assert!(progs[1].entry >= progs[0].entry + progs[0].bytes.len() as u64);
        assert_eq!(progs[1].entry % 16, 0);
        assert_ne!(progs[0].bytes, progs[1].bytes);
        // Pacing adds one `out 0x12, al` per request block.
        let paced = programs(&p, true).unwrap();
        assert_eq!(paced[0].bytes.len(), progs[0].bytes.len() + 2 * 2);
    }

    #[test]
    fn probes_then_kicks_with_the_queue_index() {
        let p = plan(2, 4);
        let code = &programs(&p, false).unwrap()[1].bytes;
        // mov ax, 0xD000; mov gs, ax; cmp dword gs:[0], "virt"
        assert_eq!(
            &code[..13],
            &[
                0xb8, 0x00, 0xd0, 0x8e, 0xe8, 0x65, 0x66, 0x81, 0x3e, 0x00, 0x00, 0x76, 0x69
            ]
        );
        // mov dword gs:[0x50], 1 and mov dword gs:[0x50], 3: vCPU 1 kicks queues 1 and 3.
        let kick = |q: u8| [0x65, 0x66, 0xc7, 0x06, 0x50, 0x00, q, 0, 0, 0];
        let find = |needle: &[u8]| code.windows(needle.len()).any(|w| w == needle);
        assert!(find(&kick(1)) && find(&kick(3)));
        assert!(!find(&kick(0)) && !find(&kick(2)));
    }

    #[test]
    fn the_largest_layout_fits() {
        let p = Plan {
            vcpus: 1,
            queues: crate::layout::VIRTIO_MAX_QUEUES,
            count: 1,
            request_size: 65536,
        };
        programs(&p, true).unwrap();
        let p = Plan {
            vcpus: crate::layout::VIRTIO_MAX_QUEUES,
            queues: crate::layout::VIRTIO_MAX_QUEUES,
            count: 1,
            request_size: 512,
        };
        programs(&p, true).unwrap();
    }
}
