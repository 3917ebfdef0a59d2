//! What the agent costs work that is not a VM: context switches between two processes pinned to
//! one CPU (`perf bench sched pipe`, whose two processes have their own mm, so every switch goes
//! through `switch_mm_irqs_off()` and its `tlb:tlb_flush`), untraced and with vmtrace's default
//! probes in turn; then once more with the kernel's BPF statistics on, for the BPF time per
//! context switch of the host.

use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Env, bpfstats, interrupt, quiet, tracer, tracer::Tracer};

/// Round trips of one run (two context switches each); about a second here.
const LOOPS: u64 = 200_000;
/// Runs per turn, the median kept: one run is short enough to catch a hiccup of the host.
pub const RUNS_PER_TURN: usize = 3;

pub struct HostSwitch {
    pub loops: u64,
    /// µs per round trip, the median of each turn, untraced and with the agent.
    pub untraced: Vec<f64>,
    pub traced: Vec<f64>,
    /// Context switches of the whole host (`ctxt` of /proc/stat) during the statistics run.
    pub switches: u64,
    /// The agent's programs that ran during it: (name, run time in ns, runs).
    pub programs: Vec<(String, u64, u64)>,
}

impl HostSwitch {
    pub fn bpf_ns(&self) -> u64 {
        self.programs.iter().map(|p| p.1).sum()
    }
}

pub fn run(env: &Env) -> Result<HostSwitch> {
    let loops = ((LOOPS as f64 * env.plan.ops_scale) as u64).max(1000);
    let mut result = HostSwitch {
        loops,
        untraced: Vec::new(),
        traced: Vec::new(),
        switches: 0,
        programs: Vec::new(),
    };
    bench_pipe(env, loops)?; // warm up
    for rep in 0..env.plan.reps {
        interrupt::check()?;
        quiet::wait(std::time::Duration::from_secs(30))?;
        // The order alternates, so that a drift of the host's speed does not favour either.
        let agent_first = rep % 2 == 1;
        for with_agent in [agent_first, !agent_first] {
            let running = tracer::start(
                if with_agent {
                    Tracer::VmtraceDefault
                } else {
                    Tracer::None
                },
                &env.tools,
            )?;
            let mut runs = (0..RUNS_PER_TURN)
                .map(|_| bench_pipe(env, loops))
                .collect::<Result<Vec<f64>>>()?;
            running.stop(&env.tools)?;
            runs.sort_by(f64::total_cmp);
            let us = runs[RUNS_PER_TURN / 2];
            eprintln!(
                "bench: host context switches {}/{}: {:<26} {us:.3} µs per round trip",
                rep + 1,
                env.plan.reps,
                if with_agent {
                    "vmtrace (default probes)"
                } else {
                    "none"
                }
            );
            if with_agent {
                result.traced.push(us);
            } else {
                result.untraced.push(us);
            }
        }
    }
    let _stats = bpfstats::StatsEnabled::enable()?;
    let before = bpfstats::snapshot()?;
    let running = tracer::start(Tracer::VmtraceDefault, &env.tools)?;
    let ids = bpfstats::new_ids(&before, &bpfstats::snapshot()?);
    let s0 = bpfstats::snapshot()?;
    let c0 = context_switches()?;
    bench_pipe(env, loops)?;
    let c1 = context_switches()?;
    let s1 = bpfstats::snapshot()?;
    running.stop(&env.tools)?;
    result.switches = c1.saturating_sub(c0);
    result.programs = bpfstats::delta(&s0, &s1, &ids)
        .into_iter()
        .filter(|p| p.run_cnt > 0)
        .map(|p| (p.name, p.run_time_ns, p.run_cnt))
        .collect();
    eprintln!(
        "bench: host context switches: {} switches, {:.1} ns of vmtrace BPF time each",
        result.switches,
        result.bpf_ns() as f64 / result.switches.max(1) as f64
    );
    Ok(result)
}

/// One `perf bench sched pipe` run on CPU 0; µs per round trip.
fn bench_pipe(env: &Env, loops: u64) -> Result<f64> {
    let output = Command::new("taskset")
        .args(["-c", "0"])
        .arg(&env.tools.perf)
        .args(["bench", "sched", "pipe", "-l", &loops.to_string()])
        .output()
        .context("running taskset -c 0 perf bench sched pipe (util-linux, linux-perf)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "perf bench sched pipe failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    usecs_per_op(&text).with_context(|| format!("no usecs/op in perf bench's output: {text}"))
}

/// perf bench prints `       5.318690 usecs/op`.
fn usecs_per_op(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_suffix("usecs/op")?.trim().parse().ok())
}

/// Context switches of the host since boot (`ctxt` of /proc/stat).
fn context_switches() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    stat.lines()
        .find_map(|l| l.strip_prefix("ctxt ")?.trim().parse().ok())
        .context("no ctxt line in /proc/stat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_perf_bench_output() {
        let text = "# Running 'sched/pipe' benchmark:\n# Executed 200000 pipe operations between two processes\n\n     Total time: 1.063 [sec]\n\n       5.318690 usecs/op\n         188016 ops/sec\n";
        assert_eq!(usecs_per_op(text), Some(5.31869));
        assert_eq!(usecs_per_op("Total time: 1.0 [sec]\n"), None);
    }
}
