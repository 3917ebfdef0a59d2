//! `cargo xtask fuzz`: builds the fuzz targets of fuzz/ with cargo-fuzz on the stable toolchain and
//! runs each one for a bounded time from its committed seed corpus (docs/fuzzing.md).
//!
//! The seeds are copied to a scratch directory first, so that the inputs libFuzzer adds while it
//! runs never land in the repository. Any crash, timeout or out-of-memory input fails the task,
//! with the path of the input that reproduces it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::setup;

/// The cargo-fuzz release these targets are built with, installed with `cargo install --locked`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every fuzz target (a `[[bin]]` of fuzz/Cargo.toml, with its seeds in `fuzz/corpus/<name>`).
pub const TARGETS: &[&str] = &["cgroup_path", "tracefs_format", "agent_config", "recording"];

/// How long one input may run before libFuzzer calls it a hang, in seconds: every parser here
/// answers in microseconds.
const INPUT_TIMEOUT_SECS: u64 = 10;

/// What one target's run did, from libFuzzer's final statistics.
struct Run {
    target: String,
    executions: u64,
    per_second: u64,
    corpus: usize,
}

/// Builds the targets, then runs each of `targets` (all when empty) for `seconds`.
pub fn run(seconds: u64, targets: &[String]) -> Result<()> {
    let selected: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for target in targets {
            if !TARGETS.contains(&target.as_str()) {
                bail!(
                    "no fuzz target `{target}`; the targets are {}",
                    TARGETS.join(", ")
                );
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    // libfuzzer-sys compiles libFuzzer, which is C++.
    setup::install_packages(&["g++"])?;
    install_cargo_fuzz()?;
    let root = crate::workspace::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let target_dir = target_dir(&root);
    let started = Instant::now();
    eprintln!("fuzz: building the fuzz targets");
    setup::exec(
        cargo_fuzz(&fuzz_dir, "build")
            .arg("--target-dir")
            .arg(&target_dir),
    )?;
    eprintln!("fuzz: built in {:.1}s", started.elapsed().as_secs_f64());
    let binaries = target_dir.join(host_triple()?).join("release");
    let mut runs = Vec::new();
    for target in selected {
        runs.push(run_target(
            &binaries.join(target),
            target,
            &fuzz_dir.join("corpus").join(target),
            &target_dir.join("runs").join(target),
            seconds,
        )?);
    }
    eprintln!(
        "fuzz: {:<16} {:>12} {:>10} {:>7}",
        "target", "executions", "exec/s", "corpus"
    );
    for run in &runs {
        eprintln!(
            "fuzz: {:<16} {:>12} {:>10} {:>7}",
            run.target, run.executions, run.per_second, run.corpus
        );
    }
    eprintln!(
        "fuzz: no crash in {} targets ({:.1}s in all)",
        runs.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo fuzz <subcommand>` in fuzz/, for the stable toolchain: no sanitizer (AddressSanitizer
/// needs a nightly compiler, and safe Rust gains little from it), debug assertions on so that
/// overflows panic, and the eBPF object stubbed, as no target loads probes.
fn cargo_fuzz(fuzz_dir: &Path, subcommand: &str) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(fuzz_dir)
        .args([
            "fuzz",
            subcommand,
            "--sanitizer",
            "none",
            "--debug-assertions",
        ])
        .env("VMTRACE_EBPF_STUB", "1");
    command
}

/// Where the fuzz targets build: beside the workspace's own build, outside the source tree.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("fuzz")
}

/// The host's target triple, which cargo-fuzz builds for unless told otherwise.
fn host_triple() -> Result<String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("cannot run rustc -vV")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV names no host triple")
}

/// Installs the pinned cargo-fuzz unless that version is already there.
fn install_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if installed
        .as_deref()
        .is_some_and(|v| v.trim() == format!("cargo-fuzz {CARGO_FUZZ_VERSION}"))
    {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    setup::exec(Command::new("cargo").args([
        "install",
        "--locked",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
    ]))
}

/// Runs one target for `seconds` from a scratch copy of its seeds; fails on any finding.
fn run_target(
    binary: &Path,
    target: &str,
    seeds: &Path,
    scratch: &Path,
    seconds: u64,
) -> Result<Run> {
    let corpus = scratch.join("corpus");
    let artifacts = scratch.join("artifacts");
    if scratch.exists() {
        fs::remove_dir_all(scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    copy_dir(seeds, &corpus)?;
    eprintln!("fuzz: {target}: {seconds}s from {}", seeds.display());
    let output = Command::new(binary)
        .arg(&corpus)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let log = String::from_utf8_lossy(&output.stderr);
    let log_path = scratch.join("libfuzzer.log");
    fs::write(&log_path, log.as_bytes())
        .with_context(|| format!("writing {}", log_path.display()))?;
    let findings = findings(&artifacts)?;
    if !output.status.success() || !findings.is_empty() {
        // The end of the log holds the panic message and libFuzzer's account of the input.
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        for line in tail.into_iter().rev() {
            eprintln!("{target}: {line}");
        }
        let reproducers: Vec<String> = findings
            .iter()
            .map(|path| {
                format!(
                    "\n  {}  (reproduce: {} {})",
                    path.display(),
                    binary.display(),
                    path.display()
                )
            })
            .collect();
        bail!(
            "fuzz target {target} failed ({}); full log in {}; inputs:{}",
            output.status,
            log_path.display(),
            if reproducers.is_empty() {
                " none written".to_owned()
            } else {
                reproducers.concat()
            }
        );
    }
    Ok(Run {
        target: target.to_owned(),
        executions: stat(&log, "number_of_executed_units").unwrap_or(0),
        per_second: stat(&log, "average_exec_per_sec").unwrap_or(0),
        corpus: fs::read_dir(&corpus).map_or(0, Iterator::count),
    })
}

/// The inputs libFuzzer wrote for a crash, timeout, leak or out-of-memory run.
fn findings(artifacts: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = fs::read_dir(artifacts)
        .with_context(|| format!("reading {}", artifacts.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    found.sort();
    Ok(found)
}

/// One of libFuzzer's `stat::<name>: <value>` lines.
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .find_map(|line| line.strip_prefix(&format!("stat::{name}:")))
        .and_then(|value| value.trim().parse().ok())
}

/// Copies a directory of seed files (no subdirectories) to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        if path.is_file() {
            let name = path.file_name().context("a seed file has a name")?;
            fs::copy(&path, to.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_statistics_are_read_from_its_log() {
        let log = "#1024\tDONE   cov: 90 ft: 120 corp: 30/4Kb\n\
                   stat::number_of_executed_units: 123456\n\
                   stat::average_exec_per_sec:     6172\n";
        assert_eq!(stat(log, "number_of_executed_units"), Some(123_456));
        assert_eq!(stat(log, "average_exec_per_sec"), Some(6172));
        assert_eq!(stat(log, "peak_rss_mb"), None);
    }

    #[test]
    fn every_target_has_a_binary_and_seeds() {
        let fuzz = crate::workspace::workspace_root().join("fuzz");
        let manifest = fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        let manifest: toml::Table = toml::from_str(&manifest).unwrap();
        let bins: Vec<&str> = manifest["bin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|bin| bin["name"].as_str().unwrap())
            .collect();
        assert_eq!(bins, TARGETS);
        for target in TARGETS {
            let seeds = fs::read_dir(fuzz.join("corpus").join(target))
                .unwrap()
                .count();
            assert!(seeds > 0, "{target} has no seeds");
        }
    }
}
