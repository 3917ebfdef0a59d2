//! The report page: one self-contained HTML file (charts inline as SVG, no scripts, no external
//! resources) that opens anywhere and pastes into an incident review.

use std::fmt::Write;

use super::series::TenantSeries;
use crate::{
    cmd::top::{format, metrics::has_hardware_exits},
    kind::TopColumn,
    sample::recording::Header,
};

/// Text safe inside HTML elements and attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What the page needs besides the charts.
pub struct Page<'a> {
    pub source: &'a str,
    pub header: Option<&'a Header>,
    pub samples: usize,
    pub duration_secs: f64,
    pub tenants: &'a [TenantSeries],
    /// The overview chart as SVG.
    pub overview: &'a str,
    /// Per tenant (same order): timeline SVG, and latency SVG if the tenant has latencies; with
    /// the files' stem for the PNG links.
    pub charts: &'a [(String, String, Option<String>)],
    pub png: bool,
}

const STYLE: &str = "body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1160px}\
table{border-collapse:collapse;margin:1em 0}th,td{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:right}\
th:first-child,td:first-child{text-align:left}dt{font-weight:bold;float:left;width:9em}dd{margin-left:10em}\
svg{max-width:100%;height:auto;border:1px solid #eee;margin:.5em 0}.note{color:#777}";

pub fn render(page: &Page) -> String {
    let mut out = String::new();
    let title = "vmtrace report";
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}: {}</title>\
         <style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n<dl>",
        escape(page.source)
    );
    let mut meta = vec![
        ("recording", page.source.to_owned()),
        (
            "samples",
            format!("{} over {:.0} s", page.samples, page.duration_secs),
        ),
    ];
    if let Some(h) = page.header {
        meta.extend([
            ("host", h.host.clone()),
            ("kernel", h.kernel.clone()),
            (
                "KVM",
                format!(
                    "{} (exit source: {})",
                    h.kvm.name(),
                    h.exit_source.short_name()
                ),
            ),
            ("started", h.started.clone()),
            ("interval", format!("{} s", h.interval_secs)),
            ("written by", format!("vmtrace {}", h.vmtrace_version)),
        ]);
    }
    for (k, v) in meta {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(&v));
    }
    out.push_str("</dl>\n<h2>Tenants</h2>\n");
    out.push_str(&summary_table(page.tenants));
    out.push_str("<h2>Exits per second by tenant</h2>\n");
    out.push_str(page.overview);
    for (tenant, (stem, timeline, latency)) in page.tenants.iter().zip(page.charts) {
        let _ = write!(
            out,
            "\n<h2 id=\"{}\">{}</h2>\n",
            escape(stem),
            escape(&tenant.tenant)
        );
        out.push_str(timeline);
        match latency {
            Some(svg) => out.push_str(svg),
            None => out.push_str("<p class=\"note\">No latency was measured for this tenant.</p>"),
        }
        if page.png {
            let _ = write!(
                out,
                "<p class=\"note\">PNG: <a href=\"{stem}-timeline.png\">timeline</a>{}</p>",
                if latency.is_some() {
                    format!(", <a href=\"{stem}-latency.png\">latency</a>")
                } else {
                    String::new()
                }
            );
        }
    }
    out.push_str("\n<p class=\"note\">Rates are per second over each sample's interval; latency \
        percentiles are the upper bound of their log2 bucket (within a factor of two). exit.* latency \
        is the VMM's service time, kvm_exit.* latency exit to entry (VMX/SVM).</p>\n</body></html>\n");
    out
}

fn summary_table(tenants: &[TenantSeries]) -> String {
    let mut out = String::from(
        "<table><tr><th>tenant</th><th>exits</th><th>mean exits/s</th><th>peak exits/s</th>\
         <th>top reason</th><th>p99 latency</th><th>virtio kicks</th></tr>\n",
    );
    for t in tenants {
        let hardware = has_hardware_exits(t.totals.keys());
        let exits: u64 = t
            .totals
            .iter()
            .filter(|(k, _)| k.counts_as_exit(hardware))
            .map(|(_, c)| c)
            .sum();
        let top = t
            .totals
            .iter()
            .filter(|(k, _)| k.counts_as_exit(hardware))
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)));
        let kicks: u64 = t
            .totals
            .iter()
            .filter(|(k, _)| k.top_column() == TopColumn::Kicks)
            .map(|(_, c)| c)
            .sum();
        let values: Vec<f64> = t.exits.points.iter().map(|p| p.1).collect();
        let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
        let peak = values.iter().copied().fold(0.0, f64::max);
        let p99 = t.histograms.first().map_or_else(
            || format::MISSING.to_owned(),
            |h| format!("{} ({})", format::latency_ns(h.summary.p99_ns), h.kind),
        );
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{exits}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{kicks}</td></tr>",
            escape(&t.tenant),
            format::rate(mean),
            format::rate(peak),
            escape(&top.map_or_else(|| format::MISSING.to_owned(), |(k, _)| k.reason_name())),
            escape(&p99),
        );
    }
    out.push_str("</table>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_tenant_names_is_escaped() {
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }
}
