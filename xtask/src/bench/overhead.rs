//! What each tracer costs a guest: every workload under every tracer, the tracers alternating
//! within each repetition (in a rotated order), guest time per operation from the VMM's report.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Result;

use super::{
    Env, interrupt, quiet,
    tracer::{self, Tracer},
    workload::{self, Workload},
};

/// A turn is measured again (up to RETRIES times) when someone else's tracing programs were
/// loaded, or other processes used more than OTHERS_MAX of all CPUs, meanwhile; but not when the
/// host was not quiet before the turn either (waiting gave up: it stays busy).
pub const RETRIES: usize = 3;
pub const OTHERS_MAX: f64 = 0.10;

/// How undisturbed one accepted turn was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Turn {
    /// Share of all CPUs used by other processes during the turn.
    pub others: f64,
    /// Whether someone else's tracing programs were loaded before or after it.
    pub foreign: bool,
}

impl Turn {
    pub fn disturbed(self) -> bool {
        self.foreign || self.others > OTHERS_MAX
    }
}

pub struct Overhead {
    /// µs of guest time per operation, one value per repetition, in repetition order.
    pub us_per_op: BTreeMap<(Workload, Tracer), Vec<f64>>,
    /// What the host was doing around each accepted turn.
    pub turns: Vec<Turn>,
}

pub fn run(env: &Env) -> Result<Overhead> {
    eprintln!("bench: guest cost: warming up");
    for w in Workload::ALL {
        workload::measure(env, w)?;
    }
    let mut result = Overhead {
        us_per_op: BTreeMap::new(),
        turns: Vec::new(),
    };
    let reps = env.plan.reps;
    for rep in 0..reps {
        interrupt::check()?;
        let mut order = Tracer::ALL;
        order.rotate_left(rep % Tracer::ALL.len());
        for (i, t) in order.into_iter().enumerate() {
            // Longer patience at the start of a repetition, a shorter one before each tracer.
            let patience = Duration::from_secs(if i == 0 { 60 } else { 10 });
            let mut attempt = 0;
            let values = loop {
                let calm = quiet::wait(patience)?;
                let meter = quiet::Meter::start()?;
                let values = turn(env, t)?;
                let others = meter.others()?;
                let turn = Turn {
                    others,
                    foreign: calm.foreign > 0 || quiet::foreign_after_stop()? > 0,
                };
                if !turn.disturbed() || attempt == RETRIES || !calm.quiet() {
                    result.turns.push(turn);
                    break values;
                }
                attempt += 1;
                eprintln!(
                    "bench: {}'s turn was disturbed (others used {:.0}% of the CPUs{}); again",
                    t.label(),
                    others * 100.0,
                    if turn.foreign {
                        ", another tracer was loaded"
                    } else {
                        ""
                    }
                );
            };
            let mut line = format!("bench: guest cost {}/{reps}: {:<30}", rep + 1, t.label());
            for (w, us) in Workload::ALL.into_iter().zip(values) {
                result.us_per_op.entry((w, t)).or_default().push(us);
                line.push_str(&format!(" {} {us:.2} µs/op", w.name()));
            }
            eprintln!("{line}");
        }
    }
    Ok(result)
}

/// One tracer's turn: start it, run every workload, stop it. µs per op, by workload.
fn turn(env: &Env, t: Tracer) -> Result<Vec<f64>> {
    let running = tracer::start(t, &env.tools)?;
    let values = Workload::ALL
        .into_iter()
        .map(|w| Ok(workload::measure(env, w)?.us_per_op()))
        .collect::<Result<Vec<_>>>()?;
    running.stop(&env.tools)?;
    Ok(values)
}
