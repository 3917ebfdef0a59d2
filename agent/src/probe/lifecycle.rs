//! Reads the kernel's cgroup lifecycle events (mkdir, rmdir, attach) into the cgroup index, so that
//! a tenant is named from the moment its cgroup exists, however briefly, and is known to be gone
//! once it is removed.

use aya::maps::{MapData, RingBuf};
use vmtrace_common::{CGROUP_EVENTS_MAP, CGROUP_PATH_LEN, CgroupEvent, CgroupEventKind};

use crate::{host::cgroup_index::CgroupIndex, probe::map_access::CountsError};

pub struct CgroupEvents {
    ring: RingBuf<MapData>,
}

impl CgroupEvents {
    pub fn new(ebpf: &mut aya::Ebpf) -> Result<Self, CountsError> {
        let map = ebpf
            .take_map(CGROUP_EVENTS_MAP)
            .ok_or(CountsError::MissingMap(CGROUP_EVENTS_MAP))?;
        let ring = RingBuf::try_from(map).map_err(|e| CountsError::Map(CGROUP_EVENTS_MAP, e))?;
        Ok(Self { ring })
    }

    /// Applies every pending event to `index`; returns how many there were.
    pub fn drain(&mut self, index: &mut CgroupIndex) -> usize {
        let mut applied = 0;
        while let Some(item) = self.ring.next() {
            if let Some((kind, id, path)) = decode(&item) {
                match kind {
                    // A path that may have been cut is left to the hierarchy walk, which names
                    // the cgroup whole while it exists.
                    CgroupEventKind::Mkdir | CgroupEventKind::Attach if may_be_cut(&item) => {}
                    CgroupEventKind::Mkdir | CgroupEventKind::Attach => index.insert(id, path),
                    // Gone: the walk can no longer name it, so a cut path is better than none
                    // (and a whole one already known stays).
                    CgroupEventKind::Rmdir => index.remove(id, path),
                }
                applied += 1;
            }
        }
        applied
    }
}

/// Whether the kernel program may have cut the event's path: it keeps at most
/// `CGROUP_PATH_LEN - 1` bytes (a cgroup v2 path can be up to PATH_MAX).
fn may_be_cut(bytes: &[u8]) -> bool {
    bytes.len() >= size_of::<CgroupEvent>() && {
        // SAFETY: as in `decode`.
        let event: CgroupEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        event.path_len as usize >= CGROUP_PATH_LEN - 1
    }
}

/// An event's kind, cgroup id and path.
fn decode(bytes: &[u8]) -> Option<(CgroupEventKind, u64, String)> {
    if bytes.len() < size_of::<CgroupEvent>() {
        return None;
    }
    // SAFETY: the buffer holds at least one CgroupEvent, a plain repr(C) struct of integers and
    // bytes, written by the kernel program; read_unaligned copes with any alignment.
    let event: CgroupEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let kind = CgroupEventKind::try_from(event.kind).ok()?;
    let len = (event.path_len as usize).min(event.path.len());
    let path = String::from_utf8_lossy(&event.path[..len]).into_owned();
    Some((kind, event.id, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_events_and_rejects_short_ones() {
        let mut event = CgroupEvent {
            id: 42,
            kind: CgroupEventKind::Rmdir as u32,
            path_len: 6,
            path: [0; 256],
        };
        event.path[..6].copy_from_slice(b"/a/b/c");
        // SAFETY: viewing a plain repr(C) struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<CgroupEvent>())
        };
        assert_eq!(
            decode(bytes),
            Some((CgroupEventKind::Rmdir, 42, "/a/b/c".to_owned()))
        );
        assert_eq!(decode(&bytes[..10]), None);
        assert!(!may_be_cut(bytes));
    }

    #[test]
    fn a_path_of_the_longest_length_carried_may_be_cut() {
        let event = CgroupEvent {
            id: 42,
            kind: CgroupEventKind::Mkdir as u32,
            path_len: u32::try_from(CGROUP_PATH_LEN - 1).unwrap(),
            path: [b'x'; CGROUP_PATH_LEN],
        };
        // SAFETY: viewing a plain repr(C) struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<CgroupEvent>())
        };
        assert!(may_be_cut(bytes));
    }
}
