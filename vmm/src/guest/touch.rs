//! The guest side of the `touch` and `balloon` scenarios: one byte written at the start of
//! every page of the touch region (see [`crate::region`]), far above the 1 MiB real mode
//! reaches through segments.
//!
//! The vCPU starts in "unreal mode": real mode, but with a 4 GiB DS limit set by the VMM
//! ([`crate::vcpu::configure`]), so an address-size prefix and a 32-bit register reach any
//! address below 4 GiB. On entry EBX holds the vCPU's first page, ESI the pages it writes in
//! all (its operations) and EDI the address of its operation counter:
//!
//! ```text
//!         mov al, 0x5A                     ; pattern 1
//!         mov ecx, pages of this vCPU
//! touch:  mov byte [ebx], al               ; 32-bit address: one page's first touch
//!         [out 0x12, al]                   ; PACE, only with a rate
//!         inc dword [edi]                  ; the guest's own count
//!         add ebx, vcpus * 4096            ; this vCPU's next page
//!         dec esi
//!         dec ecx
//!         jnz touch
//!       balloon only:
//!         out 0x15, al                     ; BALLOON: the VMM returns the first M MiB
//!         mov ebx, 0x1000000
//!         mov al, 0xA5                     ; pattern 2
//!         mov ecx, M * 256
//! again:  <the same loop, stride 4096>     ; the retouch
//!       then:
//!         out 0x11, al                     ; DONE (ESI is 0 here)
//! halt:   hlt
//!         jmp halt
//! ```

use iced_x86::IcedError;
use iced_x86::code_asm::{CodeAssembler, al, byte_ptr, dword_ptr, ebx, ecx, edi, esi};

use crate::error::Error;
use crate::layout::{
    BALLOON_PORT, PACE_PORT, PAGE_SIZE, RETOUCH_PATTERN, TOUCH_PATTERN, TOUCH_REGION_GPA,
};
use crate::region::Plan;

/// Assembles the program every vCPU of `plan` runs, to be loaded at
/// [`crate::layout::CODE_GPA`]. With `paced` the guest writes the PACE port after every page.
pub fn program(plan: &Plan, paced: bool) -> Result<Vec<u8>, Error> {
    let name = if plan.balloon() { "balloon" } else { "touch" };
    let check = |what: &str, v: u64| {
        u32::try_from(v).map_err(|_| Error::Config(format!("{name}: {what} {v} does not fit")))
    };
    let pages = check("pages per vCPU", plan.pages_per_vcpu())?;
    let stride = check("stride", plan.stride())?;
    let returned = check("returned pages", plan.returned_pages())?;
    assemble(pages, stride, plan.balloon().then_some(returned), paced)
        .map_err(|e| Error::Assemble(name, e))
}

fn assemble(
    pages: u32,
    stride: u32,
    retouch: Option<u32>,
    paced: bool,
) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    write_pages(&mut a, TOUCH_PATTERN, pages, stride, paced)?;
    if let Some(pages) = retouch {
        a.out(u32::from(BALLOON_PORT), al)?;
        a.mov(ebx, TOUCH_REGION_GPA as u32)?;
        write_pages(&mut a, RETOUCH_PATTERN, pages, PAGE_SIZE as u32, paced)?;
    }
    super::done_and_halt(&mut a)
}

/// `pages` times: write `pattern` at [EBX], count it, EBX += `stride`.
fn write_pages(
    a: &mut CodeAssembler,
    pattern: u8,
    pages: u32,
    stride: u32,
    paced: bool,
) -> Result<(), IcedError> {
    a.mov(al, u32::from(pattern))?;
    a.mov(ecx, pages)?;
    let mut again = a.create_label();
    a.set_label(&mut again)?;
    a.mov(byte_ptr(ebx), al)?;
    if paced {
        a.out(u32::from(PACE_PORT), al)?;
    }
    a.inc(dword_ptr(edi))?;
    a.add(ebx, stride as i32)?;
    a.dec(esi)?;
    a.dec(ecx)?;
    a.jnz(again)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    /// The loop of one phase, hand-assembled.
    fn phase(pattern: u8, pages: u32, stride: u32, paced: bool) -> Vec<u8> {
        let mut v = vec![0xb0, pattern, 0x66, 0xb9]; // mov al, pattern; mov ecx, pages
        v.extend(pages.to_le_bytes());
        let mut body = vec![0x67, 0x88, 0x03]; // mov [ebx], al (address-size prefix)
        if paced {
            body.extend([0xe6, 0x12]);
        }
        body.extend([0x66, 0x67, 0xff, 0x07]); // inc dword [edi]
        body.extend([0x66, 0x81, 0xc3]); // add ebx, stride
        body.extend(stride.to_le_bytes());
        body.extend([0x66, 0x4e, 0x66, 0x49]); // dec esi; dec ecx
        let back = -(i8::try_from(body.len() + 2).unwrap());
        v.extend(body);
        v.extend([0x75, back as u8]);
        v
    }

    const TAIL: [u8; 5] = [0xe6, 0x11, 0xf4, 0xeb, 0xfd]; // out 0x11,al; hlt; jmp $-1

    #[test]
    fn programs_match_hand_assembly() {
        for paced in [false, true] {
            let touch = Plan {
                vcpus: 2,
                region_bytes: 2 * MIB,
                returned_bytes: 0,
            };
            let mut want = phase(0x5a, 256, 0x2000, paced);
            want.extend(TAIL);
            assert_eq!(program(&touch, paced).unwrap(), want, "paced={paced}");

            let balloon = Plan {
                vcpus: 1,
                region_bytes: 4 * MIB,
                returned_bytes: MIB,
            };
            let mut want = phase(0x5a, 1024, 0x1000, paced);
            want.extend([0xe6, 0x15, 0x66, 0xbb, 0x00, 0x00, 0x00, 0x01]); // out; mov ebx
            want.extend(phase(0xa5, 256, 0x1000, paced));
            want.extend(TAIL);
            assert_eq!(program(&balloon, paced).unwrap(), want, "paced={paced}");
        }
    }
}
