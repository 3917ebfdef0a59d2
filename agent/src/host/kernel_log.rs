//! IOMMU faults from the kernel log, where no probe sees them. Linux's Intel VT-d driver reports a
//! DMA remapping fault only by printing it: `dmar_fault()` → `dmar_fault_do_one()`
//! (drivers/iommu/intel/dmar.c) calls no `report_iommu_fault()`, so `iommu:io_page_fault` never
//! fires there, and `dmar_fault_do_one()` is inlined, out of a kprobe's reach (docs/iommu.md).
//!
//! On such hosts the agent opens `/dev/kmsg` at start, from its end (earlier faults are not its to
//! count), and at every sample reads the records logged since and counts each DMAR fault line per
//! device and access:
//!
//! ```text
//! DMAR: [DMA Write NO_PASID] Request device [00:03.0] fault addr 0x400000 [fault reason 0x05] ...
//! ```

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{ErrorKind, Read, Seek, SeekFrom},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use crate::probe::counters::IommuFaults;

/// `flags` of a fault, as `iommu:io_page_fault` gives them (`IOMMU_FAULT_READ`, `_WRITE`).
const IOMMU_FAULT_READ: u32 = 0;
const IOMMU_FAULT_WRITE: u32 = 1;

/// The DMAR faults logged since the agent started, by device and access.
#[derive(Debug)]
pub struct DmarFaults {
    kmsg: File,
    counts: BTreeMap<(String, u32), u64>,
    /// Records the kernel overwrote before they were read (`EPIPE`): faults among them are lost.
    pub records_lost: u64,
}

impl DmarFaults {
    /// Opens `/dev/kmsg` at its end. Where `kernel.dmesg_restrict` is set, reading it takes
    /// CAP_SYSLOG.
    pub fn open() -> std::io::Result<Self> {
        Self::open_at(Path::new("/dev/kmsg"))
    }

    fn open_at(path: &Path) -> std::io::Result<Self> {
        let mut kmsg = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        kmsg.seek(SeekFrom::End(0))?;
        Ok(Self {
            kmsg,
            counts: BTreeMap::new(),
            records_lost: 0,
        })
    }

    /// Reads every record logged since the last call and counts its DMAR faults.
    pub fn read(&mut self) {
        // One record per read(2), at most about 8 KiB (kernel/printk/printk.c, devkmsg_read).
        let mut record = [0u8; 8192];
        loop {
            match self.kmsg.read(&mut record) {
                Ok(0) => return,
                Ok(n) => {
                    if let Some(fault) = parse(&String::from_utf8_lossy(&record[..n])) {
                        *self.counts.entry(fault).or_default() += 1;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => self.records_lost += 1,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // EAGAIN: nothing more for now; anything else: try again next sample.
                Err(_) => return,
            }
        }
    }

    /// The faults counted so far, as the probes' IOMMU faults are.
    pub fn faults(&self) -> impl Iterator<Item = IommuFaults> + '_ {
        self.counts
            .iter()
            .map(|((device, flags), &faults)| IommuFaults {
                device: device.clone(),
                flags: *flags,
                faults,
            })
    }
}

/// The device and access of a DMAR fault record (`<prefix>;<message>`), if it is one. The kernel
/// prints no PCI segment: the device is taken to be in segment 0.
fn parse(record: &str) -> Option<(String, u32)> {
    let message = record.split_once(';')?.1;
    let rest = message.strip_prefix("DMAR: [")?;
    let flags = if rest.starts_with("DMA Write") {
        IOMMU_FAULT_WRITE
    } else if rest.starts_with("DMA Read") {
        IOMMU_FAULT_READ
    } else {
        // Interrupt-remapping faults, and the driver's other lines.
        return None;
    };
    let device = rest.split_once("Request device [")?.1.split_once(']')?.0;
    let valid = device.len() == 7
        && device
            .bytes()
            .enumerate()
            .all(|(i, b)| matches!((i, b), (2, b':') | (5, b'.')) || b.is_ascii_hexdigit());
    valid.then(|| (format!("0000:{device}"), flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmar_fault_records_give_their_device_and_access() {
        let write = "3,812,4876754,-;DMAR: [DMA Write NO_PASID] Request device [00:03.0] fault \
                     addr 0x400000 [fault reason 0x05] PTE Write access is not set";
        assert_eq!(parse(write), Some(("0000:00:03.0".to_owned(), 1)));
        let read = "3,813,4876800,-;DMAR: [DMA Read PASID 0x1] Request device [65:1f.7] fault \
                    addr 0x1000 [fault reason 0x06] PTE Read access is not set";
        assert_eq!(parse(read), Some(("0000:65:1f.7".to_owned(), 0)));
        for other in [
            "3,814,1,-;DMAR: [INTR-REMAP] Request device [00:03.0] fault index 0x0",
            "3,815,1,-;DMAR: DRHD: handling fault status reg 2",
            "6,816,1,-;pci 0000:00:03.0: [DMA Write] Request device [00:03.0]",
            "3,817,1,-;DMAR: [DMA Write NO_PASID] Request device [0:3.0] fault addr 0x0",
            "no prefix at all",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }

    #[test]
    fn the_log_is_read_from_where_it_was_opened() {
        let dir = std::env::temp_dir().join(format!("vmtrace-kmsg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kmsg");
        let line = "3,1,1,-;DMAR: [DMA Write NO_PASID] Request device [00:03.0] fault addr 0x0\n";
        std::fs::write(&path, line).unwrap();
        let mut faults = DmarFaults::open_at(&path).unwrap();
        faults.read();
        assert_eq!(faults.faults().count(), 0, "logged before it was opened");
        drop(faults);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
