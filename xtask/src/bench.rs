//! `cargo xtask bench`: what vmtrace costs the guests it watches, beside bpftrace and perf, what
//! the agent itself costs, and how it scales with tenants. Writes docs/benchmarks.md.

mod agent;
mod agentcost;
pub mod bpfstats;
mod cgroups;
mod hostswitch;
mod interrupt;
mod machine;
mod overhead;
mod probecost;
mod process;
mod procfs;
mod quiet;
mod rawcount;
mod report;
mod scale;
mod stats;
mod svm;
mod targets;
mod tools;
mod tracer;
mod vmm;
mod workload;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Args;

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Repetitions of every (tracer, workload) pair; the tracers alternate within each one.
    #[arg(long)]
    reps: Option<usize>,
    /// A smoke run of a few minutes: 2 repetitions, workloads a tenth as long, 3 s windows, up to
    /// 100 tenants. Writes target/bench/benchmarks-quick.md unless --out is given.
    #[arg(long)]
    quick: bool,
    /// Seconds of each agent-cost and scale measurement window [default: 20, quick: 3].
    #[arg(long)]
    window: Option<u64>,
    /// Tenant counts of the scale measurement [default: 1,10,100,1000; quick: 1,10,100].
    #[arg(long, value_delimiter = ',')]
    tenants: Option<Vec<usize>>,
    /// Live tenant counts (each with a guest running) of the scale measurement [default: 2,50;
    /// quick: 2,20].
    #[arg(long, value_delimiter = ',')]
    live_tenants: Option<Vec<usize>>,
    /// Where to write the report [default: docs/benchmarks.md].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the vmtrace and vmtrace-vmm binaries already in target/release.
    #[arg(long)]
    no_build: bool,
    /// Measure only what tracing kvm_exit costs on the emulated AMD-V host (about 6 minutes;
    /// quick: 2), and replace that section of the report, keeping the rest.
    #[arg(long, conflicts_with = "no_svm")]
    svm_only: bool,
    /// Leave out the emulated AMD-V host's section.
    #[arg(long)]
    no_svm: bool,
}

/// What one run measures, resolved from the options.
pub struct Plan {
    pub quick: bool,
    pub reps: usize,
    /// Factor on the workloads' operation counts (1 for the full run).
    pub ops_scale: f64,
    pub window: Duration,
    pub tenants: Vec<usize>,
    pub live_tenants: Vec<usize>,
    pub out: PathBuf,
}

impl Plan {
    fn new(args: &BenchArgs) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let quick = args.quick;
        Self {
            quick,
            reps: args.reps.unwrap_or(if quick { 2 } else { 7 }).max(1),
            ops_scale: if quick { 0.1 } else { 1.0 },
            window: Duration::from_secs(args.window.unwrap_or(if quick { 3 } else { 20 })),
            tenants: args.tenants.clone().unwrap_or_else(|| {
                if quick {
                    vec![1, 10, 100]
                } else {
                    vec![1, 10, 100, 1000]
                }
            }),
            live_tenants: args
                .live_tenants
                .clone()
                .unwrap_or_else(|| if quick { vec![2, 20] } else { vec![2, 50] }),
            out: args.out.clone().unwrap_or_else(|| {
                if quick {
                    root.join("target/bench/benchmarks-quick.md")
                } else {
                    root.join("docs/benchmarks.md")
                }
            }),
        }
    }
}

/// What every phase needs.
pub struct Env {
    pub plan: Plan,
    pub tools: tools::Tools,
    pub cgroups: cgroups::Cgroups,
}

/// Everything the report shows.
pub struct Results {
    pub machine: machine::Machine,
    pub overhead: overhead::Overhead,
    pub probes: probecost::ProbeCost,
    pub host: hostswitch::HostSwitch,
    pub agent: Vec<agentcost::CostRow>,
    pub scale: Vec<scale::ScaleRow>,
    pub live: Vec<scale::ScaleRow>,
    pub elapsed: Duration,
}

/// `--svm-only`: the emulated host's section, in place of the one in the report.
fn svm_only(plan: &Plan, started: Instant) -> Result<()> {
    let cost = svm::run(plan.reps, plan.ops_scale)?;
    let section = svm::render(&cost, &machine::date(), &machine::commit());
    let old = std::fs::read_to_string(&plan.out).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    if let Some(dir) = plan.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&plan.out, svm::replace_section(&old, &section))
        .with_context(|| format!("writing {}", plan.out.display()))?;
    eprintln!(
        "bench: wrote the SVM host's section of {} in {:.0} s",
        plan.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo xtask raw-tracer`: the raw counter (or empty programs) on `events` until interrupted.
pub fn raw_tracer(events: &[String], empty: bool) -> Result<()> {
    interrupt::install();
    let events: Vec<&str> = events.iter().map(String::as_str).collect();
    let body = if empty {
        rawcount::Body::Empty
    } else {
        rawcount::Body::Count
    };
    let counter = rawcount::RawCounter::attach(&events, body)?;
    println!("raw-tracer: attached to {}", events.join(", "));
    while interrupt::sleep(Duration::from_hours(1)).is_ok() {}
    for (event, count) in counter.totals()? {
        println!("raw-tracer: {event} {count}");
    }
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    interrupt::install();
    let plan = Plan::new(args);
    if args.svm_only {
        return svm_only(&plan, started);
    }
    let tools = tools::prepare(!args.no_build)?;
    let env = Env {
        plan,
        tools,
        cgroups: cgroups::Cgroups::new()?,
    };
    eprintln!(
        "bench: {} repetitions of {} tracers × {} workloads, then BPF run time, host context switches, agent cost, {:?} tenants",
        env.plan.reps,
        tracer::Tracer::ALL.len(),
        workload::Workload::ALL.len(),
        env.plan.tenants
    );
    let machine = machine::describe(&env.tools);
    let overhead = overhead::run(&env)?;
    let probes = probecost::run(&env)?;
    let host = hostswitch::run(&env)?;
    let agent = agentcost::run(&env)?;
    let scale = scale::run(&env)?;
    let live = scale::run_live(&env)?;
    let results = Results {
        machine,
        overhead,
        probes,
        host,
        agent,
        scale,
        live,
        elapsed: started.elapsed(),
    };
    let mut text = report::render(&env.plan, &results);
    if !args.no_svm {
        let cost = svm::run(env.plan.reps, env.plan.ops_scale)?;
        text.push('\n');
        text.push_str(&svm::render(
            &cost,
            &results.machine.date,
            &results.machine.commit,
        ));
    }
    if let Some(dir) = env.plan.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&env.plan.out, &text)
        .with_context(|| format!("writing {}", env.plan.out.display()))?;
    for check in targets::evaluate(&results) {
        eprintln!(
            "bench: target {}: {} ({})",
            check.target,
            check.verdict(),
            check.measured
        );
    }
    eprintln!(
        "bench: wrote {} in {:.0} s",
        env.plan.out.display(),
        results.elapsed.as_secs_f64()
    );
    Ok(())
}
