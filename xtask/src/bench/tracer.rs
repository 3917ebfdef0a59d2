//! The tracers compared side by side, each started before and stopped after a set of workloads.

use std::{
    fs::File,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    agent::Agent,
    interrupt,
    process::Process,
    rawcount::{Body, RawCounter},
    tools::Tools,
};

/// The events vmtrace counts per tenant by default (on this PVM host; kvm_exit never fires here).
pub const EVENTS: [&str; 4] = ["kvm_userspace_exit", "kvm_pio", "kvm_mmio", "kvm_cpuid"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tracer {
    None,
    VmtraceDefault,
    VmtraceAll,
    BpftraceClassic,
    RawCounter,
    EmptyProgram,
    PerfStat,
}

impl Tracer {
    pub const ALL: [Tracer; 7] = [
        Tracer::None,
        Tracer::VmtraceDefault,
        Tracer::VmtraceAll,
        Tracer::BpftraceClassic,
        Tracer::RawCounter,
        Tracer::EmptyProgram,
        Tracer::PerfStat,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Tracer::None => "none",
            Tracer::VmtraceDefault => "vmtrace (default probes)",
            Tracer::VmtraceAll => "vmtrace (every probe)",
            Tracer::BpftraceClassic => "bpftrace, classic tracepoints",
            Tracer::RawCounter => "raw-tracepoint counter",
            Tracer::EmptyProgram => "empty raw-tracepoint programs",
            Tracer::PerfStat => "perf stat",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Tracer::None => "no tracer attached",
            Tracer::VmtraceDefault => "`vmtrace watch --json --interval 1s`",
            Tracer::VmtraceAll => {
                "`vmtrace watch --json --interval 1s --kick-latency --service-time` (adds \
                 `kvm:kvm_fpu`, `syscalls:sys_enter_ioctl` and `syscalls:sys_enter_read`)"
            }
            Tracer::BpftraceClassic => {
                "bpftrace: `tracepoint:kvm:<event> { @<event>[cgroup] = count(); }` for the 4 events"
            }
            Tracer::RawCounter => {
                "the same count on raw tracepoints (`rawtracepoint:<event>`), loaded by the benchmark \
                 itself: bpftrace 0.17 (Debian 12) has no rawtracepoint probes"
            }
            Tracer::EmptyProgram => {
                "a raw-tracepoint program that does nothing, on each of the 4 events: the floor of \
                 any BPF tracer of these events"
            }
            Tracer::PerfStat => {
                "`perf stat -a -e kvm:<event>,...` counting the 4 events, host-wide"
            }
        }
    }
}

/// A started tracer; stopping it (or dropping it) detaches it.
pub enum Running {
    None,
    Agent(Agent),
    Process(Process),
    Raw(RawCounter),
}

pub fn start(tracer: Tracer, tools: &Tools) -> Result<Running> {
    Ok(match tracer {
        Tracer::None => Running::None,
        Tracer::VmtraceDefault => Running::Agent(Agent::start(tools, false, "vmtrace-default")?),
        Tracer::VmtraceAll => Running::Agent(Agent::start(tools, true, "vmtrace-all")?),
        Tracer::BpftraceClassic => Running::Process(start_bpftrace(tools)?),
        Tracer::RawCounter => Running::Raw(RawCounter::attach(&EVENTS, Body::Count)?),
        Tracer::EmptyProgram => Running::Raw(RawCounter::attach(&EVENTS, Body::Empty)?),
        Tracer::PerfStat => Running::Process(start_perf(tools)?),
    })
}

impl Running {
    /// Stops the tracer. What the raw counter counted goes to target/bench/raw-counter.out, as
    /// bpftrace's maps go to bpftrace.out.
    pub fn stop(self, tools: &Tools) -> Result<()> {
        match self {
            Running::None => Ok(()),
            Running::Raw(counter) => {
                let text: String = counter
                    .totals()?
                    .iter()
                    .map(|(tp, n)| format!("{tp}: {n}\n"))
                    .collect();
                std::fs::write(tools.logs.join("raw-counter.out"), text)
                    .context("writing raw-counter.out")
            }
            Running::Agent(agent) => agent.stop().map(drop),
            Running::Process(mut process) => {
                let status = process.interrupt(Duration::from_secs(15))?;
                // bpftrace and perf exit with 0 or, on SIGINT, 130; anything else is a failure.
                match status.code() {
                    Some(0 | 130) | None => Ok(()),
                    Some(code) => bail!("the tracer exited with status {code}"),
                }
            }
        }
    }
}

fn start_bpftrace(tools: &Tools) -> Result<Process> {
    let script: String = EVENTS
        .iter()
        .map(|e| format!("tracepoint:kvm:{e} {{ @{e}[cgroup] = count(); }}\n"))
        .collect();
    let output = tools.logs.join("bpftrace.out");
    let mut process = Process::spawn(
        Command::new(&tools.bpftrace)
            .args(["-e", &script])
            .stdin(Stdio::null())
            .stdout(File::create(&output).context("creating bpftrace's output file")?)
            .stderr(File::create(tools.logs.join("bpftrace.err")).context("creating a log")?),
        "bpftrace",
    )?;
    // bpftrace prints "Attaching N probes..." just before it attaches them.
    wait_for(&mut process, "bpftrace", || {
        std::fs::read_to_string(&output).is_ok_and(|t| t.contains("Attaching"))
    })?;
    interrupt::sleep(Duration::from_millis(500))?;
    Ok(process)
}

fn start_perf(tools: &Tools) -> Result<Process> {
    let events: Vec<String> = EVENTS.iter().map(|e| format!("kvm:{e}")).collect();
    let mut process = Process::spawn(
        Command::new(&tools.perf)
            .args(["stat", "-a", "-x", ",", "-e", &events.join(",")])
            .arg("-o")
            .arg(tools.logs.join("perf-stat.csv"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "perf stat",
    )?;
    // perf says nothing when its counters are open; give it a moment and check it still runs.
    interrupt::sleep(Duration::from_millis(500))?;
    wait_for(&mut process, "perf stat", || true)?;
    Ok(process)
}

fn wait_for(process: &mut Process, name: &str, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        interrupt::check()?;
        if let Some(status) = process.exited()? {
            bail!("{name} stopped before it was ready ({status})");
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} was not ready within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
