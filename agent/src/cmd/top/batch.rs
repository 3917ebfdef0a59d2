//! Batch mode (`vmtrace top -b`, as `top -b`): each sample as a plain-text frame on stdout, for pipes,
//! logs and terminals without a TTY. Same columns and sort as the interactive view, names in full.

use super::{columns::Column, format, state::App, view::status_text};

/// Sparkline width in batch frames.
const TREND: usize = 12;

/// One frame: the status line, the header and a row per tenant, then a blank line.
pub fn frame(app: &App) -> String {
    let rows = app.rows();
    let tenant_width = rows
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(Column::Tenant.title().len());
    let width = |c: Column| match c {
        Column::Tenant => tenant_width,
        // Long reason names (VMX's EXTERNAL_INTERRUPT) get their full width in batch mode.
        Column::Reason => rows
            .iter()
            .map(|r| Column::Reason.cell(r).chars().count())
            .max()
            .unwrap_or(0)
            .max(c.width()),
        c => c.width(),
    };
    let cell = |c: Column, text: &str| {
        let w = width(c);
        if c.is_text() {
            format!("{text:<w$}")
        } else {
            format!("{text:>w$}")
        }
    };
    let mut out = status_text(app);
    out.push('\n');
    let header: Vec<String> = Column::ALL.iter().map(|&c| cell(c, c.title())).collect();
    out.push_str(&format!("{} TREND\n", header.join(" ")));
    if rows.is_empty() {
        out.push_str(if app.filter.is_empty() {
            "(no KVM activity yet)\n"
        } else {
            "(no tenant matches the filter)\n"
        });
    }
    for row in &rows {
        let cells: Vec<String> = Column::ALL.iter().map(|&c| cell(c, &c.cell(row))).collect();
        let history: Vec<f64> = app.exit_history(&row.tenant);
        let line = format!("{} {}", cells.join(" "), format::sparkline(&history, TREND));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if let Some(sample) = &app.sample {
        let dropped: u64 = sample.drops.values().sum();
        if dropped > 0 {
            out.push_str(&format!("events lost: {dropped}\n"));
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::top::keys::tests::app;

    #[test]
    fn frames_are_plain_aligned_text() {
        let app = app();
        let text = frame(&app);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("vmtrace top · test · PVM derived · 1s · 3/3 tenants"));
        assert_eq!(
            lines[1],
            "TENANT      EXITS/s TOP REASON    P99 KICKS/s  TLB/s  FLT/s   TAX TREND"
        );
        assert!(
            lines[2]
                .starts_with("/x/tenant-b     300 hlt             –       0      –      –     – ")
        );
        assert!(lines[3].starts_with("/y/other        200 cpuid"));
        assert!(lines[3].contains("   9.00 "), "{}", lines[3]);
        assert!(text.ends_with("\n\n"));
        assert!(!text.contains('\x1b'), "no escape sequences in batch mode");
    }
}
