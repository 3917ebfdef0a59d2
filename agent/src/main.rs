//! The `vmtrace` command.

use std::{process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use vmtrace::{doctor, probes::ProbeOptions, watch};

/// vmtrace: which tenant's VMs are exiting, why, and what it costs them.
///
/// vmtrace counts KVM exits in the kernel with eBPF and attributes them to tenants: cgroup v2 groups
/// resolved to Kubernetes pods, libvirt VMs, systemd units or plain paths. It needs root (or
/// CAP_BPF and CAP_PERFMON); `vmtrace doctor` checks a host.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check whether vmtrace can run here: kernel, BTF, tracefs, KVM flavour (VMX/SVM/PVM),
    /// which probes attach and which exit source is used, cgroup v2, privileges, perf counters.
    /// Exits non-zero when vmtrace cannot run on this host.
    Doctor {
        /// Print the diagnosis as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Live per-tenant view: exit counts since start and rates per tenant and kind, every interval.
    ///
    /// Kinds: `exit.<reason>` are KVM_RUN returns to the VMM (io, mmio, hlt, ...); `pio.in`/`pio.out`
    /// port accesses; `mmio.write`/`mmio.read` MMIO accesses; `mmio.write.kernel` MMIO writes the
    /// kernel completed itself (ioeventfd doorbells); `cpuid`; `kvm_exit.<reason>` on VMX/SVM hosts.
    /// Stops after --duration, or on Ctrl-C/SIGTERM, printing a last report marked final.
    Watch {
        /// Time between reports, e.g. `1s`, `500ms`.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: Duration,
        /// Stop after this long, e.g. `30s`, `5m`. Runs until interrupted when absent.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// One JSON object per report and line, for scripts.
        #[arg(long)]
        json: bool,
        /// Also measure kick service latency (a queue's first kick to its VMM's read of the
        /// doorbell eventfd), reported under `kick.q<N>`. Attaches syscalls:sys_enter_read, which
        /// runs on every read() of the host, so it is off by default.
        #[arg(long)]
        kick_latency: bool,
    },
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if interval < Duration::from_millis(10) {
        return Err("the interval must be at least 10ms".to_owned());
    }
    Ok(interval)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMTRACE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmtrace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor { json } => {
            let diagnosis = doctor::diagnose();
            if json {
                println!("{}", serde_json::to_string_pretty(&diagnosis)?);
            } else {
                print!("{}", doctor::render(&diagnosis));
            }
            Ok(if diagnosis.blockers.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Watch {
            interval,
            duration,
            json,
            kick_latency,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(watch::run(&watch::WatchOptions {
                interval,
                duration,
                json,
                probes: ProbeOptions { kick_latency },
            }))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
