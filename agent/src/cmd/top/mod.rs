//! `vmtrace top`: the live per-tenant view in the terminal, as `top` is for processes and `kvm_stat`
//! for plain KVM counts, but per tenant, with reasons, latency and kicks (and TLB, faults and tax
//! where those kinds exist).
//!
//! Layout: [`state`] holds what is shown and [`keys`] changes it, both free of terminal code;
//! [`view`] and [`detail`] draw it with ratatui; [`batch`] prints it as plain text; [`source`]
//! feeds samples from the probes, a recording or stdin; [`terminal`] makes sure the user's terminal
//! comes back on every way out.

pub(crate) mod batch;
pub(crate) mod columns;
pub(crate) mod detail;
pub(crate) mod format;
pub(crate) mod keys;
pub(crate) mod metrics;
pub(crate) mod source;
pub(crate) mod state;
pub(crate) mod terminal;
pub(crate) mod timeline;
pub(crate) mod vcpus;
pub(crate) mod view;

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Args;
use ratatui::crossterm::event::{self, Event};

use crate::{
    cmd::args::{KubeArgs, ProbeArgs, parse_interval},
    sample::errors::SampleErrors,
    sample::recording::parse_speed,
    tenant::kubernetes::{self, KubeConfig},
};
use columns::Column;
use source::{Feed, Source};
use state::App;

/// Interactive per-tenant view: exits/s, top exit reason, p99 exit latency, kicks/s (and TLB
/// flushes/s, faults/s and virtualisation tax where the host reports them; "–" where not).
///
/// Keys: 1-8 sort by a column (again to reverse), < > previous/next column, r reverse, ↑/↓ select,
/// Enter drill down into a tenant (every kind with count, rate, p50 and p99; virtio kicks per
/// queue; a latency histogram, Tab for the next; v for each vCPU thread's exits by reason), Esc
/// back, / filter by name, p or Space pause, Ctrl-L redraw, ? help, q or Ctrl-C quit.
///
/// Samples come from the probes (the default; needs root or CAP_BPF and CAP_PERFMON), or from a
/// recording with --replay. `vmtrace watch --json | vmtrace top --replay -` shows a running agent's
/// output. When stdout is not a terminal, or with -b, frames are printed as plain text instead.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// Batch mode: print each sample as a plain-text frame to stdout (for pipes and logs), no keys.
    /// Also used when stdout is not a terminal.
    #[arg(short, long)]
    pub batch: bool,
    /// Batch mode: stop after this many frames.
    #[arg(short = 'n', long, value_name = "N")]
    pub iterations: Option<u64>,
    /// Time between samples when running the probes, e.g. `1s`, `500ms`.
    #[arg(short = 'd', long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Show a recording (`vmtrace record`, or saved `watch --json` output) instead of running
    /// the probes; `-` reads samples from stdin as they arrive.
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,
    /// With --replay: play this many times faster than recorded, e.g. `10` or `0.5`.
    #[arg(long, default_value = "1", value_parser = parse_speed, requires = "replay")]
    pub speed: f64,
    /// With --replay: show samples without waiting between them.
    #[arg(long, requires = "replay", conflicts_with = "speed")]
    pub no_delay: bool,
    /// The column to sort by at start.
    #[arg(long, value_enum, default_value = "exits")]
    pub sort: Column,
    /// Show only tenants whose name contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,
    #[command(flatten)]
    pub probes: ProbeArgs,
    #[command(flatten)]
    pub kube: KubeArgs,
}

pub fn run(args: &TopArgs) -> Result<()> {
    let (source, label) = match &args.replay {
        Some(path) => open_replay(path, (!args.no_delay).then_some(args.speed))?,
        None => (open_live(args)?, "live".to_owned()),
    };
    let app = App::new(label, args.sort, args.filter.clone().unwrap_or_default());
    if args.batch || !std::io::stdout().is_terminal() {
        run_batch(source, app, args.iterations)
    } else {
        run_interactive(source, app)
    }
}

/// The probes, and the pods' names from the API server where it is known.
fn open_live(args: &TopArgs) -> Result<Source> {
    let kube = match KubeConfig::resolve(
        args.kube.kube_api.as_deref(),
        args.kube.node_name.as_deref(),
        &|name| std::env::var(name).ok(),
    ) {
        Ok(kube) => kube,
        // In a pod without NODE_NAME, top still shows its tenants, by pod UID.
        Err(e) if args.kube.kube_api.is_none() => {
            eprintln!("vmtrace top: pods are shown by UID: {e:#}");
            None
        }
        Err(e) => return Err(e),
    };
    let pods = match kube {
        Some(kube) => {
            eprintln!(
                "vmtrace top: pod names from {} (node {})",
                kube.api, kube.node
            );
            Some(kubernetes::watch_in_background(kube)?)
        }
        None => None,
    };
    Source::live(
        args.probes.into(),
        args.probes.max_tenants(),
        args.interval,
        pods,
    )
}

/// `vmtrace replay FILE --top`.
pub fn run_replay(path: &Path, speed: Option<f64>) -> Result<()> {
    let (source, label) = open_replay(path, speed)?;
    let app = App::new(label, Column::Exits, String::new());
    if std::io::stdout().is_terminal() {
        run_interactive(source, app)
    } else {
        run_batch(source, app, None)
    }
}

fn open_replay(path: &Path, speed: Option<f64>) -> Result<(Source, String)> {
    let (source, description) = Source::replay(path, speed)?;
    eprintln!("vmtrace: replaying {description}");
    let name = path
        .file_name()
        .map_or_else(|| "stdin".into(), |n| n.to_string_lossy());
    let label = if path == Path::new("-") {
        "stdin".to_owned()
    } else {
        format!("replay {name}")
    };
    Ok((source, label))
}

fn run_batch(mut source: Source, mut app: App, iterations: Option<u64>) -> Result<()> {
    let mut printed = 0;
    // Failed samples are logged to stderr at most once a minute per kind, as the agent does.
    let mut errors = SampleErrors::default();
    while iterations.is_none_or(|n| printed < n) {
        match source.poll()? {
            Feed::Sample(sample) => {
                app.push(*sample);
                let mut stdout = std::io::stdout().lock();
                // A closed pipe (`vmtrace top -b | head`) ends batch mode quietly.
                if stdout
                    .write_all(batch::frame(&app).as_bytes())
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return Ok(());
                }
                printed += 1;
            }
            Feed::Skipped(e) => {
                app.skip(&e);
                errors.record(&e, std::time::Instant::now());
            }
            Feed::Wait(wait) => std::thread::sleep(wait),
            Feed::End => break,
        }
    }
    Ok(())
}

fn run_interactive(mut source: Source, mut app: App) -> Result<()> {
    let mut guard = terminal::TerminalGuard::enter().context("cannot set up the terminal")?;
    let result = event_loop(&mut guard, &mut source, &mut app);
    drop(guard);
    result
}

/// Samples at most this many due samples per redraw, so that keys stay responsive during a fast
/// replay.
const DRAIN: usize = 64;
/// The longest the loop sleeps without looking at keys and signals.
const TICK: Duration = Duration::from_millis(200);

fn event_loop(
    guard: &mut terminal::TerminalGuard,
    source: &mut Source,
    app: &mut App,
) -> Result<()> {
    loop {
        let mut wait = TICK;
        // A paused recording stays where it is; live samples keep coming and wait in a backlog.
        let frozen = app.paused && !source.is_live();
        if !app.ended && !frozen {
            let mut drained = 0;
            loop {
                match source.poll()? {
                    Feed::Sample(sample) => app.push(*sample),
                    // Shown in the status line: a log line would tear the screen.
                    Feed::Skipped(e) => app.skip(&e),
                    Feed::Wait(d) => {
                        wait = wait.min(d);
                        break;
                    }
                    Feed::End => {
                        app.ended = true;
                        break;
                    }
                }
                drained += 1;
                if drained == DRAIN {
                    wait = Duration::ZERO;
                    break;
                }
            }
        }
        if std::mem::take(&mut app.redraw) {
            guard.terminal.clear()?;
        }
        guard.terminal.draw(|frame| view::draw(frame, app))?;
        if event::poll(wait)? {
            loop {
                match event::read()? {
                    Event::Key(key) => keys::handle_key(app, key),
                    Event::Resize(..) => app.redraw = true,
                    _ => {}
                }
                if !event::poll(Duration::ZERO)? {
                    break;
                }
            }
        }
        if app.quit || terminal::stop_requested() {
            return Ok(());
        }
    }
}
