//! A PCI device handed to the VM through VFIO (`--vfio <BDF>`), as a VMM passes a NIC VF or a GPU
//! through: the VMM opens the device's group in a VFIO type1 container, maps guest memory for the
//! device's DMA (`VFIO_IOMMU_MAP_DMA`), and unmaps it when the VM ends.
//!
//! With `--vfio-dma` the device must be QEMU's `edu` (1234:11e8), whose DMA engine the VMM drives
//! through BAR 0: one transfer from a mapped page into the device's buffer, one from the buffer to
//! another mapped page (whose contents the VMM then checks), and one to an IOVA that is not mapped,
//! which the IOMMU refuses (an I/O page fault).
//!
//! Each mapping is one page: the kernel maps a VFIO mapping as one IOMMU mapping per run of
//! physically contiguous pages (`vfio_pin_map_dma()`, drivers/vfio/vfio_iommu_type1.c) and, on
//! AMD, unmaps it per block of the IOMMU's page table (`vfio_unmap_unpin()`), both of which a
//! page makes exactly one (docs/iommu.md).

use std::{
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{
    error::Error,
    layout::PAGE_SIZE,
    memory::{host_address, load},
};

/// Where the mappings' guest memory starts: above the vCPU counters, in pages of the 64 KiB of
/// guest RAM no guest program uses (0x9000 to 0xCFFF for the four).
pub const DMA_GPA: u64 = 0x9000;
/// The mappings: one page of guest memory each, from [`DMA_GPA`] on, each at its own IOVA.
const MAPPINGS: [u64; 4] = [0x10_0000, 0x20_0000, 0x30_0000, 0x38_0000];
/// An IOVA the VMM never maps: the device's DMA there is an I/O page fault. Below the edu
/// device's 28-bit DMA mask, like the mapped ones.
pub const UNMAPPED_IOVA: u64 = 0x40_0000;
const _: () = {
    let mut i = 0;
    while i < MAPPINGS.len() {
        assert!(MAPPINGS[i] + PAGE_SIZE <= UNMAPPED_IOVA);
        i += 1;
    }
    let end = DMA_GPA + MAPPINGS.len() as u64 * PAGE_SIZE;
    assert!(end <= crate::layout::MEM_SIZE as u64, "within guest RAM");
    assert!(
        UNMAPPED_IOVA < 1 << 28,
        "within the edu device's 28-bit DMA mask"
    );
};

/// QEMU's edu device: its ids and BAR 0 registers (hw/misc/edu.c).
mod edu {
    pub const VENDOR_DEVICE: u32 = 0x11e8_1234;
    pub const IDENTIFICATION: u64 = 0x00;
    pub const DMA_SOURCE: u64 = 0x80;
    pub const DMA_DESTINATION: u64 = 0x88;
    pub const DMA_COUNT: u64 = 0x90;
    pub const DMA_COMMAND: u64 = 0x98;
    /// Command bits: start (cleared by the device when done); direction 1 = from the device's
    /// buffer to RAM, 0 = from RAM into the buffer.
    pub const DMA_RUN: u32 = 0x1;
    pub const DMA_TO_RAM: u32 = 0x2;
    /// The device's DMA buffer (4 KiB), in its own address space.
    pub const BUFFER: u64 = 0x4_0000;
    /// Bytes per transfer: half the buffer. QEMU 7.2's range check takes the end of a transfer
    /// of the whole buffer for out of bounds, and aborts QEMU (`edu_check_range()`).
    pub const TRANSFER_BYTES: u64 = 2048;
}

/// VFIO's PCI region indexes (linux/vfio.h).
const BAR0_REGION: u32 = 0;
const CONFIG_REGION: u32 = 7;
/// The PCI command register and its memory-space and bus-master bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;

/// What the VMM did with its passed-through device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioReport {
    /// The device's PCI address, e.g. `0000:00:03.0`.
    pub device: String,
    /// Its IOMMU group (`/dev/vfio/<group>`).
    pub group: u32,
    /// One entry per `VFIO_IOMMU_MAP_DMA`.
    pub mappings: Vec<DmaMapping>,
    /// `VFIO_IOMMU_MAP_DMA` calls (each one IOMMU mapping, one `iommu:map`) and the bytes they
    /// mapped.
    pub maps: u64,
    pub map_bytes: u64,
    /// `VFIO_IOMMU_UNMAP_DMA` calls (each one `iommu:unmap`) and the bytes they unmapped.
    pub unmaps: u64,
    pub unmap_bytes: u64,
    /// With `--vfio-dma`: the edu device's transfers.
    pub dma: Option<DmaReport>,
}

/// One DMA mapping of guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaMapping {
    pub iova: u64,
    pub gpa: u64,
    pub bytes: u64,
}

/// The edu device's DMA transfers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaReport {
    /// Transfers to and from mapped IOVAs, each checked by the data that arrived.
    pub transfers: u64,
    pub bytes: u64,
    /// Transfers the VMM started to an IOVA it never mapped: I/O page faults for the IOMMU.
    pub unmapped_transfers: u64,
    pub unmapped_iova: u64,
}

/// The device and what is mapped for it; unmapped by [`Passthrough::finish`].
pub struct Passthrough {
    container: Arc<VfioContainer>,
    device: VfioDevice,
    report: VfioReport,
}

impl Passthrough {
    /// Opens `bdf`'s group and device in a new container and maps four pages of guest memory
    /// for its DMA; with `dma`, drives the edu device's DMA as the module says.
    pub fn attach(bdf: &str, memory: &GuestMemoryMmap, dma: bool) -> Result<Self, Error> {
        let sysfs = Path::new("/sys/bus/pci/devices").join(bdf);
        let group = group_of(&sysfs)?;
        let container = Arc::new(VfioContainer::new(None).map_err(|e| {
            vfio_error(
                bdf,
                "cannot open /dev/vfio/vfio (load vfio and vfio_iommu_type1)",
                e,
            )
        })?);
        let device = VfioDevice::new(&sysfs, Arc::clone(&container) as Arc<dyn VfioOps>, false)
            .map_err(|e| {
                vfio_error(
                    bdf,
                    &format!(
                        "cannot open it through /dev/vfio/{group} (bind it to vfio-pci, and \
                         take it from no other process)"
                    ),
                    e,
                )
            })?;
        let mut passthrough = Self {
            container,
            device,
            report: VfioReport {
                device: bdf.to_owned(),
                group,
                mappings: Vec::new(),
                maps: 0,
                map_bytes: 0,
                unmaps: 0,
                unmap_bytes: 0,
                dma: None,
            },
        };
        passthrough.map(memory)?;
        if dma {
            passthrough.report.dma = Some(passthrough.run_dma(memory)?);
        }
        Ok(passthrough)
    }

    fn map(&mut self, memory: &GuestMemoryMmap) -> Result<(), Error> {
        for (gpa, iova) in (DMA_GPA..).step_by(PAGE_SIZE as usize).zip(MAPPINGS) {
            let hva = host_address(memory, gpa)?;
            // SAFETY: guest memory stays mapped for the VMM's life, longer than the mapping
            // (unmapped in `finish`), and is only reached through vm-memory's volatile accesses.
            unsafe {
                self.container
                    .vfio_dma_map(iova, PAGE_SIZE as usize, hva as *mut u8)
            }
            .map_err(|e| {
                vfio_error(
                    &self.report.device,
                    &format!("VFIO_IOMMU_MAP_DMA of a page at IOVA {iova:#x}"),
                    e,
                )
            })?;
            self.report.mappings.push(DmaMapping {
                iova,
                gpa,
                bytes: PAGE_SIZE,
            });
            self.report.maps += 1;
            self.report.map_bytes += PAGE_SIZE;
        }
        Ok(())
    }

    /// Two transfers through mapped IOVAs (RAM to the device's buffer, the buffer to other RAM,
    /// whose bytes must then be the first page's), then one to [`UNMAPPED_IOVA`].
    fn run_dma(&self, memory: &GuestMemoryMmap) -> Result<DmaReport, Error> {
        let id = self.read32(BAR0_REGION, edu::IDENTIFICATION);
        let vendor_device = self.read32(CONFIG_REGION, 0);
        if vendor_device != edu::VENDOR_DEVICE || id >> 16 != 0x0100 {
            return Err(Error::Config(format!(
                "--vfio-dma drives QEMU's edu device (1234:11e8); {} is {:04x}:{:04x}",
                self.report.device,
                vendor_device & 0xffff,
                vendor_device >> 16
            )));
        }
        let command = self.read16(CONFIG_REGION, PCI_COMMAND);
        self.device.region_write(
            CONFIG_REGION,
            &(command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER).to_le_bytes(),
            PCI_COMMAND,
        );
        let [source, destination, ..] = &self.report.mappings[..] else {
            unreachable!("MAPPINGS has three entries");
        };
        let pattern: Vec<u8> = (0..edu::TRANSFER_BYTES)
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        load(memory, source.gpa, &pattern)?;
        load(memory, destination.gpa, &vec![0; pattern.len()])?;
        self.transfer(source.iova, edu::BUFFER, 0)?;
        self.transfer(edu::BUFFER, destination.iova, edu::DMA_TO_RAM)?;
        let mut arrived = vec![0u8; pattern.len()];
        memory
            .read_slice(&mut arrived, GuestAddress(destination.gpa))
            .map_err(|e| Error::Memory(format!("reading the DMA's destination: {e}")))?;
        if arrived != pattern {
            return Err(Error::Mismatch(format!(
                "the edu device's DMA through IOVA {:#x} and {:#x} did not carry the page \
                 (first bytes {:?})",
                source.iova,
                destination.iova,
                &arrived[..8]
            )));
        }
        self.transfer(edu::BUFFER, UNMAPPED_IOVA, edu::DMA_TO_RAM)?;
        Ok(DmaReport {
            transfers: 2,
            bytes: 2 * edu::TRANSFER_BYTES,
            unmapped_transfers: 1,
            unmapped_iova: UNMAPPED_IOVA,
        })
    }

    /// One transfer of [`edu::TRANSFER_BYTES`], waited for: the device clears the run bit when done
    /// (after a 100 ms timer of its own).
    fn transfer(&self, source: u64, destination: u64, direction: u32) -> Result<(), Error> {
        self.write32(edu::DMA_SOURCE, source as u32);
        self.write32(edu::DMA_DESTINATION, destination as u32);
        self.write32(edu::DMA_COUNT, edu::TRANSFER_BYTES as u32);
        self.write32(edu::DMA_COMMAND, edu::DMA_RUN | direction);
        let started = Instant::now();
        while self.read32(BAR0_REGION, edu::DMA_COMMAND) & edu::DMA_RUN != 0 {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(Error::Vfio(format!(
                    "the edu device's DMA from {source:#x} to {destination:#x} did not end in 30 s"
                )));
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn read32(&self, region: u32, offset: u64) -> u32 {
        let mut bytes = [0u8; 4];
        self.device.region_read(region, &mut bytes, offset);
        u32::from_le_bytes(bytes)
    }

    fn read16(&self, region: u32, offset: u64) -> u16 {
        let mut bytes = [0u8; 2];
        self.device.region_read(region, &mut bytes, offset);
        u16::from_le_bytes(bytes)
    }

    fn write32(&self, offset: u64, value: u32) {
        self.device
            .region_write(BAR0_REGION, &value.to_le_bytes(), offset);
    }

    /// Unmaps every mapping and says what was done.
    pub fn finish(mut self) -> Result<VfioReport, Error> {
        for mapping in self.report.mappings.clone() {
            self.container
                .vfio_dma_unmap(mapping.iova, mapping.bytes as usize)
                .map_err(|e| {
                    vfio_error(
                        &self.report.device,
                        &format!("VFIO_IOMMU_UNMAP_DMA at IOVA {:#x}", mapping.iova),
                        e,
                    )
                })?;
            self.report.unmaps += 1;
            self.report.unmap_bytes += mapping.bytes;
        }
        Ok(self.report)
    }
}

/// The IOMMU group of the PCI device at `sysfs`.
fn group_of(sysfs: &Path) -> Result<u32, Error> {
    let link = sysfs.join("iommu_group");
    let target = std::fs::read_link(&link).map_err(|e| {
        Error::Config(format!(
            "{}: no IOMMU group ({e}): the host needs an IOMMU, enabled (e.g. iommu=nopt \
             amd_iommu=on or intel_iommu=on), and the device must exist",
            link.display()
        ))
    })?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Error::Config(format!(
                "{} points to {}, not an IOMMU group",
                link.display(),
                target.display()
            ))
        })
}

impl std::fmt::Debug for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passthrough")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

fn vfio_error(bdf: &str, what: &str, e: vfio_ioctls::VfioError) -> Error {
    Error::Vfio(format!("device {bdf}: {what}: {e}"))
}
