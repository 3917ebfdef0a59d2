//! `cargo xtask test`: formatting, lints and every test, then the dependency, MSRV and documentation
//! checks. Each step prints how long it took.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result};

use crate::setup;

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
    step("cargo test", || {
        setup::exec(
            cargo(&root)
                .args(["test", "--workspace"])
                .args(cargo_test_args)
                // The end-to-end tests print what they checked (exits, kinds, tenants); show it.
                .args(["--", "--show-output"]),
        )
    })?;
    step("cargo deny (licences, bans, sources, advisories)", || {
        // --offline: the advisory database is the vendored copy deny.toml points at.
        setup::exec(cargo(&root).args(["deny", "--offline", "check"]))
    })?;
    let msrv = msrv_toolchain(&root)?;
    step(&format!("MSRV: cargo check with Rust {msrv}"), || {
        setup::exec(
            setup::rustup_run(&msrv, "cargo")
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

/// Runs one named step and says how long it took.
fn step(name: &str, run: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("test: {name}");
    let started = Instant::now();
    let result = run();
    eprintln!("test: {name}: {:.1}s", started.elapsed().as_secs_f64());
    result
}

fn cargo(root: &Path) -> Command {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(root);
    cargo
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The rustup toolchain of the workspace's `rust-version` (e.g. `1.95` gives `1.95.0`).
pub fn msrv_toolchain(root: &Path) -> Result<String> {
    let manifest = root.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let version = rust_version(&text)
        .with_context(|| format!("{} declares no rust-version", manifest.display()))?;
    Ok(match version.split('.').count() {
        2 => format!("{version}.0"),
        _ => version.to_owned(),
    })
}

/// The value of the first `rust-version = "..."` line of a manifest.
fn rust_version(manifest: &str) -> Option<&str> {
    manifest.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "rust-version").then(|| value.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_msrv_is_read_from_the_workspace_manifest() {
        let manifest = "[workspace.package]\nedition = \"2024\"\nrust-version = \"1.95\"\n";
        assert_eq!(rust_version(manifest), Some("1.95"));
        assert_eq!(rust_version("[package]\n"), None);
        let root = workspace_root();
        assert!(msrv_toolchain(&root).unwrap().starts_with("1."));
    }
}
