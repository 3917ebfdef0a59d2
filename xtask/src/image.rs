//! `cargo xtask image`: the agent's container image, built from source with podman from
//! deploy/Containerfile. No registry is needed: the Debian base images it names are made locally
//! (debootstrap, then `podman import`) when they are absent.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result};

use crate::setup::{exec, install_packages};

/// The tag the image gets, beside its version's; the tests run this one.
pub const DEV_TAG: &str = "localhost/vmtrace:dev";
/// The base images deploy/Containerfile names, fully qualified so that podman does not ask.
const BASE_IMAGES: [&str; 2] = [
    "docker.io/library/debian:bookworm",
    "docker.io/library/debian:bookworm-slim",
];
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// The host's trusted authorities, for the build's RUN steps: a build host that reaches crates.io
/// through a TLS-inspecting proxy (these machines do) trusts the proxy's authority there, and the
/// build stage must too. ca-certificates in the build stage adds every file of
/// /usr/local/share/ca-certificates to its bundle; the runtime stage installs none, so the image
/// does not carry them (docs/building.md).
fn host_ca_volume() -> Vec<String> {
    const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
    const BUILD_CA: &str = "/usr/local/share/ca-certificates/build-host.crt";
    if Path::new(HOST_CA_BUNDLE).is_file() {
        vec![format!("--volume={HOST_CA_BUNDLE}:{BUILD_CA}:ro")]
    } else {
        Vec::new()
    }
}

/// The flags `podman build` and `podman run` need on these machines: crun refuses a hybrid cgroup
/// layout, and root here lacks CAP_SYS_RESOURCE, which podman's default rlimits need
/// (docs/deploy.md).
pub const PODMAN_HOST_FLAGS: [&str; 3] = [
    "--runtime=runc",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=1024:1024",
];

pub fn run(workspace_root: &Path) -> Result<()> {
    let started = Instant::now();
    install_packages(&["podman", "runc", "debootstrap"])?;
    for base in BASE_IMAGES {
        if !image_exists(base) {
            make_base_image(base)?;
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    let revision = revision(workspace_root);
    let version_tag = format!("localhost/vmtrace:{version}");
    eprintln!("image: building {version_tag} ({revision}) from deploy/Containerfile");
    exec(
        podman()
            .arg("build")
            .args(PODMAN_HOST_FLAGS)
            .args(["--file", "deploy/Containerfile"])
            .args(["--build-arg", &format!("VERSION={version}")])
            .args(["--build-arg", &format!("REVISION={revision}")])
            .args(["--tag", &version_tag, "--tag", DEV_TAG])
            .args(host_ca_volume())
            .arg(".")
            .current_dir(workspace_root),
    )?;
    eprintln!(
        "image: {DEV_TAG} and {version_tag} built in {:.0}s ({})",
        started.elapsed().as_secs_f64(),
        image_size(DEV_TAG)
    );
    Ok(())
}

fn podman() -> Command {
    Command::new("podman")
}

pub fn image_exists(image: &str) -> bool {
    podman()
        .args(["image", "exists", image])
        .status()
        .is_ok_and(|s| s.success())
}

/// A minimal Debian root filesystem (debootstrap's minbase, what the official images start from,
/// without the downloaded packages and lists) imported as `image`; the `-slim` one also without
/// documentation, manual pages and translations.
fn make_base_image(image: &str) -> Result<()> {
    let rootfs = crate::workspace::target_dir().join("image-rootfs");
    if !rootfs.join("etc/debian_version").is_file() {
        eprintln!("image: making a {SUITE} root filesystem with debootstrap (about 30 s)");
        let partial = PathBuf::from(format!("{}.partial", rootfs.display()));
        let _ = std::fs::remove_dir_all(&partial);
        exec(
            Command::new("debootstrap")
                .args(["--variant=minbase", SUITE])
                .arg(&partial)
                .arg(MIRROR)
                .stdout(std::process::Stdio::null()),
        )?;
        for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            exec(
                Command::new("find")
                    .arg(partial.join(dir))
                    .args(["-type", "f", "-delete"]),
            )?;
        }
        std::fs::rename(&partial, &rootfs)
            .with_context(|| format!("moving {} into place", partial.display()))?;
    }
    eprintln!("image: importing {image}");
    let slim = if image.ends_with("-slim") {
        "--exclude=./usr/share/doc/* --exclude=./usr/share/man/* --exclude=./usr/share/info/* \
         --exclude=./usr/share/locale/*"
    } else {
        ""
    };
    let script = format!(
        "tar -C {} --numeric-owner {slim} -c . | podman import - {image} >/dev/null",
        rootfs.display()
    );
    exec(Command::new("sh").args(["-c", &script]))
}

/// The commit the image is built from, `-dirty` when the work tree has changes.
fn revision(workspace_root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match (git(&["rev-parse", "HEAD"]), git(&["status", "--porcelain"])) {
        (Some(head), Some(changes)) if !changes.is_empty() => format!("{head}-dirty"),
        (Some(head), _) => head,
        _ => "unknown".to_owned(),
    }
}

fn image_size(image: &str) -> String {
    podman()
        .args(["image", "inspect", "--format", "{{.Size}}", image])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or_else(
            || "size unknown".to_owned(),
            |bytes| format!("{:.0} MiB", bytes / (1024.0 * 1024.0)),
        )
}
