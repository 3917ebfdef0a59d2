//! The one place that knows how to run cargo on the eBPF crate (`ebpf/`): `agent/build.rs` builds the
//! object with it, `cargo xtask test` lints the crate with it.
//!
//! `bpfel-unknown-none` ships no precompiled `core`, so the crate is built with `-Z build-std=core`,
//! which needs the library sources. Two toolchains qualify: Debian's rustc-web with rust-web-src (run
//! with `RUSTC_BOOTSTRAP=1`, as a stable compiler takes no `-Z` flags otherwise) and a rustup nightly
//! with its rust-src component. `$VMTRACE_EBPF_CARGO` overrides both.

pub mod package_variables;

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

/// The BPF target the probes are built for.
pub const TARGET: &str = "bpfel-unknown-none";
/// The cargo profile of the BPF build, defined in the root manifest.
pub const PROFILE: &str = "bpf";
/// The eBPF crate's package name.
pub const PACKAGE: &str = "vmtrace-ebpf";
/// The name of the eBPF crate's binary, the BPF object.
pub const BINARY: &str = "vmtrace";
/// The environment variable that names a cargo to use instead of the ones found here.
pub const CARGO_OVERRIDE: &str = "VMTRACE_EBPF_CARGO";

/// Rust flags of the BPF build (those aya-build passes): aya-ebpf selects its architecture-specific
/// helpers with the cfg; `--btf` makes bpf-linker emit BTF, which the loader relocates maps and
/// globals with, from the debug info.
const RUSTFLAGS: &str = "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf";

/// Where Debian's rust-web-src puts the `core` sources.
const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
/// Debian's cargo-web and rustc-web.
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

/// Variables through which the calling build (a build script runs inside cargo's environment, xtask
/// inside `cargo run`'s) would impose its own compiler: Debian's cargo would then run rustup's rustc
/// and look for the `core` sources in rustup's sysroot.
const INHERITED_BUILD_VARIABLES: [&str; 9] = [
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTUP_TOOLCHAIN",
    "CARGO_MAKEFLAGS",
];

#[derive(Debug, thiserror::Error)]
#[error(
    "no Rust toolchain with the core library sources is installed, so the eBPF programs cannot be \
     built: run `cargo xtask setup` (installs Debian's rustc-web, rust-web-src and bpf-linker), or set \
     VMTRACE_EBPF_STUB=1 to check the host crates without them"
)]
pub struct NoToolchain;

/// A toolchain that can build the eBPF crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Toolchain {
    /// The cargo named by `$VMTRACE_EBPF_CARGO`.
    Override(OsString),
    /// Debian's cargo-web and rustc-web with rust-web-src, through `RUSTC_BOOTSTRAP=1`.
    Debian,
    /// `rustup run nightly cargo`, that nightly having rust-src.
    RustupNightly,
}

impl Toolchain {
    /// The first toolchain of this machine that qualifies: the override, Debian's, rustup's nightly.
    ///
    /// # Errors
    /// [`NoToolchain`] when none is installed.
    pub fn find() -> Result<Self, NoToolchain> {
        if let Some(cargo) = env::var_os(CARGO_OVERRIDE) {
            return Ok(Self::Override(cargo));
        }
        if Path::new(DEBIAN_RUST_SRC).is_dir() && Path::new(DEBIAN_CARGO).is_file() {
            return Ok(Self::Debian);
        }
        if rustup_nightly_has_rust_src() {
            return Ok(Self::RustupNightly);
        }
        Err(NoToolchain)
    }

    /// `cargo <subcommand>` for the eBPF crate in the workspace at `workspace_root`: this toolchain's
    /// cargo and compiler, none of the calling build's compiler settings, the BPF target with `core`
    /// built from source, the `bpf` profile and the BPF Rust flags. Append further arguments (e.g.
    /// `--target-dir`, `-- -D warnings`).
    #[must_use]
    pub fn cargo(&self, subcommand: &str, workspace_root: &Path) -> Command {
        let mut cargo = match self {
            Self::Override(cargo) => clean_command(cargo),
            Self::Debian => {
                let mut cargo = clean_command(DEBIAN_CARGO);
                // /usr/bin first, so that `cargo clippy` finds Debian's cargo-clippy, which matches
                // Debian's compiler, rather than rustup's proxy.
                let path = env::var_os("PATH").unwrap_or_default();
                let path = env::join_paths(
                    std::iter::once(PathBuf::from("/usr/bin")).chain(env::split_paths(&path)),
                )
                .unwrap_or(path);
                cargo
                    .env("PATH", path)
                    .env("RUSTC", DEBIAN_RUSTC)
                    .env("RUSTC_BOOTSTRAP", "1");
                cargo
            }
            Self::RustupNightly => {
                let mut cargo = clean_command("rustup");
                cargo.args(["run", "nightly", "cargo"]);
                cargo
            }
        };
        cargo
            .current_dir(workspace_root)
            .arg(subcommand)
            .args([
                "--package",
                PACKAGE,
                "--target",
                TARGET,
                "--profile",
                PROFILE,
            ])
            .args(["-Z", "build-std=core"])
            .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS);
        cargo
    }
}

impl Toolchain {
    /// What builds the BPF object, for `vmtrace --version`: the compiler's and bpf-linker's own
    /// version lines (`unknown` where one does not answer).
    #[must_use]
    pub fn describe(&self) -> String {
        let first_line = |command: &mut Command| {
            command
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .map(|l| l.trim().to_owned())
                })
                .unwrap_or_else(|| "unknown".to_owned())
        };
        let rustc = match self {
            Self::Override(cargo) => first_line(clean_command(cargo).args(["--version"])),
            Self::Debian => first_line(clean_command(DEBIAN_RUSTC).arg("--version")),
            Self::RustupNightly => {
                first_line(clean_command("rustup").args(["run", "nightly", "rustc", "--version"]))
            }
        };
        let linker = first_line(clean_command("bpf-linker").arg("--version"));
        format!("{rustc}, {linker}")
    }
}

/// [`Toolchain::find`], then [`Toolchain::cargo`].
///
/// # Errors
/// [`NoToolchain`] when no toolchain of this machine can build for the BPF target.
pub fn cargo(subcommand: &str, workspace_root: &Path) -> Result<Command, NoToolchain> {
    Ok(Toolchain::find()?.cargo(subcommand, workspace_root))
}

/// Where `cargo build` with [`cargo`] leaves the BPF object, under `target_dir`.
#[must_use]
pub fn object_path(target_dir: &Path) -> PathBuf {
    target_dir.join(TARGET).join(PROFILE).join(BINARY)
}

/// A command that inherits none of the calling build's compiler settings.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    for key in INHERITED_BUILD_VARIABLES {
        command.env_remove(key);
    }
    command
}

fn rustup_nightly_has_rust_src() -> bool {
    let Ok(output) = clean_command("rustup")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_builds_the_ebpf_package_for_the_bpf_target_without_the_callers_compiler() {
        let cargo = Toolchain::Debian.cargo("build", Path::new("/workspace"));
        let args: Vec<_> = cargo.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "build",
                "--package",
                "vmtrace-ebpf",
                "--target",
                "bpfel-unknown-none",
                "--profile",
                "bpf",
                "-Z",
                "build-std=core"
            ]
        );
        let envs: Vec<_> = cargo.get_envs().collect();
        assert!(envs.contains(&("RUSTUP_TOOLCHAIN".as_ref(), None)));
        assert!(envs.contains(&("RUSTC".as_ref(), Some(DEBIAN_RUSTC.as_ref()))));
        assert_eq!(cargo.get_current_dir(), Some(Path::new("/workspace")));
        assert_eq!(
            object_path(Path::new("/t")),
            Path::new("/t/bpfel-unknown-none/bpf/vmtrace")
        );
    }
}
