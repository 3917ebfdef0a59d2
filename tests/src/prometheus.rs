//! A real Prometheus (Debian's `prometheus`) started by a test with its own configuration and
//! storage, its HTTP query API, the text exposition format the agent serves, and a scrape target
//! that serves recorded expositions.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::Value;

use crate::{expect::is_exit_without_kvm_exit, free_port, http_get, process::Proc, wait::wait_for};

/// Where Debian's package installs the server (`cargo xtask setup` installs it).
pub const BINARY: &str = "/usr/bin/prometheus";
/// The example scrape job of deploy/, whose relabelling [`kubernetes_pod_job`] copies.
pub const SCRAPE_CONFIG: &str = "deploy/prometheus-scrape-config.yaml";

/// A Prometheus server with its own configuration and storage, scraping and evaluating every
/// second; killed on drop.
pub struct Prometheus {
    port: u16,
    process: Proc,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with its configuration, storage and log in `dir` and the scrape jobs
    /// `scrape_configs` (the items of the `scrape_configs:` list, indented by two spaces), and
    /// waits until it is ready.
    pub fn start(dir: &Path, scrape_configs: &str) -> Self {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n{scrape_configs}"
            ),
        )
        .expect("writing prometheus.yml");
        let log = dir.join("prometheus.log");
        let log_file = fs::File::create(&log).expect("prometheus.log");
        let process = Proc::spawn(
            "prometheus",
            Command::new(BINARY)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(log_file),
        );
        let mut prometheus = Self { port, process, log };
        wait_for("Prometheus to be ready", Duration::from_mins(1), || {
            let tail = prometheus.log_tail();
            prometheus.process.assert_running(&tail);
            matches!(http_get(port, "/-/ready"), Ok((200, _))).then_some(())
        });
        prometheus
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "(prometheus log:\n{})",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// GET an API path; the `data` member of a successful answer.
    pub fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.port, path).map_err(|e| e.to_string())?;
        let json: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if json["status"] != "success" {
            return Err(format!("HTTP {status}: {body}"));
        }
        Ok(json["data"].clone())
    }

    /// An instant query at the current time.
    pub fn query(&self, expr: &str) -> Result<Value, String> {
        self.api(&format!("/api/v1/query?query={}", url_encode(expr)))
    }

    /// An instant query at `time` (seconds since the Unix epoch, as the API takes it).
    pub fn query_at(&self, expr: &str, time: &str) -> Result<Value, String> {
        self.api(&format!(
            "/api/v1/query?query={}&time={time}",
            url_encode(expr)
        ))
    }

    /// Values of `label` on the series matching `selector` in the last 5 minutes.
    pub fn label_values(&self, selector: &str, label: &str) -> Result<BTreeSet<String>, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let data = self.api(&format!(
            "/api/v1/series?match[]={}&start={}&end={now}",
            url_encode(selector),
            now - 300
        ))?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|series| series[label].as_str().map(str::to_owned))
            .collect())
    }
}

/// A scrape job `job` of the loopback target `target`, which carries the labels Kubernetes pod
/// discovery would give the agent's pod `pod_name` on `node`, relabelled as [`SCRAPE_CONFIG`]'s
/// example job does (Debian's Prometheus is built without Kubernetes discovery).
pub fn kubernetes_pod_job(job: &str, target: u16, node: &str, pod_name: &str) -> String {
    format!(
        "  - job_name: {job}\n    static_configs:\n      \
         - targets: ['127.0.0.1:{target}']\n        labels:\n          \
         __meta_kubernetes_pod_annotation_prometheus_io_scrape: 'true'\n          \
         __meta_kubernetes_pod_annotation_prometheus_io_port: '{target}'\n          \
         __meta_kubernetes_pod_annotation_prometheus_io_path: /metrics\n          \
         __meta_kubernetes_pod_label_app_kubernetes_io_name: vmtrace\n          \
         __meta_kubernetes_pod_node_name: {node}\n          \
         __meta_kubernetes_pod_name: {pod_name}\n{}",
        relabel_configs()
    )
}

/// The `relabel_configs:` block of the example scrape job, verbatim (indented as a job's key).
fn relabel_configs() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(SCRAPE_CONFIG);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut lines = text.lines().skip_while(|l| l.trim() != "relabel_configs:");
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("{SCRAPE_CONFIG}: no relabel_configs"));
    let indent = first.len() - first.trim_start().len();
    let mut block = format!("    {}\n", first.trim_start());
    for line in lines {
        let trimmed = line.trim_start();
        if !trimmed.is_empty() && line.len() - trimmed.len() <= indent {
            break;
        }
        let relative = line.get(indent..).unwrap_or("");
        block.push_str(&format!("    {relative}\n"));
    }
    block
}

/// Percent-encodes `text` for a URL's query string.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What an instant query returned, in a line; `Err` when it returned no finite value.
pub fn describe_result(data: &Value) -> Result<String, String> {
    let result = &data["result"];
    let samples: Vec<(String, String)> = match data["resultType"].as_str() {
        Some("scalar") => vec![(String::new(), result[1].as_str().unwrap_or("").to_owned())],
        Some("vector") => result
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["metric"].to_string(),
                    s["value"][1].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect(),
        Some("matrix") => result
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let last = s["values"].as_array()?.last()?;
                Some((s["metric"].to_string(), last[1].as_str()?.to_owned()))
            })
            .collect(),
        other => return Err(format!("unexpected result type {other:?}")),
    };
    if samples.is_empty() {
        return Err("no series".to_owned());
    }
    let finite = samples
        .iter()
        .filter(|(_, v)| v.parse::<f64>().is_ok_and(f64::is_finite))
        .count();
    if finite == 0 {
        return Err(format!(
            "{} series, none with a finite value: {:?}",
            samples.len(),
            samples.iter().take(3).collect::<Vec<_>>()
        ));
    }
    let (labels, value) = &samples[0];
    Ok(format!(
        "{} series ({finite} finite), e.g. {labels} = {value}",
        samples.len()
    ))
}

/// The value of the sample `name{labels}` of a text exposition (`/metrics`) whose labels include
/// all of `wanted`.
pub fn sample(metrics: &str, name: &str, wanted: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (labels, value) = rest.split_once("} ")?;
        let has = |(k, v): &(&str, &str)| labels.split(',').any(|l| l == format!("{k}=\"{v}\""));
        wanted.iter().all(has).then(|| value.trim().parse().ok())?
    })
}

/// The count of one of `expected_agent_counts`' kinds for `tenant`, as [`tenant_counts`] decodes
/// it.
pub fn count_of(metrics: &str, tenant: &str, kind: &str) -> Option<u64> {
    tenant_counts(metrics, tenant).get(kind).copied()
}

/// The labels of an exposition line's series, and its value: `name{k="v",...} value`.
fn series(line: &str) -> Option<(&str, BTreeMap<&str, &str>, &str)> {
    let (name, rest) = line.split_once('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    let mut map = BTreeMap::new();
    let mut rest = labels;
    while let Some((key, after)) = rest.split_once("=\"") {
        let end = after.find('"')?;
        map.insert(key.trim_start_matches(','), &after[..end]);
        rest = &after[end + 1..];
    }
    Some((name, map, value.trim()))
}

/// Every count `/metrics` holds for `tenant` (its `tenant` label), by the kind of
/// `vmtrace watch --json` it stands for, as docs/metrics.md defines the metrics; CPU time back in
/// ns. A tenant series of no metric docs/metrics.md lists as a count comes back as the kind
/// `unknown: <its line>`, which no expectation has. Latency histograms and gauges are left out:
/// they are not counts.
///
/// `vmtrace_vm_exits_total{exit_source="derived"}` is the views' sum of other kinds (`exit.*`,
/// `mmio.write.kernel`, `cpuid`), not kinds of its own: decoding it as kinds would count them
/// twice, so each such series is held to the kind it sums instead, and panics when it differs
/// (one exposition is one sample, so they never lag each other).
pub fn tenant_counts(metrics: &str, tenant: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    let mut derived = BTreeMap::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels, value)) = series(line) else {
            continue;
        };
        if labels.get("tenant") != Some(&tenant) {
            continue;
        }
        let label = |key: &str| labels.get(key).copied().unwrap_or("?");
        let kind = match name {
            "vmtrace_vmm_exits_total" => format!("exit.{}", label("exit_reason")),
            "vmtrace_vm_exits_total" => match label("exit_source") {
                "kvm_exit" => format!("kvm_exit.{}", label("exit_reason")),
                "derived" => {
                    let kind = match label("exit_reason") {
                        reason @ ("mmio.write.kernel" | "cpuid") => reason.to_owned(),
                        reason => format!("exit.{reason}"),
                    };
                    let count: u64 = value
                        .parse()
                        .unwrap_or_else(|_| panic!("a count that is not an integer: {line}"));
                    derived.insert(kind, count);
                    continue;
                }
                _ => format!("unknown: {line}"),
            },
            "vmtrace_vm_events_total" => label("event").to_owned(),
            "vmtrace_virtio_kicks_total" => match label("virtio_queue") {
                "any" => "kick.any".to_owned(),
                queue => format!("kick.q{queue}"),
            },
            "vmtrace_tlb_events_total" => format!("tlb.{}", label("tlb_event")),
            "vmtrace_memory_faults_total" => match label("fault_type") {
                "refault" => "mem.refault".to_owned(),
                fault => format!("fault.{fault}"),
            },
            "vmtrace_kvm_mmu_pages_total" => format!("mmu.page.{}", label("mmu_event")),
            "vmtrace_memory_invalidations_total" => format!("mem.{}", label("memory_event")),
            "vmtrace_memory_invalidated_bytes_total" => {
                format!("mem.{}_bytes", label("memory_event"))
            }
            "vmtrace_memory_cgroup_events_total" => format!("memcg.{}", label("memory_event")),
            "vmtrace_iommu_mappings_total" => format!("iommu.{}", label("iommu_operation")),
            "vmtrace_iommu_mapped_bytes_total" => {
                format!("iommu.{}_bytes", label("iommu_operation"))
            }
            "vmtrace_cpu_time_seconds_total" => {
                let kind = match label("cpu_mode") {
                    "guest" => "cpu.guest".to_owned(),
                    mode => format!("tax.{mode}"),
                };
                let seconds: f64 = value.parse().unwrap_or(f64::NAN);
                counts.insert(kind, (seconds * 1e9).round() as u64);
                continue;
            }
            _ if name.ends_with("_bucket")
                || name.ends_with("_sum")
                || name.ends_with("_count") =>
            {
                continue;
            }
            "vmtrace_memory_usage_bytes" | "vmtrace_virtualization_tax_ratio" => continue,
            _ => format!("unknown: {line}"),
        };
        let count = value
            .parse()
            .unwrap_or_else(|_| panic!("a count that is not an integer: {line}"));
        counts.insert(kind, count);
    }
    // Where the tenant has hardware exits they are its exits, and no derived series may exist.
    let hardware = counts.keys().any(|k| k.starts_with("kvm_exit."));
    let summed: BTreeMap<String, u64> = counts
        .iter()
        .filter(|(kind, _)| !hardware && is_exit_without_kvm_exit(kind))
        .map(|(kind, &n)| (kind.clone(), n))
        .collect();
    assert_eq!(
        derived, summed,
        "{tenant}: vmtrace_vm_exits_total{{exit_source=\"derived\"}} (left) is not the tenant's \
         exits by the views' rule (right)"
    );
    counts
}

/// A scrape target that serves recorded expositions, one after the other: each is served until
/// [`RecordedTarget::next`] moves on to the following one. Prometheus then stores them as it would
/// an agent's /metrics that changed between two scrapes; dropping the target stops it.
pub struct RecordedTarget {
    port: u16,
    /// The exposition being served, and how many scrapes each got.
    state: Arc<Mutex<(usize, Vec<u32>)>>,
    stop: Arc<AtomicBool>,
}

impl RecordedTarget {
    pub fn serve(expositions: Vec<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        let port = listener.local_addr().expect("local address").port();
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let state = Arc::new(Mutex::new((0, vec![0; expositions.len()])));
        let stop = Arc::new(AtomicBool::new(false));
        let (served, stopped) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let current = {
                    let mut state = served.lock().unwrap();
                    let current = state.0;
                    state.1[current] += 1;
                    current
                };
                let _ = answer(stream, &expositions[current]);
            }
        });
        Self { port, state, stop }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many scrapes the exposition being served has had.
    pub fn scrapes(&self) -> u32 {
        let state = self.state.lock().unwrap();
        state.1[state.0]
    }

    /// Serves the next exposition from now on.
    pub fn next(&self) {
        let mut state = self.state.lock().unwrap();
        assert!(state.0 + 1 < state.1.len(), "no exposition after the last");
        state.0 += 1;
    }
}

impl Drop for RecordedTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads a request's headers from `stream` and answers `exposition` in the format its text is in
/// (OpenMetrics ends with `# EOF`).
fn answer(mut stream: TcpStream, exposition: &str) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte)? == 1 {
        head.push(byte[0]);
    }
    let content_type = if exposition.trim_end().ends_with("# EOF") {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{exposition}",
        exposition.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_counts_decode_each_metric_to_its_kind() {
        let metrics = "\
# TYPE vmtrace_vm_exits_total counter
vmtrace_vm_exits_total{tenant=\"/a\",exit_source=\"derived\",exit_reason=\"io\"} 501
vmtrace_vm_exits_total{tenant=\"/a\",exit_source=\"derived\",exit_reason=\"cpuid\"} 9
vmtrace_vm_exits_total{tenant=\"/b\",exit_source=\"derived\",exit_reason=\"io\"} 7
vmtrace_vmm_exits_total{tenant=\"/a\",exit_reason=\"io\"} 501
vmtrace_vmm_exits_total{tenant=\"/b\",exit_reason=\"io\"} 7
vmtrace_vm_events_total{tenant=\"/a\",event=\"pio.out\"} 501
vmtrace_vm_events_total{tenant=\"/a\",event=\"cpuid\"} 9
vmtrace_virtio_kicks_total{tenant=\"/a\",virtio_queue=\"1\"} 3
vmtrace_memory_faults_total{tenant=\"/a\",fault_type=\"refault\"} 2
vmtrace_memory_invalidated_bytes_total{tenant=\"/a\",memory_event=\"unmap\"} 4096
vmtrace_cpu_time_seconds_total{tenant=\"/a\",cpu_mode=\"kernel\"} 0.067318
vmtrace_vmm_service_duration_seconds_count{tenant=\"/a\",exit_reason=\"io\"} 501
vmtrace_memory_usage_bytes{tenant=\"/a\"} 1000
vmtrace_new_thing_total{tenant=\"/a\"} 1
";
        let counts = tenant_counts(metrics, "/a");
        let want: BTreeMap<String, u64> = [
            ("exit.io", 501),
            ("pio.out", 501),
            ("cpuid", 9),
            ("kick.q1", 3),
            ("mem.refault", 2),
            ("mem.unmap_bytes", 4096),
            ("tax.kernel", 67_318_000),
            ("unknown: vmtrace_new_thing_total{tenant=\"/a\"} 1", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(counts, want);
        assert_eq!(count_of(metrics, "/b", "exit.io"), Some(7));
    }

    #[test]
    #[should_panic(expected = "views' rule")]
    fn a_derived_exit_series_that_is_not_its_kind_fails() {
        let metrics = "\
vmtrace_vm_exits_total{tenant=\"/a\",exit_source=\"derived\",exit_reason=\"io\"} 502
vmtrace_vmm_exits_total{tenant=\"/a\",exit_reason=\"io\"} 501
";
        tenant_counts(metrics, "/a");
    }

    #[test]
    fn hardware_exits_are_kinds_and_leave_no_room_for_derived_ones() {
        let metrics = "\
vmtrace_vm_exits_total{tenant=\"/a\",exit_source=\"kvm_exit\",exit_reason=\"HLT\"} 40
vmtrace_vmm_exits_total{tenant=\"/a\",exit_reason=\"hlt\"} 30
vmtrace_vm_events_total{tenant=\"/a\",event=\"cpuid\"} 9
";
        let want: BTreeMap<String, u64> = [("kvm_exit.HLT", 40), ("exit.hlt", 30), ("cpuid", 9)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(tenant_counts(metrics, "/a"), want);
    }
}
