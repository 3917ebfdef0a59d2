//! The `vmtrace` command line: one module per command, and the argument types they share.

pub(crate) mod agent;
mod args;
mod doctor;
pub(crate) mod log;
mod record;
mod replay;
pub mod report;
mod top;
mod watch;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use thiserror::Error;

use crate::sample::recording::RecordingError;

/// vmtrace: which tenant's VMs are exiting, why, and what it costs them.
///
/// vmtrace counts KVM exits in the kernel with eBPF and attributes them to tenants: cgroup v2 groups
/// resolved to Kubernetes pods, libvirt VMs, systemd units or plain paths. It needs root (or
/// CAP_BPF and CAP_PERFMON); `vmtrace doctor` checks a host.
#[derive(Debug, Parser)]
#[command(
    version = env!("VMTRACE_VERSION"),
    long_version = concat!(
        env!("VMTRACE_VERSION"),
        "\nBPF programs built with: ",
        env!("VMTRACE_BPF_TOOLCHAIN")
    ),
    propagate_version = true
)]
pub struct Cli {
    /// How the log is written on stderr: `text`, or `json` (one object per line, for a log
    /// pipeline); the level comes from VMTRACE_LOG (default `warn`).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "VMTRACE_LOG_FORMAT",
        default_value_t
    )]
    log_format: log::LogFormat,
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
    Watch(watch::WatchArgs),
    /// Run as the agent: sample the probes every interval and export the metrics through a
    /// Prometheus endpoint (/metrics, /healthz, /readyz; 127.0.0.1:9464 unless --listen says
    /// otherwise) and, when an endpoint is configured, OTLP push (gRPC or HTTP/protobuf, the
    /// standard OTEL_EXPORTER_OTLP_* and OTEL_RESOURCE_ATTRIBUTES variables). Settings come from
    /// flags, then environment, then --config FILE, then defaults (docs/configuration.md).
    /// Stops on SIGINT/SIGTERM after a last export.
    Agent(agent::config::AgentArgs),
    Top(top::TopArgs),
    Record(record::RecordArgs),
    Replay(replay::ReplayArgs),
    Report(report::ReportArgs),
    /// Print a shell completion script, e.g. `vmtrace completions bash >
    /// /etc/bash_completion.d/vmtrace` (bash, zsh, fish, elvish, powershell).
    Completions {
        shell: clap_complete::Shell,
    },
    /// Print a manual page (roff): vmtrace(1), or with a command's name that command's, e.g.
    /// `vmtrace man agent > /usr/share/man/man1/vmtrace-agent.1`.
    Man {
        /// The command whose page to print (agent, doctor, top, ...).
        command: Option<String>,
    },
}

/// The exit code of a failure that has no more specific one: the host cannot run vmtrace (`doctor`),
/// a probe does not load, a file cannot be read or written.
pub const EXIT_FAILURE: u8 = 1;
/// The exit code of a usage or configuration error: bad flags (clap's own code), a bad value in the
/// environment or the configuration file.
pub const EXIT_USAGE: u8 = 2;
/// The exit code of malformed input data: a file given as a recording that does not read as one.
pub const EXIT_BAD_INPUT: u8 = 3;

/// The agent's settings (flags, environment, configuration file) do not resolve.
#[derive(Debug, Error)]
#[error(transparent)]
struct ConfigError(anyhow::Error);

/// Runs the command line: parses the arguments, sets up logging, runs the command and turns an
/// error into one line on stderr and the exit code of its kind.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    log::init(cli.log_format);
    // Any process may raise its soft limit to the hard one. The usual soft limit, 1024, is too few
    // for a host of a thousand tenants, each with a cgroup.events file kept open; where raising
    // fails, fewer files are kept open and the rest are read by path.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!("open-file limit not raised: {e}");
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            log::fatal(&e);
            ExitCode::from(exit_code(&e))
        }
    }
}

/// [`EXIT_USAGE`] for bad settings, [`EXIT_BAD_INPUT`] for a recording that does not read (an
/// unreadable file is [`EXIT_FAILURE`], as is any other error).
fn exit_code(error: &anyhow::Error) -> u8 {
    let malformed = |e: &RecordingError| match e {
        RecordingError::Io { source, .. } => source.kind() == std::io::ErrorKind::InvalidData,
        _ => true,
    };
    if error.downcast_ref::<ConfigError>().is_some() {
        EXIT_USAGE
    } else if error
        .chain()
        .filter_map(|e| e.downcast_ref::<RecordingError>())
        .any(malformed)
    {
        EXIT_BAD_INPUT
    } else {
        EXIT_FAILURE
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
        Command::Watch(args) => {
            runtime()?.block_on(watch::run(&args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            // Resolved here so that bad settings are told apart from the agent's failures.
            let config =
                agent::config::AgentConfig::resolve(&args, &|name| std::env::var(name).ok())
                    .map_err(ConfigError)?;
            runtime()?.block_on(agent::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Top(args) => {
            top::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Record(args) => {
            runtime()?.block_on(record::run(&args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay(args) => {
            replay::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report(args) => {
            report::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "vmtrace", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { command } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            cli.build();
            let page = match command {
                None => cli,
                Some(name) => {
                    let Some(sub) = cli.find_subcommand(&name) else {
                        let names: Vec<&str> =
                            cli.get_subcommands().map(clap::Command::get_name).collect();
                        return Err(ConfigError(anyhow::anyhow!(
                            "no command `{name}`: one of {}",
                            names.join(", ")
                        ))
                        .into());
                    };
                    // Named as man pages of subcommands are: vmtrace-agent(1).
                    sub.clone().name(format!("vmtrace-{name}"))
                }
            };
            clap_mangen::Man::new(page).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The event loop of `watch`, `record` and `agent`: one thread is plenty. The agent serves HTTP and
/// exports on it and samples on a thread of its own, so that a slow sample holds up no request.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
