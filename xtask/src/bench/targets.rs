//! The targets, checked against the measurements (for the report, never as test
//! assertions).

use super::{Results, agentcost::Load, stats, tracer::Tracer, workload::Workload};

const DOORBELL_RATIO: f64 = 1.02;
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

    let doorbell = ratio(results, Workload::Doorbell, Tracer::VmtraceDefault);
    checks.push(Check {
        target: format!("doorbell loop with default probes <= {DOORBELL_RATIO:.2}x untraced"),
        measured: doorbell.map_or("-".to_owned(), |r| format!("{r:.3}x")),
        met: doorbell.map(|r| r <= DOORBELL_RATIO),
    });

    let others = [
        Tracer::BpftraceClassic,
        Tracer::RawCounter,
        Tracer::PerfStat,
    ];
    let mut cheaper = Vec::new();
    for w in Workload::ALL {
        let Some(ours) = ratio(results, w, Tracer::VmtraceDefault) else {
            continue;
        };
        for t in others {
            if let Some(theirs) = ratio(results, w, t) {
                cheaper.push((w, t, ours, theirs));
            }
        }
    }
    let beaten: Vec<String> = cheaper
        .iter()
        .filter(|(_, _, ours, theirs)| ours > theirs)
        .map(|(w, t, ours, theirs)| {
            format!("{}: {ours:.3}x vs {} {theirs:.3}x", w.name(), t.label())
        })
        .collect();
    checks.push(Check {
        target: "default probes cost a guest less than bpftrace, the raw counter and perf stat"
            .to_owned(),
        measured: if beaten.is_empty() {
            "cheapest on every workload".to_owned()
        } else {
            beaten.join("; ")
        },
        met: (!cheaper.is_empty()).then_some(beaten.is_empty()),
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
