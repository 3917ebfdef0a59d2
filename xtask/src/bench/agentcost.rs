//! The agent's own cost (CPU, memory) while idle and at increasing event rates, with the events
//! counted by the kernel's BPF statistics and the agent's counts checked against the guests'.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    Env,
    agent::{self, Agent},
    bpfstats,
    cgroups::ROOT,
    interrupt, procfs,
    vmm::{self, Run},
};

/// Guest operations per second of the rate-limited state.
const MODERATE_RATE: u64 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    Idle,
    Moderate,
    Highest,
}

impl Load {
    pub const ALL: [Load; 3] = [Load::Idle, Load::Moderate, Load::Highest];

    pub fn name(self) -> &'static str {
        match self {
            Load::Idle => "idle",
            Load::Moderate => "moderate",
            Load::Highest => "highest",
        }
    }

    pub fn describe(self) -> String {
        match self {
            Load::Idle => "no guest running".to_owned(),
            Load::Moderate => format!(
                "doorbell guest held to {MODERATE_RATE} ops/s (each op adds a pacing port exit)"
            ),
            Load::Highest => "doorbell guest, 2 vCPUs, unlimited, back-to-back runs".to_owned(),
        }
    }
}

pub struct CostRow {
    pub load: Load,
    pub secs: f64,
    /// Agent reports printed during the window.
    pub ticks: usize,
    /// Probe runs during the window (all of the agent's programs).
    pub events: u64,
    pub cpu_secs: f64,
    pub hwm_kib: u64,
    pub rss_kib: u64,
    /// Guest doorbell writes, and how many of them the agent counted (`mmio.write`).
    pub guest_ops: u64,
    pub counted: u64,
    /// Events the probes reported lost, since the agent started.
    pub drops: u64,
}

pub fn run(env: &Env) -> Result<Vec<CostRow>> {
    let _stats = bpfstats::StatsEnabled::enable()?;
    let before = bpfstats::snapshot()?;
    let agent = Agent::start(&env.tools, false, "agent-cost")?;
    let ids = bpfstats::new_ids(&before, &bpfstats::snapshot()?);
    interrupt::sleep(Duration::from_secs(2))?;
    let mut rows = Vec::new();
    for load in Load::ALL {
        let row = measure(env, &agent, &ids, load)?;
        eprintln!(
            "bench: agent cost {:<8} {:>9.0} events/s  {:.3}% CPU  {:.2} ms CPU/tick  peak RSS {:.1} MiB",
            load.name(),
            row.events as f64 / row.secs,
            row.cpu_secs / row.secs * 100.0,
            row.cpu_secs * 1000.0 / row.ticks.max(1) as f64,
            row.hwm_kib as f64 / 1024.0
        );
        rows.push(row);
    }
    agent.stop()?;
    Ok(rows)
}

fn measure(env: &Env, agent: &Agent, ids: &BTreeSet<u64>, load: Load) -> Result<CostRow> {
    let window = env.plan.window;
    let cgroup = format!("{ROOT}/agent/{}", load.name());
    let s0 = bpfstats::snapshot()?;
    let u0 = procfs::usage(agent.pid())?;
    let ticks0 = agent.samples()?.len();
    let start = Instant::now();
    let mut guest_ops = 0;
    match load {
        Load::Idle => interrupt::sleep(window)?,
        Load::Moderate => {
            let run = Run {
                scenario: "doorbell",
                vcpus: 1,
                count: MODERATE_RATE * window.as_secs().max(1),
                rate: Some(MODERATE_RATE),
                cgroup: cgroup.clone(),
            };
            guest_ops += ops(env, &run)?;
        }
        Load::Highest => {
            let run = Run {
                scenario: "doorbell",
                vcpus: 2,
                count: (300_000.0 * env.plan.ops_scale) as u64,
                rate: None,
                cgroup: cgroup.clone(),
            };
            while start.elapsed() < window {
                guest_ops += ops(env, &run)?;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let u1 = procfs::usage(agent.pid())?;
    let s1 = bpfstats::snapshot()?;
    let ticks = agent.samples()?.len() - ticks0;
    // The next report has every event of the window.
    interrupt::sleep(Duration::from_millis(1500))?;
    let samples = agent.samples()?;
    let last = samples.last();
    Ok(CostRow {
        load,
        secs,
        ticks,
        events: bpfstats::delta(&s0, &s1, ids)
            .iter()
            .map(|p| p.run_cnt)
            .sum(),
        cpu_secs: u1.cpu_secs - u0.cpu_secs,
        hwm_kib: u1.hwm_kib,
        rss_kib: u1.rss_kib,
        guest_ops,
        counted: last.map_or(0, |s| agent::count(s, &cgroup, "mmio.write")),
        drops: last.map_or(0, agent::drops),
    })
}

fn ops(env: &Env, run: &Run) -> Result<u64> {
    let reports = vmm::run_together(&env.tools.vmm, std::slice::from_ref(run), &env.tools.logs)?;
    Ok(reports.iter().map(|r| r.guest_ops).sum())
}
