//! Installs what the build and the agent need, skipping whatever is already there.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use vmtrace_common::mounts::{self, MountTable};

/// Debian packages: a rustc with the core library sources (the BPF target needs `-Z build-std=core`;
/// rustup cannot add rust-src here) and its clippy; LLVM 22 to build bpf-linker; bpftool for people;
/// a C compiler and the kernel headers for the tests' foreign VMM.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
    // The end-to-end tests build a small C VMM.
    "gcc",
    "libc6-dev",
    "linux-libc-dev",
    "tmux", // tests/tests/top.rs drives `vmtrace top` in a terminal
    // tests/tests/dashboards.rs runs every dashboard query through a real Prometheus;
    // tests/tests/deploy.rs installs kubernetes-validate into a venv and setcap's the agent.
    "prometheus",
    "python3-venv",
    "libcap2-bin",
    // tests/tests/web_tls.rs makes certificates and checks refusals with a real client.
    "openssl",
    "curl",
    // tests/tests/container.rs runs the image `cargo xtask image` builds from a debootstrapped base.
    "podman",
    "runc",
    "debootstrap",
    // tests/tests/svm_host.rs boots Debian kernels as an emulated AMD-V host (docs/svm-host.md).
    "qemu-system-x86",
];

pub fn run() -> Result<()> {
    let started = Instant::now();
    install_packages(PACKAGES)?;
    install_kubectl()?;
    install_bpf_linker()?;
    install_cargo_deny()?;
    install_msrv_toolchain()?;
    mount_tracefs()?;
    check_cgroup_v2()?;
    eprintln!("setup: ready ({:.1}s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// kubectl, which tests/tests/deploy.rs renders the kustomize base with: Debian's
/// kubernetes-client, unless a kubectl is already installed (another package of it would
/// conflict with that one's files).
fn install_kubectl() -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", "command -v kubectl"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Ok(());
    }
    install_packages(&["kubernetes-client"])
}

/// Installs the Debian packages that are missing, if any.
pub fn install_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    exec(Command::new("apt-get").args(["update", "-q"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// bpf-linker links the BPF object; it is built against Debian's LLVM 22.
fn install_bpf_linker() -> Result<()> {
    if Command::new(bpf_linker_path())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against LLVM 22 (about a minute)");
    let llvm = Path::new("/usr/lib/llvm-22");
    let path = format!(
        "{}:{}",
        llvm.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    exec(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", llvm)
            .env("PATH", path),
    )
}

/// The cargo-deny release deny.toml is written for; built from crates.io (about two minutes).
const CARGO_DENY: &str = "cargo-deny@0.20.2";

/// cargo-deny checks licences, duplicate crates, sources and advisories (`cargo xtask test`).
fn install_cargo_deny() -> Result<()> {
    if Command::new("cargo")
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("setup: building {CARGO_DENY} (about two minutes)");
    exec(Command::new("cargo").args(["install", "--locked", CARGO_DENY]))
}

/// The toolchain of the workspace's rust-version, for the MSRV check of `cargo xtask test`: an
/// installed one where its compiler has that version (rustup's stable often does), else rustup
/// installs it (a minimal profile: rustc, cargo and the standard library).
fn install_msrv_toolchain() -> Result<()> {
    let msrv = crate::workspace::msrv_toolchain(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))?;
    if msrv_runner(&msrv).is_some() {
        return Ok(());
    }
    eprintln!("setup: installing Rust {msrv} for the MSRV check");
    exec(Command::new("rustup").args(["toolchain", "install", &msrv, "--profile", "minimal"]))
}

/// An installed rustup toolchain whose compiler is exactly `msrv` (e.g. `1.95.0`).
pub fn msrv_runner(msrv: &str) -> Option<String> {
    [msrv, "stable"]
        .into_iter()
        .map(str::to_owned)
        .find(|toolchain| {
            rustup_run(toolchain, "rustc")
                .arg("--version")
                .output()
                .is_ok_and(|o| {
                    o.status.success()
                        && String::from_utf8_lossy(&o.stdout).starts_with(&format!("rustc {msrv} "))
                })
        })
}

/// `rustup run <toolchain> <program>`, without the calling cargo's choice of compiler.
pub fn rustup_run(toolchain: &str, program: &str) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", toolchain, program])
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN");
    command
}

fn bpf_linker_path() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    cargo_home.join("bin/bpf-linker")
}

/// Classic tracepoints (kvm:kvm_exit) are attached through tracefs, which some hosts do not mount.
fn mount_tracefs() -> Result<()> {
    if mount_table()?.tracefs().is_some() {
        return Ok(());
    }
    eprintln!("setup: mounting tracefs at /sys/kernel/tracing");
    exec(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

fn mount_table() -> Result<MountTable> {
    MountTable::read().with_context(|| format!("reading {}", mounts::MOUNTINFO))
}

fn check_cgroup_v2() -> Result<()> {
    if mount_table()?.cgroup2().is_none() {
        bail!(
            "no cgroup v2 hierarchy is mounted; tenants are cgroup v2 groups (mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`)"
        );
    }
    Ok(())
}

pub fn exec(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
