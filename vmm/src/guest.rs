//! The guest programs: a few real-mode instructions per scenario, assembled in-process with
//! iced-x86's code assembler in 16-bit mode. The `virtio` scenario's driver programs are in
//! [`virtio`], the `touch` and `balloon` programs in [`touch`].
//!
//! On entry (set by the VMM) ESI holds the number of operations left and EDI the address of the
//! vCPU's 32-bit operation counter. CPUID clobbers EAX/EBX/ECX/EDX, so the loop keeps its state
//! in ESI/EDI only:
//!
//! ```text
//!         [mov ax, 0xE000; mov es, ax]     ; mmio and doorbell: ES base = 0xE0000
//! again:  <operation>
//!         [out 0x12, al]                   ; PACE, only with a rate
//!         inc dword [edi]                  ; the guest's own count
//!         dec esi
//!         jnz again
//!         out 0x11, al                     ; DONE: the VMM stops this vCPU here
//! halt:   hlt
//!         jmp halt
//! ```

pub mod touch;
pub mod virtio;

use iced_x86::code_asm::{CodeAssembler, al, ax, byte_ptr, dword_ptr, eax, ebp, ebx, edi, es, esi};

use crate::config::Scenario;
use crate::error::Error;
use crate::layout::{
    CODE_GPA, DONE_PORT, DOORBELL_GPA, MMIO_GPA, MMIO_SEGMENT, OP_PORT, PACE_PORT,
};

/// A guest program and where it is loaded (and where the vCPUs that run it start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// Load address and entry point.
    pub entry: u64,
    /// The machine code.
    pub bytes: Vec<u8>,
}

/// Offset of the MMIO address inside [`MMIO_SEGMENT`].
const MMIO_OFFSET: u64 = MMIO_GPA - ((MMIO_SEGMENT as u64) << 4);
/// Offset of the doorbell inside [`MMIO_SEGMENT`].
const DOORBELL_OFFSET: u64 = DOORBELL_GPA - ((MMIO_SEGMENT as u64) << 4);

/// Assembles the guest program for `scenario`, to be loaded at [`CODE_GPA`]. With `paced` the
/// guest writes the PACE port after every operation. The `virtio` scenario has one program per
/// vCPU instead (see [`virtio::programs`]), and `touch` and `balloon` depend on their region
/// (see [`touch::program`]).
pub fn program(scenario: Scenario, paced: bool) -> Result<Vec<u8>, Error> {
    match scenario {
        Scenario::MmioSweep => {
            return Err(Error::Config(
                "the mmio-sweep program depends on --vcpus (guest::sweep_program)".into(),
            ));
        }
        Scenario::Virtio => {
            return Err(Error::Config(
                "the virtio scenario has one program per vCPU (guest::virtio::programs)".into(),
            ));
        }
        Scenario::Touch | Scenario::Balloon => {
            return Err(Error::Config(format!(
                "the {scenario} program depends on its region (guest::touch::program)"
            )));
        }
        _ => {}
    }
    assemble(scenario, paced).map_err(|e| Error::Assemble(scenario.name(), e))
}

fn assemble(scenario: Scenario, paced: bool) -> Result<Vec<u8>, iced_x86::IcedError> {
    let mut a = CodeAssembler::new(16)?;
    if matches!(scenario, Scenario::Mmio | Scenario::Doorbell) {
        a.mov(ax, u32::from(MMIO_SEGMENT))?;
        a.mov(es, ax)?;
    }
    let mut again = a.create_label();
    a.set_label(&mut again)?;
    match scenario {
        Scenario::Pio => a.out(u32::from(OP_PORT), al)?,
        Scenario::PioIn => a.in_(al, u32::from(OP_PORT))?,
        Scenario::Mmio => a.mov(byte_ptr(MMIO_OFFSET).es(), al)?,
        Scenario::Doorbell => a.mov(byte_ptr(DOORBELL_OFFSET).es(), al)?,
        Scenario::Cpuid => {
            a.xor(eax, eax)?;
            a.cpuid()?;
        }
        Scenario::Hlt => a.hlt()?,
        // EBX is the VMM's count of EINTRs: wait for the next.
        Scenario::Signal => {
            a.mov(ebp, ebx)?;
            let mut wait = a.create_label();
            a.set_label(&mut wait)?;
            a.cmp(ebx, ebp)?;
            a.je(wait)?;
        }
        // Refused by `program`.
        Scenario::MmioSweep | Scenario::Virtio | Scenario::Touch | Scenario::Balloon => {}
    }
    if paced {
        a.out(u32::from(PACE_PORT), al)?;
    }
    a.inc(dword_ptr(edi))?;
    a.dec(esi)?;
    a.jnz(again)?;
    done_and_halt(&mut a)
}

/// The `mmio-sweep` program for `vcpus` vCPUs: on entry EBX holds the vCPU's first address
/// (the VMM sets it, in unreal mode), and each operation writes one byte there and moves EBX on
/// by `vcpus`, so that no two writes of the VM share an address.
///
/// ```text
/// again:  mov byte [ebx], al               ; 32-bit address, unbacked: KVM_EXIT_MMIO
///         [out 0x12, al]                   ; PACE, only with a rate
///         inc dword [edi]
///         add ebx, vcpus
///         dec esi
///         jnz again
/// ```
pub fn sweep_program(vcpus: u32, paced: bool) -> Result<Vec<u8>, Error> {
    let assemble = || -> Result<Vec<u8>, iced_x86::IcedError> {
        let mut a = CodeAssembler::new(16)?;
        let mut again = a.create_label();
        a.set_label(&mut again)?;
        a.mov(byte_ptr(ebx), al)?;
        if paced {
            a.out(u32::from(PACE_PORT), al)?;
        }
        a.inc(dword_ptr(edi))?;
        a.add(ebx, vcpus)?;
        a.dec(esi)?;
        a.jnz(again)?;
        done_and_halt(&mut a)
    };
    assemble().map_err(|e| Error::Assemble("mmio-sweep", e))
}

/// The end of every program: write DONE (the VMM stops the vCPU there), then halt for good; and
/// the machine code, for [`CODE_GPA`].
pub(crate) fn done_and_halt(a: &mut CodeAssembler) -> Result<Vec<u8>, iced_x86::IcedError> {
    a.out(u32::from(DONE_PORT), al)?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    a.assemble(CODE_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Hand-assembled references: the assembler must produce exactly these bytes.
    const INC_DEC_JNZ: [u8; 6] = [0x66, 0x67, 0xff, 0x07, 0x66, 0x4e]; // inc dword [edi]; dec esi
    const TAIL: [u8; 5] = [0xe6, 0x11, 0xf4, 0xeb, 0xfd]; // out 0x11,al; hlt; jmp $-1

    fn expected(prologue: &[u8], op: &[u8], paced: bool) -> Vec<u8> {
        let mut body = op.to_vec();
        if paced {
            body.extend([0xe6, 0x12]);
        }
        body.extend(INC_DEC_JNZ);
        let back = -(i8::try_from(body.len() + 2).unwrap());
        let mut v = prologue.to_vec();
        v.extend(body);
        v.extend([0x75, back as u8]);
        v.extend(TAIL);
        v
    }

    const ES_PROLOGUE: [u8; 5] = [0xb8, 0x00, 0xe0, 0x8e, 0xc0]; // mov ax,0xe000; mov es,ax

    #[test]
    fn programs_match_hand_assembly() {
        let cases: [(Scenario, &[u8], &[u8]); 6] = [
            (Scenario::Pio, &[], &[0xe6, 0x10]),
            (Scenario::PioIn, &[], &[0xe4, 0x10]),
            (Scenario::Mmio, &ES_PROLOGUE, &[0x26, 0xa2, 0x00, 0x00]),
            (Scenario::Doorbell, &ES_PROLOGUE, &[0x26, 0xa2, 0x00, 0x10]),
            (Scenario::Cpuid, &[], &[0x66, 0x31, 0xc0, 0x0f, 0xa2]),
            (Scenario::Hlt, &[], &[0xf4]),
        ];
        for (scenario, prologue, op) in cases {
            for paced in [false, true] {
                assert_eq!(
                    program(scenario, paced).unwrap(),
                    expected(prologue, op, paced),
                    "{scenario} paced={paced}"
                );
            }
        }
    }

    #[test]
    fn the_sweep_program_moves_on_by_the_vcpu_count() {
        // mov [ebx],al; inc dword [edi]; add ebx,3; dec esi; jnz again
        let mut body = vec![0x67, 0x88, 0x03];
        body.extend(&INC_DEC_JNZ[..4]);
        body.extend([0x66, 0x83, 0xc3, 0x03]);
        body.extend(&INC_DEC_JNZ[4..]);
        let back = -(i8::try_from(body.len() + 2).unwrap());
        body.extend([0x75, back as u8]);
        body.extend(TAIL);
        assert_eq!(sweep_program(3, false).unwrap(), body);
        assert!(program(Scenario::MmioSweep, false).is_err());
    }
}
