//! `cargo xtask test`: formatting, lints and every test, then the dependency, MSRV and documentation
//! checks. Each step prints how long it took.

use std::{path::Path, time::Instant};

use anyhow::Result;

use crate::{
    fuzz, image, seccomp, setup,
    workspace::{cargo, msrv_toolchain, workspace_root},
};

/// How long `cargo xtask test` fuzzes each target: enough to run every seed and tens of thousands
/// of mutations of them (docs/fuzzing.md has the figures); `cargo xtask fuzz` runs longer.
const FUZZ_SECONDS: u64 = 20;

pub fn run(cargo_test_args: &[String]) -> Result<()> {
    setup::run()?;
    let root = workspace_root();
    step("rustfmt", || {
        setup::exec(cargo(&root).args(["fmt", "--all", "--check"]))
    })?;
    step("clippy", || {
        setup::exec(cargo(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("clippy (eBPF crate, BPF target)", || {
        let mut clippy = vmtrace_ebpf_toolchain::cargo("clippy", &root)?;
        if let Some(target_dir) = std::env::var_os("CARGO_TARGET_DIR") {
            clippy.arg("--target-dir").arg(target_dir);
        }
        setup::exec(clippy.args(["--", "-D", "warnings"]))
    })?;
    step("seccomp profile (deploy/seccomp/vmtrace.json)", || {
        seccomp::run(&root, true)
    })?;
    // The container tests (tests/tests/container.rs) run this image.
    step("image (cargo xtask image)", || image::run(&root))?;
    step("cargo test", || {
        setup::exec(
            cargo(&root)
                .args(["test", "--workspace"])
                .args(cargo_test_args)
                // The end-to-end tests print what they checked (exits, kinds, tenants); show it.
                .args(["--", "--show-output"]),
        )
    })?;
    step(
        &format!(
            "fuzz ({FUZZ_SECONDS}s for each of {} targets)",
            fuzz::TARGETS.len()
        ),
        || fuzz::run(FUZZ_SECONDS, &[]),
    )?;
    step("cargo deny (licences, bans, sources, advisories)", || {
        warn_if_advisories_are_old(&root);
        // --offline: the advisory database is the vendored copy deny.toml points at. cargo-deny
        // reads the metadata of every platform's crates, which a build here does not download.
        setup::exec(cargo(&root).args(["fetch", "--locked"]))?;
        setup::exec(cargo(&root).args(["deny", "--offline", "check"]))
    })?;
    let msrv = msrv_toolchain(&root)?;
    let msrv_toolchain = setup::msrv_runner(&msrv).unwrap_or_else(|| msrv.clone());
    step(&format!("MSRV: cargo check with Rust {msrv}"), || {
        setup::exec(
            setup::rustup_run(&msrv_toolchain, "cargo")
                .current_dir(&root)
                .args(["check", "--workspace"]),
        )
    })?;
    step("cargo doc (warnings are errors)", || {
        setup::exec(
            cargo(&root)
                .args(["doc", "--workspace", "--no-deps"])
                .env("RUSTDOCFLAGS", "-Dwarnings"),
        )
    })
}

/// `cargo xtask vm-test`: the emulated host's tests alone (SVM, then the IOMMUs), each reported
/// by name.
pub fn vm_test() -> Result<()> {
    setup::run()?;
    let root = workspace_root();
    for (name, test) in [
        ("emulated SVM host (tests/tests/svm_host.rs)", "svm_host"),
        ("emulated IOMMUs (tests/tests/iommu_host.rs)", "iommu_host"),
    ] {
        step(name, || {
            setup::exec(cargo(&root).args([
                "test",
                "-p",
                "vmtrace-tests",
                "--test",
                test,
                "--",
                "--show-output",
            ]))
        })?;
    }
    Ok(())
}

/// Runs one named step and says how long it took and how much disk is left after it: a full run
/// fills about 12 GB (docs/building.md), and a disk that fills up shows as a compiler or linker error
/// far from its cause.
fn step(name: &str, run: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("test: {name}");
    let started = Instant::now();
    let result = run();
    let free = free_gigabytes(&workspace_root())
        .map_or_else(String::new, |gb| format!("; {gb:.1} GB free"));
    eprintln!(
        "test: {name}: {:.1}s{free}",
        started.elapsed().as_secs_f64()
    );
    result
}

/// Free space, in GB, on the filesystem that holds `path`; `None` where statvfs fails.
fn free_gigabytes(path: &Path) -> Option<f64> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is a writable statvfs that the call fills.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Some((stat.f_bavail as f64) * (stat.f_frsize as f64) / 1e9)
}

/// The vendored advisory database (deny.toml's `db-path`) and the file that says which commit it is.
const ADVISORY_SNAPSHOT: &str = "deny/advisory-dbs/advisory-db-3157b0e258782691/SNAPSHOT";
/// cargo-deny's own limit, which it cannot apply to a vendored copy: it dates the database by the
/// last commit of the repository it sits in, i.e. this one.
const ADVISORIES_MAX_AGE_DAYS: i64 = 90;

/// Says so when the vendored advisory database is older than cargo-deny would accept.
fn warn_if_advisories_are_old(root: &Path) {
    let path = root.join(ADVISORY_SNAPSHOT);
    let Ok(snapshot) = std::fs::read_to_string(&path) else {
        eprintln!("test: warning: cannot read {}", path.display());
        return;
    };
    let now_days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            i64::try_from(d.as_secs() / 86_400).unwrap_or(i64::MAX)
        });
    match snapshot_age_days(&snapshot, now_days) {
        Some(age) if age > ADVISORIES_MAX_AGE_DAYS => eprintln!(
            "test: warning: the vendored RustSec advisory database is {age} days old; refresh it \
             (docs/building.md, \"cargo-deny and the advisory database\")"
        ),
        Some(_) => {}
        None => eprintln!("test: warning: {} has no date", path.display()),
    }
}

/// Days between the snapshot's commit date (`<url> <commit> <YYYY-MM-DD>T...`) and `now_days`.
fn snapshot_age_days(snapshot: &str, now_days: i64) -> Option<i64> {
    let date = snapshot.split_whitespace().nth(2)?.get(..10)?;
    let mut fields = date.split('-').map(str::parse::<i64>);
    let (year, month, day) = (
        fields.next()?.ok()?,
        fields.next()?.ok()?,
        fields.next()?.ok()?,
    );
    Some(now_days - days_since_epoch(year, month, day))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's algorithm).
fn days_since_epoch(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advisory_snapshot_is_dated_by_its_commit() {
        assert_eq!(days_since_epoch(1970, 1, 1), 0);
        assert_eq!(days_since_epoch(2000, 3, 1), 11_017);
        let snapshot = "https://github.com/rustsec/advisory-db abc 2026-08-21T08:28:40+02:00\n";
        let now = days_since_epoch(2026, 12, 3);
        assert_eq!(snapshot_age_days(snapshot, now), Some(104));
        assert_eq!(snapshot_age_days("no date", now), None);
        let vendored = std::fs::read_to_string(workspace_root().join(ADVISORY_SNAPSHOT)).unwrap();
        assert!(snapshot_age_days(&vendored, now).is_some());
    }
}
