//! The live VM: built from a [`VmmConfig`] by [`Vmm::try_from`], run to completion by
//! [`Vmm::run`], which returns the checked [`Report`].

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::caps;
use crate::cgroup;
use crate::config::{Scenario, VmmConfig};
use crate::error::Error;
use crate::exits::{self, ExitCounts};
use crate::guest;
use crate::ioeventfd;
use crate::kick;
use crate::layout::{
    CODE_GPA, DOORBELL_GPA, DOORBELL_LEN, MEM_SIZE, PAGE_SIZE, SWEEP_GPA, TOUCH_REGION_GPA,
    TOUCH_REGION_SLOT, VIRTIO_MEM_SIZE, WRITE_PROTECT_GPA, counter_gpa,
};
use crate::memory;
use crate::protect::{self, WriteProtectReport};
use crate::region::{self, Balloon};
use crate::report::{
    CgroupReport, IoEventFdReport, MemoryReport, ProcessReport, Report, TotalReport, VcpuReport,
};
use crate::usage::Usage;
use crate::vcpu::{self, VcpuOutcome, VcpuRunner};
use crate::vfio::{Passthrough, VfioReport};
use crate::virtio::VirtioBlk;
use crate::virtio::plan::Plan;
use crate::virtio::worker::WorkerOutput;

/// How often vCPU threads are kicked again while they are being stopped.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// What the threads of a running VM tell [`Vmm::run`].
enum Event {
    /// A vCPU thread ended.
    Vcpu(u32, Result<VcpuOutcome, Error>),
    /// The virtio worker gave up.
    Device(Error),
}

/// The touch region of a touch or balloon VM.
#[derive(Debug, Clone, Copy)]
struct TouchRegion {
    plan: region::Plan,
    /// Host virtual address of its mapping.
    hva: u64,
}

/// What the vCPU threads (and the virtio worker) of a finished run left, before it is checked.
struct Ran {
    outcomes: Vec<VcpuOutcome>,
    duration: Duration,
    worker_output: Option<WorkerOutput>,
    /// The touch region's resident pages before the vCPUs started.
    resident_before: Option<u64>,
    write_protect: Option<WriteProtectReport>,
    /// The process's accounting just after the first vCPU's first `KVM_RUN` returned.
    first_return: Option<Usage>,
}

/// A VM ready to run: KVM checked, cgroup joined, memory loaded, devices initialised, vCPUs
/// configured.
///
/// Fields drop in order: the VM and vCPU fds close before the guest memory is unmapped.
#[derive(Debug)]
pub struct Vmm {
    config: VmmConfig,
    cgroup: Option<CgroupReport>,
    doorbell: Option<EventFd>,
    virtio: Option<VirtioBlk>,
    ioeventfds: Vec<IoEventFdReport>,
    region: Option<TouchRegion>,
    vcpus: Vec<VcpuFd>,
    /// The process's accounting when it joined its cgroup, and just before it became a VMM.
    accounted_at_join: Usage,
    accounted_before_first_slot: Usage,
    /// The device passed through with `--vfio`; declared before the memory its DMA maps, so
    /// that it is unmapped and closed first.
    passthrough: Option<Passthrough>,
    vm: VmFd,
    _kvm: Kvm,
    memory: GuestMemoryMmap,
}

impl TryFrom<VmmConfig> for Vmm {
    type Error = Error;

    /// Checks the configuration and KVM's capabilities, moves the process into the requested
    /// cgroup, then creates the VM, its memory (with the guest program loaded), its devices
    /// and ioeventfds, and its vCPUs.
    fn try_from(config: VmmConfig) -> Result<Self, Error> {
        config.validate()?;
        let checked = caps::check(&config)?;
        let paced = config.rate.is_some();
        let plan = (config.scenario == Scenario::Virtio).then_some(Plan {
            vcpus: config.vcpus,
            queues: config.queues,
            count: config.count,
            request_size: config.request_size,
        });
        let region_plan = config.region_plan();
        // One program at CODE_GPA for every vCPU, or one per vCPU for virtio.
        let programs = match (&plan, &region_plan) {
            (Some(plan), _) => guest::virtio::programs(plan, paced)?,
            (None, Some(region_plan)) => vec![guest::Program {
                entry: CODE_GPA,
                bytes: guest::touch::program(region_plan, paced)?,
            }],
            (None, None) if config.scenario == Scenario::MmioSweep => vec![guest::Program {
                entry: CODE_GPA,
                bytes: guest::sweep_program(config.vcpus, paced)?,
            }],
            (None, None) => vec![guest::Program {
                entry: CODE_GPA,
                bytes: guest::program(config.scenario, paced)?,
            }],
        };

        // Join the cgroup (and on hybrid hosts its cgroup v1 memory twin) before the VM
        // exists, so that its memory and threads are charged there from the start.
        let cgroup = match &config.cgroup {
            Some(requested) => Some(cgroup::enter(requested)?),
            None => cgroup::current()?,
        };
        let accounted_at_join = match &config.cgroup {
            Some(_) => Usage::of_process()?,
            None => Usage::default(),
        };

        let kvm = checked.kvm;
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        let mem_size = if plan.is_some() {
            VIRTIO_MEM_SIZE
        } else {
            MEM_SIZE
        };
        let (memory, accounted_before_first_slot) =
            memory::create(&vm, mem_size, region_plan.map(|p| p.region_bytes))?;
        let region = match region_plan {
            Some(plan) => Some(TouchRegion {
                plan,
                hva: memory::host_address(&memory, TOUCH_REGION_GPA)?,
            }),
            None => None,
        };
        for program in &programs {
            memory::load(&memory, program.entry, &program.bytes)?;
        }
        for index in 0..config.vcpus {
            memory::load(&memory, counter_gpa(index), &0u32.to_le_bytes())?;
        }

        let passthrough = match &config.vfio {
            Some(bdf) => Some(Passthrough::attach(bdf, &memory, config.vfio_dma)?),
            None => None,
        };

        let mut ioeventfds = Vec::new();
        let doorbell = if config.scenario == Scenario::Doorbell {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd("creation", e))?;
            ioeventfds.push(ioeventfd::register_mmio(
                &vm,
                &fd,
                DOORBELL_GPA,
                DOORBELL_LEN,
                None,
            )?);
            Some(fd)
        } else {
            None
        };
        let virtio = match plan {
            Some(plan) => {
                let device = VirtioBlk::create(&vm, &memory, plan)?;
                ioeventfds.extend_from_slice(device.ioeventfds());
                Some(device)
            }
            None => None,
        };

        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            let entry = programs[(index as usize).min(programs.len() - 1)].entry;
            // The first address the vCPU writes, in unreal mode (EBX): its first page, or for
            // mmio-sweep its first byte.
            let first_page = match region_plan {
                Some(p) => Some(p.first_page_gpa(index)),
                None => {
                    (config.scenario == Scenario::MmioSweep).then(|| SWEEP_GPA + u64::from(index))
                }
            };
            vcpu::configure(&vcpu, index, config.ops_per_vcpu(), entry, first_page)?;
            vcpus.push(vcpu);
        }

        Ok(Vmm {
            config,
            cgroup,
            doorbell,
            virtio,
            ioeventfds,
            region,
            vcpus,
            accounted_at_join,
            accounted_before_first_slot,
            passthrough,
            vm,
            _kvm: kvm,
            memory,
        })
    }
}

impl Vmm {
    /// The configuration this VM was built from.
    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// The KVM VM file descriptor number.
    pub fn vm_fd(&self) -> i32 {
        self.vm.as_raw_fd()
    }

    /// Every ioeventfd registered with KVM_IOEVENTFD so far.
    pub fn ioeventfds(&self) -> &[IoEventFdReport] {
        &self.ioeventfds
    }

    /// Sleeps `--vm-setup-delay-ms` (if any), then runs every vCPU on its own thread until
    /// each guest writes DONE (with the virtio worker serving the queues meanwhile), then reads
    /// the guest counters back, checks them against the VMM's own observations and the
    /// requested count, and returns the report. If one vCPU (or the virtio worker) fails, the
    /// vCPUs are stopped and its error returned.
    pub fn run(mut self) -> Result<Report, Error> {
        let ran = self.run_vcpus()?;
        let vfio = self
            .passthrough
            .take()
            .map(Passthrough::finish)
            .transpose()?;
        self.report(ran, vfio)
    }

    /// Runs the vCPUs to the end (see [`Vmm::run`]) and collects what they observed.
    fn run_vcpus(&mut self) -> Result<Ran, Error> {
        if let Some(delay) = self.config.vm_setup_delay() {
            thread::sleep(delay);
        }
        let resident_before = match &self.region {
            Some(r) => Some(region::resident_pages(r.hva, r.plan.region_bytes)?),
            None => None,
        };
        let balloon = self.region.filter(|r| r.plan.balloon()).map(|r| Balloon {
            region_hva: r.hva,
            region_bytes: r.plan.region_bytes,
            returned_bytes: r.plan.returned_bytes,
        });
        let abort = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let vcpus = std::mem::take(&mut self.vcpus);
        let total = vcpus.len();
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(total);
        let mut first_error: Option<Error> = None;
        // Install the kick handler before any vCPU thread exists.
        kick::kick_signal();
        let worker = match self.virtio.as_mut() {
            Some(device) => {
                let tx = tx.clone();
                Some(device.start(move |e| {
                    let _ = tx.send(Event::Device(e));
                })?)
            }
            None => None,
        };
        let device = self.virtio.as_ref().map(VirtioBlk::handle);
        let first_return = Arc::new(OnceLock::new());
        let start = Instant::now();
        for (index, vcpu) in (0u32..).zip(vcpus) {
            let runner = VcpuRunner {
                index,
                vcpu,
                scenario: self.config.scenario,
                rate: self.config.rate,
                abort: Arc::clone(&abort),
                device: device.clone(),
                exit_delay: self.config.exit_delay(),
                balloon,
                first_return: Arc::clone(&first_return),
            };
            let tx = tx.clone();
            let spawned = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let _ = tx.send(Event::Vcpu(index, runner.run()));
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    first_error = Some(Error::Thread(format!("{index} could not start: {e}")));
                    abort.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        drop(tx);
        let vcpus_running = Arc::new(AtomicBool::new(true));
        let protector = self.start_write_protect(&vcpus_running, &abort)?;

        let mut outcomes: Vec<Option<VcpuOutcome>> = vec![None; handles.len()];
        let mut finished = vec![false; handles.len()];
        let mut remaining = handles.len();
        while remaining > 0 {
            let received = if abort.load(Ordering::Relaxed) {
                for (handle, done) in handles.iter().zip(&finished) {
                    if !done {
                        kick::kick(handle.as_pthread_t());
                    }
                }
                rx.recv_timeout(KICK_INTERVAL)
            } else {
                rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            };
            match received {
                Ok(Event::Vcpu(index, result)) => {
                    vcpus_running.store(false, Ordering::Relaxed);
                    remaining -= 1;
                    finished[index as usize] = true;
                    match result {
                        Ok(outcome) => outcomes[index as usize] = Some(outcome),
                        Err(Error::Aborted(_)) => {}
                        Err(e) => {
                            if first_error.is_none() {
                                first_error = Some(e);
                            }
                            abort.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Event::Device(e)) => {
                    if first_error.is_none() {
                        first_error = Some(e);
                    }
                    abort.store(true, Ordering::Relaxed);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let duration = start.elapsed();
        let write_protect = match protector.map(JoinHandle::join) {
            Some(Ok(Ok(report))) => Some(report),
            Some(Ok(Err(e))) => {
                first_error.get_or_insert(e);
                None
            }
            Some(Err(_)) => {
                first_error.get_or_insert(Error::Thread("write-protect panicked".into()));
                None
            }
            None => None,
        };
        for (index, handle) in handles.into_iter().enumerate() {
            if handle.join().is_err() && first_error.is_none() {
                first_error = Some(Error::Thread(format!("{index} panicked")));
            }
        }
        let worker_output = match worker.map(super::virtio::worker::Worker::stop) {
            Some(Ok(output)) => Some(output),
            Some(Err(e)) => {
                first_error.get_or_insert(e);
                None
            }
            None => None,
        };
        if let Some(e) = first_error {
            // A refused request explains a guest driver failure.
            return Err(match worker_output.and_then(|o| o.first_rejected) {
                Some(why) => Error::Device(format!("{e}; the device refused {why}")),
                None => e,
            });
        }
        let outcomes = outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| o.ok_or_else(|| Error::Thread(format!("{i} ended without a result"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Ran {
            outcomes,
            duration,
            worker_output,
            resident_before,
            write_protect,
            first_return: first_return.get().copied(),
        })
    }

    /// Starts the thread of `--write-protect-cycles`, if any.
    fn start_write_protect(
        &self,
        vcpus_running: &Arc<AtomicBool>,
        abort: &Arc<AtomicBool>,
    ) -> Result<Option<JoinHandle<Result<WriteProtectReport, Error>>>, Error> {
        let cycles = self.config.write_protect_cycles;
        if cycles == 0 {
            return Ok(None);
        }
        let hva = memory::host_address(&self.memory, WRITE_PROTECT_GPA)?;
        let (running, abort) = (Arc::clone(vcpus_running), Arc::clone(abort));
        thread::Builder::new()
            .name("write-protect".into())
            .spawn(move || protect::run(WRITE_PROTECT_GPA, hva, cycles, &running, &abort))
            .map(Some)
            .map_err(|e| Error::Thread(format!("write-protect could not start: {e}")))
    }

    /// Checks what a run left against the plan and the guests' own counters and, if all
    /// agrees, builds the report.
    fn report(&self, ran: Ran, vfio: Option<VfioReport>) -> Result<Report, Error> {
        let Ran {
            outcomes,
            duration,
            worker_output,
            resident_before,
            write_protect,
            first_return,
        } = ran;
        let count = self.config.ops_per_vcpu();
        let returned: Vec<_> = outcomes.iter().filter_map(|o| o.returned).collect();
        let mut vcpus = Vec::with_capacity(outcomes.len());
        let mut total_exits = ExitCounts::new();
        let mut total_ops = 0u64;
        for outcome in outcomes {
            let guest_ops = u64::from(memory::read_u32(&self.memory, counter_gpa(outcome.index))?);
            let who = format!("vCPU {}", outcome.index);
            if guest_ops != count {
                return Err(Error::Mismatch(format!(
                    "{who} counted {guest_ops} operations, {count} were requested"
                )));
            }
            if let Some(seen) = outcome.observed_ops
                && seen != guest_ops
            {
                return Err(Error::Mismatch(format!(
                    "{who} counted {guest_ops} operations but the VMM saw {seen} {} exits",
                    self.config.scenario
                )));
            }
            if self.config.rate.is_some() && outcome.pace_exits != guest_ops {
                return Err(Error::Mismatch(format!(
                    "{who} counted {guest_ops} operations but made {} PACE exits",
                    outcome.pace_exits
                )));
            }
            exits::add(&mut total_exits, &outcome.exits);
            total_ops += guest_ops;
            vcpus.push(VcpuReport {
                index: outcome.index,
                tid: outcome.tid,
                guest_ops,
                vmm_observed_ops: outcome.observed_ops,
                exits: outcome.exits,
                guest_ns: outcome.guest_ns,
            });
        }
        let doorbell_signals = match &self.doorbell {
            Some(fd) => {
                let signals = match fd.read() {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(Error::EventFd("read", e)),
                };
                if signals != total_ops {
                    return Err(Error::Mismatch(format!(
                        "the guests counted {total_ops} doorbell writes but the eventfd was \
                         signalled {signals} times"
                    )));
                }
                Some(signals)
            }
            None => None,
        };
        let virtio = match (&self.virtio, worker_output) {
            (Some(device), Some(output)) => Some(device.finish(output)?),
            (Some(_), None) => {
                return Err(Error::Device("the worker left no result".into()));
            }
            (None, _) => None,
        };
        let memory = match &self.region {
            Some(r) => Some(self.memory_report(r, &returned, resident_before)?),
            None => None,
        };
        // The vCPU threads have been joined: nothing runs in guest mode any more.
        let usage = Usage::of_process()?;
        Ok(Report {
            scenario: self.config.scenario,
            pid: std::process::id(),
            count,
            rate: self.config.rate,
            cgroup: self.cgroup.clone(),
            vm_fd: self.vm.as_raw_fd(),
            ioeventfds: self.ioeventfds.clone(),
            vcpus,
            total: TotalReport {
                guest_ops: total_ops,
                exits: total_exits,
            },
            doorbell_signals,
            duration_secs: duration.as_secs_f64(),
            exit_delay_us: self.config.exit_delay_us,
            vm_setup_delay_ms: self.config.vm_setup_delay_ms,
            virtio,
            memory,
            write_protect,
            vfio,
            process: ProcessReport {
                lifetime: usage,
                in_cgroup: usage.since(self.accounted_at_join),
                as_vmm: usage.since(self.accounted_before_first_slot),
                running: usage.since(first_return.unwrap_or(usage)),
            },
        })
    }

    /// Checks the touch region after a run (the BALLOON exit came once if planned, every page
    /// holds the guest's last pattern) and describes it.
    fn memory_report(
        &self,
        r: &TouchRegion,
        returned: &[region::Returned],
        resident_before: Option<u64>,
    ) -> Result<MemoryReport, Error> {
        let plan = &r.plan;
        let want_calls = usize::from(plan.balloon());
        if returned.len() != want_calls {
            return Err(Error::Mismatch(format!(
                "the guest wrote DONE after {} BALLOON exit(s) that returned memory, {want_calls} \
                 planned",
                returned.len()
            )));
        }
        if let Some(ret) = returned.first()
            && (ret.hva, ret.bytes) != (r.hva, plan.returned_bytes)
        {
            return Err(Error::Mismatch(format!(
                "the BALLOON exit returned {} bytes at {:#x}, {} bytes at {:#x} planned",
                ret.bytes, ret.hva, plan.returned_bytes, r.hva
            )));
        }
        region::verify(&self.memory, plan)?;
        Ok(MemoryReport {
            slot: TOUCH_REGION_SLOT,
            region_gpa: TOUCH_REGION_GPA,
            region_hva: r.hva,
            region_bytes: plan.region_bytes,
            page_size: PAGE_SIZE,
            pages_touched: plan.pages(),
            bytes_returned: returned.iter().map(|x| x.bytes).sum(),
            returned_hva: returned.first().map(|x| x.hva),
            madvise_calls: returned.len() as u64,
            pages_retouched: plan.returned_pages(),
            bytes_retouched: plan.returned_bytes,
            resident_pages_before: resident_before.unwrap_or(0),
            resident_pages_after_return: returned.first().map(|x| x.resident_pages_after),
            resident_pages_end: region::resident_pages(r.hva, plan.region_bytes)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::kvm_or_skip;
    use crate::layout::DONE_PORT;

    /// A failing vCPU stops the others, even one that is in a long loop without exits.
    #[test]
    fn failing_vcpu_stops_the_others() {
        if !kvm_or_skip("failing_vcpu_stops_the_others") {
            return;
        }
        // vCPU 1 runs the cpuid loop (no exits) for ~10^7 operations, tens of seconds here.
        let config = VmmConfig {
            vcpus: 2,
            count: 10_000_000,
            ..VmmConfig::new(Scenario::Cpuid)
        };
        let vmm = Vmm::try_from(config).unwrap();
        // vCPU 0 starts at a bad port write instead.
        let bad_gpa = 0x2000;
        memory::load(&vmm.memory, bad_gpa, &[0xe6, DONE_PORT as u8 + 2]).unwrap();
        let mut regs = vmm.vcpus[0].get_regs().unwrap();
        regs.rip = bad_gpa;
        vmm.vcpus[0].set_regs(&regs).unwrap();
        let start = Instant::now();
        let err = vmm.run().unwrap_err();
        assert!(
            matches!(err, Error::Guest { index: 0, .. }),
            "unexpected error {err}"
        );
        assert!(err.to_string().contains("port 0x13"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "stopping took {:?}",
            start.elapsed()
        );
    }

    fn virtio_vmm(count: u64) -> Vmm {
        let config = VmmConfig {
            count,
            ..VmmConfig::new(Scenario::Virtio)
        };
        Vmm::try_from(config).unwrap()
    }

    /// The final check compares every byte of the guest's buffers with the plan.
    #[test]
    fn virtio_catches_unexpected_data() {
        if !kvm_or_skip("virtio_catches_unexpected_data") {
            return;
        }
        let vmm = virtio_vmm(20);
        // One byte of the write buffer the guest never touches, changed behind its back: the
        // guest's own checks pass (it reads back what it wrote) but the data differ from the plan.
        let gpa = crate::layout::VIRTIO_BUFFERS_GPA + 100;
        memory::load(&vmm.memory, gpa, &[!memory_byte(&vmm, gpa)]).unwrap();
        let err = vmm.run().unwrap_err();
        assert!(matches!(err, Error::Mismatch(_)), "{err}");
        assert!(err.to_string().contains("differs"), "{err}");
    }

    /// A guest kick counter that disagrees with the eventfd is an error.
    #[test]
    fn virtio_catches_a_kick_mismatch() {
        if !kvm_or_skip("virtio_catches_a_kick_mismatch") {
            return;
        }
        let vmm = virtio_vmm(10);
        memory::load(&vmm.memory, Plan::guest_kicks_gpa(1), &3u32.to_le_bytes()).unwrap();
        let err = vmm.run().unwrap_err().to_string();
        assert!(err.contains("queue 1: the guest counted 8 kicks"), "{err}");
    }

    /// Requests the device refuses (a disk too small for the plan: IOERR) stop the guest driver
    /// with a clear error that names the device's reason.
    #[test]
    fn virtio_refused_requests_stop_the_guest() {
        if !kvm_or_skip("virtio_refused_requests_stop_the_guest") {
            return;
        }
        let mut vmm = virtio_vmm(10);
        vmm.virtio
            .as_mut()
            .unwrap()
            .replace_disk(crate::virtio::blk::Disk {
                bytes: vec![0; 4096],
            });
        let start = Instant::now();
        let err = vmm.run().unwrap_err().to_string();
        assert!(err.contains("status other than VIRTIO_BLK_S_OK"), "{err}");
        assert!(err.contains("beyond the disk"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    fn region_vmm(scenario: Scenario, vcpus: u32, mib: u32, balloon_mib: Option<u32>) -> Vmm {
        let config = VmmConfig {
            vcpus,
            mib,
            balloon_mib,
            ..VmmConfig::new(scenario)
        };
        Vmm::try_from(config).unwrap()
    }

    /// The final check reads every page of the touch region: one byte changed after the guest
    /// wrote it fails the run, though the guest's counters are right.
    #[test]
    fn touch_catches_a_corrupted_page() {
        if !kvm_or_skip("touch_catches_a_corrupted_page") {
            return;
        }
        let mut vmm = region_vmm(Scenario::Touch, 2, 2, None);
        let ran = vmm.run_vcpus().unwrap();
        let gpa = TOUCH_REGION_GPA + 7 * PAGE_SIZE;
        assert_eq!(memory_byte(&vmm, gpa), crate::layout::TOUCH_PATTERN);
        memory::load(&vmm.memory, gpa, &[0]).unwrap();
        let err = vmm.report(ran, None).unwrap_err();
        assert!(matches!(err, Error::Mismatch(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("1 of the 512 pages") && msg.contains("page 7 (GPA 0x1007000): 0x00"),
            "{msg}"
        );
    }

    /// A returned page that still holds the first pattern was not touched again.
    #[test]
    fn balloon_catches_a_page_left_from_the_first_touch() {
        if !kvm_or_skip("balloon_catches_a_page_left_from_the_first_touch") {
            return;
        }
        let mut vmm = region_vmm(Scenario::Balloon, 1, 2, Some(1));
        let ran = vmm.run_vcpus().unwrap();
        // The last returned page and the first kept one hold their patterns...
        let last_returned = TOUCH_REGION_GPA + 255 * PAGE_SIZE;
        assert_eq!(
            memory_byte(&vmm, last_returned),
            crate::layout::RETOUCH_PATTERN
        );
        assert_eq!(
            memory_byte(&vmm, last_returned + PAGE_SIZE),
            crate::layout::TOUCH_PATTERN
        );
        // ...until one of the returned pages goes back to the first pattern.
        memory::load(&vmm.memory, last_returned, &[crate::layout::TOUCH_PATTERN]).unwrap();
        let err = vmm.report(ran, None).unwrap_err().to_string();
        assert!(
            err.contains("page 255 (GPA 0x10ff000): 0x5a instead of 0xa5"),
            "{err}"
        );
    }

    /// Unchanged, the same runs pass.
    #[test]
    fn region_runs_pass_unchanged() {
        if !kvm_or_skip("region_runs_pass_unchanged") {
            return;
        }
        let report = region_vmm(Scenario::Touch, 2, 2, None).run().unwrap();
        assert_eq!(report.memory.unwrap().pages_touched, 512);
        let report = region_vmm(Scenario::Balloon, 1, 2, Some(1)).run().unwrap();
        assert_eq!(report.memory.unwrap().pages_retouched, 256);
    }

    fn memory_byte(vmm: &Vmm, gpa: u64) -> u8 {
        use vm_memory::{Bytes, GuestAddress};
        vmm.memory.read_obj(GuestAddress(gpa)).unwrap()
    }
}
