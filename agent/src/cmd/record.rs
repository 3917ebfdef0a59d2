//! `vmtrace record`: samples written to a file for later (`vmtrace replay`, `vmtrace top --replay`,
//! `vmtrace report`), possibly on another machine.
//!
//! The file is JSON lines: one header object, then one [`Sample`] per line, exactly as `vmtrace watch
//! --json` prints them. JSON lines because a recording cut short (the agent killed, the disk full)
//! is still valid up to its last complete line, `jq` and `grep` read it, and serde already knows the
//! sample. The format is described in docs/recording-format.md; bump [`VERSION`] on any change an
//! older reader would misread.

use std::{
    fs::File,
    io::{BufWriter, IsTerminal, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::{
    cmd::args::{ProbeArgs, parse_interval},
    host::{self, KvmFlavour},
    probe::load::ExitSource,
    sample::sampler::{Sample, Sampler},
    sample::ticks::Ticks,
};

/// The `format` field of every recording's header.
pub const FORMAT: &str = "vmtrace-recording";
/// The format version this vmtrace writes and the newest it reads.
pub const VERSION: u32 = 1;

/// The first line of a recording: what was recorded where. Only `format` and `version` are needed
/// to replay; the rest is for people and reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`] when written by this vmtrace.
    pub version: u32,
    /// The vmtrace that wrote the file.
    #[serde(default)]
    pub vmtrace_version: String,
    /// Host name of the recording machine.
    #[serde(default)]
    pub host: String,
    /// Kernel release of the recording machine.
    #[serde(default)]
    pub kernel: String,
    /// KVM flavour of the recording machine.
    pub kvm: KvmFlavour,
    /// Where its exit counts came from.
    pub exit_source: ExitSource,
    /// When the probes were attached, RFC 3339 in UTC.
    pub started: String,
    /// The same instant, seconds since the Unix epoch.
    pub started_unix: f64,
    /// The requested time between samples, in seconds.
    pub interval_secs: f64,
    /// Whether kick service latency was measured (`--kick-latency`).
    #[serde(default)]
    pub kick_latency: bool,
}

impl Header {
    /// A header for a recording that starts now on this machine.
    pub fn new(kvm: KvmFlavour, exit_source: ExitSource, interval: Duration, kick: bool) -> Self {
        let now = SystemTime::now();
        Self {
            format: FORMAT.to_owned(),
            version: VERSION,
            vmtrace_version: env!("CARGO_PKG_VERSION").to_owned(),
            host: hostname(),
            kernel: host::kernel_release(),
            kvm,
            exit_source,
            started: humantime::format_rfc3339_seconds(now).to_string(),
            started_unix: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            interval_secs: interval.as_secs_f64(),
            kick_latency: kick,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Writes a recording line by line, flushing each line so that a reader (or a crash) never sees a
/// partial sample except possibly the very last line.
pub struct RecordingWriter<W: Write> {
    out: W,
    samples: u64,
    bytes: u64,
}

impl<W: Write> RecordingWriter<W> {
    /// Starts a recording with its header.
    pub fn new(mut out: W, header: &Header) -> std::io::Result<Self> {
        let line = serde_json::to_string(header)? + "\n";
        out.write_all(line.as_bytes())?;
        out.flush()?;
        Ok(Self {
            out,
            samples: 0,
            bytes: line.len() as u64,
        })
    }

    /// Appends one sample.
    pub fn write(&mut self, sample: &Sample) -> std::io::Result<()> {
        let line = serde_json::to_string(sample)? + "\n";
        self.out.write_all(line.as_bytes())?;
        self.out.flush()?;
        self.samples += 1;
        self.bytes += line.len() as u64;
        Ok(())
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Record samples to a file for `vmtrace replay`, `vmtrace top --replay` and `vmtrace report`.
///
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
    let header = Header::new(
        sampler.kvm().flavour,
        sampler.probes().exit_source,
        args.interval,
        args.probes.kick_latency,
    );
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
    let mut ticks = Ticks::new(args.interval, args.duration, false)?;
    loop {
        let last = ticks.next().await;
        let sample = Sample {
            last,
            ..sampler.sample()?
        };
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
    fn header_names_format_and_version_and_round_trips() {
        let header = Header::new(
            KvmFlavour::Pvm,
            ExitSource::Derived,
            Duration::from_millis(500),
            false,
        );
        assert_eq!(header.format, FORMAT);
        assert_eq!(header.version, VERSION);
        assert_eq!(header.interval_secs, 0.5);
        let line = serde_json::to_string(&header).unwrap();
        assert!(line.starts_with(r#"{"format":"vmtrace-recording","version":1,"#));
        let back: Header = serde_json::from_str(&line).unwrap();
        assert_eq!(back, header);
    }

    #[test]
    fn writer_counts_samples_and_bytes() {
        let header = Header::new(KvmFlavour::Vmx, ExitSource::KvmExit, Duration::ZERO, true);
        let mut buf = Vec::new();
        let mut writer = RecordingWriter::new(&mut buf, &header).unwrap();
        let sample = Sample {
            timestamp: 1.0,
            elapsed_secs: 1.0,
            interval_secs: 1.0,
            kvm: KvmFlavour::Vmx,
            exit_source: ExitSource::KvmExit,
            tenants: Vec::new(),
            dtlb_unavailable: None,
            iommu_faults: Vec::new(),
            drops: Default::default(),
            last: true,
        };
        writer.write(&sample).unwrap();
        assert_eq!(writer.samples(), 1);
        let bytes = writer.bytes();
        assert_eq!(bytes, buf.len() as u64);
        assert_eq!(String::from_utf8(buf).unwrap().lines().count(), 2);
    }

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
