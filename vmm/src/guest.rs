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

use iced_x86::code_asm::{CodeAssembler, al, ax, byte_ptr, dword_ptr, eax, edi, es, esi};

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
        Scenario::Mmio => a.mov(byte_ptr(MMIO_OFFSET).es(), al)?,
        Scenario::Doorbell => a.mov(byte_ptr(DOORBELL_OFFSET).es(), al)?,
        Scenario::Cpuid => {
            a.xor(eax, eax)?;
            a.cpuid()?;
        }
        Scenario::Hlt => a.hlt()?,
        // Refused by `program`.
        Scenario::Virtio | Scenario::Touch | Scenario::Balloon => {}
    }
    if paced {
        a.out(u32::from(PACE_PORT), al)?;
    }
    a.inc(dword_ptr(edi))?;
    a.dec(esi)?;
    a.jnz(again)?;
    done_and_halt(&mut a)
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
        let cases: [(Scenario, &[u8], &[u8]); 5] = [
            (Scenario::Pio, &[], &[0xe6, 0x10]),
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
}
