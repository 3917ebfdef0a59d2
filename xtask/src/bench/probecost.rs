//! Per-program BPF run time, from the kernel's statistics, for each BPF tracer on each workload.

use std::collections::BTreeMap;

use anyhow::Result;

use super::{
    Env, bpfstats,
    tracer::{self, Tracer},
    workload::{self, Workload},
};

/// The tracers that run BPF programs (perf stat does not).
const TRACERS: [Tracer; 5] = [
    Tracer::VmtraceDefault,
    Tracer::VmtraceAll,
    Tracer::BpftraceClassic,
    Tracer::RawCounter,
    Tracer::EmptyProgram,
];

pub struct ProgCost {
    pub tracer: Tracer,
    pub program: String,
    pub prog_type: String,
    /// (run time in ns, runs) per workload.
    pub runs: BTreeMap<Workload, (u64, u64)>,
}

pub struct ProbeCost {
    pub progs: Vec<ProgCost>,
    /// Guest operations of each workload.
    pub guest_ops: BTreeMap<Workload, u64>,
}

pub fn run(env: &Env) -> Result<ProbeCost> {
    let _stats = bpfstats::StatsEnabled::enable()?;
    let mut result = ProbeCost {
        progs: Vec::new(),
        guest_ops: BTreeMap::new(),
    };
    for t in TRACERS {
        let before = bpfstats::snapshot()?;
        let running = tracer::start(t, &env.tools)?;
        let ids = bpfstats::new_ids(&before, &bpfstats::snapshot()?);
        let first = result.progs.len();
        for w in Workload::ALL {
            let s0 = bpfstats::snapshot()?;
            let measured = workload::measure(env, w)?;
            let s1 = bpfstats::snapshot()?;
            result.guest_ops.insert(w, measured.ops);
            for prog in bpfstats::delta(&s0, &s1, &ids) {
                let row = if let Some(row) = result.progs[first..]
                    .iter_mut()
                    .find(|p| p.program == prog.name && p.prog_type == prog.prog_type)
                {
                    row
                } else {
                    result.progs.push(ProgCost {
                        tracer: t,
                        program: prog.name.clone(),
                        prog_type: prog.prog_type.clone(),
                        runs: BTreeMap::new(),
                    });
                    result.progs.last_mut().expect("just pushed")
                };
                let entry = row.runs.entry(w).or_default();
                entry.0 += prog.run_time_ns;
                entry.1 += prog.run_cnt;
            }
        }
        running.stop(&env.tools)?;
        let (time, runs) = result.progs[first..]
            .iter()
            .flat_map(|p| p.runs.values())
            .fold((0, 0), |(t, r), (dt, dr)| (t + dt, r + dr));
        eprintln!(
            "bench: BPF run time: {:<30} {} programs, {runs} runs, {:.0} ns/run on average",
            t.label(),
            ids.len(),
            time as f64 / runs.max(1) as f64
        );
    }
    Ok(result)
}
