//! `vmtrace record`: samples written to a file for later (`vmtrace replay`, `vmtrace top --replay`,
//! `vmtrace report`), possibly on another machine, in the format of `sample::recording`.

use std::{
    fs::File,
    io::{BufWriter, IsTerminal, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    cmd::args::{ProbeArgs, parse_interval},
    probe::{load::ProbeOptions, spec::ProbeOption},
    sample::recording::{Header, RecordingWriter},
    sample::sampler::{Sample, Sampler},
    sample::ticks::Ticks,
};
use anyhow::{Context, Result};
use clap::Args;

/// The file is JSON lines: a header (format "vmtrace-recording", version, host, kernel, KVM flavour,
/// exit source, start time, interval), then one sample per line as `vmtrace watch --json` prints it
/// (see docs/recording-format.md). Each line is flushed as it is written, so a recording cut short
/// stays readable. Progress goes to stderr. Stops after --duration, or on Ctrl-C/SIGTERM after
/// writing a last sample marked final.
#[derive(Debug, Clone, Args)]
pub struct RecordArgs {
    /// The file to write (replaced if it exists); `-` writes to stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Time between samples, e.g. `1s`, `500ms`.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Stop after this long, e.g. `30s`, `5m`. Records until interrupted when absent.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub probes: ProbeArgs,
}

pub async fn run(args: &RecordArgs) -> Result<()> {
    let out: Box<dyn Write> = if args.output == Path::new("-") {
        Box::new(std::io::stdout().lock())
    } else {
        let file = File::create(&args.output)
            .with_context(|| format!("cannot create {}", args.output.display()))?;
        Box::new(BufWriter::new(file))
    };
    let mut sampler = Sampler::start(&args.probes.into())?;
    sampler.limit_tenants(args.probes.max_tenants());
    let header = Header {
        probes_not_attached: sampler.probes_not_attached(),
        vm_ioctls: ProbeOptions::from(args.probes).is_on(ProbeOption::VmIoctls),
        service_time: args.probes.service_time,
        ..Header::new(
            sampler.kvm().flavour,
            sampler.probes().exit_source,
            args.interval,
            args.probes.kick_latency,
        )
    };
    let mut writer = RecordingWriter::new(out, &header)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!(
        "vmtrace: recording to {} every {}; KVM {}; exit source: {}",
        args.output.display(),
        humantime::format_duration(args.interval),
        header.kvm.name(),
        header.exit_source.short_name(),
    );
    let mut progress = Progress::new();
    let started = Instant::now();
    let mut errors = crate::sample::errors::SampleErrors::default();
    let mut ticks = Ticks::new(args.interval, args.duration, false)?;
    loop {
        let last = ticks.next().await;
        // A failed sample is counted, logged (rate limited) and skipped; the next tick tries again.
        let Some(sample) = errors.skip(sampler.sample()) else {
            if last {
                return Ok(());
            }
            continue;
        };
        let sample = Sample { last, ..sample };
        writer
            .write(&sample)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        progress.update(&writer, &sample, started.elapsed(), last);
        if last {
            return Ok(());
        }
    }
}

/// Progress on stderr: a line rewritten in place on a terminal, an occasional line otherwise (logs).
struct Progress {
    tty: bool,
    last_line: Instant,
}

impl Progress {
    /// How often a non-terminal stderr gets a progress line.
    const LOG_EVERY: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last_line: Instant::now(),
        }
    }

    fn update<W: Write>(
        &mut self,
        writer: &RecordingWriter<W>,
        sample: &Sample,
        elapsed: Duration,
        last: bool,
    ) {
        let line = progress_line(
            writer.samples(),
            sample.tenants.len(),
            elapsed,
            writer.bytes(),
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}{}", if last { "\n" } else { "" });
        } else if last || self.last_line.elapsed() >= Self::LOG_EVERY {
            eprintln!("{line}");
            self.last_line = Instant::now();
        }
        if last {
            eprintln!("vmtrace: recording complete");
        }
    }
}

/// "recorded 12 samples · 3 tenants · 12s · 48.1 KiB".
pub fn progress_line(samples: u64, tenants: usize, elapsed: Duration, bytes: u64) -> String {
    format!(
        "vmtrace: recorded {samples} sample{} · {tenants} tenant{} · {}s · {}",
        if samples == 1 { "" } else { "s" },
        if tenants == 1 { "" } else { "s" },
        elapsed.as_secs(),
        human_bytes(bytes)
    )
}

/// Sizes as people read them: 512 B, 48.1 KiB, 3.2 MiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_and_sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(49_254), "48.1 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(
            progress_line(1, 3, Duration::from_secs(12), 2048),
            "vmtrace: recorded 1 sample · 3 tenants · 12s · 2.0 KiB"
        );
    }
}
