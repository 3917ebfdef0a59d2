//! The two text formats `/metrics` answers in, chosen from the scraper's `Accept` as the Prometheus
//! client libraries do: the Prometheus text format 0.0.4 unless OpenMetrics is asked for.
//! prometheus-client writes OpenMetrics; the text format is derived from it line by line.

use std::collections::BTreeMap;

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what a scraper gets that does not ask for OpenMetrics.
    Text,
    /// `application/openmetrics-text; version=1.0.0` (Prometheus asks for it first).
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when `accept` lists it with a non-zero quality, the text format otherwise.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let asks_for_openmetrics = accept.is_some_and(|accept| {
            accept.split(',').any(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next().unwrap_or_default();
                let quality = parts
                    .find_map(|p| p.strip_prefix("q="))
                    .and_then(|q| q.parse::<f32>().ok())
                    .unwrap_or(1.0);
                media.eq_ignore_ascii_case("application/openmetrics-text") && quality > 0.0
            })
        });
        if asks_for_openmetrics {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The text format 0.0.4 of an OpenMetrics exposition: no `# EOF` or `# UNIT`, counters' `HELP`
/// and `TYPE` under their samples' name (`_total`), no `_created` samples, and `HELP` text without
/// OpenMetrics' escaped quotes. Samples are written alike in both.
pub fn text_format(openmetrics: &str) -> String {
    let types: BTreeMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let counter = |family: &str| types.get(family) == Some(&"counter");
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some((keyword, rest)) = line
            .strip_prefix("# HELP ")
            .map(|r| ("HELP", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("TYPE", r)))
        {
            let (family, value) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if counter(family) {
                format!("{family}_total")
            } else {
                family.to_owned()
            };
            let value = if keyword == "HELP" {
                value.replace("\\\"", "\"")
            } else {
                value.to_owned()
            };
            text.push_str(&format!("# {keyword} {name} {value}\n"));
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or_default();
        if sample.strip_suffix("_created").is_some_and(&counter) {
            continue;
        }
        text.push_str(line);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapers_get_openmetrics_only_when_they_ask() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
    }

    #[test]
    fn the_text_format_names_counters_by_their_samples() {
        let openmetrics = "# HELP a_exits Exits \\\"per\\\" tenant.\n# TYPE a_exits counter\n\
                           a_exits_total{tenant=\"t\"} 3\na_exits_created{tenant=\"t\"} 1.5\n\
                           # HELP a_bytes Bytes.\n# TYPE a_bytes gauge\n# UNIT a_bytes bytes\n\
                           a_bytes 7\n# EOF\n";
        assert_eq!(
            text_format(openmetrics),
            "# HELP a_exits_total Exits \"per\" tenant.\n# TYPE a_exits_total counter\n\
             a_exits_total{tenant=\"t\"} 3\n# HELP a_bytes Bytes.\n# TYPE a_bytes gauge\n\
             a_bytes 7\n"
        );
    }
}
