//! The plan of the `virtio` scenario, shared by the guest driver program, the VMM's setup and
//! its final checks: which vCPU drives which queue, where rings and buffers live in guest
//! memory, what each request does, and what every counter and byte must be at the end.
//!
//! Requests of one vCPU are numbered 0, 1, 2, ... Request `i` goes to the vCPU's local queue
//! `i mod k` (k = the number of queues it owns). Even requests are writes (VIRTIO_BLK_T_OUT) of
//! the vCPU's write buffer, odd requests read (VIRTIO_BLK_T_IN) the same sectors back into its
//! read buffer: pair `p` = requests `2p` and `2p + 1` uses disk slot `p mod SLOTS` of the
//! vCPU's own region of the disk. Before each write the guest adds 1 to the first and the last
//! 32-bit word of its write buffer (the tag), so every written payload differs from the last.

use crate::config::SECTOR_SIZE;
use crate::layout::{
    VIRTIO_BUFFERS_GPA, VIRTIO_NOTIFY_GPA, VIRTIO_QUEUE_STRIDE, VIRTIO_QUEUES_GPA, queue_block,
};

/// Disk slots (of one request each) per vCPU that request pairs cycle through. A power of two.
pub const SLOTS: u32 = 8;
/// The byte the VMM fills the disk with before the run.
pub const DISK_FILL: u8 = 0x5A;

/// What one queue must have seen at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueExpectation {
    /// Requests (= kicks, = chains served).
    pub requests: u64,
    /// Of which writes.
    pub writes: u64,
    /// Of which reads.
    pub reads: u64,
}

/// The static plan of one virtio run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// vCPUs.
    pub vcpus: u32,
    /// Queues of the device (at least `vcpus`).
    pub queues: u32,
    /// Requests per vCPU.
    pub count: u64,
    /// Data bytes per request (a multiple of 512).
    pub request_size: u32,
}

impl Plan {
    /// The vCPU that drives `queue`.
    pub fn owner(&self, queue: u32) -> u32 {
        queue % self.vcpus
    }

    /// The queues `vcpu` drives, in its round-robin order.
    pub fn queues_of(&self, vcpu: u32) -> Vec<u32> {
        (vcpu..self.queues).step_by(self.vcpus as usize).collect()
    }

    /// Guest-physical address of `queue`'s block (rings, header, status, guest kick counter).
    pub fn queue_gpa(queue: u32) -> u64 {
        VIRTIO_QUEUES_GPA + u64::from(queue) * VIRTIO_QUEUE_STRIDE
    }

    /// Guest-physical address of `queue`'s descriptor table.
    pub fn desc_gpa(queue: u32) -> u64 {
        Self::queue_gpa(queue) + queue_block::DESC
    }

    /// Guest-physical address of `queue`'s available (driver) ring.
    pub fn avail_gpa(queue: u32) -> u64 {
        Self::queue_gpa(queue) + queue_block::AVAIL
    }

    /// Guest-physical address of `queue`'s used (device) ring.
    pub fn used_gpa(queue: u32) -> u64 {
        Self::queue_gpa(queue) + queue_block::USED
    }

    /// Guest-physical address of the guest's own kick counter for `queue`.
    pub fn guest_kicks_gpa(queue: u32) -> u64 {
        Self::queue_gpa(queue) + queue_block::GUEST_KICKS
    }

    /// The address every queue's kick is written to (the value written is the queue index).
    pub fn notify_gpa() -> u64 {
        VIRTIO_NOTIFY_GPA
    }

    /// Guest-physical address of `vcpu`'s write buffer (16-byte aligned).
    pub fn write_buffer_gpa(&self, vcpu: u32) -> u64 {
        VIRTIO_BUFFERS_GPA + 2 * u64::from(vcpu) * u64::from(self.request_size)
    }

    /// Guest-physical address of `vcpu`'s read buffer, right after its write buffer.
    pub fn read_buffer_gpa(&self, vcpu: u32) -> u64 {
        self.write_buffer_gpa(vcpu) + u64::from(self.request_size)
    }

    /// Sectors per request.
    pub fn sectors_per_request(&self) -> u32 {
        self.request_size / SECTOR_SIZE
    }

    /// First sector of `vcpu`'s region of the disk.
    pub fn base_sector(&self, vcpu: u32) -> u64 {
        u64::from(vcpu) * u64::from(SLOTS) * u64::from(self.sectors_per_request())
    }

    /// Disk size in bytes: `SLOTS` requests per vCPU.
    pub fn disk_bytes(&self) -> u64 {
        u64::from(self.vcpus) * u64::from(SLOTS) * u64::from(self.request_size)
    }

    /// Writes one vCPU makes (even request numbers below `count`).
    pub fn writes_per_vcpu(&self) -> u64 {
        self.count.div_ceil(2)
    }

    /// Reads one vCPU makes (odd request numbers below `count`).
    pub fn reads_per_vcpu(&self) -> u64 {
        self.count / 2
    }

    /// What `queue` must have served by the end.
    pub fn expected(&self, queue: u32) -> QueueExpectation {
        let vcpu = self.owner(queue);
        let local = self.queues_of(vcpu);
        let k = local.len() as u64;
        let j = local
            .iter()
            .position(|&q| q == queue)
            .map_or(u64::MAX, |j| j as u64);
        // Requests j, j + k, j + 2k, ... below count.
        let requests = if j < self.count {
            (self.count - j).div_ceil(k)
        } else {
            0
        };
        let writes = if k.is_multiple_of(2) {
            // Every request of this queue has the parity of j.
            if j.is_multiple_of(2) { requests } else { 0 }
        } else if j.is_multiple_of(2) {
            // Parities alternate, starting with j's.
            requests.div_ceil(2)
        } else {
            requests / 2
        };
        QueueExpectation {
            requests,
            writes,
            reads: requests - writes,
        }
    }

    /// The initial content of `vcpu`'s write buffer: a pattern that differs per vCPU and from
    /// [`DISK_FILL`] and zero almost everywhere.
    pub fn write_pattern(&self, vcpu: u32) -> Vec<u8> {
        let mut x = 0x9E37_79B9u32 ^ vcpu.wrapping_mul(0x85EB_CA6B);
        (0..self.request_size)
            .map(|_| {
                // xorshift32
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The write pattern of `vcpu` after `writes` writes: first and last word plus `writes`.
    pub fn tagged(&self, vcpu: u32, writes: u64) -> Vec<u8> {
        let mut data = self.write_pattern(vcpu);
        let last = data.len() - 4;
        for at in [0, last] {
            let word = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
            // The guest's counter is 32 bits wide; so is the tag.
            let word = word.wrapping_add(writes as u32);
            data[at..at + 4].copy_from_slice(&word.to_le_bytes());
        }
        data
    }

    /// What `vcpu`'s write buffer must hold at the end.
    pub fn expected_write_buffer(&self, vcpu: u32) -> Vec<u8> {
        self.tagged(vcpu, self.writes_per_vcpu())
    }

    /// What `vcpu`'s read buffer must hold at the end: the data of the last pair it read back
    /// (all zero if it never read).
    pub fn expected_read_buffer(&self, vcpu: u32) -> Vec<u8> {
        match self.reads_per_vcpu() {
            0 => vec![0; self.request_size as usize],
            reads => self.tagged(vcpu, reads),
        }
    }

    /// What the whole disk must hold at the end: every slot holds the last write to it, slots
    /// never written hold [`DISK_FILL`].
    pub fn expected_disk(&self) -> Vec<u8> {
        let size = self.request_size as usize;
        let mut disk = vec![DISK_FILL; self.disk_bytes() as usize];
        let writes = self.writes_per_vcpu();
        for vcpu in 0..self.vcpus {
            for slot in 0..u64::from(SLOTS) {
                if slot >= writes {
                    continue;
                }
                // The last pair p < writes with p mod SLOTS == slot; its write is write p + 1.
                let last_pair = slot + (writes - 1 - slot) / u64::from(SLOTS) * u64::from(SLOTS);
                let at = (self.base_sector(vcpu) * u64::from(SECTOR_SIZE)) as usize
                    + slot as usize * size;
                disk[at..at + size].copy_from_slice(&self.tagged(vcpu, last_pair + 1));
            }
        }
        disk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(vcpus: u32, queues: u32, count: u64) -> Plan {
        Plan {
            vcpus,
            queues,
            count,
            request_size: 1024,
        }
    }

    /// The closed forms agree with walking the requests one by one.
    #[test]
    fn expectations_match_a_simulation() {
        for (vcpus, queues) in [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (2, 4), (3, 7)] {
            for count in [1, 2, 3, 4, 5, 7, 100, 101] {
                let p = plan(vcpus, queues, count);
                let mut want = vec![
                    QueueExpectation {
                        requests: 0,
                        writes: 0,
                        reads: 0
                    };
                    queues as usize
                ];
                for vcpu in 0..vcpus {
                    let local = p.queues_of(vcpu);
                    for i in 0..count {
                        let e = &mut want[local[(i % local.len() as u64) as usize] as usize];
                        e.requests += 1;
                        if i % 2 == 0 {
                            e.writes += 1;
                        } else {
                            e.reads += 1;
                        }
                    }
                }
                for q in 0..queues {
                    assert_eq!(p.expected(q), want[q as usize], "{p:?} queue {q}");
                }
            }
        }
    }

    #[test]
    fn queues_belong_to_one_vcpu() {
        let p = plan(2, 5, 10);
        assert_eq!(p.queues_of(0), [0, 2, 4]);
        assert_eq!(p.queues_of(1), [1, 3]);
        assert!((0..5).all(|q| p.queues_of(p.owner(q)).contains(&q)));
    }

    #[test]
    fn disk_holds_the_last_write_of_each_slot() {
        let p = plan(2, 2, 2 * u64::from(SLOTS) + 3); // 10 writes: slots 0 and 1 twice
        let disk = p.expected_disk();
        let size = p.request_size as usize;
        let region = SLOTS as usize * size;
        assert_eq!(&disk[..size], &p.tagged(0, 9)[..]);
        assert_eq!(&disk[size..2 * size], &p.tagged(0, 10)[..]);
        assert_eq!(&disk[2 * size..3 * size], &p.tagged(0, 3)[..]);
        assert_eq!(&disk[region..region + size], &p.tagged(1, 9)[..]);
        let p = plan(1, 1, 1);
        let disk = p.expected_disk();
        assert_eq!(&disk[..size], &p.tagged(0, 1)[..]);
        assert!(disk[size..].iter().all(|&b| b == DISK_FILL));
        assert_ne!(p.write_pattern(0), p.write_pattern(1));
    }
}
