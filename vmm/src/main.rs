//! `vmtrace-vmm`: runs one scenario and prints the JSON report of ground truth.

use std::fs::File;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use clap::error::ErrorKind;
use vmtrace_vmm::{Cli, Vmm, VmmConfig};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmtrace-vmm: error: {e:#}");
            // An impossible request is a usage error, like a bad flag.
            match e.downcast_ref::<vmtrace_vmm::Error>() {
                Some(vmtrace_vmm::Error::Config(_)) => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

/// Prints help/version as clap does, and any other parse error as one line.
fn usage_error(e: &clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let rendered = e.render().to_string();
    let mut line = String::new();
    for part in rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let part = part.strip_prefix("error: ").unwrap_or(part);
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    eprintln!("vmtrace-vmm: error: {line} (see 'vmtrace-vmm --help')");
    ExitCode::from(2)
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let config = VmmConfig::try_from(cli)?;
    // Open the report file first so a bad path fails before any work is done.
    let mut out: Box<dyn Write> = match &cli.report {
        Some(path) => Box::new(
            File::create(path)
                .with_context(|| format!("cannot create the report file {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let vmm = Vmm::try_from(config)?;
    if !cli.quiet && cli.vm_setup_delay_ms > 0 {
        // The VM exists and its ioeventfds are registered: a tracer started now sees the run
        // but not the setup.
        eprintln!(
            "vmtrace-vmm: VM set up (pid {}, vm fd {}, {} ioeventfd(s)); starting the vCPUs in \
             {} ms",
            std::process::id(),
            vmm.vm_fd(),
            vmm.ioeventfds().len(),
            cli.vm_setup_delay_ms
        );
    }
    let report = vmm.run()?;
    let json = if cli.pretty {
        report.to_json_pretty()
    } else {
        report.to_json()
    };
    writeln!(out, "{json}")
        .and_then(|()| out.flush())
        .context("cannot write the report")?;
    if !cli.quiet {
        eprintln!(
            "vmtrace-vmm: {}: {} vCPU(s) x {} ops in {:.3} s ({:.2} us/op per vCPU), exits {:?}{}",
            report.scenario,
            report.vcpus.len(),
            report.count,
            report.duration_secs,
            report.micros_per_op(),
            report.total.exits,
            match &report.virtio {
                Some(v) => format!(
                    ", kicks per queue {:?}",
                    v.queues.iter().map(|q| q.kicks).collect::<Vec<_>>()
                ),
                None => String::new(),
            }
        );
        if let Some(m) = &report.memory {
            let balloon = if m.madvise_calls > 0 {
                format!(
                    ", {} MiB returned to the host and {} pages touched again",
                    m.bytes_returned >> 20,
                    m.pages_retouched
                )
            } else {
                String::new()
            };
            eprintln!(
                "vmtrace-vmm: {}: {} MiB region, {} pages touched{balloon}; resident pages {} \
                 before, {} at the end",
                report.scenario,
                m.region_bytes >> 20,
                m.pages_touched,
                m.resident_pages_before,
                m.resident_pages_end
            );
        }
    }
    Ok(())
}
