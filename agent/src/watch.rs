//! `vmtrace watch`: the live per-tenant view, as a table for people or JSON lines for scripts.

use std::{
    io::Write,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cgroups::{CgroupIndex, find_v2_mount},
    counts::Counters,
    host,
    probes::{ExitSource, ProbeOptions, Probes},
    tenants::{TenantCounts, by_tenant},
};

/// How `watch` runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub json: bool,
    pub probes: ProbeOptions,
}

/// One interval's view, as printed in JSON mode.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// Seconds since the Unix epoch.
    pub timestamp: f64,
    /// Seconds since the probes were attached; counts are totals since then.
    pub elapsed_secs: f64,
    pub exit_source: ExitSource,
    pub tenants: &'a [TenantCounts],
    /// Events the probes could not count, by reason.
    pub drops: &'a std::collections::BTreeMap<&'static str, u64>,
    /// True on the last report, printed when the agent stops.
    pub last: bool,
}

pub async fn run(options: &WatchOptions) -> Result<()> {
    let kvm = host::detect_kvm();
    let mut probes = Probes::attach(&kvm, &options.probes).context("cannot start the probes")?;
    let counters = Counters::new(&mut probes.ebpf)?;
    let root = find_v2_mount().context(
        "no cgroup v2 hierarchy is mounted (mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`)",
    )?;
    let mut index = CgroupIndex::new(root);
    for failed in probes.status.iter().filter(|s| s.error.is_some()) {
        // kvm_exit is expected to be missing where it never fires, and optional probes when off.
        let expected = (failed.tracepoint == "kvm:kvm_exit" && !kvm.flavour.emits_kvm_exit())
            || (failed.tracepoint == "syscalls:sys_enter_read" && !options.probes.kick_latency);
        if !expected {
            tracing::warn!(tracepoint = %failed.tracepoint, error = ?failed.error, "probe not attached");
        }
    }
    eprintln!(
        "vmtrace: watching; KVM {}; exit source: {}",
        kvm.flavour.name(),
        probes.exit_source.describe()
    );

    let started = Instant::now();
    let mut ticker = tokio::time::interval(options.interval);
    ticker.tick().await;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let deadline = options.duration.map(|d| started + d);
    let mut previous: Vec<TenantCounts> = Vec::new();
    let mut last_tick = started;
    loop {
        let last = tokio::select! {
            _ = ticker.tick() => deadline.is_some_and(|d| Instant::now() >= d),
            _ = interrupt.recv() => true,
            _ = terminate.recv() => true,
        };
        let now = Instant::now();
        let snapshot = counters.read(&probes.reason_names)?;
        let tenants = by_tenant(
            &snapshot,
            &mut index,
            &previous,
            now.duration_since(last_tick).as_secs_f64(),
        );
        let report = Report {
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            elapsed_secs: now.duration_since(started).as_secs_f64(),
            exit_source: probes.exit_source,
            tenants: &tenants,
            drops: &snapshot.drops,
            last,
        };
        let text = if options.json {
            serde_json::to_string(&report)? + "\n"
        } else {
            render_table(&report)
        };
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (`vmtrace watch | head`) ends the view quietly.
        if stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
            || last
        {
            return Ok(());
        }
        previous = tenants;
        last_tick = now;
    }
}

/// The table people read: one block per tenant, one line per kind, with latency percentiles where
/// the kind has them.
fn render_table(report: &Report) -> String {
    let mut out = format!(
        "\n── vmtrace · {:.0}s · exit source: {}{} ──\n{:<40} {:<26} {:>11} {:>10} {:>9} {:>9}\n",
        report.elapsed_secs,
        report.exit_source.short_name(),
        if report.last { " · final" } else { "" },
        "TENANT",
        "KIND",
        "COUNT",
        "RATE/s",
        "p50 µs",
        "p99 µs"
    );
    if report.tenants.is_empty() {
        out.push_str("(no KVM activity yet)\n");
    }
    for tenant in report.tenants {
        for (i, (kind, count)) in tenant.counts.iter().enumerate() {
            let name = if i == 0 { tenant.tenant.as_str() } else { "" };
            let rate = tenant.rates.get(kind).copied().unwrap_or(0.0);
            let (p50, p99) = tenant
                .latency
                .get(kind)
                .map_or((String::new(), String::new()), |l| {
                    let us = |ns: u64| format!("{:.1}", ns as f64 / 1000.0);
                    (us(l.p50_ns), us(l.p99_ns))
                });
            out.push_str(&format!(
                "{name:<40} {kind:<26} {count:>11} {rate:>10.1} {p50:>9} {p99:>9}\n"
            ));
        }
    }
    let dropped: u64 = report.drops.values().sum();
    if dropped > 0 {
        out.push_str(&format!("events lost: {:?}\n", report.drops));
    }
    out
}
