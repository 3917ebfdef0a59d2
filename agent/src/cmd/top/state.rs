//! What `top` knows and shows: the latest sample, each tenant's recent exit rates (for the
//! sparklines), and the view settings (sort, filter, selection, drill-down, pause, help). Free of
//! terminal code, so key handling and ordering are unit-tested.

use std::collections::VecDeque;

use super::{
    columns::{Column, sort_rows},
    metrics::{TenantRow, exits_at, tenant_row},
};
use crate::{sample::sampler::Sample, sample::timeline::Timeline, tenant::aggregate::TenantCounts};

/// Samples of history kept per tenant: two minutes at the default interval, wider than any
/// sparkline drawn.
pub const HISTORY: usize = 240;

/// Samples that arrive while paused and wait to be shown; older ones are dropped.
const BACKLOG: usize = 1000;

#[derive(Debug, Clone, PartialEq)]
pub enum Screen {
    /// All tenants.
    Table,
    /// One tenant in detail.
    Detail(String),
}

/// The state of a `top` session.
pub struct App {
    /// The sample on screen.
    pub sample: Option<Sample>,
    /// The one before it, for the per-vCPU rates.
    pub previous: Option<Sample>,
    /// Every tenant's recent samples, for the trends.
    pub timeline: Timeline,
    /// Samples shown so far.
    pub samples: u64,
    /// Live samples that failed and were skipped, and the last one's error.
    pub skipped: u64,
    pub last_skip: Option<String>,
    pub sort: Column,
    pub descending: bool,
    /// Case-insensitive substring of tenant names to show; empty shows all.
    pub filter: String,
    /// Typing into the filter (after `/`).
    pub editing_filter: bool,
    pub screen: Screen,
    /// The highlighted row of the table (see [`App::selected_row`]).
    pub selected: usize,
    /// The highlighted tenant, followed when the order changes between samples.
    selected_tenant: Option<String>,
    /// Which latency kind's histogram the detail screen shows (index among the tenant's kinds).
    pub histogram_kind: usize,
    /// The detail screen shows each vCPU thread's exits instead of the tenant's kinds (`v`).
    pub vcpus: bool,
    pub help: bool,
    pub paused: bool,
    backlog: VecDeque<Sample>,
    /// Where samples come from, for the title.
    pub source: String,
    /// The source has no more samples (end of a recording).
    pub ended: bool,
    /// Clear and redraw the whole screen (Ctrl-L, after something else wrote to the terminal).
    pub redraw: bool,
    pub quit: bool,
}

impl App {
    pub fn new(source: String, sort: Column, filter: String) -> Self {
        Self {
            sample: None,
            previous: None,
            timeline: Timeline::with_capacity(HISTORY),
            samples: 0,
            skipped: 0,
            last_skip: None,
            sort,
            descending: sort.descending_by_default(),
            filter,
            editing_filter: false,
            screen: Screen::Table,
            selected: 0,
            selected_tenant: None,
            histogram_kind: 0,
            vcpus: false,
            help: false,
            paused: false,
            backlog: VecDeque::new(),
            source,
            ended: false,
            redraw: false,
            quit: false,
        }
    }

    /// Takes a new sample: shown now, or kept for later while paused.
    pub fn push(&mut self, sample: Sample) {
        if self.paused {
            if self.backlog.len() == BACKLOG {
                self.backlog.pop_front();
            }
            self.backlog.push_back(sample);
        } else {
            self.apply(sample);
        }
    }

    /// Counts a failed live sample; the one on screen stays.
    pub fn skip(&mut self, error: &anyhow::Error) {
        self.skipped += 1;
        self.last_skip = Some(format!("{error:#}"));
    }

    fn apply(&mut self, sample: Sample) {
        // Tenants that are gone (their cgroups removed) leave the timeline once flat.
        self.timeline.push(&sample);
        self.previous = self.sample.replace(sample);
        self.samples += 1;
    }

    /// A tenant's exits per second over the kept samples, oldest first.
    pub fn exit_history(&self, tenant: &str) -> Vec<f64> {
        self.timeline.values(tenant, exits_at)
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            while let Some(sample) = self.backlog.pop_front() {
                self.apply(sample);
            }
        }
    }

    /// The rows to show: filtered, sorted.
    pub fn rows(&self) -> Vec<TenantRow> {
        let Some(sample) = &self.sample else {
            return Vec::new();
        };
        let filter = self.filter.to_lowercase();
        let mut rows: Vec<TenantRow> = sample
            .tenants
            .iter()
            .filter(|t| {
                t.tenant.to_lowercase().contains(&filter)
                    || t.display_name().to_lowercase().contains(&filter)
            })
            .map(tenant_row)
            .collect();
        sort_rows(&mut rows, self.sort, self.descending);
        rows
    }

    /// The tenant the detail screen shows, from the sample on screen.
    pub fn detail_tenant(&self) -> Option<&TenantCounts> {
        let Screen::Detail(name) = &self.screen else {
            return None;
        };
        self.sample
            .as_ref()?
            .tenants
            .iter()
            .find(|t| &t.tenant == name)
    }

    /// Sorts by `column`; choosing the current column again reverses the order.
    pub fn sort_by(&mut self, column: Column) {
        if column == self.sort {
            self.descending = !self.descending;
        } else {
            self.sort = column;
            self.descending = column.descending_by_default();
        }
    }

    /// The index of the highlighted row in `rows`: the highlighted tenant's row while it is shown,
    /// else the last highlighted position.
    pub fn selected_row(&self, rows: &[TenantRow]) -> usize {
        self.selected_tenant
            .as_ref()
            .and_then(|name| rows.iter().position(|r| &r.tenant == name))
            .unwrap_or(self.selected)
            .min(rows.len().saturating_sub(1))
    }

    /// Moves the highlight by `delta` rows.
    pub fn select(&mut self, delta: isize) {
        let rows = self.rows();
        self.select_row(&rows, self.selected_row(&rows).saturating_add_signed(delta));
    }

    /// Highlights row `index` (clamped).
    pub fn select_row(&mut self, rows: &[TenantRow], index: usize) {
        self.selected = index.min(rows.len().saturating_sub(1));
        self.selected_tenant = rows.get(self.selected).map(|r| r.tenant.clone());
    }

    /// Opens the selected tenant's detail screen.
    pub fn open_detail(&mut self) {
        let rows = self.rows();
        if let Some(row) = rows.get(self.selected_row(&rows)) {
            self.screen = Screen::Detail(row.tenant.clone());
            self.histogram_kind = 0;
        }
    }

    pub fn close_detail(&mut self) {
        self.screen = Screen::Table;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::top::keys::tests::app;

    #[test]
    fn vanished_tenants_leave_the_history_once_flat() {
        let mut app = app();
        let mut sample = app.sample.clone().unwrap();
        sample.tenants.retain(|t| t.tenant != "/x/tenant-a");
        app.push(sample.clone());
        assert_eq!(app.exit_history("/x/tenant-a"), [100.0, 0.0]);
        for _ in 0..HISTORY {
            app.push(sample.clone());
        }
        assert!(app.exit_history("/x/tenant-a").is_empty());
        assert_eq!(app.exit_history("/x/tenant-b").len(), HISTORY);
        assert_eq!(app.rows().len(), 2);
    }
}
