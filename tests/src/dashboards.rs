//! The Grafana dashboards of dashboards/ as files: their panels and variables, and Grafana's
//! substitution of variables into a query.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use serde_json::Value;

use crate::prometheus::Prometheus;

pub struct Dashboard {
    pub file: String,
    pub json: Value,
}

pub fn dashboards() -> Vec<Dashboard> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    files
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            Dashboard {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                json,
            }
        })
        .collect()
}

/// Every panel that is not a row, including those inside collapsed rows.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        if panel["type"] == "row" {
            out.extend(panel["panels"].as_array().into_iter().flatten());
        } else {
            out.push(panel);
        }
    }
    out
}

pub fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .map(|l| l.iter().collect())
        .unwrap_or_default()
}

/// The variable's query text (`label_values(...)`), in either of Grafana's two spellings.
pub fn variable_query(variable: &Value) -> Option<&str> {
    variable["query"]["query"]
        .as_str()
        .or_else(|| variable["query"].as_str())
}

/// Grafana's built-in variables a query may use.
pub const BUILTINS: [&str; 9] = [
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
    "__from",
    "__to",
    "__dashboard",
];

/// Names referenced as `$name`, `${name}` or `${name:format}` in `text`.
pub fn referenced_variables(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let braced = bytes.get(i + 1) == Some(&b'{');
        let start = i + 1 + usize::from(braced);
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if end > start {
            names.insert(text[start..end].to_owned());
        }
        i = end.max(i + 1);
    }
    names
}

/// Replaces `$name`, `${name}` and `${name:format}` by `values[name]`; every reference must have a
/// value.
pub fn substitute(text: &str, values: &BTreeMap<&str, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, consumed) = if let Some(inner) = after.strip_prefix('{') {
            let close = inner
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {text}"));
            let name = inner[..close].split(':').next().unwrap_or_default();
            (name, close + 2)
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..len], len)
        };
        let value = values
            .get(name)
            .unwrap_or_else(|| panic!("no value for ${name} in {text}"));
        out.push_str(value);
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

/// A regular expression matching exactly these values, as Grafana formats a multi-value variable
/// for Prometheus.
pub fn regex_of(values: &[String]) -> String {
    let escaped: Vec<String> = values
        .iter()
        .map(|v| {
            v.chars()
                .flat_map(|c| {
                    let special = "\\^$.|?*+()[]{}".contains(c);
                    special
                        .then_some('\\')
                        .into_iter()
                        .chain(std::iter::once(c))
                })
                .collect()
        })
        .collect();
    if escaped.len() == 1 {
        escaped[0].clone()
    } else {
        format!("({})", escaped.join("|"))
    }
}

/// A panel whose value over a time range is a count per series: the dashboard file, the panel's
/// title, the label its result is keyed by, and whether its query is a rate() over the window
/// (multiplied back by its length) rather than an increase() or a plain figure.
pub struct CountingPanel {
    pub file: &'static str,
    pub title: &'static str,
    /// The label that tells the result's series apart (`None`: one series).
    pub key: Option<&'static str>,
    pub rate: bool,
}

impl CountingPanel {
    /// The panel's first query, evaluated as Grafana does with the dashboard's time range set from
    /// the scrape at `start_ms` to the one at `end_ms` (the query at its end, `$__range` and
    /// `$__rate_interval` the range's length) and the other variables from `values`; the query and
    /// its counts by key.
    ///
    /// Prometheus (2.x) selects the samples of [end - range, end], both ends included: each
    /// series' first sample is the scrape at the start and its last the one at the end, so
    /// increase() extrapolates nothing and is exactly the difference of the two; rate() is that
    /// over the range's seconds, which times the seconds gives it back up to floating-point
    /// rounding.
    pub fn counts_over(
        &self,
        all: &[Dashboard],
        prometheus: &Prometheus,
        values: &BTreeMap<&str, String>,
        (start_ms, end_ms): (i64, i64),
    ) -> (String, BTreeMap<String, u64>) {
        let (file, title) = (self.file, self.title);
        let range_ms = end_ms - start_ms;
        let mut values = values.clone();
        values.insert("__range", format!("{range_ms}ms"));
        values.insert("__rate_interval", format!("{range_ms}ms"));
        let time = format!("{}.{:03}", end_ms / 1000, end_ms % 1000);
        let dashboard = all
            .iter()
            .find(|d| d.file == file)
            .unwrap_or_else(|| panic!("no dashboard {file}"));
        let target = panels(&dashboard.json)
            .into_iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("{file}: no panel \"{title}\""))["targets"][0]
            .clone();
        let query = substitute(target["expr"].as_str().unwrap_or_default(), &values);
        let data = prometheus
            .query_at(&query, &time)
            .unwrap_or_else(|e| panic!("{file}: {title}: {e}\n    {query}"));
        let counts = data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|series| {
                let key = self.key.map_or(String::new(), |k| {
                    series["metric"][k].as_str().unwrap_or("?").to_owned()
                });
                let value: f64 = series["value"][1]
                    .as_str()
                    .unwrap_or("")
                    .parse()
                    .unwrap_or(f64::NAN);
                let count = if self.rate {
                    let count = value * range_ms as f64 / 1000.0;
                    assert!(
                        (count - count.round()).abs() < 1e-6,
                        "{file}: {title}: {key}: {value}/s over {range_ms} ms is not a whole \
                         count\n    {query}"
                    );
                    count.round()
                } else {
                    value
                };
                assert!(
                    count >= 0.0 && count.fract() == 0.0,
                    "{file}: {title}: {key}: {value} is not a count\n    {query}"
                );
                (key, count as u64)
            })
            .collect();
        (query, counts)
    }
}
