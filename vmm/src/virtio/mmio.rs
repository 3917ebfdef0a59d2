//! The virtio-mmio transport (virtio 1.x, "modern", register layout version 2) of the block
//! device: its register file, the device status state machine and the queues' configuration.
//!
//! Every register access goes through [`Transport::read`] and [`Transport::write`]: the guest's
//! MMIO exits, and the VMM's host-side driver initialisation ([`super::driver`]) alike. The
//! registers (offsets below 0x100) take aligned 32-bit accesses only, as the specification
//! requires of drivers; the device configuration space (from 0x100) takes any width.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_MQ, virtio_blk_config};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_SHM_BASE_HIGH, VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::VIRTIO_QUEUE_MAX_SIZE;

/// MagicValue: "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Version of the register layout: 2 is the virtio 1.x ("modern") transport.
pub const VERSION: u32 = 2;
/// DeviceID of a block device.
pub const DEVICE_ID: u32 = VIRTIO_ID_BLOCK;
/// VendorID: "vmtr".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"vmtr");
/// The features the device offers: VIRTIO_F_VERSION_1 and VIRTIO_BLK_F_MQ.
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_MQ);
/// Size of the device configuration space (struct virtio_blk_config).
pub const CONFIG_LEN: usize = size_of::<virtio_blk_config>();

/// What a register write asks of the VMM beyond updating the register file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEffect {
    /// Nothing more.
    None,
    /// A QueueNotify write that reached the VMM (no ioeventfd matched it): kick this queue.
    Notify(u32),
}

/// The register file and queues of the virtio-blk device.
#[derive(Debug)]
pub struct Transport {
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    shm_sel: u32,
    config: Vec<u8>,
    queues: Vec<Queue>,
    activated: bool,
    mem: GuestMemoryMmap,
}

impl Transport {
    /// A reset device with `queues` queues over a disk of `capacity_sectors` 512-byte sectors.
    pub fn new(
        queues: u16,
        capacity_sectors: u64,
        mem: GuestMemoryMmap,
    ) -> Result<Transport, String> {
        let mut config = vec![0; CONFIG_LEN];
        let at = offset_of!(virtio_blk_config, capacity);
        config[at..at + 8].copy_from_slice(&capacity_sectors.to_le_bytes());
        let at = offset_of!(virtio_blk_config, num_queues);
        config[at..at + 2].copy_from_slice(&queues.to_le_bytes());
        let queues = (0..queues)
            .map(|_| Queue::new(VIRTIO_QUEUE_MAX_SIZE))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot create a queue: {e}"))?;
        Ok(Transport {
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            shm_sel: 0,
            config,
            queues,
            activated: false,
            mem,
        })
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver set DRIVER_OK and the device accepted it.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// The features the driver acknowledged.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Queue `index` if the device is live and the queue is ready: the worker serves only those.
    pub fn live_queue(&mut self, index: u32) -> Option<&mut Queue> {
        if !self.activated {
            return None;
        }
        self.queues.get_mut(index as usize).filter(|q| q.ready())
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET), e.g. after a malformed descriptor chain.
    pub fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Serves a read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), String> {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            return self.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
        }
        let reg = register(offset, data.len())?;
        let value = match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => DEVICE_ID,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => DEVICE_FEATURES as u32,
                1 => (DEVICE_FEATURES >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX if (self.queue_sel as usize) < self.queues.len() => {
                u32::from(VIRTIO_QUEUE_MAX_SIZE)
            }
            VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: length and base read as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            // Write-only and reserved registers read as zero.
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), String> {
        if data.len() > 8 {
            return Err(format!("{}-byte config space read", data.len()));
        }
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
        Ok(())
    }

    /// Serves a write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<WriteEffect, String> {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            // virtio-blk's configuration space is read-only without VIRTIO_BLK_F_CONFIG_WCE.
            return Ok(WriteEffect::None);
        }
        let reg = register(offset, data.len())?;
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value)?,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                let size = u16::try_from(value).map_err(|_| format!("QueueNum {value}"))?;
                self.configure_queue(|q| q.try_set_size(size).map_err(|e| e.to_string()))?;
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if value as usize >= self.queues.len() {
                    return Err(format!(
                        "QueueNotify for queue {value}, the device has {}",
                        self.queues.len()
                    ));
                }
                return Ok(WriteEffect::Notify(value));
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.write_status(value)?,
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_address(reg, value)?,
            VIRTIO_MMIO_SHM_SEL => self.shm_sel = value,
            // Read-only and reserved registers ignore writes.
            _ => {}
        }
        Ok(WriteEffect::None)
    }

    fn write_driver_features(&mut self, value: u32) -> Result<(), String> {
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0
            || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            return Err("DriverFeatures written outside feature negotiation".into());
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return Ok(()),
        };
        self.driver_features =
            (self.driver_features & !(0xFFFF_FFFFu64 << shift)) | (u64::from(value) << shift);
        Ok(())
    }

    /// Applies `change` to the selected queue, which must exist and not be ready.
    fn configure_queue(
        &mut self,
        change: impl FnOnce(&mut Queue) -> Result<(), String>,
    ) -> Result<(), String> {
        let sel = self.queue_sel;
        let Some(queue) = self.selected() else {
            return Err(format!(
                "queue {sel} configured, the device has no such queue"
            ));
        };
        if queue.ready() {
            return Err(format!("queue {sel} configured while it is ready"));
        }
        change(queue).map_err(|e| format!("queue {sel}: {e}"))
    }

    fn write_queue_address(&mut self, reg: u32, value: u32) -> Result<(), String> {
        self.configure_queue(|q| {
            let (current, high) = match reg {
                VIRTIO_MMIO_QUEUE_DESC_LOW => (q.desc_table(), false),
                VIRTIO_MMIO_QUEUE_DESC_HIGH => (q.desc_table(), true),
                VIRTIO_MMIO_QUEUE_AVAIL_LOW => (q.avail_ring(), false),
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (q.avail_ring(), true),
                VIRTIO_MMIO_QUEUE_USED_LOW => (q.used_ring(), false),
                _ => (q.used_ring(), true),
            };
            let address = GuestAddress(if high {
                (current & 0xFFFF_FFFF) | (u64::from(value) << 32)
            } else {
                (current & !0xFFFF_FFFF) | u64::from(value)
            });
            let result = match reg {
                VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                    q.try_set_desc_table_address(address)
                }
                VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                    q.try_set_avail_ring_address(address)
                }
                _ => q.try_set_used_ring_address(address),
            };
            result.map_err(|e| e.to_string())
        })
    }

    fn write_status(&mut self, value: u32) -> Result<(), String> {
        if value == 0 {
            self.reset();
            return Ok(());
        }
        let old = self.status;
        if value & old != old & !VIRTIO_CONFIG_S_NEEDS_RESET {
            return Err(format!(
                "Status {value:#x} clears bits of {old:#x} (only a write of 0 may, to reset)"
            ));
        }
        let added = value & !old;
        let mut status = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let acceptable = self.driver_features & !DEVICE_FEATURES == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !acceptable {
                // The driver will read Status back and see FEATURES_OK unset.
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let wanted =
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
            let queues_valid = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            if status & wanted == wanted && queues_valid {
                self.activated = true;
            } else {
                status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            self.activated = false;
        }
        self.status = status;
        Ok(())
    }

    /// Device reset: every register and queue back to its initial state. The worker stops
    /// serving the queues until the driver sets DRIVER_OK again.
    fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.shm_sel = 0;
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
    }
}

/// The register at `offset`, checking the access is an aligned 32-bit one.
fn register(offset: u64, len: usize) -> Result<u32, String> {
    if len != 4 || !offset.is_multiple_of(4) {
        return Err(format!(
            "{len}-byte access at register offset {offset:#x}: virtio-mmio registers take \
             aligned 4-byte accesses only"
        ));
    }
    u32::try_from(offset).map_err(|_| format!("register offset {offset:#x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport() -> Transport {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        Transport::new(2, 64, mem).unwrap()
    }

    fn read(t: &Transport, offset: u32) -> u32 {
        let mut data = [0; 4];
        t.read(u64::from(offset), &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    fn write(t: &mut Transport, offset: u32, value: u32) -> WriteEffect {
        t.write(u64::from(offset), &value.to_le_bytes()).unwrap()
    }

    #[test]
    fn identifies_itself() {
        let t = transport();
        assert_eq!(read(&t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read(&t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(&t, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(read(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        // Config space: capacity (u64 at 0) and num_queues (u16 at 34), any width.
        let mut capacity = [0; 8];
        t.read(0x100, &mut capacity).unwrap();
        assert_eq!(u64::from_le_bytes(capacity), 64);
        let mut queues = [0; 2];
        t.read(0x100 + 34, &mut queues).unwrap();
        assert_eq!(u16::from_le_bytes(queues), 2);
        // Registers take aligned 4-byte accesses only.
        assert!(t.read(0x70, &mut [0; 2]).is_err());
        assert!(t.read(0x72, &mut [0; 4]).is_err());
    }

    #[test]
    fn negotiates_and_activates() {
        let mut t = transport();
        write(&mut t, VIRTIO_MMIO_STATUS, 1);
        write(&mut t, VIRTIO_MMIO_STATUS, 3);
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write(&mut t, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(read(&t, VIRTIO_MMIO_STATUS), 0xb);
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1100);
        write(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x1180);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert!(t.live_queue(1).is_none());
        write(&mut t, VIRTIO_MMIO_STATUS, 0xf);
        assert_eq!(read(&t, VIRTIO_MMIO_STATUS), 0xf);
        assert!(t.live_queue(1).is_some());
        assert!(t.live_queue(0).is_none(), "queue 0 is not ready");
        // A ready queue cannot be reconfigured; QueueNotify that reaches the VMM is a kick.
        assert!(t.write(0x38, &8u32.to_le_bytes()).is_err());
        assert_eq!(
            write(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1),
            WriteEffect::Notify(1)
        );
        assert!(t.write(0x50, &2u32.to_le_bytes()).is_err());
        // Reset stops everything.
        write(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert!(t.live_queue(1).is_none());
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read(&t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn refuses_bad_features_and_bad_queues() {
        let mut t = transport();
        write(&mut t, VIRTIO_MMIO_STATUS, 3);
        // No VERSION_1: FEATURES_OK does not stick.
        write(&mut t, VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(read(&t, VIRTIO_MMIO_STATUS), 3);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write(&mut t, VIRTIO_MMIO_STATUS, 0xb);
        // A ready queue whose rings lie outside guest memory: DRIVER_OK gets NEEDS_RESET.
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10_0000);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        write(&mut t, VIRTIO_MMIO_STATUS, 0xf);
        assert_eq!(read(&t, VIRTIO_MMIO_STATUS), 0x4f);
        assert!(!t.activated());
        // Misaligned rings and sizes that are not powers of two are refused.
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert!(t.write(0x80, &0x1001u32.to_le_bytes()).is_err());
        assert!(t.write(0x38, &12u32.to_le_bytes()).is_err());
    }
}
