//! Where the workspace is, how cargo is run in it, and which Rust it declares: what every task
//! needs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

/// `cargo`, run in the workspace at `root`.
pub fn cargo(root: &Path) -> Command {
    let mut cargo = Command::new("cargo");
    // Without xtask's own package variables, which `cargo run` set: the builds here then match
    // those run from a shell and from the tests' harness, and share their artifacts.
    vmtrace_ebpf_toolchain::package_variables::remove(&mut cargo);
    cargo.current_dir(root);
    cargo
}

/// The workspace this xtask belongs to.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where cargo builds: `CARGO_TARGET_DIR`, or the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// The rustup toolchain of the workspace's `rust-version` (e.g. `1.95` gives `1.95.0`).
pub fn msrv_toolchain(root: &Path) -> Result<String> {
    let manifest = root.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let version = rust_version(&text).with_context(|| {
        format!(
            "{} declares no [workspace.package] rust-version",
            manifest.display()
        )
    })?;
    Ok(match version.split('.').count() {
        2 => format!("{version}.0"),
        _ => version,
    })
}

/// The `[workspace.package]` `rust-version` of a manifest.
fn rust_version(manifest: &str) -> Option<String> {
    let manifest: toml::Table = toml::from_str(manifest).ok()?;
    let version = manifest
        .get("workspace")?
        .get("package")?
        .get("rust-version")?;
    version.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_msrv_is_read_from_the_workspace_manifest() {
        let manifest = "[workspace.package]\nedition = \"2024\"\nrust-version = \"1.95\"\n";
        assert_eq!(rust_version(manifest).as_deref(), Some("1.95"));
        assert_eq!(rust_version("[package]\n"), None);
        let root = workspace_root();
        assert!(msrv_toolchain(&root).unwrap().starts_with("1."));
    }
}
