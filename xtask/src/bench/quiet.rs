//! The host must be quiet while guests are timed, and this machine may be shared (builds, other
//! tests, other tracers). Before each tracer's turn the benchmark waits, for a while, until the CPUs
//! are mostly idle and no tracing BPF program is loaded (any would also run on the benchmark's
//! guests, the untraced ones included), and measures how much CPU everyone else used during the
//! turn, so that a disturbed turn can be measured again; the report shows what it found.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::{bpfstats, interrupt, procfs};

/// Busier than this (share of all CPUs) counts as not quiet.
const QUIET: f64 = 0.15;

/// BPF program types that tracers use.
const TRACING_TYPES: [&str; 6] = [
    "tracepoint",
    "raw_tracepoint",
    "raw_tracepoint_writable",
    "perf_event",
    "kprobe",
    "tracing",
];

/// What the host was doing just before a measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calm {
    /// Share of all CPUs busy over the last second.
    pub busy: f64,
    /// Tracing BPF programs loaded by someone else.
    pub foreign: usize,
}

impl Calm {
    pub fn quiet(self) -> bool {
        self.busy <= QUIET && self.foreign == 0
    }

    fn describe(self) -> String {
        format!(
            "{:.0}% busy, {} foreign tracing BPF programs",
            self.busy * 100.0,
            self.foreign
        )
    }
}

/// Waits up to `patience` for a quiet second; returns what the last second looked like.
pub fn wait(patience: Duration) -> Result<Calm> {
    let start = Instant::now();
    let mut warned = false;
    loop {
        let calm = Calm {
            busy: busy_share(Duration::from_secs(1))?,
            foreign: foreign_tracers()?,
        };
        if calm.quiet() {
            return Ok(calm);
        }
        if start.elapsed() >= patience {
            eprintln!(
                "bench: the host is still not quiet ({}); measuring anyway",
                calm.describe()
            );
            return Ok(calm);
        }
        if !warned {
            eprintln!(
                "bench: the host is not quiet ({}); waiting up to {}s",
                calm.describe(),
                patience.as_secs()
            );
            warned = true;
        }
    }
}

/// Tracing BPF programs loaded now (call it while none of the benchmark's own are).
pub fn foreign_tracers() -> Result<usize> {
    Ok(bpfstats::snapshot()?
        .values()
        .filter(|p| TRACING_TYPES.contains(&p.prog_type.as_str()))
        .count())
}

/// Tracing BPF programs still loaded once a tracer has stopped, allowing the kernel a moment to
/// free the stopped tracer's own.
pub fn foreign_after_stop() -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let foreign = foreign_tracers()?;
        if foreign == 0 || Instant::now() >= deadline {
            return Ok(foreign);
        }
        interrupt::sleep(Duration::from_millis(100))?;
    }
}

/// Measures the CPU time other processes use: the host's busy time less this process's and its
/// reaped children's (the VMMs and tracers).
pub struct Meter {
    host_busy: u64,
    host_total: u64,
    ours: f64,
}

impl Meter {
    pub fn start() -> Result<Self> {
        let (host_busy, host_total) = procfs::host_jiffies()?;
        Ok(Self {
            host_busy,
            host_total,
            ours: procfs::own_cpu_ticks(),
        })
    }

    /// Share of all CPUs used by other processes since the start.
    pub fn others(&self) -> Result<f64> {
        let (busy, total) = procfs::host_jiffies()?;
        let host = busy.saturating_sub(self.host_busy) as f64;
        let ours = procfs::own_cpu_ticks() - self.ours;
        let total = total.saturating_sub(self.host_total).max(1) as f64;
        Ok(((host - ours) / total).max(0.0))
    }
}

/// Share of all CPUs' time spent busy over `window`.
fn busy_share(window: Duration) -> Result<f64> {
    let (busy0, total0) = procfs::host_jiffies()?;
    interrupt::sleep(window)?;
    let (busy1, total1) = procfs::host_jiffies()?;
    let total = total1.saturating_sub(total0).max(1);
    Ok(busy1.saturating_sub(busy0) as f64 / total as f64)
}
