//! virtio-blk requests: parsing one descriptor chain and moving its data between guest memory
//! and the memory-backed disk.
//!
//! A request is a chain of a device-readable header `{type: u32, reserved: u32, sector: u64}`,
//! data descriptors (device-readable for OUT, device-writable for IN) and a device-writable
//! status byte last (virtio 1.x, 5.2.6).

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemory};

use crate::config::SECTOR_SIZE;

/// Size of the request header.
pub const HEADER_LEN: u32 = 16;
/// The serial number GET_ID returns (NUL-padded to 20 bytes).
pub const DEVICE_SERIAL: &[u8] = b"vmtrace-vmm-blk0";

/// The memory-backed disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Its bytes; the size is a multiple of 512.
    pub bytes: Vec<u8>,
}

/// What one request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// VIRTIO_BLK_T_IN: disk to guest.
    Read,
    /// VIRTIO_BLK_T_OUT: guest to disk.
    Write,
    /// Anything else (GET_ID, unsupported types).
    Other,
}

/// The outcome of one served request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The request's type.
    pub kind: Kind,
    /// The status byte written (VIRTIO_BLK_S_*).
    pub status: u8,
    /// Data bytes moved between guest memory and the disk (0 unless the status is OK).
    pub bytes: u64,
    /// The used length: bytes the device wrote into device-writable buffers, status included.
    pub used_len: u32,
    /// Why a request got a status other than OK.
    pub rejected: Option<String>,
}

/// Serves the request in `chain`. `Err` means the chain is malformed beyond answering (no
/// status byte to write, unreadable memory): the device then needs a reset.
pub fn serve<M>(
    chain: DescriptorChain<M>,
    mem: &M::Target,
    disk: &mut Disk,
) -> Result<Served, String>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let descs: Vec<Descriptor> = chain.collect();
    let [header, data @ .., status] = descs.as_slice() else {
        return Err(format!(
            "chain at head {head} has {} descriptor(s), a request needs at least a header and \
             a status byte",
            descs.len()
        ));
    };
    if !status.is_write_only() || status.len() < 1 {
        return Err(format!(
            "chain at head {head}: the last descriptor is not a device-writable status byte"
        ));
    }
    let (outcome, rejected) = match parse_header(mem, header) {
        Err(why) => ((VIRTIO_BLK_S_IOERR, 0, 0, Kind::Other), Some(why)),
        Ok((kind, sector)) => match execute(mem, kind, sector, data, disk) {
            Ok(done) => (done, None),
            Err((kind, status, why)) => ((status, 0, 0, kind), Some(why)),
        },
    };
    let (status_byte, bytes, written, kind) = outcome;
    mem.write_obj(status_byte as u8, status.addr())
        .map_err(|e| {
            format!(
                "cannot write the status byte at {:#x}: {e}",
                status.addr().0
            )
        })?;
    Ok(Served {
        kind,
        status: status_byte as u8,
        bytes,
        used_len: written + 1,
        rejected,
    })
}

fn parse_header<M: GuestMemory + ?Sized>(
    mem: &M,
    header: &Descriptor,
) -> Result<(u32, u64), String> {
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err("the first descriptor is not a device-readable 16-byte header".into());
    }
    let kind: u32 = mem
        .read_obj(header.addr())
        .map_err(|e| format!("cannot read the header: {e}"))?;
    let sector: u64 = mem
        .read_obj(header.addr().unchecked_add(8))
        .map_err(|e| format!("cannot read the header: {e}"))?;
    Ok((u32::from_le(kind), u64::from_le(sector)))
}

type Done = (u32, u64, u32, Kind);
type Rejected = (Kind, u32, String);

/// Executes request `kind` at `sector`: (status, bytes moved, bytes written to the guest, kind).
fn execute<M: GuestMemory + ?Sized>(
    mem: &M,
    kind: u32,
    sector: u64,
    data: &[Descriptor],
    disk: &mut Disk,
) -> Result<Done, Rejected> {
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let read = kind == VIRTIO_BLK_T_IN;
            let k = if read { Kind::Read } else { Kind::Write };
            let reject = |why: String| (k, VIRTIO_BLK_S_IOERR, why);
            if data.iter().any(|d| d.is_write_only() != read) {
                return Err(reject(format!(
                    "a {} data descriptor is not device-{}",
                    if read { "read" } else { "write" },
                    if read { "writable" } else { "readable" }
                )));
            }
            let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
            if total == 0 || !total.is_multiple_of(u64::from(SECTOR_SIZE)) {
                return Err(reject(format!(
                    "{total} data bytes, not a positive multiple of {SECTOR_SIZE}"
                )));
            }
            let start = sector.checked_mul(u64::from(SECTOR_SIZE));
            let end = start.and_then(|s| s.checked_add(total));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(reject(format!("sector {sector} overflows")));
            };
            if end > disk.bytes.len() as u64 {
                return Err(reject(format!(
                    "sectors {sector}..{} lie beyond the disk's {} sectors",
                    end / u64::from(SECTOR_SIZE),
                    disk.bytes.len() / SECTOR_SIZE as usize
                )));
            }
            let mut at = start as usize;
            for d in data {
                let slice = &mut disk.bytes[at..at + d.len() as usize];
                let moved = if read {
                    mem.write_slice(slice, d.addr())
                } else {
                    mem.read_slice(slice, d.addr())
                };
                moved.map_err(|e| reject(format!("guest buffer at {:#x}: {e}", d.addr().0)))?;
                at += d.len() as usize;
            }
            let written = if read { total as u32 } else { 0 };
            Ok((VIRTIO_BLK_S_OK, total, written, k))
        }
        VIRTIO_BLK_T_GET_ID => {
            let Some(d) = data.iter().find(|d| d.is_write_only()) else {
                return Err((
                    Kind::Other,
                    VIRTIO_BLK_S_IOERR,
                    "GET_ID without a device-writable buffer".into(),
                ));
            };
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            id[..DEVICE_SERIAL.len()].copy_from_slice(DEVICE_SERIAL);
            let n = (d.len() as usize).min(id.len());
            mem.write_slice(&id[..n], d.addr()).map_err(|e| {
                (
                    Kind::Other,
                    VIRTIO_BLK_S_IOERR,
                    format!("GET_ID buffer at {:#x}: {e}", d.addr().0),
                )
            })?;
            Ok((VIRTIO_BLK_S_OK, 0, n as u32, Kind::Other))
        }
        other => Err((
            Kind::Other,
            VIRTIO_BLK_S_UNSUPP,
            format!("request type {other} is not supported"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    const HDR: u64 = 0x4000;
    const BUF: u64 = 0x5000;
    const ST: u64 = 0x6000;

    /// Serves one chain (header, data of `len` bytes, status) with the given flags and header.
    fn serve_one(kind: u32, sector: u64, len: u32, data_flags: u16, disk: &mut Disk) -> Served {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap();
        mem.write_slice(&[0xAB; 0x1000], GuestAddress(BUF)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let next = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(Descriptor::new(HDR, HEADER_LEN, next, 1)),
            RawDescriptor::from(Descriptor::new(BUF, len, data_flags | next, 2)),
            RawDescriptor::from(Descriptor::new(ST, 1, VRING_DESC_F_WRITE as u16, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let served = serve(chain, &mem, disk).unwrap();
        let status: u8 = mem.read_obj(GuestAddress(ST)).unwrap();
        assert_eq!(status, served.status);
        served
    }

    #[test]
    fn writes_then_reads() {
        let mut disk = Disk {
            bytes: vec![0; 8 * 512],
        };
        let w = serve_one(VIRTIO_BLK_T_OUT, 2, 1024, 0, &mut disk);
        assert_eq!(
            (w.kind, w.status, w.bytes, w.used_len),
            (Kind::Write, 0, 1024, 1)
        );
        assert!(disk.bytes[1024..2048].iter().all(|&b| b == 0xAB));
        assert!(disk.bytes[..1024].iter().all(|&b| b == 0));
        disk.bytes[1024] = 0x11;
        let r = serve_one(
            VIRTIO_BLK_T_IN,
            2,
            512,
            VRING_DESC_F_WRITE as u16,
            &mut disk,
        );
        assert_eq!(
            (r.kind, r.status, r.bytes, r.used_len),
            (Kind::Read, 0, 512, 513)
        );
    }

    #[test]
    fn rejects_bad_requests_with_a_status() {
        let mut disk = Disk {
            bytes: vec![0; 4 * 512],
        };
        let wr = VRING_DESC_F_WRITE as u16;
        // Beyond the disk, a partial sector, wrong direction, unknown type.
        for (kind, sector, len, flags, status) in [
            (VIRTIO_BLK_T_IN, 3, 1024, wr, VIRTIO_BLK_S_IOERR),
            (VIRTIO_BLK_T_OUT, 0, 100, 0, VIRTIO_BLK_S_IOERR),
            (VIRTIO_BLK_T_IN, 0, 512, 0, VIRTIO_BLK_S_IOERR),
            (99, 0, 512, 0, VIRTIO_BLK_S_UNSUPP),
        ] {
            let s = serve_one(kind, sector, len, flags, &mut disk);
            assert_eq!(u32::from(s.status), status, "{s:?}");
            assert_eq!(s.bytes, 0);
            assert!(s.rejected.is_some());
        }
        assert!(disk.bytes.iter().all(|&b| b == 0));
        let id = serve_one(VIRTIO_BLK_T_GET_ID, 0, 20, wr, &mut disk);
        assert_eq!((id.status, id.used_len), (0, 21));
    }
}
