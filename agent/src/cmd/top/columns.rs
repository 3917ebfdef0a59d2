//! The tenants table's columns: titles, widths, cell text and sort order, shared by the terminal
//! view and batch mode so both sort and print alike.

use std::cmp::Ordering;

use clap::ValueEnum;

use super::{
    format::{self, MISSING},
    metrics::TenantRow,
};

/// A column of the tenants table; every one can be sorted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Column {
    /// Tenant label (pod, VM, unit or cgroup path).
    Tenant,
    /// Exits per second.
    Exits,
    /// The exit reason with the highest rate.
    Reason,
    /// p99 latency of the top reason (VMM service time, or exit to entry on VMX/SVM).
    P99,
    /// Virtio kicks per second.
    Kicks,
    /// TLB flushes per second.
    Tlb,
    /// Faults per second.
    Faults,
    /// Virtualisation tax: CPUs the tenant uses outside guest mode.
    Tax,
}

impl Column {
    pub const ALL: [Column; 8] = [
        Column::Tenant,
        Column::Exits,
        Column::Reason,
        Column::P99,
        Column::Kicks,
        Column::Tlb,
        Column::Faults,
        Column::Tax,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Self::Tenant => "TENANT",
            Self::Exits => "EXITS/s",
            Self::Reason => "TOP REASON",
            Self::P99 => "P99",
            Self::Kicks => "KICKS/s",
            Self::Tlb => "TLB/s",
            Self::Faults => "FLT/s",
            Self::Tax => "TAX",
        }
    }

    /// Width of the column's cells (the tenant column takes what is left).
    pub fn width(self) -> usize {
        match self {
            Self::Tenant => 6,
            Self::Exits | Self::Kicks => 7,
            Self::Reason => 10,
            Self::P99 => 6,
            Self::Tlb | Self::Faults => 6,
            Self::Tax => 5,
        }
    }

    /// The digit key that sorts by this column: `1` for the first.
    pub fn key(self) -> char {
        let i = Self::ALL.iter().position(|c| *c == self).unwrap_or(0);
        char::from(b'1' + i as u8)
    }

    pub fn from_key(key: char) -> Option<Self> {
        let i = key.to_digit(10)?.checked_sub(1)? as usize;
        Self::ALL.get(i).copied()
    }

    pub fn next(self) -> Self {
        let i = Self::ALL.iter().position(|c| *c == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }

    pub fn previous(self) -> Self {
        let i = Self::ALL.iter().position(|c| *c == self).unwrap_or(0);
        Self::ALL[(i + Self::ALL.len() - 1) % Self::ALL.len()]
    }

    /// Text columns sort A→Z first, figures largest first.
    pub fn descending_by_default(self) -> bool {
        !matches!(self, Self::Tenant | Self::Reason)
    }

    /// Whether the column holds text (left-aligned) rather than a figure (right-aligned).
    pub fn is_text(self) -> bool {
        matches!(self, Self::Tenant | Self::Reason)
    }

    pub fn cell(self, row: &TenantRow) -> String {
        let opt_rate = |v: Option<f64>| v.map_or_else(|| MISSING.to_owned(), format::rate);
        match self {
            Self::Tenant => row.name.clone(),
            Self::Exits => format::rate(row.exits),
            Self::Reason => row.top_reason.clone().unwrap_or_else(|| MISSING.to_owned()),
            Self::P99 => row
                .p99_ns
                .map_or_else(|| MISSING.to_owned(), format::latency_ns),
            Self::Kicks => format::rate(row.kicks),
            Self::Tlb => opt_rate(row.tlb),
            Self::Faults => opt_rate(row.faults),
            Self::Tax => row.tax.map_or_else(|| MISSING.to_owned(), format::cpus),
        }
    }

    /// Ascending order of two rows by this column; `None` (missing) is less than any value.
    fn compare(self, a: &TenantRow, b: &TenantRow) -> Ordering {
        let f = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (x, y) => x.is_some().cmp(&y.is_some()),
        };
        match self {
            Self::Tenant => a.name.cmp(&b.name),
            Self::Exits => a.exits.total_cmp(&b.exits),
            Self::Reason => match (&a.top_reason, &b.top_reason) {
                (Some(x), Some(y)) => x.cmp(y),
                // Missing reasons go last when sorting A→Z.
                (x, y) => y.is_some().cmp(&x.is_some()),
            },
            Self::P99 => a.p99_ns.cmp(&b.p99_ns),
            Self::Kicks => a.kicks.total_cmp(&b.kicks),
            Self::Tlb => f(a.tlb, b.tlb),
            Self::Faults => f(a.faults, b.faults),
            Self::Tax => f(a.tax, b.tax),
        }
    }
}

/// Sorts rows by `column`, ties by tenant name so that the order is stable between refreshes.
pub fn sort_rows(rows: &mut [TenantRow], column: Column, descending: bool) {
    rows.sort_by(|a, b| {
        let order = column.compare(a, b);
        let order = if descending { order.reverse() } else { order };
        order.then_with(|| a.tenant.cmp(&b.tenant))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::top::metrics::{tenant_row, tests::tenant};

    fn rows() -> Vec<TenantRow> {
        vec![
            tenant_row(&tenant(
                "a",
                &[("exit.io", 10, 100.0)],
                &[("exit.io", 5_000)],
            )),
            tenant_row(&tenant(
                "b",
                &[("exit.hlt", 10, 300.0), ("kick.q0", 5, 50.0)],
                &[],
            )),
            tenant_row(&tenant(
                "c",
                &[("cpuid", 10, 200.0), ("tlb.flush", 1, 1.0)],
                &[],
            )),
        ]
    }

    fn order(rows: &[TenantRow]) -> Vec<&str> {
        rows.iter().map(|r| r.tenant.as_str()).collect()
    }

    #[test]
    fn every_column_sorts_with_missing_values_last() {
        let mut r = rows();
        sort_rows(&mut r, Column::Exits, true);
        assert_eq!(order(&r), ["b", "c", "a"]);
        sort_rows(&mut r, Column::Exits, false);
        assert_eq!(order(&r), ["a", "c", "b"]);
        sort_rows(&mut r, Column::Kicks, true);
        assert_eq!(order(&r), ["b", "a", "c"]);
        sort_rows(&mut r, Column::P99, true);
        assert_eq!(order(&r), ["a", "b", "c"]);
        sort_rows(&mut r, Column::Reason, false);
        assert_eq!(order(&r), ["c", "b", "a"]); // cpuid, hlt, io
        sort_rows(&mut r, Column::Tlb, true);
        assert_eq!(order(&r)[0], "c");
        sort_rows(&mut r, Column::Tenant, false);
        assert_eq!(order(&r), ["a", "b", "c"]);
    }

    #[test]
    fn keys_and_cycling_cover_every_column() {
        for (i, column) in Column::ALL.iter().enumerate() {
            assert_eq!(Column::from_key(column.key()), Some(*column));
            assert_eq!(column.key(), char::from(b'1' + i as u8));
            assert_eq!(column.next().previous(), *column);
        }
        assert_eq!(Column::from_key('0'), None);
        assert_eq!(Column::from_key('9'), None);
        assert_eq!(Column::Tax.next(), Column::Tenant);
    }

    #[test]
    fn cells_show_a_dash_for_metrics_that_do_not_exist() {
        let r = rows();
        assert_eq!(Column::Tlb.cell(&r[0]), MISSING);
        assert_eq!(Column::Tlb.cell(&r[2]), "1.00");
        assert_eq!(Column::P99.cell(&r[0]), "5.00µs");
        assert_eq!(Column::Reason.cell(&r[1]), "hlt");
        assert_eq!(Column::Tax.cell(&r[1]), MISSING);
        for c in Column::ALL {
            assert!(c.title().chars().count() <= c.width().max(10));
        }
    }
}
