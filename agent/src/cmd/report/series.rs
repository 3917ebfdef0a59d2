//! The numbers a report draws, taken out of a recording: per tenant, rates over time by kind and
//! the latency histograms at the end. Pure data, so what the charts show is unit-tested apart from
//! how they are drawn.

use std::collections::BTreeMap;

use crate::{
    cmd::top::metrics::{has_hardware_exits, tenant_row},
    kind::{Kind, TopColumn},
    probe::exit_counts::KindCounts,
    probe::latency::LatencySummary,
    sample::sampler::Sample,
};

/// At most this many exit kinds get their own line in a tenant's timeline; the rest are summed.
pub const MAX_KINDS: usize = 8;
/// At most this many latency kinds are drawn side by side in a tenant's histogram.
pub const MAX_LATENCY_KINDS: usize = 4;

/// One line of a chart: (seconds since the recording started, value) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One latency kind's histogram: log2 buckets as (lowest ns, count).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub kind: Kind,
    pub summary: LatencySummary,
}

/// Everything drawn for one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantSeries {
    pub tenant: String,
    /// Exits per second, all reasons (the figure `top` shows).
    pub exits: Series,
    /// Exits per second by reason, busiest first; then kicks/s, TLB flushes/s, faults/s where the
    /// recording has them.
    pub timeline: Vec<Series>,
    pub histograms: Vec<Histogram>,
    /// Totals at the last sample, by kind.
    pub totals: KindCounts,
}

/// A value of every sample for one tenant: 0 where the tenant is absent from a sample.
fn track(
    samples: &[Sample],
    tenant: &str,
    value: impl Fn(&crate::tenant::aggregate::TenantCounts) -> f64,
) -> Vec<(f64, f64)> {
    samples
        .iter()
        .map(|s| {
            let v = s
                .tenants
                .iter()
                .find(|t| t.tenant == tenant)
                .map_or(0.0, &value);
            (s.elapsed_secs, v)
        })
        .collect()
}

fn sum_rates(t: &crate::tenant::aggregate::TenantCounts, column: TopColumn) -> f64 {
    t.rates
        .iter()
        .filter(|(k, _)| k.top_column() == column)
        .map(|(_, r)| r)
        .sum()
}

/// The series of every tenant seen in `samples`, in order of their total exits, busiest first.
pub fn tenant_series(samples: &[Sample]) -> Vec<TenantSeries> {
    // Latest state of each tenant: counts are totals since start, so the last sample holding a
    // tenant holds its totals and histograms.
    let mut last: BTreeMap<&str, &crate::tenant::aggregate::TenantCounts> = BTreeMap::new();
    for sample in samples {
        for t in &sample.tenants {
            last.insert(&t.tenant, t);
        }
    }
    let mut out: Vec<TenantSeries> = last
        .into_iter()
        .map(|(name, t)| {
            let hardware = has_hardware_exits(t.counts.keys());
            let mut kinds: Vec<(&Kind, u64)> = t
                .counts
                .iter()
                .filter(|(k, _)| k.counts_as_exit(hardware))
                .map(|(k, c)| (k, *c))
                .collect();
            kinds.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let (shown, rest) = kinds.split_at(kinds.len().min(MAX_KINDS));
            let mut timeline: Vec<Series> = shown
                .iter()
                .map(|(kind, _)| Series {
                    name: format!("exit {}", kind.reason_name()),
                    points: track(samples, name, |t| {
                        t.rates.get(*kind).copied().unwrap_or(0.0)
                    }),
                })
                .collect();
            if !rest.is_empty() {
                let rest: Vec<&Kind> = rest.iter().map(|(k, _)| *k).collect();
                timeline.push(Series {
                    name: format!("exit: {} other reasons", rest.len()),
                    points: track(samples, name, |t| {
                        rest.iter().filter_map(|k| t.rates.get(*k)).sum()
                    }),
                });
            }
            for (column, label) in [
                (TopColumn::Kicks, "virtio kicks"),
                (TopColumn::Tlb, "TLB flushes"),
                (TopColumn::Faults, "faults"),
            ] {
                if t.counts.keys().any(|k| k.top_column() == column) {
                    timeline.push(Series {
                        name: label.to_owned(),
                        points: track(samples, name, |t| sum_rates(t, column)),
                    });
                }
            }
            let mut histograms: Vec<Histogram> = t
                .latency
                .iter()
                .filter(|(_, l)| l.count > 0)
                .map(|(k, l)| Histogram {
                    kind: k.clone(),
                    summary: l.clone(),
                })
                .collect();
            histograms.sort_by(|a, b| {
                b.summary
                    .count
                    .cmp(&a.summary.count)
                    .then(a.kind.cmp(&b.kind))
            });
            histograms.truncate(MAX_LATENCY_KINDS);
            TenantSeries {
                tenant: name.to_owned(),
                exits: Series {
                    name: name.to_owned(),
                    points: track(samples, name, |t| tenant_row(t).exits),
                },
                timeline,
                histograms,
                totals: t.counts.clone(),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        let total = |s: &TenantSeries| s.exits.points.iter().map(|p| p.1).sum::<f64>();
        total(b).total_cmp(&total(a)).then(a.tenant.cmp(&b.tenant))
    });
    out
}

/// A file-name-safe form of a tenant label: `/vmtrace-demo/tenant-a` → `vmtrace-demo-tenant-a`.
pub fn slug(tenant: &str) -> String {
    let mut out = String::new();
    for c in tenant.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-');
    let out: String = out.chars().take(60).collect();
    if out.is_empty() {
        "tenant".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cmd::top::metrics::tests::tenant, host::KvmFlavour, probe::load::ExitSource};

    fn sample(elapsed: f64, tenants: Vec<crate::tenant::aggregate::TenantCounts>) -> Sample {
        Sample {
            timestamp: 0.0,
            elapsed_secs: elapsed,
            interval_secs: 1.0,
            kvm: KvmFlavour::Pvm,
            exit_source: ExitSource::Derived,
            tenants,
            dtlb_unavailable: None,
            guest_time_unavailable: None,
            figures_unavailable: Vec::new(),
            iommu_faults: Vec::new(),
            drops: BTreeMap::default(),
            probes_not_attached: Vec::new(),
            probes_attached: Vec::new(),
            maps: Vec::new(),
            state: crate::sample::sampler::StateSizes::default(),
            last: false,
        }
    }

    #[test]
    fn each_tenant_gets_its_exit_kinds_kicks_and_histograms_over_time() {
        let samples = vec![
            sample(1.0, vec![tenant("/a", &[("exit.io", 10, 10.0)], &[])]),
            sample(
                2.0,
                vec![
                    tenant(
                        "/a",
                        &[("exit.io", 30, 20.0), ("pio.out", 30, 20.0)],
                        &[("exit.io", 4_000)],
                    ),
                    tenant(
                        "/b",
                        &[
                            ("mmio.write.kernel", 500, 500.0),
                            ("kick.q0", 250, 250.0),
                            ("kick.q1", 250, 250.0),
                        ],
                        &[],
                    ),
                ],
            ),
        ];
        let series = tenant_series(&samples);
        assert_eq!(series[0].tenant, "/b", "busiest first");
        assert_eq!(series[0].exits.points, vec![(1.0, 0.0), (2.0, 500.0)]);
        let names: Vec<&str> = series[0].timeline.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["exit mmio.kern", "virtio kicks"]);
        assert_eq!(series[0].timeline[1].points[1], (2.0, 500.0));
        let a = &series[1];
        assert_eq!(a.timeline[0].name, "exit io");
        assert_eq!(a.timeline[0].points, vec![(1.0, 10.0), (2.0, 20.0)]);
        let io: Kind = "exit.io".parse().unwrap();
        assert_eq!(a.histograms[0].kind, io);
        assert_eq!(a.totals[&io], 30);
    }

    #[test]
    fn many_reasons_are_folded_into_other() {
        let kinds: Vec<(String, u64, f64)> = (0..12)
            .map(|i| (format!("kvm_exit.R{i:02}"), 100 - i, 1.0))
            .collect();
        let kinds: Vec<(&str, u64, f64)> =
            kinds.iter().map(|(k, c, r)| (k.as_str(), *c, *r)).collect();
        let series = tenant_series(&[sample(1.0, vec![tenant("vm/x", &kinds, &[])])]);
        let timeline = &series[0].timeline;
        assert_eq!(timeline.len(), MAX_KINDS + 1);
        assert_eq!(timeline[MAX_KINDS].name, "exit: 4 other reasons");
        assert_eq!(timeline[MAX_KINDS].points[0].1, 4.0);
    }

    #[test]
    fn slugs_are_file_names() {
        assert_eq!(slug("/vmtrace-demo/tenant-a"), "vmtrace-demo-tenant-a");
        assert_eq!(slug("pod/1234-ABCD"), "pod-1234-abcd");
        assert_eq!(slug("///"), "tenant");
    }
}
