//! One vCPU: its initial real-mode state and the run loop its host thread executes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvm_bindings::kvm_regs;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::config::Scenario;
use crate::error::Error;
use crate::exits::{self, ExitCounts};
use crate::guest::virtio::FailCode;
use crate::layout::{
    BALLOON_PORT, DONE_PORT, FAIL_PORT, MMIO_GPA, OP_PORT, PACE_PORT, SWEEP_ADDRESSES, SWEEP_GPA,
    counter_gpa,
};
use crate::pace::Pacer;
use crate::region::{Balloon, Returned};
use crate::usage;
use crate::usage::Usage;
use crate::virtio::MmioHandle;

/// RFLAGS with only the always-one bit 1 set (interrupts disabled).
const RFLAGS_RESERVED: u64 = 0x2;

/// DS limit of the touch and balloon guests: 4 GiB, so 32-bit addresses reach the touch region.
const UNREAL_LIMIT: u32 = 0xFFFF_FFFF;

/// Puts a fresh vCPU into real mode at CS:IP 0:`entry` (below 64 KiB; normally
/// [`crate::layout::CODE_GPA`]) with flat zero-based segments, ESI = `count` operations to do
/// and EDI = the address of its operation counter.
///
/// With `first_page` (touch and balloon) it also puts that address into EBX and gives DS a
/// 4 GiB limit ("unreal mode"): real-mode code then reaches any address below 4 GiB through a
/// 32-bit register and an address-size prefix.
pub fn configure(
    vcpu: &VcpuFd,
    index: u32,
    count: u64,
    entry: u64,
    first_page: Option<u64>,
) -> Result<(), Error> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    if first_page.is_some() {
        // KVM takes the limit in bytes; with g = 1 it must end in 0xFFF and the descriptor
        // it builds holds limit >> 12 (0xFFFFF pages). Without g the emulator would see only
        // the low 20 bits: a 1 MiB limit.
        sregs.ds.limit = UNREAL_LIMIT;
        sregs.ds.g = 1;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rip: entry,
        rflags: RFLAGS_RESERVED,
        rsi: count,
        rdi: counter_gpa(index),
        rbx: first_page.unwrap_or(0),
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
}

/// What one vCPU thread observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuOutcome {
    /// vCPU index.
    pub index: u32,
    /// Thread id of the thread that ran it.
    pub tid: u32,
    /// Every KVM_RUN return by reason.
    pub exits: ExitCounts,
    /// Operations seen as exits (pio, mmio, hlt), `None` for scenarios where they are invisible.
    pub observed_ops: Option<u64>,
    /// PACE port exits.
    pub pace_exits: u64,
    /// What the BALLOON exit returned to the host (balloon scenario).
    pub returned: Option<Returned>,
    /// The thread's guest time after its last KVM_RUN, ns.
    pub guest_ns: u64,
}

/// The state one vCPU thread runs with.
#[derive(Debug)]
pub struct VcpuRunner {
    /// vCPU index.
    pub index: u32,
    /// The KVM vCPU, configured by [`configure`].
    pub vcpu: VcpuFd,
    /// What the guest does.
    pub scenario: Scenario,
    /// Requested ops per second, if paced.
    pub rate: Option<f64>,
    /// Set when another vCPU failed: stop at the next exit.
    pub abort: Arc<AtomicBool>,
    /// The virtio device whose MMIO exits this vCPU serves (virtio scenario).
    pub device: Option<MmioHandle>,
    /// Sleep this long after every exit before re-entering KVM_RUN (a slow VMM).
    pub exit_delay: Option<Duration>,
    /// What the BALLOON exit returns to the host (balloon scenario).
    pub balloon: Option<Balloon>,
    /// The process's accounting just after the first return of any vCPU's first `KVM_RUN`.
    pub first_return: Arc<OnceLock<Usage>>,
}

/// What to do after one exit, decided while the exit still borrows the vCPU.
enum Step {
    Op,
    /// An exit served without counting an operation (virtio register access).
    Served,
    Pace,
    /// The balloon guest has touched the region: return memory to the host.
    Balloon,
    Done,
    Interrupted,
    Fail(String),
}

/// The id of the calling thread.
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid as u32
}

impl VcpuRunner {
    /// Runs the guest on the calling thread until it writes the DONE port.
    pub fn run(mut self) -> Result<VcpuOutcome, Error> {
        let mut outcome = VcpuOutcome {
            index: self.index,
            tid: gettid(),
            exits: ExitCounts::new(),
            observed_ops: match self.scenario {
                Scenario::Pio
                | Scenario::PioIn
                | Scenario::Mmio
                | Scenario::MmioSweep
                | Scenario::Hlt => Some(0),
                Scenario::Signal
                | Scenario::Doorbell
                | Scenario::Cpuid
                | Scenario::Virtio
                | Scenario::Touch
                | Scenario::Balloon => None,
            },
            pace_exits: 0,
            returned: None,
            guest_ns: 0,
        };
        let mut pacer = self.rate.map(Pacer::new);
        let _signaller = (self.scenario == Scenario::Signal).then(Signaller::start);
        if self.exit_delay.is_some() {
            precise_sleeps();
        }
        let mut first = true;
        loop {
            if let Some(delay) = self.exit_delay
                && !std::mem::take(&mut first)
            {
                // The slow VMM: every exit takes at least this long to serve.
                std::thread::sleep(delay);
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(Error::Aborted(self.index));
            }
            let ran = self.vcpu.run();
            if self.first_return.get().is_none() {
                // A tracer that knows VMMs by KVM_RUN alone has known this one since at least now.
                let _ = self.first_return.set(Usage::of_process()?);
            }
            let step = match ran {
                Ok(exit) => {
                    *outcome
                        .exits
                        .entry(exits::name(&exit).into_owned())
                        .or_default() += 1;
                    classify(self.scenario, exit, self.device.as_ref())
                }
                Err(e) if e.errno() == libc::EINTR => {
                    let seen = outcome.exits.entry(exits::INTR.into()).or_default();
                    *seen += 1;
                    let seen = *seen;
                    if self.scenario == Scenario::Signal {
                        self.tell_guest_eintrs(seen)?;
                    }
                    Step::Interrupted
                }
                Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
            };
            match step {
                Step::Interrupted | Step::Served => {}
                Step::Op => {
                    if let Some(n) = outcome.observed_ops.as_mut() {
                        *n += 1;
                    }
                }
                Step::Pace => match pacer.as_mut() {
                    Some(p) => p.tick(),
                    None => return Err(self.guest_error("PACE port written without a rate")),
                },
                Step::Balloon => match (self.balloon, outcome.returned) {
                    // On the vCPU thread, as a VMM serving a balloon request would.
                    (Some(balloon), None) => outcome.returned = Some(balloon.inflate()?),
                    (Some(_), Some(_)) => {
                        return Err(self.guest_error("BALLOON port written a second time"));
                    }
                    (None, _) => {
                        return Err(self.guest_error("BALLOON port written without a balloon"));
                    }
                },
                Step::Done => break,
                Step::Fail(msg) => return Err(self.guest_error(&msg)),
            }
        }
        outcome.pace_exits = pacer.map_or(0, |p| p.ticks());
        outcome.guest_ns = usage::thread_guest_ns()?;
        let regs = self
            .vcpu
            .get_regs()
            .map_err(|e| Error::Kvm("KVM_GET_REGS", e))?;
        if regs.rsi & 0xffff_ffff != 0 {
            return Err(Error::Mismatch(format!(
                "vCPU {} wrote DONE with ESI = {} operations left",
                self.index,
                regs.rsi & 0xffff_ffff
            )));
        }
        Ok(outcome)
    }

    /// Writes the count of EINTRs seen into the signal guest's EBX, which it watches.
    fn tell_guest_eintrs(&mut self, seen: u64) -> Result<(), Error> {
        let mut regs = self
            .vcpu
            .get_regs()
            .map_err(|e| Error::Kvm("KVM_GET_REGS", e))?;
        regs.rbx = seen;
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
    }

    fn guest_error(&mut self, msg: &str) -> Error {
        let rip = self.vcpu.get_regs().map_or(u64::MAX, |r| r.rip);
        let mut msg = msg.to_string();
        if msg.starts_with("internal_error") {
            // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
            // member of the kvm_run exit union.
            let internal = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal };
            msg.push_str(&format!(
                " (suberror {}: {})",
                internal.suberror,
                match internal.suberror {
                    1 => "instruction emulation failed",
                    2 => "simultaneous exception",
                    3 => "delivery event",
                    4 => "unexpected exit reason",
                    _ => "unknown",
                }
            ));
        }
        Error::Guest {
            index: self.index,
            rip,
            msg,
        }
    }
}

/// How often the signal scenario's vCPU thread is sent SIGUSR1.
const SIGNAL_EVERY: Duration = Duration::from_micros(500);

/// Sends the thread that started it SIGUSR1 every [`SIGNAL_EVERY`] from a thread of its own, so
/// that its KVM_RUN keeps returning EINTR (signal scenario); stops, and is joined, when dropped.
struct Signaller {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Signaller {
    fn start() -> Self {
        ignore_sigusr1();
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                // SAFETY: the target thread lives until it has joined this one (Drop).
                unsafe { libc::pthread_kill(target, libc::SIGUSR1) };
                std::thread::sleep(SIGNAL_EVERY);
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Signaller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

extern "C" fn do_nothing(_: libc::c_int) {}

/// Handles SIGUSR1 by doing nothing, without SA_RESTART: a KVM_RUN it interrupts returns EINTR,
/// where the default action would end the process.
fn ignore_sigusr1() {
    // SAFETY: a zeroed sigaction is valid; the handler does nothing, which is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = do_nothing as *const () as libc::sighandler_t;
        libc::sigemptyset(&raw mut action.sa_mask);
        libc::sigaction(libc::SIGUSR1, &raw const action, std::ptr::null_mut());
    }
}

/// Makes this thread's sleeps end on time: the default timer slack (50 µs) would stretch every
/// short `--exit-delay-us` sleep by up to that much.
fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and only changes the calling
    // thread's timer slack; failure leaves the default, which only makes sleeps longer.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

fn classify(scenario: Scenario, exit: VcpuExit<'_>, device: Option<&MmioHandle>) -> Step {
    let served = |result: Result<(), String>| match result {
        Ok(()) => Step::Served,
        Err(e) => Step::Fail(format!("virtio-mmio: {e}")),
    };
    // The device's registers (QueueNotify writes reach them only if no ioeventfd matched).
    let exit = match (exit, device) {
        (VcpuExit::MmioRead(addr, data), Some(d)) if MmioHandle::contains(addr) => {
            return served(d.read(addr, data));
        }
        (VcpuExit::MmioWrite(addr, data), Some(d)) if MmioHandle::contains(addr) => {
            return served(d.write(addr, data));
        }
        (exit, _) => exit,
    };
    match exit {
        VcpuExit::IoOut(port, data) => match port {
            OP_PORT if scenario == Scenario::Pio => Step::Op,
            DONE_PORT => Step::Done,
            PACE_PORT => Step::Pace,
            BALLOON_PORT if scenario == Scenario::Balloon => Step::Balloon,
            FAIL_PORT if scenario == Scenario::Virtio => {
                Step::Fail(FailCode::describe(data.first().copied().unwrap_or(0)))
            }
            _ => Step::Fail(format!("unexpected write to port {port:#x}")),
        },

        VcpuExit::IoIn(OP_PORT, data) if scenario == Scenario::PioIn => {
            // What the guest reads is of no consequence; the VMM answers every read.
            data.fill(0x5a);
            Step::Op
        }
        VcpuExit::IoIn(port, data) => {
            data.fill(0xff);
            Step::Fail(format!("unexpected read of port {port:#x}"))
        }
        VcpuExit::MmioWrite(addr, data) if scenario == Scenario::Mmio && addr == MMIO_GPA => {
            if data.len() == 1 {
                Step::Op
            } else {
                Step::Fail(format!("{}-byte MMIO write at {addr:#x}", data.len()))
            }
        }
        VcpuExit::MmioWrite(addr, data)
            if scenario == Scenario::MmioSweep
                && (SWEEP_GPA..SWEEP_GPA + SWEEP_ADDRESSES).contains(&addr)
                && data.len() == 1 =>
        {
            Step::Op
        }
        VcpuExit::MmioWrite(addr, data) => Step::Fail(format!(
            "unexpected {}-byte MMIO write at {addr:#x}",
            data.len()
        )),
        VcpuExit::MmioRead(addr, data) => {
            data.fill(0xff);
            Step::Fail(format!("unexpected MMIO read at {addr:#x}"))
        }
        VcpuExit::Hlt if scenario == Scenario::Hlt => Step::Op,
        VcpuExit::Intr => Step::Interrupted,
        VcpuExit::Shutdown => Step::Fail("shutdown (triple fault)".into()),
        VcpuExit::InternalError => Step::Fail("internal_error".into()),
        VcpuExit::FailEntry(reason, cpu) => Step::Fail(format!(
            "fail_entry (hardware entry failure reason {reason:#x} on CPU {cpu})"
        )),
        VcpuExit::SystemEvent(kind, data) => {
            Step::Fail(format!("system_event type {kind} data {data:x?}"))
        }
        other => Step::Fail(format!("unexpected exit {}", exits::name(&other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_(scenario: Scenario, exit: VcpuExit<'_>) -> Step {
        classify(scenario, exit, None)
    }

    #[test]
    fn classifies_exits() {
        assert!(matches!(
            classify_(Scenario::Pio, VcpuExit::IoOut(OP_PORT, &[0])),
            Step::Op
        ));
        assert!(matches!(
            classify_(Scenario::Mmio, VcpuExit::IoOut(OP_PORT, &[0])),
            Step::Fail(_)
        ));
        assert!(matches!(
            classify_(Scenario::Cpuid, VcpuExit::IoOut(DONE_PORT, &[0])),
            Step::Done
        ));
        assert!(matches!(
            classify_(Scenario::Mmio, VcpuExit::MmioWrite(MMIO_GPA, &[0])),
            Step::Op
        ));
        assert!(matches!(
            classify_(Scenario::Pio, VcpuExit::Hlt),
            Step::Fail(_)
        ));
        assert!(matches!(classify_(Scenario::Hlt, VcpuExit::Hlt), Step::Op));
        assert!(matches!(
            classify_(Scenario::Hlt, VcpuExit::Shutdown),
            Step::Fail(_)
        ));
        assert!(matches!(
            classify_(Scenario::Virtio, VcpuExit::IoOut(FAIL_PORT, &[5])),
            Step::Fail(m) if m.contains("data read back differs")
        ));
        assert!(matches!(
            classify_(Scenario::Balloon, VcpuExit::IoOut(BALLOON_PORT, &[0])),
            Step::Balloon
        ));
        assert!(matches!(
            classify_(Scenario::Touch, VcpuExit::IoOut(BALLOON_PORT, &[0])),
            Step::Fail(m) if m.contains("unexpected write to port 0x15")
        ));
        assert!(matches!(
            classify_(Scenario::Pio, VcpuExit::IoOut(FAIL_PORT, &[5])),
            Step::Fail(m) if m.contains("unexpected write to port 0x14")
        ));
        // Without a device the virtio window is just an unexpected address.
        assert!(matches!(
            classify_(Scenario::Virtio, VcpuExit::MmioWrite(0xD0070, &[0; 4])),
            Step::Fail(m) if m.contains("unexpected 4-byte MMIO write")
        ));
    }
}
