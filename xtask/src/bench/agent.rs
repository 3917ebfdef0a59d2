//! The vmtrace agent under test: `vmtrace watch --json --interval 1s`, its JSON lines kept in a file.

use std::{
    fs::File,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{interrupt, process::Process, tools::Tools};

pub struct Agent {
    process: Process,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Agent {
    /// Starts the agent with its default probes, or with every probe, and waits until they are
    /// attached.
    pub fn start(tools: &Tools, every_probe: bool, name: &str) -> Result<Self> {
        let stdout = tools.logs.join(format!("{name}.jsonl"));
        let stderr = tools.logs.join(format!("{name}.log"));
        let mut command = Command::new(&tools.vmtrace);
        command
            .args(["watch", "--json", "--interval", "1s"])
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).context("creating the agent's output file")?)
            .stderr(File::create(&stderr).context("creating the agent's log file")?);
        if every_probe {
            command.args(["--kick-latency", "--service-time"]);
        }
        let mut agent = Self {
            process: Process::spawn(&mut command, "vmtrace watch")?,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            interrupt::check()?;
            if let Some(status) = agent.process.exited()? {
                bail!("vmtrace watch stopped ({status}): {}", agent.log());
            }
            // It says "watching" once its probes are attached.
            if agent.log().contains("watching") {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!("vmtrace watch did not start within 30 s: {}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// The reports printed so far, one per tick.
    pub fn samples(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.stdout).context("reading the agent's output")?;
        // The last line may still be being written.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Stops the agent (SIGINT) and returns every report, the last one marked `"last": true`.
    pub fn stop(mut self) -> Result<Vec<Value>> {
        let status = self.process.interrupt(Duration::from_secs(15))?;
        if !status.success() {
            bail!("vmtrace watch failed ({status}): {}", self.log());
        }
        self.samples()
    }
}

/// Number of tenants whose cgroup path starts with `prefix`, and of their (tenant, kind) series,
/// in one report.
pub fn series_under(sample: &Value, prefix: &str) -> (usize, usize) {
    let ours: Vec<&Value> = tenants(sample)
        .iter()
        .filter(|t| {
            t.get("tenant")
                .and_then(Value::as_str)
                .is_some_and(|name| name.trim_start_matches('/').starts_with(prefix))
        })
        .collect();
    let series = ours
        .iter()
        .map(|t| {
            t.get("counts")
                .and_then(Value::as_object)
                .map_or(0, serde_json::Map::len)
        })
        .sum();
    (ours.len(), series)
}

/// Events the probes could not count, all reasons together.
pub fn drops(sample: &Value) -> u64 {
    sample
        .get("drops")
        .and_then(Value::as_object)
        .map_or(0, |d| d.values().filter_map(Value::as_u64).sum())
}

/// A tenant's count of `kind` since the agent started, the tenant named by its cgroup path.
pub fn count(sample: &Value, cgroup: &str, kind: &str) -> u64 {
    tenants(sample)
        .iter()
        .filter(|t| {
            t.get("tenant")
                .and_then(Value::as_str)
                .is_some_and(|name| name.trim_start_matches('/') == cgroup)
        })
        .filter_map(|t| {
            t.pointer(&format!("/counts/{kind}"))
                .and_then(Value::as_u64)
        })
        .sum()
}

fn tenants(sample: &Value) -> &[Value] {
    sample
        .get("tenants")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tenants_series_counts_and_drops() {
        let line = r#"{"elapsed_secs":3.0,"tenants":[
            {"tenant":"/vmtrace-bench/agent/max","counts":{"exit.io":2,"mmio.write":600000,"mmio.write.kernel":600000}},
            {"tenant":"/vmtrace-bench/scale/n10/t0001","counts":{"pio.out":50}}],
            "drops":{"exit_counts_full":0,"kicks_full":3},"last":true}"#;
        let sample: Value = serde_json::from_str(line).unwrap();
        assert_eq!(series_under(&sample, ""), (2, 4));
        assert_eq!(series_under(&sample, "vmtrace-bench/scale/n10/"), (1, 1));
        assert_eq!(drops(&sample), 3);
        assert_eq!(
            count(&sample, "vmtrace-bench/agent/max", "mmio.write"),
            600000
        );
        assert_eq!(count(&sample, "vmtrace-bench/agent/max", "cpuid"), 0);
    }
}
