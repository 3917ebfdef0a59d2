//! Runs of the reference VMM (`vmtrace-vmm`) and the ground truth each one reports.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::process::Process;

/// One VMM process: a scenario on some vCPUs in a tenant cgroup.
#[derive(Debug, Clone)]
pub struct Run {
    pub scenario: &'static str,
    pub vcpus: u32,
    /// Operations per vCPU.
    pub count: u64,
    /// Operations per second per vCPU, unlimited when `None`.
    pub rate: Option<u64>,
    /// Relative to the cgroup2 mount.
    pub cgroup: String,
}

/// What the VMM's JSON report says about the run as a whole.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Wall time from the first vCPU's start to the last one's stop.
    pub duration_secs: f64,
    /// Guest operations over all vCPUs, read back from guest memory.
    pub guest_ops: u64,
}

pub fn parse_report(json: &str) -> Result<Report> {
    let value: Value = serde_json::from_str(json).context("the VMM report is not JSON")?;
    Ok(Report {
        duration_secs: value
            .get("duration_secs")
            .and_then(Value::as_f64)
            .context("no duration_secs in the VMM report")?,
        guest_ops: value
            .pointer("/total/guest_ops")
            .and_then(Value::as_u64)
            .context("no total.guest_ops in the VMM report")?,
    })
}

/// Starts one VMM writing its report to `report` (`/dev/null` when not needed).
pub fn spawn(bin: &Path, run: &Run, report: &Path) -> Result<Process> {
    let mut command = Command::new(bin);
    command
        .args(["--scenario", run.scenario, "--quiet"])
        .args(["--vcpus", &run.vcpus.to_string()])
        .args(["--count", &run.count.to_string()])
        .args(["--cgroup", &run.cgroup])
        .arg("--report")
        .arg(report);
    if let Some(rate) = run.rate {
        command.args(["--rate", &rate.to_string()]);
    }
    Process::spawn(&mut command, &format!("vmtrace-vmm {}", run.scenario))
}

/// Runs the VMMs at the same time and returns their reports, in order.
pub fn run_together(bin: &Path, runs: &[Run], logs: &Path) -> Result<Vec<Report>> {
    let paths: Vec<_> = (0..runs.len())
        .map(|i| logs.join(format!("vmm-{i}.json")))
        .collect();
    let mut processes = runs
        .iter()
        .zip(&paths)
        .map(|(run, path)| spawn(bin, run, path))
        .collect::<Result<Vec<_>>>()?;
    for (process, run) in processes.iter_mut().zip(runs) {
        let status = process.wait()?;
        if !status.success() {
            bail!(
                "vmtrace-vmm {} in {} failed ({status})",
                run.scenario,
                run.cgroup
            );
        }
    }
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            parse_report(&text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_vmm_report() {
        let json = r#"{"scenario":"doorbell","pid":18460,"count":20000,"rate":null,
            "vcpus":[{"index":0,"tid":18461,"guest_ops":20000,"exits":{"io":1}}],
            "total":{"guest_ops":20000,"exits":{"io":1}},"doorbell_signals":20000,"duration_secs":0.0576}"#;
        let report = parse_report(json).unwrap();
        assert_eq!(report.guest_ops, 20000);
        assert!((report.duration_secs - 0.0576).abs() < 1e-12);
        assert!(parse_report(r#"{"total":{}}"#).is_err());
    }
}
