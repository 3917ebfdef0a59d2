//! Keys of `top`. One table of bindings, shown by the help overlay, so that help and behaviour do
//! not drift apart.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::{
    columns::Column,
    state::{App, Screen},
};

/// The bindings as the help overlay lists them.
pub const HELP: &[(&str, &str)] = &[
    ("1-8", "sort by column 1-8 (again: reverse)"),
    ("< >", "sort by the previous / next column"),
    ("r", "reverse the sort order"),
    ("↑ ↓ j k", "select a tenant"),
    ("Enter →", "drill down into the tenant"),
    ("Esc ← ⌫", "back to all tenants"),
    ("Tab", "next latency histogram (drill-down)"),
    ("v", "each vCPU thread's exits by reason (drill-down)"),
    ("/", "new name filter (Enter keeps, Esc clears)"),
    ("p Space", "pause / resume"),
    ("?", "this help (any key closes)"),
    ("Ctrl-L", "redraw the screen"),
    ("q Ctrl-C", "quit"),
];

/// Applies one key press to the state.
pub fn handle_key(app: &mut App, key: KeyEvent) {
    if key.kind == KeyEventKind::Release {
        return;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) {
        match key.code {
            KeyCode::Char('c') => app.quit = true,
            KeyCode::Char('l') => app.redraw = true,
            _ => {}
        }
        return;
    }
    if app.editing_filter {
        edit_filter(app, key.code);
        return;
    }
    if app.help {
        // Any key closes the help; `q` still quits.
        app.help = false;
        if key.code == KeyCode::Char('q') {
            app.quit = true;
        }
        return;
    }
    match key.code {
        KeyCode::Char('q') => app.quit = true,
        KeyCode::Char('?') | KeyCode::F(1) => app.help = true,
        KeyCode::Char('/') => {
            // A new filter, as in less and top.
            app.filter.clear();
            app.editing_filter = true;
        }
        KeyCode::Char('p' | ' ') => app.set_paused(!app.paused),
        KeyCode::Char('r') => app.descending = !app.descending,
        KeyCode::Char('>' | '.') => app.sort_by(app.sort.next()),
        KeyCode::Char('<' | ',') => app.sort_by(app.sort.previous()),
        KeyCode::Char(c @ '1'..='9') => {
            if let Some(column) = Column::from_key(c) {
                app.sort_by(column);
            }
        }
        KeyCode::Up | KeyCode::Char('k') => app.select(-1),
        KeyCode::Down | KeyCode::Char('j') => app.select(1),
        KeyCode::PageUp => app.select(-10),
        KeyCode::PageDown => app.select(10),
        KeyCode::Home | KeyCode::Char('g') => app.select(isize::MIN),
        KeyCode::End | KeyCode::Char('G') => app.select(isize::MAX),
        KeyCode::Enter | KeyCode::Right | KeyCode::Char('l') => app.open_detail(),
        KeyCode::Esc | KeyCode::Left | KeyCode::Backspace | KeyCode::Char('h') => {
            if app.screen == Screen::Table && key.code == KeyCode::Esc {
                app.filter.clear();
            }
            app.close_detail();
        }
        KeyCode::Char('v') if matches!(app.screen, Screen::Detail(_)) => app.vcpus = !app.vcpus,
        KeyCode::Tab => app.histogram_kind = app.histogram_kind.wrapping_add(1),
        KeyCode::BackTab => app.histogram_kind = app.histogram_kind.wrapping_sub(1),
        _ => {}
    }
}

fn edit_filter(app: &mut App, code: KeyCode) {
    match code {
        KeyCode::Enter => app.editing_filter = false,
        KeyCode::Esc => {
            app.filter.clear();
            app.editing_filter = false;
        }
        KeyCode::Backspace => {
            app.filter.pop();
        }
        KeyCode::Char(c) => app.filter.push(c),
        _ => {}
    }
    // The highlight goes to the first tenant that matches.
    let rows = app.rows();
    app.select_row(&rows, 0);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        cmd::top::metrics::tests::tenant, host::KvmFlavour, probe::load::ExitSource,
        sample::sampler::Sample,
    };

    fn press(app: &mut App, keys: &str) {
        for c in keys.chars() {
            let code = match c {
                '\n' => KeyCode::Enter,
                '\x1b' => KeyCode::Esc,
                '\t' => KeyCode::Tab,
                c => KeyCode::Char(c),
            };
            handle_key(app, KeyEvent::new(code, KeyModifiers::NONE));
        }
    }

    pub(crate) fn app() -> App {
        let mut app = App::new("test".to_owned(), Column::Exits, String::new());
        app.push(Sample {
            timestamp: 0.0,
            elapsed_secs: 1.0,
            interval_secs: 1.0,
            kvm: KvmFlavour::Pvm,
            exit_source: ExitSource::Derived,
            tenants: vec![
                tenant("/x/tenant-a", &[("exit.io", 10, 100.0)], &[]),
                tenant("/x/tenant-b", &[("exit.hlt", 30, 300.0)], &[]),
                tenant(
                    "/y/other",
                    &[("cpuid", 20, 200.0), ("kick.q0", 9, 9.0)],
                    &[],
                ),
            ],
            dtlb_unavailable: None,
            guest_time_unavailable: None,
            figures_unavailable: Vec::new(),
            iommu_faults: Vec::new(),
            drops: std::collections::BTreeMap::default(),
            probes_not_attached: Vec::new(),
            probes_attached: Vec::new(),
            maps: Vec::new(),
            state: crate::sample::sampler::StateSizes::default(),
            last: false,
        });
        app
    }

    fn names(app: &App) -> Vec<String> {
        app.rows().into_iter().map(|r| r.tenant).collect()
    }

    #[test]
    fn digits_sort_and_repeat_reverses() {
        let mut app = app();
        assert_eq!(names(&app), ["/x/tenant-b", "/y/other", "/x/tenant-a"]);
        press(&mut app, "1");
        assert_eq!(names(&app), ["/x/tenant-a", "/x/tenant-b", "/y/other"]);
        press(&mut app, "1");
        assert_eq!(names(&app), ["/y/other", "/x/tenant-b", "/x/tenant-a"]);
        press(&mut app, "5");
        assert_eq!(names(&app)[0], "/y/other");
        press(&mut app, "r");
        assert_eq!(names(&app)[2], "/y/other");
        press(&mut app, ">");
        assert_eq!(app.sort, Column::Tlb);
    }

    #[test]
    fn the_highlight_follows_its_tenant_when_the_order_changes() {
        let mut app = app();
        press(&mut app, "G");
        assert_eq!(
            app.rows()[app.selected_row(&app.rows())].tenant,
            "/x/tenant-a"
        );
        let mut sample = app.sample.clone().unwrap();
        sample.tenants[0]
            .rates
            .insert("exit.io".parse().unwrap(), 1000.0);
        app.push(sample);
        let rows = app.rows();
        assert_eq!(rows[0].tenant, "/x/tenant-a");
        assert_eq!(app.selected_row(&rows), 0);
        press(&mut app, "j\n");
        assert_eq!(app.screen, Screen::Detail("/x/tenant-b".to_owned()));
    }

    #[test]
    fn filter_edits_and_clears() {
        let mut app = app();
        press(&mut app, "/TENANT");
        assert!(app.editing_filter);
        // While typing, `q` is a letter, not quit.
        press(&mut app, "q");
        assert!(!app.quit);
        assert!(names(&app).is_empty());
        handle_key(
            &mut app,
            KeyEvent::new(KeyCode::Backspace, KeyModifiers::NONE),
        );
        press(&mut app, "\n");
        assert!(!app.editing_filter);
        assert_eq!(names(&app).len(), 2);
        press(&mut app, "\x1b");
        assert_eq!(names(&app).len(), 3);
    }

    #[test]
    fn drill_down_pause_help_and_quit() {
        let mut app = app();
        press(&mut app, "j\n");
        assert_eq!(app.screen, Screen::Detail("/y/other".to_owned()));
        assert_eq!(app.detail_tenant().unwrap().tenant, "/y/other");
        press(&mut app, "\x1b");
        assert_eq!(app.screen, Screen::Table);
        press(&mut app, "p");
        assert!(app.paused);
        let before = app.samples;
        let sample = app.sample.clone().unwrap();
        app.push(sample);
        assert_eq!(app.samples, before, "paused: not shown yet");
        press(&mut app, " ");
        assert_eq!(app.samples, before + 1, "resumed: the backlog is shown");
        assert_eq!(app.exit_history("/y/other").len(), 2);
        press(&mut app, "?");
        assert!(app.help);
        press(&mut app, "x");
        assert!(!app.help && !app.quit);
        press(&mut app, "q");
        assert!(app.quit);
        let mut app2 = self::app();
        handle_key(
            &mut app2,
            KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
        );
        assert!(app2.quit);
    }
}
