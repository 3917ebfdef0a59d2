//! A known cause of host TLB flushes: a VMM thread write-protects one page of guest RAM and
//! makes it writable again, over and over, while the vCPUs run. Taking write access away from a
//! present page makes the kernel flush it from every CPU that may hold the VMM's address space
//! (mprotect → change_protection → flush_tlb_range: on the calling CPU, and by IPI on the
//! others); giving it back needs no flush (x86 `pte_needs_flush`). Both calls also invalidate the
//! range for KVM through its MMU notifier.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::{error::Error, layout::PAGE_SIZE};

/// What the write-protecting thread did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteProtectReport {
    /// The guest-physical address of the page (no guest program uses it).
    pub gpa: u64,
    /// Its host address in the VMM process.
    pub hva: u64,
    /// Write-protections done, each followed by making the page writable again: two mprotect
    /// calls per cycle.
    pub cycles: u64,
    /// Of those, the cycles done while no vCPU had finished yet.
    pub cycles_while_vcpus_ran: u64,
}

/// Write-protects the page at `hva` (guest address `gpa`) `cycles` times, stopping early on
/// `abort`; `vcpus_running` says whether every vCPU is still running.
pub fn run(
    gpa: u64,
    hva: u64,
    cycles: u64,
    vcpus_running: &AtomicBool,
    abort: &AtomicBool,
) -> Result<WriteProtectReport, Error> {
    // SAFETY: `hva` is the start of a page of the guest RAM mapping, which the VMM keeps mapped
    // for the whole run and no guest program uses; the byte makes the page present, so that
    // taking write access away needs a flush.
    unsafe { std::ptr::write_volatile(hva as *mut u8, 0) };
    let mut report = WriteProtectReport {
        gpa,
        hva,
        cycles: 0,
        cycles_while_vcpus_ran: 0,
    };
    while report.cycles < cycles && !abort.load(Ordering::Relaxed) {
        let running = vcpus_running.load(Ordering::Relaxed);
        protect(hva, libc::PROT_READ, "PROT_READ")?;
        protect(
            hva,
            libc::PROT_READ | libc::PROT_WRITE,
            "PROT_READ|PROT_WRITE",
        )?;
        report.cycles += 1;
        if running && vcpus_running.load(Ordering::Relaxed) {
            report.cycles_while_vcpus_ran += 1;
        }
    }
    Ok(report)
}

fn protect(hva: u64, prot: libc::c_int, name: &str) -> Result<(), Error> {
    // SAFETY: one page of the guest RAM mapping (see `run`); while it is read-only nothing writes
    // it (no guest program uses it, and the VMM touched it only before the first cycle).
    let rc = unsafe { libc::mprotect(hva as *mut libc::c_void, PAGE_SIZE as usize, prot) };
    if rc != 0 {
        return Err(Error::Memory(format!(
            "mprotect({hva:#x}, {PAGE_SIZE}, {name}) failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
