//! The targets, checked against the measurements (for the report, never as test
//! assertions).

use super::{Results, agentcost::Load, stats, tracer::Tracer, workload::Workload};

const BPF_VS_COUNTER: f64 = 1.2;
const GUEST_VS_COUNTER: f64 = 0.02;
const HOST_SWITCH_RATIO: f64 = 1.02;
const TICK_US_PER_TENANT: f64 = 10.0;
const HOT_PATH_NS: f64 = 60.0;
const AGENT_CPU_PCT: f64 = 1.0;
const AGENT_RSS_MIB: f64 = 32.0;
/// "Flat": the highest event rate adds at most this much CPU (percent of one core) to idle.
const FLAT_PCT: f64 = 0.2;
const TENANT_MEMORY_RATIO: f64 = 2.0;

pub struct Check {
    pub target: String,
    pub measured: String,
    /// `None` when it could not be measured.
    pub met: Option<bool>,
}

impl Check {
    pub fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        }
    }
}

/// Guest-time ratio of `tracer` to the untraced run on `workload` (median of paired repetitions).
pub fn ratio(results: &Results, workload: Workload, tracer: Tracer) -> Option<f64> {
    let series = |t| results.overhead.us_per_op.get(&(workload, t));
    stats::paired_ratio(series(tracer)?, series(Tracer::None)?)
}

/// The spread of `tracer`'s per-repetition ratios to untraced on `workload`.
pub fn spread(results: &Results, workload: Workload, tracer: Tracer) -> Option<(f64, f64)> {
    let series = |t| results.overhead.us_per_op.get(&(workload, t));
    stats::range(&stats::paired_ratios(
        series(tracer)?,
        series(Tracer::None)?,
    ))
}

/// BPF run time per guest operation of all of `tracer`'s programs on `workload`, in ns.
pub fn bpf_ns_per_op(results: &Results, tracer: Tracer, workload: Workload) -> Option<f64> {
    let mut progs = results
        .probes
        .progs
        .iter()
        .filter(|p| p.tracer == tracer)
        .peekable();
    progs.peek()?;
    let ns: u64 = progs
        .filter_map(|p| p.runs.get(&workload).map(|x| x.0))
        .sum();
    let ops = results.probes.guest_ops.get(&workload).copied()?.max(1);
    Some(ns as f64 / ops as f64)
}

/// Agent CPU per tick per tenant of `rows`, in µs: the slope from the fewest tenants measured to
/// the most.
pub fn tick_us_per_tenant(rows: &[super::scale::ScaleRow]) -> Option<(f64, usize, usize)> {
    let tick_ms = |row: &super::scale::ScaleRow| row.cpu_secs * 1000.0 / row.ticks.max(1) as f64;
    let small = rows.iter().min_by_key(|r| r.tenants)?;
    let large = rows.iter().max_by_key(|r| r.tenants)?;
    (large.tenants > small.tenants).then(|| {
        let us =
            (tick_ms(large) - tick_ms(small)) * 1000.0 / (large.tenants - small.tenants) as f64;
        (us, small.tenants, large.tenants)
    })
}

/// Programs that ran at least this often on a workload are on its hot path (the rest ran once or
/// twice per VMM, at its start or end).
const HOT_RUNS: u64 = 1000;

/// The default probe with the highest run time per event on any workload's hot path, and the
/// empty programs' run time (the timing's own cost, the same for every event).
pub struct Hot {
    pub program: String,
    pub workload: Workload,
    pub ns: f64,
    pub floor: f64,
}

pub fn hot_path(results: &Results) -> Option<Hot> {
    let per_run = |t: Tracer| {
        results
            .probes
            .progs
            .iter()
            .filter(move |p| p.tracer == t)
            .flat_map(|p| {
                p.runs
                    .iter()
                    .filter(|(_, (_, runs))| *runs >= HOT_RUNS)
                    .map(move |(w, (ns, runs))| (&p.program, *w, *ns as f64 / *runs as f64))
            })
    };
    let (program, workload, ns) =
        per_run(Tracer::VmtraceDefault).max_by(|a, b| a.2.total_cmp(&b.2))?;
    let floors: Vec<f64> = per_run(Tracer::EmptyProgram).map(|(.., ns)| ns).collect();
    let floor = stats::median(&floors).unwrap_or(0.0);
    Some(Hot {
        program: program.clone(),
        workload,
        ns,
        floor,
    })
}

pub fn evaluate(results: &Results) -> Vec<Check> {
    let mut checks = Vec::new();

    let mut bpf = Vec::new();
    for w in Workload::ALL {
        let ours = bpf_ns_per_op(results, Tracer::VmtraceDefault, w);
        let theirs = bpf_ns_per_op(results, Tracer::RawCounter, w);
        if let (Some(ours), Some(theirs)) = (ours, theirs) {
            bpf.push((w, ours, theirs));
        }
    }
    checks.push(Check {
        target: format!(
            "BPF time per guest operation, default probes <= {BPF_VS_COUNTER:.1}x the raw-tracepoint counter's, every workload"
        ),
        measured: bpf
            .iter()
            .map(|(w, ours, theirs)| {
                format!("{}: {ours:.0} vs {theirs:.0} ns ({:.2}x)", w.name(), ours / theirs.max(1.0))
            })
            .collect::<Vec<_>>()
            .join("; "),
        met: (!bpf.is_empty()).then(|| {
            bpf.iter()
                .all(|(_, ours, theirs)| *ours <= BPF_VS_COUNTER * theirs)
        }),
    });

    let mut guest = Vec::new();
    for w in Workload::ALL {
        let ours = ratio(results, w, Tracer::VmtraceDefault);
        let theirs = ratio(results, w, Tracer::RawCounter);
        if let (Some(ours), Some(theirs)) = (ours, theirs) {
            let spread =
                |t| spread(results, w, t).map_or("-".to_owned(), |(a, b)| format!("{a:.3}–{b:.3}"));
            guest.push((
                w,
                ours,
                theirs,
                spread(Tracer::VmtraceDefault),
                spread(Tracer::RawCounter),
            ));
        }
    }
    checks.push(Check {
        target: format!(
            "guest time, default probes' ratio to untraced <= the raw counter's + {GUEST_VS_COUNTER:.2}, every workload (median; per-repetition range)"
        ),
        measured: guest
            .iter()
            .map(|(w, ours, theirs, s_ours, s_theirs)| {
                format!("{}: {ours:.3}x ({s_ours}) vs {theirs:.3}x ({s_theirs})", w.name())
            })
            .collect::<Vec<_>>()
            .join("; "),
        met: (!guest.is_empty()).then(|| {
            guest
                .iter()
                .all(|(_, ours, theirs, ..)| *ours <= theirs + GUEST_VS_COUNTER)
        }),
    });

    let host = &results.host;
    let switch = stats::paired_ratio(&host.traced, &host.untraced);
    let per_switch = host.bpf_ns() as f64 / host.switches.max(1) as f64;
    checks.push(Check {
        target: format!(
            "host context switches (not a VM) with the agent <= {HOST_SWITCH_RATIO:.2}x untraced; BPF time per switch stated"
        ),
        measured: switch.map_or("-".to_owned(), |r| {
            let range = stats::range(&stats::paired_ratios(&host.traced, &host.untraced))
                .map_or("-".to_owned(), |(a, b)| format!("{a:.3}–{b:.3}"));
            format!(
                "{r:.3}x (per-repetition {range}); {per_switch:.1} ns of BPF time per context switch"
            )
        }),
        met: switch.map(|r| r <= HOST_SWITCH_RATIO),
    });

    let hot = hot_path(results);
    checks.push(Check {
        target: format!(
            "hot-path BPF run time <= {HOT_PATH_NS:.0} ns per event (default probes, above the empty program's)"
        ),
        measured: hot.as_ref().map_or("-".to_owned(), |h| {
            format!(
                "worst: {} on {}, {:.0} ns/event measured, {:.0} ns above the empty programs' {:.0} ns",
                h.program,
                h.workload.name(),
                h.ns,
                h.ns - h.floor,
                h.floor
            )
        }),
        met: hot.map(|h| h.ns - h.floor <= HOT_PATH_NS),
    });

    let row = |load| results.agent.iter().find(|r| r.load == load);
    let pct = |r: &super::agentcost::CostRow| r.cpu_secs / r.secs * 100.0;
    if let (Some(idle), Some(high)) = (row(Load::Idle), row(Load::Highest)) {
        let events = high.events as f64 / high.secs;
        checks.push(Check {
            target: format!("agent <= {AGENT_CPU_PCT}% of one core at the highest rate"),
            measured: format!("{:.3}% at {events:.0} events/s", pct(high)),
            met: Some(pct(high) <= AGENT_CPU_PCT),
        });
        let peak = results.agent.iter().map(|r| r.hwm_kib).max().unwrap_or(0) as f64 / 1024.0;
        checks.push(Check {
            target: format!("agent peak RSS <= {AGENT_RSS_MIB} MiB"),
            measured: format!("{peak:.1} MiB"),
            met: Some(peak <= AGENT_RSS_MIB),
        });
        let extra = pct(high) - pct(idle);
        checks.push(Check {
            target: format!(
                "agent CPU flat in the event rate (within {FLAT_PCT}% of a core of idle)"
            ),
            measured: format!(
                "idle {:.3}%, highest {:.3}% ({:+.3} points)",
                pct(idle),
                pct(high),
                extra
            ),
            met: Some(extra <= FLAT_PCT),
        });
        checks.push(Check {
            target: "no event lost at the highest rate".to_owned(),
            measured: format!(
                "{} of {} doorbell writes counted, {} drops",
                high.counted, high.guest_ops, high.drops
            ),
            met: Some(high.counted == high.guest_ops && high.drops == 0),
        });
    }

    if let Some((us, small, large)) = tick_us_per_tenant(&results.live) {
        let finished = tick_us_per_tenant(&results.scale).map_or(String::new(), |(us, _, _)| {
            format!("; {us:.1} µs per tenant whose guests have finished")
        });
        checks.push(Check {
            target: format!(
                "agent tick <= {TICK_US_PER_TENANT:.0} µs of CPU per active tenant (a guest running)"
            ),
            measured: format!(
                "{us:.1} µs per active tenant (from {small} to {large}){finished}"
            ),
            met: Some(us <= TICK_US_PER_TENANT),
        });
    }

    let size = |n| results.scale.iter().find(|r| r.tenants == n);
    if let (Some(ten), Some(thousand)) = (size(10), size(1000)) {
        let peak = thousand.hwm_kib as f64 / ten.hwm_kib.max(1) as f64;
        let now = thousand.rss_kib as f64 / ten.rss_kib.max(1) as f64;
        let mib = |kib: u64| kib as f64 / 1024.0;
        checks.push(Check {
            target: format!("1000 tenants within {TENANT_MEMORY_RATIO}x the memory of 10"),
            measured: format!(
                "peak RSS {:.1} vs {:.1} MiB ({peak:.2}x); RSS after the window {:.1} vs {:.1} MiB ({now:.2}x)",
                mib(thousand.hwm_kib),
                mib(ten.hwm_kib),
                mib(thousand.rss_kib),
                mib(ten.rss_kib)
            ),
            met: Some(peak.max(now) <= TENANT_MEMORY_RATIO),
        });
    }
    checks
}
