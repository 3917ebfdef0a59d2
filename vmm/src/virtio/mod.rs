//! The virtio-blk device of the `virtio` scenario: a virtio-mmio transport ([`mmio`]) at
//! [`VIRTIO_MMIO_GPA`], a memory-backed disk ([`blk`]), one ioeventfd per queue on QueueNotify
//! (datamatch = queue index) and a worker thread that serves the queues ([`worker`]).
//!
//! The VMM performs the driver's initialisation itself ([`driver`]); the guest program
//! ([`crate::guest::virtio`]) probes the device, then only fills descriptors, kicks and polls.
//! [`VirtioBlk::finish`] checks the outcome against the [`plan`].

pub mod blk;
pub mod driver;
pub mod mmio;
pub mod plan;
pub mod worker;

use std::io::ErrorKind;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use self::blk::Disk;
use self::mmio::{Transport, WriteEffect};
use self::plan::{DISK_FILL, Plan};
use self::worker::{Worker, WorkerOutput};
use crate::config::SECTOR_SIZE;
use crate::error::Error;
use crate::ioeventfd;
use crate::layout::{
    VIRTIO_MMIO_GPA, VIRTIO_MMIO_LEN, VIRTIO_NOTIFY_GPA, VIRTIO_NOTIFY_LEN, VIRTIO_QUEUE_SIZE,
};
use crate::memory;
use crate::report::{IoEventFdReport, VirtioQueueReport, VirtioReport};

/// What a vCPU thread needs to serve the device's MMIO exits.
#[derive(Debug, Clone)]
pub struct MmioHandle {
    transport: Arc<Mutex<Transport>>,
    kicks: Arc<Vec<EventFd>>,
}

impl MmioHandle {
    /// Whether `addr` lies in the device's window.
    pub fn contains(addr: u64) -> bool {
        (VIRTIO_MMIO_GPA..VIRTIO_MMIO_GPA + VIRTIO_MMIO_LEN).contains(&addr)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Transport>, String> {
        self.transport
            .lock()
            .map_err(|_| "the register lock is poisoned".to_string())
    }

    /// Serves an MMIO read at guest-physical `addr` (inside the window).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), String> {
        self.lock()?.read(addr - VIRTIO_MMIO_GPA, data)
    }

    /// Serves an MMIO write at guest-physical `addr` (inside the window). A QueueNotify write
    /// that reached the VMM (no ioeventfd matched it) signals the queue's eventfd, as the
    /// ioeventfd would have.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), String> {
        let effect = self.lock()?.write(addr - VIRTIO_MMIO_GPA, data)?;
        if let WriteEffect::Notify(queue) = effect {
            self.kicks[queue as usize]
                .write(1)
                .map_err(|e| format!("cannot signal queue {queue}'s eventfd: {e}"))?;
        }
        Ok(())
    }
}

/// The device, set up and initialised, its worker not yet started.
#[derive(Debug)]
pub struct VirtioBlk {
    plan: Plan,
    handle: MmioHandle,
    disk: Option<Disk>,
    ioeventfds: Vec<IoEventFdReport>,
    mem: GuestMemoryMmap,
}

impl VirtioBlk {
    /// Creates the device for `plan` in `vm`: registers one ioeventfd per queue, initialises
    /// the device as its driver would, and fills the guest's write buffers with their pattern.
    pub fn create(vm: &VmFd, mem: &GuestMemoryMmap, plan: Plan) -> Result<VirtioBlk, Error> {
        let sectors = plan.disk_bytes() / u64::from(SECTOR_SIZE);
        let queues =
            u16::try_from(plan.queues).map_err(|_| Error::Config("too many queues".into()))?;
        let transport = Transport::new(queues, sectors, mem.clone()).map_err(Error::Device)?;
        let mut kicks = Vec::with_capacity(plan.queues as usize);
        let mut ioeventfds = Vec::with_capacity(plan.queues as usize);
        for queue in 0..plan.queues {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd("creation", e))?;
            ioeventfds.push(ioeventfd::register_mmio(
                vm,
                &fd,
                VIRTIO_NOTIFY_GPA,
                VIRTIO_NOTIFY_LEN,
                Some(u64::from(queue)),
            )?);
            kicks.push(fd);
        }
        let handle = MmioHandle {
            transport: Arc::new(Mutex::new(transport)),
            kicks: Arc::new(kicks),
        };
        driver::initialise(&handle, &plan)?;
        for vcpu in 0..plan.vcpus {
            memory::load(mem, plan.write_buffer_gpa(vcpu), &plan.write_pattern(vcpu))?;
        }
        let disk = Disk {
            bytes: vec![DISK_FILL; plan.disk_bytes() as usize],
        };
        Ok(VirtioBlk {
            plan,
            handle,
            disk: Some(disk),
            ioeventfds,
            mem: mem.clone(),
        })
    }

    /// Swaps the disk, for tests that make the device misbehave.
    #[cfg(test)]
    pub(crate) fn replace_disk(&mut self, disk: Disk) {
        self.disk = Some(disk);
    }

    /// The handle vCPU threads serve MMIO exits with.
    pub fn handle(&self) -> MmioHandle {
        self.handle.clone()
    }

    /// The KVM_IOEVENTFD registrations, one per queue.
    pub fn ioeventfds(&self) -> &[IoEventFdReport] {
        &self.ioeventfds
    }

    /// Starts the worker thread (once); `on_failure` is called if it has to give up.
    pub fn start(
        &mut self,
        on_failure: impl FnOnce(Error) + Send + 'static,
    ) -> Result<Worker, Error> {
        let disk = self
            .disk
            .take()
            .ok_or_else(|| Error::Device("the worker was started twice".into()))?;
        Worker::spawn(
            Arc::clone(&self.handle.transport),
            self.mem.clone(),
            Arc::clone(&self.handle.kicks),
            disk,
            on_failure,
        )
    }

    /// After the vCPUs and the worker stopped: collects what is left in the eventfds, checks
    /// every queue's kicks, the guest's own kick counts and the requests served against the
    /// plan, and every byte of the disk and of the guest's buffers against the pattern the
    /// requests must have left; returns the report of the device.
    pub fn finish(&self, output: WorkerOutput) -> Result<VirtioReport, Error> {
        let plan = &self.plan;
        let mut queues = Vec::with_capacity(plan.queues as usize);
        for (queue, stats) in (0u32..).zip(&output.stats) {
            let left = match self.handle.kicks[queue as usize].read() {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                Err(e) => return Err(Error::EventFd("read", e)),
            };
            let guest_kicks = u64::from(memory::read_u32(&self.mem, Plan::guest_kicks_gpa(queue))?);
            let report = VirtioQueueReport {
                index: queue,
                vcpu: plan.owner(queue),
                notify_addr: VIRTIO_NOTIFY_GPA,
                datamatch: u64::from(queue),
                kicks: stats.kicks + left,
                eventfd_reads: stats.eventfd_reads + u64::from(left > 0),
                guest_kicks,
                requests: stats.requests,
                writes: stats.writes,
                reads: stats.reads,
                bytes: stats.bytes,
            };
            check_queue(plan, &report)?;
            queues.push(report);
        }
        if let Some(why) = output.first_rejected {
            return Err(Error::Mismatch(format!(
                "the device refused a request: {why}"
            )));
        }
        self.check_data(&output.disk)?;
        Ok(VirtioReport {
            device: "virtio-blk over virtio-mmio".into(),
            mmio_base: VIRTIO_MMIO_GPA,
            mmio_len: VIRTIO_MMIO_LEN,
            notify_addr: VIRTIO_NOTIFY_GPA,
            queue_size: VIRTIO_QUEUE_SIZE,
            request_size: plan.request_size,
            disk_bytes: plan.disk_bytes(),
            queues,
        })
    }

    fn check_data(&self, disk: &Disk) -> Result<(), Error> {
        let plan = &self.plan;
        let size = plan.request_size as usize;
        if let Some(at) = first_difference(&disk.bytes, &plan.expected_disk()) {
            return Err(Error::Mismatch(format!(
                "the disk differs from what the writes must have left at byte {at} (sector {})",
                at / SECTOR_SIZE as usize
            )));
        }
        for vcpu in 0..plan.vcpus {
            for (name, gpa, want) in [
                (
                    "write",
                    plan.write_buffer_gpa(vcpu),
                    plan.expected_write_buffer(vcpu),
                ),
                (
                    "read",
                    plan.read_buffer_gpa(vcpu),
                    plan.expected_read_buffer(vcpu),
                ),
            ] {
                let mut got = vec![0; size];
                self.mem
                    .read_slice(&mut got, GuestAddress(gpa))
                    .map_err(|e| Error::Memory(format!("cannot read {gpa:#x}: {e}")))?;
                if let Some(at) = first_difference(&got, &want) {
                    return Err(Error::Mismatch(format!(
                        "vCPU {vcpu}'s {name} buffer at {gpa:#x} differs from the expected \
                         data at byte {at}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Checks one queue's counters against each other and the plan.
fn check_queue(plan: &Plan, q: &VirtioQueueReport) -> Result<(), Error> {
    let want = plan.expected(q.index);
    let index = q.index;
    let fail = |msg: String| Err(Error::Mismatch(format!("queue {index}: {msg}")));
    if q.guest_kicks != want.requests {
        return fail(format!(
            "the guest counted {} kicks, its plan has {} requests",
            q.guest_kicks, want.requests
        ));
    }
    if q.kicks != q.guest_kicks {
        return fail(format!(
            "the guest wrote QueueNotify {} times but its eventfd counted {}",
            q.guest_kicks, q.kicks
        ));
    }
    if (q.requests, q.writes, q.reads) != (want.requests, want.writes, want.reads) {
        return fail(format!(
            "the device served {} requests ({} writes, {} reads), the plan has {} ({} writes, \
             {} reads)",
            q.requests, q.writes, q.reads, want.requests, want.writes, want.reads
        ));
    }
    let bytes = q.requests * u64::from(plan.request_size);
    if q.bytes != bytes {
        return fail(format!(
            "the device moved {} bytes, {} requests of {} bytes are {bytes}",
            q.bytes, q.requests, plan.request_size
        ));
    }
    Ok(())
}

fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}
