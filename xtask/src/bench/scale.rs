//! The agent's cost by number of tenants. Every tenant is a cgroup in which a short reference-VMM
//! run leaves counts (a cgroup without KVM activity has no map entries, so nothing to cost); a
//! few of them keep a guest running through the measurement window. Then the cost by number of
//! live tenants, each with a guest running through the window: a live tenant's cgroup files and
//! VMM threads are read every tick, a finished one's are not.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::{
    Env,
    agent::{self, Agent},
    cgroups::ROOT,
    interrupt, procfs,
    vmm::{self, Run},
};

/// Scenarios the short runs cycle through, so tenants have different kinds.
const SCENARIOS: [&str; 5] = ["pio", "mmio", "doorbell", "cpuid", "hlt"];
/// Operations of each short run.
const SHORT_OPS: u64 = 50;
/// VMMs started at once while populating.
const PARALLEL: usize = 4;
/// Tenants with a guest running through the window, and its rate.
const ACTIVE: usize = 2;
const ACTIVE_RATE: u64 = 5_000;
/// The live tenants' guests: port writes (an exit to the VMM each) at this rate.
pub const LIVE_RATE: u64 = 100;

pub struct ScaleRow {
    pub tenants: usize,
    pub active: usize,
    pub populate_secs: f64,
    /// The benchmark's tenants in the agent's last report, and their (tenant, kind) series.
    pub reported: usize,
    pub series: usize,
    pub secs: f64,
    pub ticks: usize,
    pub cpu_secs: f64,
    pub hwm_kib: u64,
    pub rss_kib: u64,
}

pub fn run(env: &Env) -> Result<Vec<ScaleRow>> {
    measure_each(env, &env.plan.tenants, "scale", measure)
}

/// Rows with every tenant live, for each count of `env.plan.live_tenants`.
pub fn run_live(env: &Env) -> Result<Vec<ScaleRow>> {
    measure_each(env, &env.plan.live_tenants, "live", measure_live)
}

fn measure_each(
    env: &Env,
    sizes: &[usize],
    what: &str,
    measure: fn(&Env, usize, &str) -> Result<ScaleRow>,
) -> Result<Vec<ScaleRow>> {
    let mut rows = Vec::new();
    for &n in sizes {
        let rel = format!("{what}/n{n}");
        let row = measure(env, n, &rel);
        env.cgroups.remove(&rel);
        let row = row?;
        eprintln!(
            "bench: {what} {n:>5} tenants: {} reported, {} series, {:.2} ms CPU/tick, peak RSS {:.1} MiB",
            row.reported,
            row.series,
            row.cpu_secs * 1000.0 / row.ticks.max(1) as f64,
            row.hwm_kib as f64 / 1024.0
        );
        rows.push(row);
    }
    Ok(rows)
}

fn measure(env: &Env, n: usize, rel: &str) -> Result<ScaleRow> {
    let cgroups = create(env, n, rel)?;
    let agent = Agent::start(&env.tools, false, &format!("scale-{n}"))?;
    let start = Instant::now();
    let runs: Vec<Run> = cgroups
        .iter()
        .enumerate()
        .map(|(i, cgroup)| Run {
            scenario: SCENARIOS[i % SCENARIOS.len()],
            vcpus: 1,
            count: SHORT_OPS,
            rate: None,
            cgroup: cgroup.clone(),
        })
        .collect();
    for chunk in runs.chunks(PARALLEL) {
        interrupt::check()?;
        vmm::run_together(&env.tools.vmm, chunk, &env.tools.logs)?;
    }
    let populate_secs = start.elapsed().as_secs_f64();
    let active = &cgroups[..ACTIVE.min(n)];
    window(
        env,
        agent,
        n,
        rel,
        active,
        ("doorbell", ACTIVE_RATE),
        populate_secs,
    )
}

/// `n` tenants, each with a guest making port writes at [`LIVE_RATE`] through the window.
fn measure_live(env: &Env, n: usize, rel: &str) -> Result<ScaleRow> {
    let cgroups = create(env, n, rel)?;
    let agent = Agent::start(&env.tools, false, &format!("live-{n}"))?;
    window(env, agent, n, rel, &cgroups, ("pio", LIVE_RATE), 0.0)
}

fn create(env: &Env, n: usize, rel: &str) -> Result<Vec<String>> {
    (0..n)
        .map(|i| env.cgroups.create(&format!("{rel}/t{i:04}")))
        .collect()
}

/// Runs a guest at `rate` in each of `active`, and measures the agent over the window.
fn window(
    env: &Env,
    agent: Agent,
    n: usize,
    rel: &str,
    active: &[String],
    (scenario, rate): (&'static str, u64),
    populate_secs: f64,
) -> Result<ScaleRow> {
    let window = env.plan.window;
    let guests: Vec<_> = active
        .iter()
        .enumerate()
        .map(|(i, cgroup)| {
            let run = Run {
                scenario,
                vcpus: 1,
                count: rate * (window.as_secs() + 10),
                rate: Some(rate),
                cgroup: cgroup.clone(),
            };
            vmm::spawn(
                &env.tools.vmm,
                &run,
                &env.tools.logs.join(format!("active-{i}.json")),
            )
        })
        .collect::<Result<_>>()?;
    // Let the agent name the new cgroups before the window opens.
    interrupt::sleep(Duration::from_secs(2))?;
    let u0 = procfs::usage(agent.pid())?;
    let ticks0 = agent.samples()?.len();
    let window_start = Instant::now();
    interrupt::sleep(window)?;
    let secs = window_start.elapsed().as_secs_f64();
    let u1 = procfs::usage(agent.pid())?;
    let ticks = agent.samples()?.len() - ticks0;
    drop(guests);
    let samples = agent.stop()?;
    let (reported, series) = samples.last().map_or((0, 0), |s| {
        agent::series_under(s, &format!("{ROOT}/{rel}/"))
    });
    Ok(ScaleRow {
        tenants: n,
        active: active.len(),
        populate_secs,
        reported,
        series,
        secs,
        ticks,
        cpu_secs: u1.cpu_secs - u0.cpu_secs,
        hwm_kib: u1.hwm_kib,
        rss_kib: u1.rss_kib,
    })
}
