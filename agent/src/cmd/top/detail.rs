//! The drill-down screen: one tenant's every kind (count, rate, p50, p99), its exit-rate timeline,
//! a latency histogram as bars, and its virtio kicks per VMM, doorbell and queue; or, with `v`,
//! each vCPU thread's exits ([`super::vcpus`]).

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Style, Stylize},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row, Table},
};

use super::{
    format::{self, MISSING},
    metrics::tenant_row,
    state::App,
    timeline, vcpus,
};
use crate::{
    kind::{Gauge, Kind, Latency},
    probe::latency::LatencySummary,
    tenant::aggregate::TenantCounts,
    tenant::resolve::Tenant,
};

pub fn draw(frame: &mut Frame, app: &App, area: Rect) {
    let Some(tenant) = app.detail_tenant() else {
        frame.render_widget(
            Paragraph::new("this tenant is not in the current sample").dim(),
            area,
        );
        return;
    };
    let doorbell_rows = tenant.doorbells.len().min(4) as u16;
    let [info, timeline_area, middle, doorbells] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(5),
        Constraint::Fill(1),
        Constraint::Length(if doorbell_rows > 0 {
            doorbell_rows + 2
        } else {
            0
        }),
    ])
    .areas(area);
    frame.render_widget(info_lines(tenant, info.width as usize), info);
    timeline::draw(frame, app, &tenant.tenant, timeline_area);
    let side_by_side = middle.width >= 76;
    let (kinds_area, histogram_area) = if side_by_side {
        let [k, h] = Layout::horizontal([Constraint::Length(50), Constraint::Fill(1)])
            .spacing(1)
            .areas(middle);
        (k, h)
    } else {
        let [k, h] = Layout::vertical([Constraint::Fill(1), Constraint::Fill(1)]).areas(middle);
        (k, h)
    };
    if let (Some(sample), true) = (&app.sample, app.vcpus) {
        vcpus::draw(frame, sample, tenant, app.previous.as_ref(), middle);
    } else {
        draw_kinds(frame, tenant, kinds_area);
        draw_histogram(frame, tenant, app.histogram_kind, histogram_area);
    }
    if doorbell_rows > 0 {
        draw_doorbells(frame, tenant, doorbells);
    }
}

fn identity(tenant: &TenantCounts) -> String {
    match &tenant.identity {
        Some(Tenant::KubernetesPod { pod_uid, qos, .. }) => format!(
            "Kubernetes pod {pod_uid}{}",
            qos.as_ref().map(|q| format!(" ({q})")).unwrap_or_default()
        ),
        Some(Tenant::LibvirtVm { name }) => format!("libvirt VM {name}"),
        Some(Tenant::SystemdUnit { unit }) => format!("systemd unit {unit}"),
        Some(Tenant::Path { .. }) => "cgroup".to_owned(),
        None => "unnamed cgroup".to_owned(),
    }
}

fn info_lines(tenant: &TenantCounts, width: usize) -> Paragraph<'static> {
    let row = tenant_row(tenant);
    let cgroups: Vec<String> = tenant
        .cgroups
        .iter()
        .map(|c| format!("{} ({})", c.path.as_deref().unwrap_or("?"), c.id))
        .collect();
    let name = match tenant.display_name() {
        name if name == tenant.tenant => name,
        name => format!("{name} ({})", tenant.tenant),
    };
    let first = format!(
        "{name} · {} · cgroups: {}",
        identity(tenant),
        cgroups.join(", ")
    );
    // The tax as `watch` gives it: CPUs, and the share of the tenant's CPU where the host knows
    // guest time.
    let tax = row.tax.map_or_else(String::new, |cpus| {
        let share = tenant
            .gauges
            .get(&Gauge::TaxRatio)
            .map_or_else(|| "share unknown".to_owned(), |&r| format::percent(r));
        format!(" · tax {} CPU ({share})", format::cpus(cpus))
    });
    let second = format!(
        "exits/s {} · top reason {} · p99 {} · kicks/s {}{tax}",
        format::rate(row.exits),
        row.top_reason.as_deref().unwrap_or(MISSING),
        row.p99_ns
            .map_or_else(|| MISSING.to_owned(), format::latency_ns),
        format::rate(row.kicks)
    );
    Paragraph::new(vec![
        Line::raw(truncate_right(&first, width)).bold(),
        Line::raw(second),
    ])
}

fn truncate_right(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// A tenant's kinds, busiest first.
pub fn kinds_by_rate(tenant: &TenantCounts) -> Vec<(&Kind, u64, f64)> {
    let mut kinds: Vec<(&Kind, u64, f64)> = tenant
        .counts
        .iter()
        .map(|(k, &c)| (k, c, tenant.rates.get(k).copied().unwrap_or(0.0)))
        .collect();
    kinds.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.1.cmp(&a.1)).then(a.0.cmp(b.0)));
    kinds
}

fn draw_kinds(frame: &mut Frame, tenant: &TenantCounts, area: Rect) {
    let kind_width = area.width.saturating_sub(8 + 7 + 6 + 6 + 4).max(8);
    let rows = kinds_by_rate(tenant)
        .into_iter()
        .map(|(kind, count, rate)| {
            let (p50, p99) = tenant.latency.get(kind).map_or_else(
                || (String::new(), String::new()),
                |l| (format::latency_ns(l.p50_ns), format::latency_ns(l.p99_ns)),
            );
            Row::new([
                truncate_right(&kind.text(), kind_width as usize),
                format!("{:>8}", format::count(count)),
                format!("{:>7}", format::rate(rate)),
                format!("{p50:>6}"),
                format!("{p99:>6}"),
            ])
        });
    let header = Row::new(["KIND", "   COUNT", " RATE/s", "   P50", "   P99"]).bold();
    let table = Table::new(
        rows,
        [
            Constraint::Length(kind_width),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Length(6),
            Constraint::Length(6),
        ],
    )
    .header(header)
    .column_spacing(1);
    frame.render_widget(table, area);
}

/// The latency kinds a tenant has, most measured first.
pub fn latency_kinds(tenant: &TenantCounts) -> Vec<(&Kind, &LatencySummary)> {
    let mut kinds: Vec<(&Kind, &LatencySummary)> =
        tenant.latency.iter().filter(|(_, l)| l.count > 0).collect();
    kinds.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    kinds
}

/// What a kind's latency measures.
fn latency_meaning(kind: &Kind) -> &'static str {
    kind.latency().map_or("latency", Latency::meaning)
}

fn draw_histogram(frame: &mut Frame, tenant: &TenantCounts, choice: usize, area: Rect) {
    let kinds = latency_kinds(tenant);
    let block = Block::new().borders(Borders::LEFT | Borders::TOP);
    if kinds.is_empty() {
        frame.render_widget(
            Paragraph::new("no latency measured for this tenant")
                .dim()
                .block(block.title(" latency ")),
            area,
        );
        return;
    }
    let (kind, summary) = kinds[choice % kinds.len()];
    let title = format!(
        " {} {} ({}/{}) ",
        kind,
        latency_meaning(kind),
        choice % kinds.len() + 1,
        kinds.len()
    );
    let inner = block.inner(area);
    let rows = format::histogram_rows(&summary.buckets, inner.height.saturating_sub(1) as usize);
    let max = rows.iter().map(|r| r.count).max().unwrap_or(0);
    let bar_width = (inner.width as usize).saturating_sub(6 + 1 + 1 + 6);
    let mut lines: Vec<Line> = rows
        .iter()
        .map(|r| {
            let bar = format::bar(r.count, max, bar_width);
            Line::from(vec![
                format!("{:>6} ", format::latency_ns(r.lowest_ns)).into(),
                ratatui::text::Span::styled(
                    format!("{bar:<bar_width$}"),
                    Style::new().fg(Color::Green),
                ),
                format!(" {:>6}", format::count(r.count)).into(),
            ])
        })
        .collect();
    lines.push(
        Line::raw(format!(
            "p99 {} max {}",
            format::latency_ns(summary.p99_ns),
            format::latency_ns(summary.max_ns)
        ))
        .dim(),
    );
    frame.render_widget(Paragraph::new(lines).block(block.title(title)), area);
}

fn draw_doorbells(frame: &mut Frame, tenant: &TenantCounts, area: Rect) {
    let mut doorbells: Vec<_> = tenant.doorbells.iter().collect();
    doorbells.sort_by_key(|d| std::cmp::Reverse(d.kicks));
    let rows = doorbells.into_iter().map(|d| {
        Row::new([
            format!("{:>7}", d.pid),
            format!("{:>5}", d.vm_fd),
            d.space.clone(),
            format!("{:#x}", d.addr),
            d.queue.map_or_else(|| "any".to_owned(), |q| q.to_string()),
            format!("{:>9}", d.kicks),
        ])
    });
    let header = Row::new([
        "    PID",
        "VM FD",
        "SPACE",
        "DOORBELL",
        "QUEUE",
        "    KICKS",
    ])
    .bold();
    let table = Table::new(
        rows,
        [
            Constraint::Length(7),
            Constraint::Length(5),
            Constraint::Length(5),
            Constraint::Length(14),
            Constraint::Length(5),
            Constraint::Length(9),
        ],
    )
    .header(header)
    .column_spacing(1)
    .block(
        Block::new()
            .borders(Borders::TOP)
            .title(" virtio kicks per queue "),
    );
    frame.render_widget(table, area);
}

#[cfg(test)]
mod tests {
    use crate::{
        cmd::top::keys::tests::app, cmd::top::view::tests::render, probe::counters::DoorbellKicks,
    };

    #[test]
    fn drill_down_shows_kinds_histogram_and_queues_in_80x24() {
        let mut app = app();
        let sample = app.sample.as_mut().unwrap();
        let other = sample
            .tenants
            .iter_mut()
            .find(|t| t.tenant == "/y/other")
            .unwrap();
        other.latency.insert(
            "exit.io".parse().unwrap(),
            serde_json::from_value(serde_json::json!({
                "count": 100, "mean_ns": 3000, "p50_ns": 2047, "p90_ns": 4095, "p99_ns": 16383,
                "max_ns": 9000, "buckets": [[1024, 60], [2048, 30], [8192, 10]],
            }))
            .unwrap(),
        );
        other.doorbells.push(DoorbellKicks {
            pid: 4242,
            vm_fd: 5,
            space: "mmio".to_owned(),
            addr: 0xd000_0050,
            queue: Some(0),
            kicks: 9,
        });
        app.screen = crate::cmd::top::state::Screen::Detail("/y/other".to_owned());
        let screen = render(&app, 80, 24);
        let text = screen.join("\n");
        assert!(screen[1].starts_with("/y/other · unnamed cgroup"), "{text}");
        for needle in [
            "KIND",
            "cpuid",
            "kick.q0",
            "exit.io VMM service (1/1)",
            "1.02µs",
            "4242",
            "0xd0000050",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
        assert!(text.contains('█'), "histogram bars:\n{text}");
    }
}
