//! The selected tenant's exit-rate timeline, drawn under the tenants table and in the detail
//! screen.

use ratatui::{
    Frame,
    layout::Rect,
    style::{Color, Style},
    widgets::{Block, Borders, Sparkline},
};

use super::{
    format::{self, truncate_left},
    state::App,
};

/// The selected tenant's exits per second over the kept history.
pub fn draw(frame: &mut Frame, app: &App, tenant: &str, area: Rect) {
    let values: Vec<f64> = app.exit_history(tenant);
    let inner = area.width.saturating_sub(2) as usize;
    let shown = &values[values.len().saturating_sub(inner)..];
    let max = shown.iter().copied().fold(0.0, f64::max);
    let now = shown.last().copied().unwrap_or(0.0);
    let title = format!(
        " exits/s · {} · now {} · max {} ",
        truncate_left(tenant, inner.saturating_sub(30).max(8)),
        format::rate(now),
        format::rate(max)
    );
    let data: Vec<u64> = shown.iter().map(|v| v.max(0.0).round() as u64).collect();
    let sparkline = Sparkline::default()
        .block(Block::new().borders(Borders::TOP).title(title))
        .data(data)
        .style(Style::new().fg(Color::Cyan));
    frame.render_widget(sparkline, area);
}
