//! The device's worker thread: it waits in epoll on every queue's ioeventfd, reads the eventfd
//! (the value is the number of kicks since the last read: eventfd adds 1 per signal), serves
//! every available descriptor chain of that queue and publishes it on the used ring.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::blk::{self, Disk, Kind};
use super::mmio::Transport;
use crate::error::Error;

/// The epoll token of the stop eventfd (queue eventfds use their queue index).
const STOP: u64 = u64::MAX;

/// What the worker counted for one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Sum of the values read from the queue's eventfd.
    pub kicks: u64,
    /// Reads of the eventfd that returned a value (fewer than `kicks` when kicks coalesced).
    pub eventfd_reads: u64,
    /// Descriptor chains served.
    pub requests: u64,
    /// Of which VIRTIO_BLK_T_OUT.
    pub writes: u64,
    /// Of which VIRTIO_BLK_T_IN.
    pub reads: u64,
    /// Data bytes moved.
    pub bytes: u64,
}

/// What the worker hands back when it stops.
#[derive(Debug)]
pub struct WorkerOutput {
    /// Per queue, by index.
    pub stats: Vec<QueueStats>,
    /// The disk, for the final check.
    pub disk: Disk,
    /// Why the first request that did not get status OK was refused, if one did not.
    pub first_rejected: Option<String>,
}

/// The state the worker thread owns.
struct State {
    transport: Arc<Mutex<Transport>>,
    mem: GuestMemoryMmap,
    kicks: Arc<Vec<EventFd>>,
    stop: EventFd,
    disk: Disk,
    stats: Vec<QueueStats>,
    first_rejected: Option<String>,
}

/// A running worker thread.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    handle: JoinHandle<Result<WorkerOutput, Error>>,
}

impl Worker {
    /// Starts the worker thread. It calls `on_failure` once if it has to give up (a malformed
    /// chain or a failing system call), so that the VMM can stop the vCPUs, which would otherwise
    /// poll the used ring forever.
    pub fn spawn(
        transport: Arc<Mutex<Transport>>,
        mem: GuestMemoryMmap,
        kicks: Arc<Vec<EventFd>>,
        disk: Disk,
        on_failure: impl FnOnce(Error) + Send + 'static,
    ) -> Result<Worker, Error> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd("creation", e))?;
        let state = State {
            transport,
            mem,
            stats: vec![QueueStats::default(); kicks.len()],
            kicks,
            stop: stop.try_clone().map_err(|e| Error::EventFd("dup", e))?,
            disk,
            first_rejected: None,
        };
        let handle = thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || match state.run() {
                Ok(output) => Ok(output),
                Err(e) => {
                    let short = Error::Device(format!("worker stopped: {e}"));
                    on_failure(e);
                    Err(short)
                }
            })
            .map_err(|e| Error::Device(format!("cannot start the worker thread: {e}")))?;
        Ok(Worker { stop, handle })
    }

    /// Tells the worker to stop and returns what it counted.
    pub fn stop(self) -> Result<WorkerOutput, Error> {
        self.stop.write(1).map_err(|e| Error::EventFd("write", e))?;
        self.handle
            .join()
            .map_err(|_| Error::Device("the worker thread panicked".into()))?
    }
}

impl State {
    fn run(mut self) -> Result<WorkerOutput, Error> {
        let epoll = Epoll::new().map_err(|e| Error::Device(format!("epoll_create: {e}")))?;
        let add = |fd: &EventFd, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| Error::Device(format!("epoll_ctl: {e}")))
        };
        for (index, fd) in (0u64..).zip(self.kicks.iter()) {
            add(fd, index)?;
        }
        add(&self.stop, STOP)?;
        let mut events = vec![EpollEvent::default(); self.kicks.len() + 1];
        loop {
            let ready = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Device(format!("epoll_wait: {e}"))),
            };
            let mut stopping = false;
            for event in &events[..ready] {
                match event.data() {
                    STOP => stopping = true,
                    queue => self.kicked(queue as usize)?,
                }
            }
            if stopping {
                break;
            }
        }
        Ok(WorkerOutput {
            stats: self.stats,
            disk: self.disk,
            first_rejected: self.first_rejected,
        })
    }

    /// Reads queue `index`'s eventfd and serves everything its available ring holds.
    fn kicked(&mut self, index: usize) -> Result<(), Error> {
        match self.kicks[index].read() {
            Ok(n) => {
                self.stats[index].kicks += n;
                self.stats[index].eventfd_reads += 1;
            }
            // Already read: the chains it announced were served with an earlier kick.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::EventFd("read", e)),
        }
        self.serve(index)
    }

    fn serve(&mut self, index: usize) -> Result<(), Error> {
        let mut transport = self
            .transport
            .lock()
            .map_err(|_| Error::Device("the register lock is poisoned".into()))?;
        let result = (|| {
            // Kicks of a queue that is not live (before DRIVER_OK, after a reset) are counted
            // and otherwise ignored.
            let Some(queue) = transport.live_queue(index as u32) else {
                return Ok(());
            };
            loop {
                let chain = queue
                    .iter(&self.mem)
                    .map_err(|e| format!("queue {index}: {e}"))?
                    .next();
                let Some(chain) = chain else {
                    return Ok(());
                };
                let head = chain.head_index();
                let served = blk::serve(chain, &self.mem, &mut self.disk)
                    .map_err(|e| format!("queue {index}: {e}"))?;
                let stats = &mut self.stats[index];
                stats.requests += 1;
                stats.bytes += served.bytes;
                match served.kind {
                    Kind::Write => stats.writes += 1,
                    Kind::Read => stats.reads += 1,
                    Kind::Other => {}
                }
                if let Some(why) = served.rejected
                    && self.first_rejected.is_none()
                {
                    self.first_rejected = Some(format!("queue {index}: {why}"));
                }
                queue
                    .add_used(&self.mem, head, served.used_len)
                    .map_err(|e| format!("queue {index}: used ring: {e}"))?;
            }
        })();
        result.map_err(|msg| {
            transport.needs_reset();
            Error::Device(msg)
        })
    }
}
