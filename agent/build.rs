//! Builds the eBPF programs (crate `ebpf/`) for the BPF target and leaves the object in OUT_DIR, where
//! `src/probe/load.rs` embeds it. The BPF target needs a compiler with the `core` library sources
//! (`-Z build-std=core`) and bpf-linker; `cargo xtask setup` installs both. Two toolchains qualify:
//! Debian's rustc-web with rust-web-src (used through RUSTC_BOOTSTRAP, as stable compilers do not
//! take `-Z` flags otherwise) and a rustup nightly with its rust-src component.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let ebpf_dir = manifest_dir.join("../ebpf");
    let common_dir = manifest_dir.join("../common");
    for dir in [&ebpf_dir.join("src"), &common_dir.join("src")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.toml").display()
    );
    println!("cargo:rerun-if-env-changed=VMTRACE_EBPF_CARGO");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let target_dir = out_dir.join("ebpf-target");
    let mut cargo = ebpf_cargo();
    cargo
        .current_dir(&ebpf_dir)
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // aya-ebpf selects its architecture-specific helpers with this cfg; --btf makes bpf-linker emit BTF.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    let status = cargo
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run {cargo:?}: {e}")));
    if !status.success() {
        fail("building the eBPF programs failed (see the errors above)");
    }
    let object = target_dir.join("bpfel-unknown-none/release/vmtrace");
    std::fs::copy(&object, out_dir.join("vmtrace.bpf.o"))
        .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", object.display())));
}

/// A command that inherits none of the host build's compiler settings, which this script runs inside.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

/// The cargo command that can build for the BPF target on this machine.
fn ebpf_cargo() -> Command {
    if let Some(cargo) = env::var_os("VMTRACE_EBPF_CARGO") {
        return clean_command(cargo);
    }
    if Path::new(DEBIAN_RUST_SRC).is_dir() && Path::new("/usr/bin/cargo").is_file() {
        let mut cmd = clean_command("/usr/bin/cargo");
        cmd.env("RUSTC", "/usr/bin/rustc")
            .env("RUSTC_BOOTSTRAP", "1");
        return cmd;
    }
    if rustup_nightly_has_rust_src() {
        let mut cmd = clean_command("rustup");
        cmd.args(["run", "nightly", "cargo"]);
        return cmd;
    }
    fail(
        "no Rust toolchain with the core library sources is installed, so the eBPF programs cannot be \
         built: run `cargo xtask setup` (installs Debian's rustc-web, rust-web-src and bpf-linker)",
    )
}

fn rustup_nightly_has_rust_src() -> bool {
    let Ok(output) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&output.stdout);
    output.status.success()
        && Path::new(sysroot.trim())
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
