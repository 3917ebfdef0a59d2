//! The live VM: built from a [`VmmConfig`] by [`Vmm::try_from`], run to completion by
//! [`Vmm::run`], which returns the checked [`Report`].

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{KVMIO, kvm_ioeventfd};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::caps;
use crate::cgroup;
use crate::config::{Scenario, VmmConfig};
use crate::error::Error;
use crate::exits::{self, ExitCounts};
use crate::guest;
use crate::kick;
use crate::layout::{CODE_GPA, DOORBELL_GPA, DOORBELL_LEN, counter_gpa};
use crate::memory;
use crate::report::{CgroupReport, IoEventFdReport, Report, TotalReport, VcpuReport};
use crate::vcpu::{self, VcpuOutcome, VcpuRunner};

ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

/// How often vCPU threads are kicked again while they are being stopped.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// A VM ready to run: KVM checked, cgroup joined, memory loaded, vCPUs configured.
///
/// Fields drop in order: the VM and vCPU fds close before the guest memory is unmapped.
#[derive(Debug)]
pub struct Vmm {
    config: VmmConfig,
    cgroup: Option<CgroupReport>,
    doorbell: Option<EventFd>,
    ioeventfds: Vec<IoEventFdReport>,
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    _kvm: Kvm,
    memory: GuestMemoryMmap,
}

impl TryFrom<VmmConfig> for Vmm {
    type Error = Error;

    /// Checks the configuration and KVM's capabilities, moves the process into the requested
    /// cgroup, then creates the VM, its memory (with the guest program loaded) and its vCPUs.
    fn try_from(config: VmmConfig) -> Result<Self, Error> {
        config.validate()?;
        let checked = caps::check(&config)?;
        let program = guest::program(config.scenario, config.rate.is_some())?;

        // Join the cgroup before the VM exists, so that its memory and threads are charged
        // there from the start.
        let cgroup = match &config.cgroup {
            Some(requested) => {
                let mount = cgroup::find_mount()?.ok_or_else(|| Error::Cgroup {
                    path: requested.clone(),
                    msg: "no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo); mount \
                          one or drop --cgroup"
                        .into(),
                })?;
                let dir = cgroup::resolve(requested, &mount)?;
                Some(cgroup::join(&dir, &mount)?)
            }
            None => cgroup::current()?,
        };

        let kvm = checked.kvm;
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        let memory = memory::create(&vm)?;
        memory::load(&memory, CODE_GPA, &program)?;
        for index in 0..config.vcpus {
            memory::load(&memory, counter_gpa(index), &0u32.to_le_bytes())?;
        }

        let mut ioeventfds = Vec::new();
        let doorbell = if config.scenario == Scenario::Doorbell {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd("creation", e))?;
            register_mmio_ioeventfd(&vm, &fd, DOORBELL_GPA, DOORBELL_LEN)?;
            ioeventfds.push(IoEventFdReport {
                space: "mmio".into(),
                addr: DOORBELL_GPA,
                len: DOORBELL_LEN,
                datamatch: None,
            });
            Some(fd)
        } else {
            None
        };

        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            vcpu::configure(&vcpu, index, config.count)?;
            vcpus.push(vcpu);
        }

        Ok(Vmm {
            config,
            cgroup,
            doorbell,
            ioeventfds,
            vcpus,
            vm,
            _kvm: kvm,
            memory,
        })
    }
}

/// Registers `fd` as an ioeventfd for `len`-byte MMIO writes at `addr`, with no datamatch.
///
/// kvm-ioctls' `register_ioevent` ties the length to the datamatch type (no datamatch means
/// length 0, "any length"), so the ioctl is issued directly to get the length a device model
/// would register.
fn register_mmio_ioeventfd(vm: &VmFd, fd: &EventFd, addr: u64, len: u32) -> Result<(), Error> {
    let request = kvm_ioeventfd {
        datamatch: 0,
        addr,
        len,
        fd: fd.as_raw_fd(),
        flags: 0,
        ..Default::default()
    };
    // SAFETY: `vm` is a KVM VM fd and `request` is a fully initialised kvm_ioeventfd that the
    // kernel only reads; the return value is checked.
    let ret = unsafe { ioctl_with_ref(vm, KVM_IOEVENTFD(), &request) };
    if ret != 0 {
        return Err(Error::Kvm("KVM_IOEVENTFD", kvm_ioctls::Error::last()));
    }
    Ok(())
}

impl Vmm {
    /// The configuration this VM was built from.
    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// Runs every vCPU on its own thread until each guest writes DONE, then reads the guest
    /// counters back, checks them against the VMM's own observations and the requested count,
    /// and returns the report. If one vCPU fails the others are stopped and its error returned.
    pub fn run(mut self) -> Result<Report, Error> {
        let abort = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let vcpus = std::mem::take(&mut self.vcpus);
        let total = vcpus.len();
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(total);
        let mut first_error: Option<Error> = None;
        // Install the kick handler before any vCPU thread exists.
        kick::kick_signal();
        let start = Instant::now();
        for (index, vcpu) in (0u32..).zip(vcpus) {
            let runner = VcpuRunner {
                index,
                vcpu,
                scenario: self.config.scenario,
                rate: self.config.rate,
                abort: Arc::clone(&abort),
            };
            let tx = tx.clone();
            let spawned = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let _ = tx.send((index, runner.run()));
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
                Ok((index, result)) => {
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
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let duration = start.elapsed();
        for (index, handle) in handles.into_iter().enumerate() {
            if handle.join().is_err() && first_error.is_none() {
                first_error = Some(Error::Thread(format!("{index} panicked")));
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let outcomes = outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| o.ok_or_else(|| Error::Thread(format!("{i} ended without a result"))))
            .collect::<Result<Vec<_>, _>>()?;
        self.report(outcomes, duration)
    }

    fn report(&self, outcomes: Vec<VcpuOutcome>, duration: Duration) -> Result<Report, Error> {
        let count = self.config.count;
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
}
