//! `cargo xtask test`: formatting, lints and every test, for the host crates and the eBPF crate.

use std::process::Command;

use anyhow::Result;

use crate::setup;

pub fn run(cargo_test_args: &[String]) -> Result<()> {
    setup::run()?;
    eprintln!("test: rustfmt");
    setup::exec(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    setup::exec(Command::new("cargo").args(["fmt", "--manifest-path", EBPF_MANIFEST, "--check"]))?;
    eprintln!("test: clippy");
    setup::exec(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    setup::exec(ebpf_cargo().args([
        "clippy",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    eprintln!("test: cargo test");
    setup::exec(
        Command::new("cargo")
            .args(["test", "--workspace"])
            .args(cargo_test_args)
            // The end-to-end tests print what they checked (exits, kinds, tenants); show it.
            .args(["--", "--show-output"]),
    )
}

const EBPF_MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/Cargo.toml");

/// Debian's cargo for the eBPF crate, which builds `core` from source for the BPF target. /usr/bin
/// comes first in PATH so that cargo finds Debian's cargo-clippy, which matches that compiler.
fn ebpf_cargo() -> Command {
    let mut cargo = Command::new("/usr/bin/cargo");
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    cargo
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"))
        .env("PATH", path)
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        );
    cargo
}
