//! Builds the eBPF programs (crate `ebpf/`) for the BPF target and leaves the object in `OUT_DIR`, where
//! `src/probe/load.rs` embeds it. The toolchain that can (a compiler with the `core` sources, and
//! bpf-linker) is found by `vmtrace-ebpf-toolchain`; `cargo xtask setup` installs it.
//!
//! With `VMTRACE_EBPF_STUB=1` an empty object is embedded instead, so that the host crates can be
//! checked, linted and documented on a machine without that toolchain; such an agent refuses to load
//! its probes.

use std::{
    env,
    path::{Path, PathBuf},
};

use vmtrace_ebpf_toolchain as ebpf_toolchain;

const STUB: &str = "VMTRACE_EBPF_STUB";

fn main() {
    export_version();
    println!(
        "cargo:rustc-env=VMTRACE_BPF_TOOLCHAIN={}",
        if env::var_os(STUB).is_some_and(|v| v == "1") {
            "none (built with VMTRACE_EBPF_STUB=1)".to_owned()
        } else {
            ebpf_toolchain::Toolchain::find().map_or_else(|e| e.to_string(), |t| t.describe())
        }
    );
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let workspace_root = manifest_dir.join("..");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let object = out_dir.join("vmtrace.bpf.o");
    println!("cargo:rerun-if-env-changed={STUB}");
    println!(
        "cargo:rerun-if-env-changed={}",
        ebpf_toolchain::CARGO_OVERRIDE
    );
    if env::var_os(STUB).is_some_and(|v| v == "1") {
        println!(
            "cargo:warning={STUB}=1: the eBPF programs were not built; this vmtrace cannot load probes"
        );
        std::fs::write(&object, [])
            .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", object.display())));
        return;
    }
    for path in ["ebpf/src", "common/src", "ebpf/Cargo.toml", "Cargo.toml"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace_root.join(path).display()
        );
    }

    let target_dir = ebpf_target_dir(&out_dir);
    let mut cargo =
        ebpf_toolchain::cargo("build", &workspace_root).unwrap_or_else(|e| fail(&e.to_string()));
    cargo.arg("--target-dir").arg(&target_dir);
    let status = cargo
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run {cargo:?}: {e}")));
    if !status.success() {
        fail(
            "building the eBPF programs failed (see the errors above); `cargo xtask setup` installs \
             the toolchain and bpf-linker, and VMTRACE_EBPF_STUB=1 checks the host crates without them",
        );
    }
    let built = ebpf_toolchain::object_path(&target_dir);
    std::fs::copy(&built, &object)
        .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", built.display())));
}

/// Where the eBPF crate is built: `ebpf/` in the outer build's target directory, so that every
/// build of the agent (check, test, doc, another toolchain) shares one BPF build instead of each
/// keeping its own 400 MB copy (`core` built from source) in its `OUT_DIR`. `OUT_DIR` is
/// `<target>/[<triple>/]<profile>/build/vmtrace-<hash>/out`; a layout other than that keeps the build
/// in `OUT_DIR`. The inner cargo locks its own directory, so concurrent builds wait for each other.
fn ebpf_target_dir(out_dir: &Path) -> PathBuf {
    let mut ancestors = out_dir.ancestors();
    match (ancestors.nth(2), ancestors.nth(1)) {
        (Some(build), Some(target)) if build.file_name().is_some_and(|n| n == "build") => {
            target.join("ebpf")
        }
        _ => out_dir.join("ebpf-target"),
    }
}

/// `VMTRACE_VERSION`, what `vmtrace --version` prints: the crate's version and, when the build was
/// given one (the image build passes the commit), `VMTRACE_REVISION`; and that revision alone as
/// `VMTRACE_BUILD_REVISION` (`unknown` without), for vmtrace.build.info.
fn export_version() {
    println!("cargo:rerun-if-env-changed=VMTRACE_REVISION");
    let version = env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let revision = env::var("VMTRACE_REVISION")
        .ok()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty());
    let version = match &revision {
        Some(revision) => format!("{version} ({revision})"),
        None => version,
    };
    println!("cargo:rustc-env=VMTRACE_VERSION={version}");
    println!(
        "cargo:rustc-env=VMTRACE_BUILD_REVISION={}",
        revision.as_deref().unwrap_or("unknown")
    );
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
