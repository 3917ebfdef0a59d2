//! The kernel's own BPF statistics: with `kernel.bpf_stats_enabled=1` every program accumulates its
//! run time and run count, which `bpftool prog show --json` reports as `run_time_ns` and `run_cnt`.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the statistics on, and back to what they were when dropped.
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn enable() -> Result<Self> {
        let previous =
            std::fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
        std::fs::write(SYSCTL, "1").with_context(|| format!("writing 1 to {SYSCTL}"))?;
        Ok(Self {
            previous: previous.trim().to_owned(),
        })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SYSCTL, &self.previous) {
            eprintln!("bench: cannot restore {SYSCTL} to {}: {e}", self.previous);
        }
    }
}

/// One loaded program's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedProgram {
    pub id: u64,
    pub name: String,
    pub prog_type: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Every loaded program, by id.
pub type Snapshot = BTreeMap<u64, LoadedProgram>;

pub fn snapshot() -> Result<Snapshot> {
    let output = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool (cargo xtask setup installs it)")?;
    if !output.status.success() {
        bail!(
            "bpftool prog show failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let progs = parse(&String::from_utf8_lossy(&output.stdout))?;
    Ok(progs.into_iter().map(|p| (p.id, p)).collect())
}

/// Parses `bpftool prog show --json`. The statistics fields are absent while a program has not run
/// with statistics enabled; they count as zero.
pub fn parse(json: &str) -> Result<Vec<LoadedProgram>> {
    let value: Value = serde_json::from_str(json).context("bpftool printed no JSON")?;
    let Value::Array(items) = value else {
        bail!("bpftool printed no JSON array");
    };
    items
        .iter()
        .map(|item| {
            let number = |key: &str| item.get(key).and_then(Value::as_u64);
            let text = |key: &str| {
                item.get(key)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            Ok(LoadedProgram {
                id: number("id").context("a program without an id")?,
                name: text("name"),
                prog_type: text("type"),
                run_time_ns: number("run_time_ns").unwrap_or(0),
                run_cnt: number("run_cnt").unwrap_or(0),
            })
        })
        .collect()
}

/// The programs loaded between two snapshots: those of a tracer started in between.
pub fn new_ids(before: &Snapshot, after: &Snapshot) -> BTreeSet<u64> {
    after
        .keys()
        .filter(|id| !before.contains_key(id))
        .copied()
        .collect()
}

/// Run time and count accumulated by the programs `ids` between two snapshots.
pub fn delta(before: &Snapshot, after: &Snapshot, ids: &BTreeSet<u64>) -> Vec<LoadedProgram> {
    ids.iter()
        .filter_map(|id| {
            let end = after.get(id)?;
            let (time0, cnt0) = before
                .get(id)
                .map_or((0, 0), |p| (p.run_time_ns, p.run_cnt));
            Some(LoadedProgram {
                run_time_ns: end.run_time_ns.saturating_sub(time0),
                run_cnt: end.run_cnt.saturating_sub(cnt0),
                ..end.clone()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = r#"[{"id":531,"type":"raw_tracepoint","name":"kvm_userspace_e","tag":"abfd6782a4ed026e",
        "gpl_compatible":true,"run_time_ns":36000,"run_cnt":1200,"map_ids":[429,430]},
        {"id":545,"type":"tracepoint","name":"kvm_cpuid","tag":"00","gpl_compatible":true}]"#;

    #[test]
    fn parses_bpftool_json_with_and_without_statistics() {
        let progs = parse(SHOW).unwrap();
        assert_eq!(progs.len(), 2);
        assert_eq!(progs[0].name, "kvm_userspace_e");
        assert_eq!(progs[0].prog_type, "raw_tracepoint");
        assert_eq!((progs[0].run_time_ns, progs[0].run_cnt), (36000, 1200));
        assert_eq!((progs[1].run_time_ns, progs[1].run_cnt), (0, 0));
        assert!(parse("not json").is_err());
    }

    #[test]
    fn deltas_cover_only_the_tracer_programs() {
        let before: Snapshot = parse(SHOW)
            .unwrap()
            .into_iter()
            .map(|p| (p.id, p))
            .collect();
        let mut after = before.clone();
        after.get_mut(&531).unwrap().run_time_ns = 96000;
        after.get_mut(&531).unwrap().run_cnt = 2200;
        let added = LoadedProgram {
            id: 600,
            name: "kvm_mmio".to_owned(),
            prog_type: "raw_tracepoint".to_owned(),
            run_time_ns: 500,
            run_cnt: 10,
        };
        after.insert(600, added);
        assert_eq!(new_ids(&before, &after), BTreeSet::from([600]));
        let d = delta(&before, &after, &BTreeSet::from([531, 600]));
        assert_eq!((d[0].run_time_ns, d[0].run_cnt), (60000, 1000));
        assert_eq!((d[1].run_time_ns, d[1].run_cnt), (500, 10));
    }
}
