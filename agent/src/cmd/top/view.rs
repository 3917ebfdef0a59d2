//! Drawing `top`: status line, the tenants table with a trend per tenant and the selected tenant's
//! exit-rate timeline, the footer, and the help overlay. Laid out to stay readable in 80x24.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize},
    text::{Line, Span},
    widgets::{Block, Cell, Clear, Paragraph, Row, Table, TableState},
};

use super::{
    columns::Column,
    detail,
    format::{self, truncate_left},
    keys::HELP,
    state::{App, Screen},
    timeline,
};
use crate::sample::sampler::degraded_marker;

/// Width of the trend (sparkline) column.
const TREND: u16 = 8;
/// Marker before the selected row.
const SELECTED: &str = "▶";

pub fn draw(frame: &mut Frame, app: &App) {
    let [status, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(status_line(app), status);
    match &app.screen {
        Screen::Table => draw_table_screen(frame, app, body),
        Screen::Detail(_) => detail::draw(frame, app, body),
    }
    frame.render_widget(footer_line(app), footer);
    if app.help {
        draw_help(frame, frame.area());
    }
}

/// `vmtrace top · live · PVM derived · 12s · 3/3 tenants · sort EXITS/s ▼`.
pub fn status_text(app: &App) -> String {
    let mut parts = vec!["vmtrace top".to_owned(), app.source.clone()];
    if let Some(s) = &app.sample {
        parts.push(format!("{} {}", s.kvm.name(), s.exit_source.short_name()));
        parts.push(format!("{:.0}s", s.elapsed_secs));
        let total = s.tenants.len();
        parts.push(format!("{}/{total} tenants", app.rows().len()));
        parts.extend(degraded_marker(&s.probes_not_attached));
    } else {
        parts.push("waiting for the first sample".to_owned());
    }
    parts.push(format!(
        "sort {} {}",
        app.sort.title(),
        if app.descending { "▼" } else { "▲" }
    ));
    if let Some(error) = &app.last_skip {
        parts.push(format!(
            "{} sample{} skipped (last: {error})",
            app.skipped,
            if app.skipped == 1 { "" } else { "s" }
        ));
    }
    if app.paused {
        parts.push("PAUSED".to_owned());
    }
    if app.ended {
        parts.push("end of recording".to_owned());
    }
    parts.join(" · ")
}

fn status_line(app: &App) -> Paragraph<'static> {
    Paragraph::new(status_text(app)).style(Style::new().reversed())
}

fn footer_line(app: &App) -> Paragraph<'static> {
    if app.editing_filter {
        return Paragraph::new(Line::from(vec![
            Span::raw("filter: ").bold(),
            Span::raw(app.filter.clone()),
            Span::raw("█").slow_blink(),
            Span::raw("   Enter keep · Esc clear").dim(),
        ]));
    }
    let keys = match app.screen {
        Screen::Table => "q quit  ? help  / filter  p pause  1-8 sort  r reverse  ↵ details",
        Screen::Detail(_) => "q quit  ? help  Esc back  Tab histogram  p pause",
    };
    let mut spans = vec![Span::raw(keys).dim()];
    if !app.filter.is_empty() {
        spans.push(Span::raw(format!("  filter: {}", app.filter)).bold());
    }
    Paragraph::new(Line::from(spans))
}

fn draw_table_screen(frame: &mut Frame, app: &App, area: Rect) {
    let rows = app.rows();
    let timeline = area.height >= 12 && !rows.is_empty();
    let [table_area, timeline_area] = Layout::vertical([
        Constraint::Fill(1),
        Constraint::Length(if timeline { 6 } else { 0 }),
    ])
    .areas(area);
    draw_tenants(frame, app, &rows, table_area);
    if timeline {
        let selected = &rows[app.selected_row(&rows)];
        timeline::draw(frame, app, &selected.tenant, timeline_area);
    }
}

fn draw_tenants(frame: &mut Frame, app: &App, rows: &[super::metrics::TenantRow], area: Rect) {
    let fixed: u16 = Column::ALL[1..].iter().map(|c| c.width() as u16).sum();
    let gaps = Column::ALL.len() as u16; // between columns, and before the trend
    let marker = 2;
    let tenant_width = area
        .width
        .saturating_sub(fixed + gaps + TREND + marker)
        .max(6);
    let widths: Vec<Constraint> = Column::ALL
        .iter()
        .map(|c| match c {
            Column::Tenant => Constraint::Length(tenant_width),
            c => Constraint::Length(c.width() as u16),
        })
        .chain([Constraint::Length(TREND)])
        .collect();
    let header_style = |c: Column| {
        if c == app.sort {
            Style::new().bold().underlined().fg(Color::Yellow)
        } else {
            Style::new().bold()
        }
    };
    let header = Row::new(
        Column::ALL
            .iter()
            .map(|&c| Cell::from(align(c, c.title(), c.width())).style(header_style(c)))
            .chain([Cell::from("TREND").bold()]),
    );
    let body = rows.iter().map(|row| {
        let history: Vec<f64> = app.exit_history(&row.tenant);
        Row::new(
            Column::ALL
                .iter()
                .map(|&c| {
                    let text = match c {
                        Column::Tenant => truncate_left(&row.name, tenant_width as usize),
                        c => align(c, &c.cell(row), c.width()),
                    };
                    Cell::from(text)
                })
                .chain([Cell::from(format::sparkline(&history, TREND as usize))
                    .style(Style::new().fg(Color::Cyan))]),
        )
    });
    let empty = rows.is_empty();
    let table = Table::new(body, widths)
        .header(header)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol(format!("{SELECTED} "))
        .highlight_spacing(ratatui::widgets::HighlightSpacing::Always);
    let mut state = TableState::default().with_selected((!empty).then(|| app.selected_row(rows)));
    frame.render_stateful_widget(table, area, &mut state);
    if empty {
        let note = if app.sample.is_none() {
            "waiting for the first sample…"
        } else if !app.filter.is_empty() {
            "no tenant matches the filter"
        } else {
            "no KVM activity yet"
        };
        let line = Rect {
            y: area.y + 2,
            height: 1,
            ..area
        };
        if area.height > 2 {
            frame.render_widget(Paragraph::new(note).dim().centered(), line);
        }
    }
}

/// Right-aligns figures, left-aligns text.
fn align(column: Column, text: &str, width: usize) -> String {
    if column.is_text() {
        text.to_owned()
    } else {
        format!("{text:>width$}")
    }
}

fn draw_help(frame: &mut Frame, area: Rect) {
    let width = 60.min(area.width);
    let height = (HELP.len() as u16 + 5).min(area.height);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(keys, what)| {
            Line::from(vec![
                Span::raw(format!("{keys:>9}  ")).bold(),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    let columns: Vec<String> = Column::ALL
        .iter()
        .map(|c| format!("{} {}", c.key(), c.title()))
        .collect();
    lines.push(Line::raw(columns[..4].join("  ")).dim());
    lines.push(Line::raw(columns[4..].join("  ")).dim());
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" vmtrace top: keys ")),
        popup,
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;

    /// The screen as text, one line per row.
    pub(crate) fn render(app: &App, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, app)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol().to_owned())
                    .collect::<String>()
            })
            .collect()
    }

    #[test]
    fn the_table_fits_80x24_with_every_column() {
        let app = crate::cmd::top::keys::tests::app();
        let screen = render(&app, 80, 24);
        let text = screen.join("\n");
        for title in Column::ALL.iter().map(|c| c.title()).chain(["TREND"]) {
            assert!(text.contains(title), "{title} missing:\n{text}");
        }
        assert!(
            screen[0].starts_with("vmtrace top · test · PVM derived"),
            "{}",
            screen[0]
        );
        let b = screen
            .iter()
            .position(|l| l.contains("/x/tenant-b"))
            .unwrap();
        let a = screen
            .iter()
            .position(|l| l.contains("/x/tenant-a"))
            .unwrap();
        assert!(b < a, "sorted by exits/s, largest first:\n{text}");
        assert!(screen[b].contains("300") && screen[b].contains("hlt"));
        assert!(
            screen[b].contains(format::MISSING),
            "missing metrics show a dash"
        );
        assert!(
            text.contains("exits/s · "),
            "timeline of the selected tenant"
        );
        assert!(screen[23].starts_with("q quit"));
    }

    #[test]
    fn help_overlays_the_table() {
        let mut app = crate::cmd::top::keys::tests::app();
        app.help = true;
        let text = render(&app, 80, 24).join("\n");
        assert!(text.contains("vmtrace top: keys"));
        assert!(text.contains("drill down into the tenant"));
    }

    #[test]
    fn a_skipped_sample_keeps_the_last_one_on_screen_and_says_so() {
        let mut app = crate::cmd::top::keys::tests::app();
        let shown = app.sample.clone();
        app.skip(&anyhow::anyhow!("reading map `KICKS`: Bad file descriptor"));
        app.skip(&anyhow::anyhow!("cannot read memory.stat"));
        assert_eq!(app.sample, shown);
        let status = status_text(&app);
        assert!(
            status.contains("2 samples skipped (last: cannot read memory.stat)"),
            "{status}"
        );
        assert!(
            status.starts_with("vmtrace top · test · PVM derived"),
            "{status}"
        );
    }
}
