//! The drill-down's per-vCPU view (`v`), as `perf kvm stat` has it: each VMM thread of the tenant
//! (a vCPU is one) with its exits, their rate and their reasons, counted by the probes per thread
//! while `top` runs live. Bounded: at most [`MAX_ROWS`] threads, busiest first, and the
//! [`MAX_REASONS`] commonest reasons of each, the rest summed.

use ratatui::{
    Frame,
    layout::{Constraint, Rect},
    style::Stylize,
    text::Line,
    widgets::{Paragraph, Row, Table},
};

use super::format;
use crate::{
    probe::threads::ThreadExits, sample::sampler::Sample, tenant::aggregate::TenantCounts,
};

/// Threads listed at most.
pub const MAX_ROWS: usize = 64;
/// Reasons shown per thread; the others are summed as `+N more`.
pub const MAX_REASONS: usize = 3;

/// One thread's line.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuRow {
    pub tid: u32,
    /// The thread's name (`vcpu0`), `?` where /proc does not show it.
    pub name: String,
    pub ended: bool,
    /// Exits as the tenant's exits count them (the host's exit source).
    pub exits: u64,
    /// Exits per second since the previous sample; `None` on the first sample of a thread.
    pub rate: Option<f64>,
    /// The commonest reasons, most first.
    pub reasons: Vec<(String, u64)>,
    /// Reasons beyond those, and their exits.
    pub more: Option<(usize, u64)>,
}

/// The tenant's threads in `sample`, with rates against `previous` (the sample before).
pub fn rows(sample: &Sample, tenant: &TenantCounts, previous: Option<&Sample>) -> Vec<VcpuRow> {
    let before = |tid: u32| -> Option<(u64, f64)> {
        let previous = previous?;
        let seconds = sample.elapsed_secs - previous.elapsed_secs;
        let thread = previous
            .tenants
            .iter()
            .find(|t| t.tenant == tenant.tenant)?
            .threads
            .iter()
            .find(|t| t.tid == tid)?;
        (seconds > 0.0).then(|| (exits(sample, thread).0, seconds))
    };
    let mut rows: Vec<VcpuRow> = tenant
        .threads
        .iter()
        .filter_map(|thread| {
            let (total, mut reasons) = exits(sample, thread);
            if total == 0 {
                return None;
            }
            reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let rest = reasons.split_off(reasons.len().min(MAX_REASONS));
            Some(VcpuRow {
                tid: thread.tid,
                name: thread.name.clone().unwrap_or_else(|| "?".to_owned()),
                ended: thread.ended,
                exits: total,
                rate: before(thread.tid)
                    .map(|(then, seconds)| total.saturating_sub(then) as f64 / seconds),
                more: (!rest.is_empty()).then(|| (rest.len(), rest.iter().map(|(_, n)| n).sum())),
                reasons,
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        a.ended
            .cmp(&b.ended)
            .then(b.exits.cmp(&a.exits))
            .then(a.tid.cmp(&b.tid))
    });
    rows.truncate(MAX_ROWS);
    rows
}

/// A thread's exits by reason, as the tenant's are counted from the host's exit source.
fn exits(sample: &Sample, thread: &ThreadExits) -> (u64, Vec<(String, u64)>) {
    let reasons: Vec<(String, u64)> = thread
        .counts
        .iter()
        .filter_map(|(kind, &count)| Some((kind.exit_reason(sample.exit_source)?, count)))
        .filter(|(_, count)| *count > 0)
        .collect();
    (reasons.iter().map(|(_, n)| n).sum(), reasons)
}

/// The reasons cell: `io 3000 · hlt 1 · +2 more (7)`.
pub fn reasons_text(row: &VcpuRow) -> String {
    let mut parts: Vec<String> = row
        .reasons
        .iter()
        .map(|(reason, count)| format!("{reason} {}", format::count(*count)))
        .collect();
    if let Some((n, count)) = row.more {
        parts.push(format!("+{n} more ({})", format::count(count)));
    }
    parts.join(" · ")
}

pub fn draw(
    frame: &mut Frame,
    sample: &Sample,
    tenant: &TenantCounts,
    previous: Option<&Sample>,
    area: Rect,
) {
    let rows = rows(sample, tenant, previous);
    if rows.is_empty() {
        frame.render_widget(
            Paragraph::new(vec![
                Line::raw("per-vCPU exits (v: back to kinds)").bold(),
                Line::raw(if sample.tenants.iter().any(|t| !t.threads.is_empty()) {
                    "no exits of this tenant's threads yet"
                } else {
                    "no per-thread counts in these samples: they are counted while top runs the \
                     probes itself (not from a recording or another agent's stream)"
                })
                .dim(),
            ]),
            area,
        );
        return;
    }
    let table_rows = rows.iter().map(|row| {
        let name = if row.ended {
            format!("{} (ended)", row.name)
        } else {
            row.name.clone()
        };
        Row::new([
            name,
            format!("{:>8}", row.tid),
            format!("{:>8}", format::count(row.exits)),
            format!(
                "{:>7}",
                row.rate
                    .map_or_else(|| format::MISSING.to_owned(), format::rate)
            ),
            reasons_text(row),
        ])
    });
    let header = Row::new([
        "THREAD",
        "     TID",
        "   EXITS",
        "EXITS/s",
        "REASONS (v: kinds)",
    ])
    .bold();
    let table = Table::new(
        table_rows,
        [
            Constraint::Length(16),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Fill(1),
        ],
    )
    .header(header)
    .column_spacing(1);
    frame.render_widget(table, area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::{ExitReason, Kind};

    fn thread(tid: u32, name: &str, counts: &[(Kind, u64)]) -> ThreadExits {
        ThreadExits {
            tid,
            name: Some(name.to_owned()),
            ended: false,
            counts: counts.iter().cloned().collect(),
        }
    }

    fn sample_with(elapsed_secs: f64, threads: Vec<ThreadExits>) -> Sample {
        let mut sample: Sample = serde_json::from_value(serde_json::json!({
            "timestamp": 1.0, "elapsed_secs": elapsed_secs, "interval_secs": 1.0, "kvm": "pvm",
            "exit_source": "derived", "drops": {},
            "tenants": [{"tenant": "/a", "identity": null, "cgroups": [], "counts": {},
                         "rates": {}}],
        }))
        .unwrap();
        sample.tenants[0].threads = threads;
        sample
    }

    #[test]
    fn threads_show_their_exits_by_reason_busiest_first_with_rates() {
        let io = Kind::Exit(ExitReason(2));
        let hlt = Kind::Exit(ExitReason(5));
        let before = sample_with(1.0, vec![thread(11, "vcpu0", &[(io.clone(), 100)])]);
        let now = sample_with(
            3.0,
            vec![
                thread(11, "vcpu0", &[(io.clone(), 300), (hlt.clone(), 1)]),
                thread(12, "vcpu1", &[(io.clone(), 500)]),
                // The VMM's main thread: no exits, not listed.
                thread(10, "vmtrace-vmm", &[]),
            ],
        );
        let rows = rows(&now, &now.tenants[0], Some(&before));
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].tid, rows[0].exits, rows[0].rate), (12, 500, None));
        assert_eq!((rows[1].tid, rows[1].exits), (11, 301));
        assert_eq!(rows[1].rate, Some(100.5));
        assert_eq!(reasons_text(&rows[1]), "io 300 · hlt 1");
    }

    #[test]
    fn reasons_beyond_the_commonest_are_summed() {
        let kinds = [
            (Kind::Exit(ExitReason(2)), 50),
            (Kind::Exit(ExitReason(5)), 40),
            (Kind::Exit(ExitReason(6)), 30),
            (Kind::Cpuid, 20),
            (Kind::Exit(ExitReason(10)), 10),
        ];
        let now = sample_with(1.0, vec![thread(7, "vcpu0", &kinds)]);
        let rows = rows(&now, &now.tenants[0], None);
        assert_eq!(rows[0].exits, 150);
        assert_eq!(
            reasons_text(&rows[0]),
            "io 50 · hlt 40 · mmio 30 · +2 more (30)"
        );
    }
}
