//! Project tasks: `cargo xtask setup | test | vm-test | kernel-matrix | fuzz | demo | bench | soak | image | seccomp`. Run `cargo xtask --help`.

mod bench;
mod demo;
mod emulated;
mod fuzz;
mod image;
mod kernel_matrix;
mod seccomp;
mod setup;
mod soak;
mod test;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// vmtrace's project tasks. Each one installs what it needs first (idempotently).
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install and start what building, checking and running vmtrace needs on this machine: Debian's
    /// Rust toolchain with library sources (rustc-web, rust-web-src) for the BPF target, bpf-linker
    /// built against LLVM 22, cargo-deny, the rust-version toolchain, bpftool, and a mounted tracefs.
    /// Takes seconds when nothing is missing.
    Setup,
    /// Set up, then run every check: rustfmt, clippy (every crate, the eBPF crate also for the BPF
    /// target), the seccomp profile against the runtime's default, the image build, all tests, the
    /// fuzz targets for 20 seconds each, cargo-deny, a build with the workspace's rust-version and
    /// `cargo doc` without warnings. With VMTRACE_REQUIRE_CAPS=1 a test that lacks KVM, BPF or
    /// root fails instead of skipping.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        cargo_test_args: Vec<String>,
    },
    /// Build the fuzz targets (fuzz/: cgroup paths, tracefs format files, the agent's configuration
    /// file, recordings) with cargo-fuzz on the stable toolchain, installing cargo-fuzz when missing,
    /// and run each for a while from a scratch copy of its committed seeds. Fails on any crash,
    /// naming the input that reproduces it (docs/fuzzing.md).
    Fuzz {
        /// How long each target runs, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The targets to run (all when none is given).
        targets: Vec<String>,
    },
    /// Set up, then boot every kernel Debian offers here as an emulated AMD-V host (QEMU/TCG), run
    /// the agent and the reference VMM's tenants inside, and check that the counts from
    /// `kvm:kvm_exit` equal the VMMs' (tests/tests/svm_host.rs, docs/svm-host.md); then boot it
    /// with QEMU's AMD and Intel IOMMUs and check a VFIO tenant's DMA mappings
    /// (tests/tests/iommu_host.rs, docs/iommu.md). About 3 minutes with the release binaries
    /// built; `cargo xtask test` runs it too.
    VmTest,
    /// Set up, build, then boot every kernel Debian offers here as an emulated AMD-V host, and on
    /// each and on this host's own kernel run `vmtrace doctor` and `vmtrace watch` while the
    /// reference VMM runs every scenario: which probes attach, which fire. Writes
    /// docs/kernel-matrix.md. About 5 minutes with the release binaries built.
    KernelMatrix,
    /// Set up, build, then run the reference VMM in three tenant cgroups while the agent shows its
    /// live per-tenant view: `vmtrace top` in a terminal (q quits), `vmtrace watch` otherwise.
    Demo {
        /// How long the demo runs, in seconds, when not in a terminal.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Set up, build, then measure what vmtrace costs the guests it watches beside bpftrace and
    /// perf, the agent's own CPU and memory, and how it scales with tenants, and what tracing
    /// kvm_exit costs on the emulated AMD-V host; installs bpftrace and perf when missing and
    /// writes docs/benchmarks.md. Takes about 20 minutes (--quick: 3 to 6; --svm-only: 6).
    Bench(bench::BenchArgs),
    /// Set up, build, then run the soak test for this long: tenants' cgroups created and removed
    /// continuously, VMMs coming and going, doorbells re-registered and clients hammering the
    /// endpoint, while two long-lived tenants run guests. Checks afterwards that the agent's
    /// memory stayed flat, no descriptor or BPF object leaked, and the long-lived tenants' counts
    /// are exact. `cargo xtask test` runs it for 2 minutes.
    Soak {
        /// How long the churn runs, in minutes.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Build the agent's container image from source with podman (deploy/Containerfile: a build
    /// stage with Debian's rustc-web and bpf-linker, a Debian slim runtime stage), tagged
    /// `localhost/vmtrace:<version>` and `localhost/vmtrace:dev`. Makes the Debian base images it
    /// names with debootstrap when they are absent, so no registry is needed. About 7 minutes the
    /// first time on 2 CPUs.
    Image,
    /// Write deploy/seccomp/vmtrace.json: the runtime default seccomp profile (containers-common's,
    /// as CRI-O and podman apply it) with bpf() and perf_event_open() allowed without
    /// CAP_SYS_ADMIN.
    Seccomp {
        /// Fail instead of writing when the shipped profile differs from the installed default's.
        #[arg(long)]
        check: bool,
    },
    /// The benchmark's own tracer, run by it inside the emulated host: per-tenant counters (or
    /// empty programs) on the given events, `name` for a raw tracepoint, `group:name` for a
    /// classic one; attached until SIGINT or SIGTERM, then prints what each counted.
    #[command(hide = true)]
    RawTracer {
        /// Programs that do nothing, instead of counters.
        #[arg(long)]
        empty: bool,
        #[arg(required = true)]
        events: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::VmTest => test::vm_test(),
        Task::KernelMatrix => kernel_matrix::run(),
        Task::Test { cargo_test_args } => test::run(&cargo_test_args),
        Task::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Task::Demo { seconds } => demo::run(seconds),
        Task::Bench(args) => bench::run(&args),
        Task::Soak { minutes } => soak::run(minutes),
        Task::Image => image::run(&workspace::workspace_root()),
        Task::Seccomp { check } => seccomp::run(&workspace::workspace_root(), check),
        Task::RawTracer { empty, events } => bench::raw_tracer(&events, empty),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
