//! The driver's initialisation of the device (virtio 1.x, 3.1.1 and 4.2.3.1), done by the VMM
//! from the host side to keep the real-mode guest small. It goes through the same register
//! handlers as the guest's MMIO exits, in the order a driver must follow, and checks what it
//! reads back as a driver would; the guest then only drives the queues.

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VERSION,
};

use super::MmioHandle;
use super::mmio::{DEVICE_ID, MAGIC, VERSION};
use super::plan::Plan;
use crate::error::Error;
use crate::layout::{VIRTIO_MMIO_GPA, VIRTIO_QUEUE_SIZE};

/// The features the driver acknowledges.
pub const DRIVER_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_MQ);
/// Offset of `num_queues` in the virtio-blk configuration space.
const CONFIG_NUM_QUEUES: u64 = 34;

struct Driver<'a> {
    device: &'a MmioHandle,
}

impl Driver<'_> {
    fn read(&self, reg: u32) -> Result<u32, Error> {
        let mut data = [0; 4];
        self.device
            .read(VIRTIO_MMIO_GPA + u64::from(reg), &mut data)
            .map_err(|e| Error::Device(format!("driver initialisation: {e}")))?;
        Ok(u32::from_le_bytes(data))
    }

    fn write(&self, reg: u32, value: u32) -> Result<(), Error> {
        self.device
            .write(VIRTIO_MMIO_GPA + u64::from(reg), &value.to_le_bytes())
            .map_err(|e| Error::Device(format!("driver initialisation: {e}")))
    }

    fn set_status(&self, bits: u32) -> Result<u32, Error> {
        let status = self.read(VIRTIO_MMIO_STATUS)? | bits;
        self.write(VIRTIO_MMIO_STATUS, status)?;
        self.read(VIRTIO_MMIO_STATUS)
    }

    fn write_address(&self, low: u32, high: u32, gpa: u64) -> Result<(), Error> {
        self.write(low, gpa as u32)?;
        self.write(high, (gpa >> 32) as u32)
    }
}

/// Initialises the device for `plan` as its driver would, ending with DRIVER_OK.
pub fn initialise(device: &MmioHandle, plan: &Plan) -> Result<(), Error> {
    let d = Driver { device };
    let fail = |what: String| Err(Error::Device(format!("driver initialisation: {what}")));
    let ids = (
        d.read(VIRTIO_MMIO_MAGIC_VALUE)?,
        d.read(VIRTIO_MMIO_VERSION)?,
        d.read(VIRTIO_MMIO_DEVICE_ID)?,
    );
    if ids != (MAGIC, VERSION, DEVICE_ID) {
        return fail(format!("not a virtio 1.x block device: {ids:x?}"));
    }
    d.write(VIRTIO_MMIO_STATUS, 0)?;
    d.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)?;
    d.set_status(VIRTIO_CONFIG_S_DRIVER)?;
    let mut offered = 0u64;
    for sel in 0..2u32 {
        d.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel)?;
        offered |= u64::from(d.read(VIRTIO_MMIO_DEVICE_FEATURES)?) << (32 * sel);
    }
    if offered & DRIVER_FEATURES != DRIVER_FEATURES {
        return fail(format!("the device offers features {offered:#x}"));
    }
    for sel in 0..2u32 {
        d.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)?;
        d.write(
            VIRTIO_MMIO_DRIVER_FEATURES,
            (DRIVER_FEATURES >> (32 * sel)) as u32,
        )?;
    }
    if d.set_status(VIRTIO_CONFIG_S_FEATURES_OK)? & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
        return fail("the device refused the features".into());
    }
    let mut num_queues = [0; 2];
    device
        .read(
            VIRTIO_MMIO_GPA + u64::from(VIRTIO_MMIO_CONFIG) + CONFIG_NUM_QUEUES,
            &mut num_queues,
        )
        .map_err(Error::Device)?;
    let num_queues = u32::from(u16::from_le_bytes(num_queues));
    if num_queues < plan.queues {
        return fail(format!("the device has {num_queues} queues"));
    }
    for queue in 0..plan.queues {
        d.write(VIRTIO_MMIO_QUEUE_SEL, queue)?;
        if d.read(VIRTIO_MMIO_QUEUE_READY)? != 0 {
            return fail(format!("queue {queue} is already in use"));
        }
        let max = d.read(VIRTIO_MMIO_QUEUE_NUM_MAX)?;
        if max < u32::from(VIRTIO_QUEUE_SIZE) {
            return fail(format!("queue {queue} has at most {max} entries"));
        }
        d.write(VIRTIO_MMIO_QUEUE_NUM, u32::from(VIRTIO_QUEUE_SIZE))?;
        d.write_address(
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_QUEUE_DESC_HIGH,
            Plan::desc_gpa(queue),
        )?;
        d.write_address(
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            Plan::avail_gpa(queue),
        )?;
        d.write_address(
            VIRTIO_MMIO_QUEUE_USED_LOW,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            Plan::used_gpa(queue),
        )?;
        d.write(VIRTIO_MMIO_QUEUE_READY, 1)?;
    }
    let status = d.set_status(VIRTIO_CONFIG_S_DRIVER_OK)?;
    let want = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK;
    if status != want {
        return fail(format!("status is {status:#x} after DRIVER_OK"));
    }
    Ok(())
}
