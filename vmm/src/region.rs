//! The touch region of the `touch` and `balloon` scenarios: what the guests write where
//! ([`Plan`]), the host side of the mapping (no huge pages, returning pages with
//! `madvise(MADV_DONTNEED)`, counting resident pages with `mincore(2)`) and the final check
//! of every page.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::Error;
use crate::layout::{PAGE_SIZE, RETOUCH_PATTERN, TOUCH_PATTERN, TOUCH_REGION_GPA};

/// What the touch and balloon guests do, derived from the configuration
/// ([`crate::VmmConfig::region_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// vCPUs sharing the pages (balloon: 1).
    pub vcpus: u32,
    /// Size of the region at [`TOUCH_REGION_GPA`].
    pub region_bytes: u64,
    /// Bytes at the start of the region returned to the host and touched again (balloon);
    /// 0 for touch.
    pub returned_bytes: u64,
}

impl Plan {
    /// Pages in the region: each is touched once in the first phase.
    pub fn pages(&self) -> u64 {
        self.region_bytes / PAGE_SIZE
    }

    /// Pages returned to the host and touched again in the second phase (balloon).
    pub fn returned_pages(&self) -> u64 {
        self.returned_bytes / PAGE_SIZE
    }

    /// Whether there is a second phase: the balloon scenario.
    pub fn balloon(&self) -> bool {
        self.returned_bytes > 0
    }

    /// Pages vCPU 0 (any vCPU) writes in the first phase.
    pub fn pages_per_vcpu(&self) -> u64 {
        self.pages() / u64::from(self.vcpus.max(1))
    }

    /// Pages each vCPU writes in all: its share of the first phase plus the second phase's
    /// (one vCPU only) retouched pages. This is what its guest counter must reach.
    pub fn ops_per_vcpu(&self) -> u64 {
        self.pages_per_vcpu() + self.returned_pages()
    }

    /// The first page vCPU `index` writes: vCPU i takes pages i, i + vcpus, ...
    pub fn first_page_gpa(&self, index: u32) -> u64 {
        TOUCH_REGION_GPA + u64::from(index) * PAGE_SIZE
    }

    /// Distance between the pages one vCPU writes in the first phase.
    pub fn stride(&self) -> u64 {
        u64::from(self.vcpus) * PAGE_SIZE
    }

    /// The byte page `page` (0-based, from the region's start) must start with at the end.
    pub fn final_pattern(&self, page: u64) -> u8 {
        if page < self.returned_pages() {
            RETOUCH_PATTERN
        } else {
            TOUCH_PATTERN
        }
    }
}

/// The host side of the balloon scenario: the range its BALLOON exit returns to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balloon {
    /// Host virtual address of the touch region; the returned range starts there.
    pub region_hva: u64,
    /// Size of the touch region.
    pub region_bytes: u64,
    /// Bytes returned, from the region's start.
    pub returned_bytes: u64,
}

/// What one BALLOON exit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Returned {
    /// Where the `madvise(MADV_DONTNEED)` started.
    pub hva: u64,
    /// Its length (it returned 0).
    pub bytes: u64,
    /// The region's pages resident in host memory right after it.
    pub resident_pages_after: u64,
}

impl Balloon {
    /// Returns the first `returned_bytes` of the region to the host with one
    /// `madvise(MADV_DONTNEED)`, then counts the region's resident pages.
    pub fn inflate(&self) -> Result<Returned, Error> {
        return_to_host(self.region_hva, self.returned_bytes)?;
        Ok(Returned {
            hva: self.region_hva,
            bytes: self.returned_bytes,
            resident_pages_after: resident_pages(self.region_hva, self.region_bytes)?,
        })
    }
}

/// Tells the kernel not to back `len` bytes at `hva` with transparent huge pages.
///
/// Why: with THP set to `always` (or `madvise` plus a VMM that asks for it) the first touch of
/// a 2 MiB-aligned range may fault in one huge page, so the host's page faults and RSS growth
/// per guest page would depend on the host's setting and on alignment. With MADV_NOHUGEPAGE
/// every first touch of a 4 KiB page is exactly one 4 KiB fault, which is the ground truth the
/// report states.
pub fn no_huge_pages(hva: u64, len: u64) -> Result<(), Error> {
    madvise(hva, len, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")
}

/// Returns `len` bytes at `hva` to the host with `madvise(MADV_DONTNEED)`: the pages are freed
/// and the next access to each (here: the guest's, through KVM) faults in a zero page.
pub fn return_to_host(hva: u64, len: u64) -> Result<(), Error> {
    madvise(hva, len, libc::MADV_DONTNEED, "MADV_DONTNEED")
}

fn madvise(hva: u64, len: u64, advice: libc::c_int, name: &str) -> Result<(), Error> {
    // SAFETY: the range is (part of) the anonymous guest memory mapping the caller owns and
    // keeps mapped. MADV_NOHUGEPAGE only changes how it is backed; MADV_DONTNEED replaces its
    // contents with zeros, which nothing may rely on: the guest re-writes them and the VMM
    // accesses guest memory only through vm-memory's volatile accessors, never through
    // references.
    let rc = unsafe { libc::madvise(hva as *mut libc::c_void, len as usize, advice) };
    if rc != 0 {
        return Err(Error::Memory(format!(
            "madvise({hva:#x}, {len}, {name}) failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// How many of the pages of the `len` bytes at `hva` are resident in host memory.
pub fn resident_pages(hva: u64, len: u64) -> Result<u64, Error> {
    let pages = len.div_ceil(PAGE_SIZE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is a mapping the caller owns and keeps mapped; `vec` has one byte per
    // page of it, as mincore(2) requires, and outlives the call.
    let rc = unsafe {
        libc::mincore(
            hva as *mut libc::c_void,
            len as usize,
            vec.as_mut_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(Error::Memory(format!(
            "mincore({hva:#x}, {len}) failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64)
}

/// Checks that every page of the region starts with the byte `plan` says the guest wrote
/// there last (reading pages that are present: the guest touched them all).
pub fn verify(memory: &GuestMemoryMmap, plan: &Plan) -> Result<(), Error> {
    let mut wrong = 0u64;
    let mut first: Option<(u64, u8, u8)> = None;
    for page in 0..plan.pages() {
        let gpa = TOUCH_REGION_GPA + page * PAGE_SIZE;
        let got: u8 = memory
            .read_obj(GuestAddress(gpa))
            .map_err(|e| Error::Memory(format!("cannot read the touch region at {gpa:#x}: {e}")))?;
        let want = plan.final_pattern(page);
        if got != want {
            wrong += 1;
            first.get_or_insert((page, got, want));
        }
    }
    match first {
        None => Ok(()),
        Some((page, got, want)) => Err(Error::Mismatch(format!(
            "{wrong} of the {} pages of the touch region hold a first byte that differs from \
             the guest's pattern; the first is page {page} (GPA {:#x}): {got:#04x} instead of \
             {want:#04x}",
            plan.pages(),
            TOUCH_REGION_GPA + page * PAGE_SIZE
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    #[test]
    fn plans() {
        let touch = Plan {
            vcpus: 4,
            region_bytes: 2 * MIB,
            returned_bytes: 0,
        };
        assert_eq!(touch.pages(), 512);
        assert_eq!(touch.ops_per_vcpu(), 128);
        assert_eq!(touch.first_page_gpa(3), 0x100_3000);
        assert_eq!(touch.stride(), 0x4000);
        assert!(!touch.balloon());
        assert_eq!(touch.final_pattern(0), TOUCH_PATTERN);
        let balloon = Plan {
            vcpus: 1,
            region_bytes: 4 * MIB,
            returned_bytes: 2 * MIB,
        };
        assert!(balloon.balloon());
        assert_eq!(balloon.ops_per_vcpu(), 1024 + 512);
        assert_eq!(balloon.final_pattern(511), RETOUCH_PATTERN);
        assert_eq!(balloon.final_pattern(512), TOUCH_PATTERN);
    }

    /// madvise and mincore on a mapping of our own: fresh memory is not resident, touched
    /// pages are, returned pages are not any more.
    #[test]
    fn residency_follows_touch_and_return() {
        let memory =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(TOUCH_REGION_GPA), MIB as usize)])
                .unwrap();
        let hva = vm_memory::GuestMemoryBackend::get_host_address(
            &memory,
            GuestAddress(TOUCH_REGION_GPA),
        )
        .unwrap() as u64;
        no_huge_pages(hva, MIB).unwrap();
        assert_eq!(resident_pages(hva, MIB).unwrap(), 0);
        for page in 0..256 {
            memory
                .write_obj(1u8, GuestAddress(TOUCH_REGION_GPA + page * PAGE_SIZE))
                .unwrap();
        }
        assert_eq!(resident_pages(hva, MIB).unwrap(), 256);
        return_to_host(hva, MIB / 4).unwrap();
        assert_eq!(resident_pages(hva, MIB).unwrap(), 192);
        assert!(return_to_host(hva + 1, PAGE_SIZE).is_err());
    }
}
