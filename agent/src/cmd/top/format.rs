//! Numbers as `top` shows them: short enough for an 80-column table, with units where they are
//! not per second. Pure functions, shared by the terminal view and batch mode.

/// Shown where a metric does not exist for a tenant (no such probe on this host, or not yet).
pub const MISSING: &str = "–";

/// A rate in at most six characters: `0`, `12.3`, `987`, `1.2k`, `45.6k`, `1.23M`.
pub fn rate(value: f64) -> String {
    if !value.is_finite() || value < 0.0 {
        return MISSING.to_owned();
    }
    if value == 0.0 {
        return "0".to_owned();
    }
    scaled(value)
}

/// A count with a k/M/G suffix past four digits.
pub fn count(value: u64) -> String {
    if value < 10_000 {
        value.to_string()
    } else {
        scaled(value as f64)
    }
}

fn scaled(value: f64) -> String {
    const SUFFIXES: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, suffix) in SUFFIXES {
        if value >= scale * 0.9995 {
            return format!("{}{suffix}", three_digits(value / scale));
        }
    }
    three_digits(value)
}

/// Three significant digits: 1.23, 12.3, 123.
fn three_digits(value: f64) -> String {
    if value >= 99.95 {
        format!("{value:.0}")
    } else if value >= 9.995 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// A latency with its unit: `850ns`, `12.3µs`, `1.23ms`, `2.00s`.
pub fn latency_ns(ns: u64) -> String {
    let ns_f = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 999_500 {
        format!("{}µs", three_digits(ns_f / 1e3))
    } else if ns < 999_500_000 {
        format!("{}ms", three_digits(ns_f / 1e6))
    } else {
        format!("{}s", three_digits(ns_f / 1e9))
    }
}

/// CPUs, as `watch` gives the tax: `0.003`, `0.25`, `1.50`, `12.0`.
pub fn cpus(cpus: f64) -> String {
    if !cpus.is_finite() || cpus < 0.0 {
        MISSING.to_owned()
    } else if cpus < 0.01 {
        format!("{cpus:.3}")
    } else if cpus < 9.995 {
        format!("{cpus:.2}")
    } else {
        format!("{cpus:.1}")
    }
}

/// A fraction as a percentage: `0.5%`, `12%`, `100%`.
pub fn percent(fraction: f64) -> String {
    if !fraction.is_finite() || fraction < 0.0 {
        return MISSING.to_owned();
    }
    let p = fraction * 100.0;
    if p < 9.95 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

/// `s` cut to `width` characters, keeping the end (where tenant paths differ) behind a `…`.
pub fn truncate_left(s: &str, width: usize) -> String {
    let len = s.chars().count();
    if len <= width {
        return s.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let tail: String = s.chars().skip(len - (width - 1)).collect();
    format!("…{tail}")
}

const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The last `width` values as a one-line sparkline scaled to their maximum; zero is a blank, so an
/// idle tenant shows nothing and any activity shows at least the lowest bar.
pub fn sparkline(values: &[f64], width: usize) -> String {
    let start = values.len().saturating_sub(width);
    let shown = &values[start..];
    let max = shown
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let mut out: String = shown
        .iter()
        .map(|&v| {
            if v.is_finite() && v > 0.0 && max > 0.0 {
                let level = ((v / max) * LEVELS.len() as f64).ceil() as usize;
                LEVELS[level.clamp(1, LEVELS.len()) - 1]
            } else {
                ' '
            }
        })
        .collect();
    // Right-aligned: the newest value sits at the column's right edge, as in `top`'s history.
    let pad = width.saturating_sub(shown.len());
    out.insert_str(0, &" ".repeat(pad));
    out
}

/// One row of a latency histogram as drawn: the range's lower bound and how many fell in it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramRow {
    pub lowest_ns: u64,
    pub count: u64,
}

/// The log2 buckets from the first non-empty to the last, empty ones included so the shape is
/// true, merged pairwise (each row then spans four times, eight times... the range) until at most
/// `max_rows` remain.
pub fn histogram_rows(buckets: &[(u64, u64)], max_rows: usize) -> Vec<HistogramRow> {
    let index = |lowest: u64| {
        if lowest == 0 {
            0
        } else {
            lowest.trailing_zeros() as usize
        }
    };
    let Some(first) = buckets.iter().map(|b| index(b.0)).min() else {
        return Vec::new();
    };
    let last = buckets.iter().map(|b| index(b.0)).max().unwrap_or(first);
    let lower = |i: usize| if i == 0 { 0 } else { 1u64 << i.min(63) };
    let mut rows: Vec<HistogramRow> = (first..=last)
        .map(|i| HistogramRow {
            lowest_ns: lower(i),
            count: buckets
                .iter()
                .filter(|b| index(b.0) == i)
                .map(|b| b.1)
                .sum(),
        })
        .collect();
    let max_rows = max_rows.max(1);
    while rows.len() > max_rows {
        rows = rows
            .chunks(2)
            .map(|pair| HistogramRow {
                lowest_ns: pair[0].lowest_ns,
                count: pair.iter().map(|r| r.count).sum(),
            })
            .collect();
    }
    rows
}

/// A horizontal bar of up to `width` cells for `value` out of `max`, with eighth-cell resolution.
pub fn bar(value: u64, max: u64, width: usize) -> String {
    const PARTIAL: [char; 7] = ['▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    if max == 0 || value == 0 || width == 0 {
        return String::new();
    }
    let eighths = ((value as f64 / max as f64) * (width * 8) as f64).round() as usize;
    let eighths = eighths.clamp(1, width * 8);
    let mut out = "█".repeat(eighths / 8);
    if !eighths.is_multiple_of(8) {
        out.push(PARTIAL[eighths % 8 - 1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_counts_fit_six_characters() {
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(0.5), "0.50");
        assert_eq!(rate(12.34), "12.3");
        assert_eq!(rate(987.0), "987");
        assert_eq!(rate(1234.0), "1.23k");
        assert_eq!(rate(45_600.0), "45.6k");
        assert_eq!(rate(999_999.0), "1.00M");
        assert_eq!(rate(f64::NAN), MISSING);
        assert_eq!(count(9_999), "9999");
        assert_eq!(count(123_456), "123k");
        for v in [
            0.001, 9.999, 99.99, 999.9, 9_999.0, 99_999.0, 999_999.0, 1.2e10,
        ] {
            assert!(rate(v).chars().count() <= 6, "{v} -> {}", rate(v));
        }
    }

    #[test]
    fn latencies_carry_units() {
        assert_eq!(latency_ns(850), "850ns");
        assert_eq!(latency_ns(12_345), "12.3µs");
        assert_eq!(latency_ns(131_071), "131µs");
        assert_eq!(latency_ns(1_234_567), "1.23ms");
        assert_eq!(latency_ns(2_000_000_000), "2.00s");
        assert_eq!(percent(0.123), "12%");
        assert_eq!(cpus(0.0034), "0.003");
        assert_eq!(cpus(0.25), "0.25");
        assert_eq!(cpus(1.5), "1.50");
        assert_eq!(cpus(12.04), "12.0");
        assert_eq!(cpus(f64::NAN), MISSING);
        assert_eq!(percent(0.005), "0.5%");
    }

    #[test]
    fn long_names_keep_their_distinct_end() {
        assert_eq!(truncate_left("/vmtrace-demo/tenant-a", 10), "…/tenant-a");
        assert_eq!(truncate_left("short", 10), "short");
        assert_eq!(truncate_left("abc", 0), "");
    }

    #[test]
    fn sparklines_scale_to_their_maximum_and_align_right() {
        assert_eq!(sparkline(&[0.0, 1.0, 2.0, 4.0, 8.0], 5), " ▁▂▄█");
        assert_eq!(sparkline(&[5.0], 3), "  █");
        assert_eq!(sparkline(&[1.0, 2.0, 3.0], 2), "▆█");
        assert_eq!(sparkline(&[], 2), "  ");
        assert_eq!(sparkline(&[0.0, 0.0], 2), "  ");
    }

    #[test]
    fn histograms_keep_empty_buckets_between_and_merge_to_fit() {
        let buckets = [(512, 98), (2048, 1), (4096, 1)];
        let rows = histogram_rows(&buckets, 10);
        assert_eq!(
            rows.iter()
                .map(|r| (r.lowest_ns, r.count))
                .collect::<Vec<_>>(),
            vec![(512, 98), (1024, 0), (2048, 1), (4096, 1)]
        );
        let merged = histogram_rows(&buckets, 2);
        assert_eq!(
            merged
                .iter()
                .map(|r| (r.lowest_ns, r.count))
                .collect::<Vec<_>>(),
            vec![(512, 98), (2048, 2)]
        );
        assert!(histogram_rows(&[], 5).is_empty());
        assert_eq!(histogram_rows(&[(0, 3)], 5)[0].count, 3);
    }

    #[test]
    fn bars_have_eighth_resolution() {
        assert_eq!(bar(10, 10, 4), "████");
        assert_eq!(bar(5, 10, 4), "██");
        assert_eq!(bar(1, 1000, 4), "▏");
        assert_eq!(bar(0, 10, 4), "");
    }
}
