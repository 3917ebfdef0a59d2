//! `vmtrace watch`: the live per-tenant view, as a table for people or JSON lines for scripts.

use std::{io::Write, time::Duration};

use anyhow::Result;

use clap::Args;

use crate::{
    cmd::args::{ProbeArgs, parse_interval},
    kind::{Gauge, Kind, MemEvent, TopColumn},
    sample::sampler::{Sample, Sampler, degraded_marker},
    sample::ticks::Ticks,
    tenant::aggregate::TenantCounts,
};

/// Live per-tenant view: exit counts since start and rates per tenant and kind, every interval.
///
/// Kinds: `exit.<reason>` are KVM_RUN returns to the VMM (io, mmio, hlt, ...); `pio.in`/`pio.out`
/// port accesses; `mmio.write`/`mmio.read` MMIO accesses; `mmio.write.kernel` MMIO writes the kernel
/// completed itself (ioeventfd doorbells); `cpuid`; `kick.q<N>` virtio queue kicks; `kvm_exit.<reason>`
/// on VMX/SVM hosts. Latency percentiles are shown for `kvm_exit.*` (exit to entry), and with
/// --service-time for `exit.*` (the VMM's service time), with --kick-latency for `kick.*`. Under each tenant a `host:` line
/// sums up what the host spends on it: the virtualisation tax in CPUs (and its share of the
/// tenant's CPU), memory charged, page faults and TLB flushes per second, memory returned by a
/// balloon and taken back (refaults). `--json` has every kind: `tlb.*`, `fault.*`, `mem.*`,
/// `mmu.page.*`, `memcg.*`, `tax.*`, `cpu.guest`, `iommu.*` (see docs/memory-and-tlb.md, docs/tax.md).
/// Stops after --duration, or on Ctrl-C/SIGTERM, printing a last report marked final.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Time between reports, e.g. `1s`, `500ms`.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Stop after this long, e.g. `30s`, `5m`. Runs until interrupted when absent.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// One JSON object per report and line, for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub probes: ProbeArgs,
}

pub async fn run(options: &WatchArgs) -> Result<()> {
    let mut sampler = Sampler::start(&options.probes.into())?;
    sampler.limit_tenants(options.probes.max_tenants());
    eprintln!(
        "vmtrace: watching; KVM {}; exit source: {}",
        sampler.kvm().flavour.name(),
        sampler.probes().exit_source.describe()
    );
    if let Some(marker) = degraded_marker(&sampler.probes_not_attached()) {
        eprintln!("vmtrace: {marker}: its figures are incomplete (`vmtrace doctor` says why)");
    }
    let mut errors = crate::sample::errors::SampleErrors::default();
    let mut ticks = Ticks::new(options.interval, options.duration, false)?;
    loop {
        let last = ticks.next().await;
        // A failed sample is counted, logged (rate limited) and skipped; the next tick tries again.
        let Some(sample) = errors.skip(sampler.sample()) else {
            if last {
                return Ok(());
            }
            continue;
        };
        let sample = Sample { last, ..sample };
        if !print_sample(&sample, options.json)? || last {
            return Ok(());
        }
    }
}

/// Prints a sample as a JSON line or a table. Returns false once stdout is closed (`vmtrace watch |
/// head`), which ends the view quietly.
pub fn print_sample(sample: &Sample, json: bool) -> Result<bool> {
    let text = if json {
        serde_json::to_string(sample)? + "\n"
    } else {
        render_table(sample)
    };
    let mut stdout = std::io::stdout().lock();
    Ok(stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok())
}

/// The table people read: one block per tenant, one line per guest-side kind, with latency
/// percentiles where the kind has them, then one line of what the host spends on the tenant.
/// What the host spends on a tenant, on one line: tax (in CPUs, and as a share of the tenant's CPU
/// where the host knows guest time), memory, faults, TLB flushes, balloon.
fn host_line(tenant: &TenantCounts) -> Option<String> {
    let rate = |of: &dyn Fn(&Kind) -> bool| -> Option<f64> {
        let mut rates = tenant.rates.iter().filter(|(k, _)| of(k));
        let first = rates.next()?;
        Some(first.1 + rates.map(|(_, r)| r).sum::<f64>())
    };
    let count = |kind: Kind| tenant.counts.get(&kind).copied().filter(|&c| c > 0);
    let mut parts = Vec::new();
    if let Some(tax) = rate(&|k| k.top_column() == TopColumn::Tax) {
        let ratio = tenant.gauges.get(&Gauge::TaxRatio);
        parts.push(format!(
            "tax {:.2} CPU ({})",
            tax / 1e9,
            ratio.map_or_else(
                || "share unknown".to_owned(),
                |r| format!("{:.0}%", r * 100.0)
            )
        ));
    }
    if let Some(bytes) = tenant.gauges.get(&Gauge::MemoryUsage) {
        parts.push(format!("memory {:.1} MiB", bytes / MIB));
    }
    if let Some(faults) = rate(&|k| k.top_column() == TopColumn::Faults) {
        parts.push(format!("faults {faults:.0}/s"));
    }
    if let Some(flushes) = rate(&Kind::is_tlb_flush) {
        parts.push(format!("TLB flushes {flushes:.0}/s"));
    }
    if let Some(bytes) = count(Kind::Mem(MemEvent::ReturnedBytes)) {
        parts.push(format!("returned {:.1} MiB", bytes as f64 / MIB));
    }
    if let Some(pages) = count(Kind::Mem(MemEvent::Refault)) {
        parts.push(format!("refaults {pages}"));
    }
    (!parts.is_empty()).then(|| format!("host: {}", parts.join(" · ")))
}

const MIB: f64 = 1024.0 * 1024.0;

fn render_table(report: &Sample) -> String {
    let mut out = format!(
        "\n── vmtrace · {:.0}s · exit source: {}{}{} ──\n{:<40} {:<26} {:>11} {:>10} {:>9} {:>9}\n",
        report.elapsed_secs,
        report.exit_source.short_name(),
        if report.last { " · final" } else { "" },
        degraded_marker(&report.probes_not_attached)
            .map_or_else(String::new, |m| format!(" · {m}")),
        "TENANT",
        "KIND",
        "COUNT",
        "RATE/s",
        "p50 µs",
        "p99 µs"
    );
    if report.tenants.is_empty() {
        out.push_str("(no KVM activity yet)\n");
    } else if let Some(why) = &report.guest_time_unavailable {
        out.push_str(&format!("(tax shares unknown: {why})\n"));
    }
    for tenant in &report.tenants {
        let guest_side = tenant.counts.iter().filter(|(k, _)| !k.is_host_side());
        for (i, (kind, count)) in guest_side.enumerate() {
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
                "{name:<40} {:<26} {count:>11} {rate:>10.1} {p50:>9} {p99:>9}\n",
                kind.text()
            ));
        }
        if let Some(line) = host_line(tenant) {
            out.push_str(&format!("{:<40} {line}\n", ""));
        }
    }
    let dropped: u64 = report.drops.values().sum();
    if dropped > 0 {
        out.push_str(&format!("events lost: {:?}\n", report.drops));
    }
    out
}
