//! Recordings: samples written to a file for later (`vmtrace replay`, `vmtrace top --replay`,
//! `vmtrace report`), possibly on another machine, and read back.
//!
//! The file is JSON lines: one header object, then one [`Sample`] per line, exactly as `vmtrace watch
//! --json` prints them. JSON lines because a recording cut short (the agent killed, the disk full)
//! is still valid up to its last complete line, `jq` and `grep` read it, and serde already knows the
//! sample. The format is described in docs/recording-format.md; bump [`VERSION`] on any change an
//! older reader would misread.
//!
//! Nothing here looks at the machine it runs on when reading: a recording made on another host
//! (another kernel, KVM flavour or exit source) replays the same everywhere.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    path::Path,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::{
    host::{self, KvmFlavour},
    probe::load::ExitSource,
    sample::sampler::{ProbeFailure, Sample},
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
    /// Whether doorbells were learnt from the VMMs' setup ioctls (`--vm-ioctls`, which
    /// `--kick-latency` implies); if not, MMIO kicks were inferred per queue and there is no
    /// `kick.any` (docs/virtio-kicks.md).
    #[serde(default)]
    pub vm_ioctls: bool,
    /// Whether the VMMs' service time was measured (`--service-time`): without it there are no
    /// `exit.*` latencies on hosts where `kvm:kvm_exit` is silent.
    #[serde(default)]
    pub service_time: bool,
    /// Probes that should have been attached and were not when the recording started, with why:
    /// its figures are incomplete. Absent when every probe was attached (and in older recordings).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes_not_attached: Vec<ProbeFailure>,
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
            vm_ioctls: kick,
            service_time: false,
            probes_not_attached: Vec::new(),
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
/// Why a recording cannot be read. Each names the file and, where it helps, the line.
#[derive(Debug, Error)]
pub enum RecordingError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is empty: a recording starts with a header line")]
    Empty { path: String },
    #[error(
        "{path} is not a vmtrace recording: its first line is neither a header with format \"{FORMAT}\" nor a sample ({detail})"
    )]
    NotARecording { path: String, detail: String },
    #[error(
        "{path} is a version {found} recording; this vmtrace reads versions 1 to {VERSION} (a newer vmtrace wrote it)"
    )]
    UnsupportedVersion { path: String, found: u64 },
    #[error("{path}, line 1: bad recording header: {detail}")]
    BadHeader { path: String, detail: String },
    #[error("{path}, line {line}: not a sample: {detail}")]
    BadSample {
        path: String,
        line: usize,
        detail: String,
    },
}

/// What the first line of a file turned out to be.
#[derive(Debug)]
pub enum FirstLine {
    /// A recording's header.
    Header(Header),
    /// A sample: the file is `vmtrace watch --json` output, which replays the same way.
    Sample(Box<Sample>),
}

/// `text` with its control characters escaped: serde's messages quote what they could not read
/// (an unknown variant, say), which may hold a newline, and an error is one line.
fn one_line(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Classifies a file's first line: a header this vmtrace can read, a bare sample, or an error saying
/// which of the two it failed to be.
pub fn parse_first_line(line: &str, path: &str) -> Result<FirstLine, RecordingError> {
    let value: Value = serde_json::from_str(line).map_err(|e| RecordingError::NotARecording {
        path: path.to_owned(),
        detail: one_line(&format!("not JSON: {e}")),
    })?;
    match value.get("format") {
        Some(format) if format == FORMAT => {}
        Some(other) => {
            return Err(RecordingError::NotARecording {
                path: path.to_owned(),
                detail: format!("format is {other}"),
            });
        }
        None if value.get("tenants").is_some() && value.get("timestamp").is_some() => {
            return serde_json::from_value(value)
                .map(|s| FirstLine::Sample(Box::new(s)))
                .map_err(|e| RecordingError::BadSample {
                    path: path.to_owned(),
                    line: 1,
                    detail: one_line(&e.to_string()),
                });
        }
        None => {
            return Err(RecordingError::NotARecording {
                path: path.to_owned(),
                detail: "it has no \"format\" field".to_owned(),
            });
        }
    }
    let version = value
        .get("version")
        .and_then(Value::as_u64)
        .ok_or_else(|| RecordingError::BadHeader {
            path: path.to_owned(),
            detail: "no numeric \"version\"".to_owned(),
        })?;
    if version == 0 || version > u64::from(VERSION) {
        return Err(RecordingError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
        });
    }
    serde_json::from_value(value)
        .map(FirstLine::Header)
        .map_err(|e| RecordingError::BadHeader {
            path: path.to_owned(),
            detail: one_line(&e.to_string()),
        })
}

/// A recording read line by line, so that hours of samples need not fit in memory.
pub struct RecordingReader {
    input: Box<dyn BufRead + Send>,
    path: String,
    line: usize,
    header: Option<Header>,
    first: Option<Sample>,
    done: bool,
}

impl RecordingReader {
    /// Opens a recording file; `-` reads stdin (e.g. `vmtrace watch --json | vmtrace top --replay -`).
    pub fn open(path: &Path) -> Result<Self, RecordingError> {
        let name = path.display().to_string();
        if path == Path::new("-") {
            return Self::new(Box::new(BufReader::new(std::io::stdin())), "stdin");
        }
        let file = File::open(path).map_err(|source| RecordingError::Io {
            path: name.clone(),
            source,
        })?;
        Self::new(Box::new(BufReader::new(file)), &name)
    }

    /// Reads the first line from `input` and checks it.
    pub fn new(input: Box<dyn BufRead + Send>, path: &str) -> Result<Self, RecordingError> {
        let mut reader = Self {
            input,
            path: path.to_owned(),
            line: 0,
            header: None,
            first: None,
            done: false,
        };
        let Some((first, _)) = reader.read_line()? else {
            return Err(RecordingError::Empty {
                path: path.to_owned(),
            });
        };
        match parse_first_line(&first, path)? {
            FirstLine::Header(header) => reader.header = Some(header),
            FirstLine::Sample(sample) => reader.first = Some(*sample),
        }
        Ok(reader)
    }

    /// The header, or `None` for `watch --json` output.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// The file's name as errors show it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The next sample, `None` at the end. A last line cut short (the recorder was killed mid-write)
    /// ends the recording quietly; any other bad line is an error.
    pub fn next_sample(&mut self) -> Result<Option<Sample>, RecordingError> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        if self.done {
            return Ok(None);
        }
        let Some((text, complete)) = self.read_line()? else {
            self.done = true;
            return Ok(None);
        };
        match serde_json::from_str(&text) {
            Ok(sample) => Ok(Some(sample)),
            Err(e) if !complete && e.is_eof() => {
                tracing::warn!(path = %self.path, line = self.line, "last line is cut short; ignored");
                self.done = true;
                Ok(None)
            }
            Err(e) => Err(RecordingError::BadSample {
                path: self.path.clone(),
                line: self.line,
                detail: one_line(&e.to_string()),
            }),
        }
    }

    /// The next non-blank line and whether it ended with a newline.
    fn read_line(&mut self) -> Result<Option<(String, bool)>, RecordingError> {
        loop {
            let mut text = String::new();
            let n = self
                .input
                .read_line(&mut text)
                .map_err(|source| RecordingError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            let complete = text.ends_with('\n');
            if !text.trim().is_empty() {
                return Ok(Some((text, complete)));
            }
        }
    }
}

impl Iterator for RecordingReader {
    type Item = Result<Sample, RecordingError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_sample().transpose()
    }
}

/// Reads a whole recording.
pub fn read_all(path: &Path) -> Result<(Option<Header>, Vec<Sample>), RecordingError> {
    let mut reader = RecordingReader::open(path)?;
    let header = reader.header().cloned();
    let samples = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
    Ok((header, samples))
}

/// Paces samples as they were recorded: the wait before each is the recorded time since the
/// previous one, divided by the speed. Without a speed, no waiting.
#[derive(Debug, Clone)]
pub struct Pacer {
    speed: Option<f64>,
    previous: Option<f64>,
}

impl Pacer {
    /// The longest wait between two samples, whatever the file says.
    pub const MAX_WAIT: Duration = Duration::from_hours(1);

    pub fn new(speed: Option<f64>) -> Self {
        Self {
            speed,
            previous: None,
        }
    }

    /// How long to wait before showing `sample`.
    pub fn delay(&mut self, sample: &Sample) -> Duration {
        let previous = self.previous.replace(sample.elapsed_secs);
        let (Some(speed), Some(previous)) = (self.speed, previous) else {
            return Duration::ZERO;
        };
        let secs = (sample.elapsed_secs - previous) / speed;
        if secs >= Self::MAX_WAIT.as_secs_f64() {
            return Self::MAX_WAIT;
        }
        // Negative or NaN gaps (a clock step, a hand-edited file) mean no wait.
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::ZERO)
    }
}

/// Parses a replay speed: a positive factor (2 = twice as fast).
pub fn parse_speed(text: &str) -> Result<f64, String> {
    let speed: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !(speed.is_finite() && speed > 0.0) {
        return Err("the speed must be a positive number, e.g. 2 or 0.5".to_owned());
    }
    Ok(speed)
}

/// Replay a recording through the watch views (table or JSON lines) or `top`.
///
/// One line on where a recording comes from.
pub fn describe(reader: &RecordingReader) -> String {
    match reader.header() {
        Some(h) => format!(
            "{} (recorded on {} at {}, kernel {}, KVM {}, exit source {}, every {}s)",
            reader.path(),
            if h.host.is_empty() { "?" } else { &h.host },
            h.started,
            if h.kernel.is_empty() { "?" } else { &h.kernel },
            h.kvm.name(),
            h.exit_source.short_name(),
            h.interval_secs
        ),
        None => format!("{} (watch --json output, no header)", reader.path()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::{
        host::KvmFlavour,
        kind::{ExitReason, Gauge, Kind},
        probe::load::ExitSource,
    };

    #[test]
    fn an_error_quoting_a_newline_is_one_line() {
        let line = r#"{"timestamp": 1.0, "tenants": [], "exit_source": "k\nderived"}"#;
        let e = parse_first_line(line, "test.jsonl")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains(r"k\nderived"), "{e}");
    }

    fn sample(elapsed: f64, io: u64) -> Sample {
        serde_json::from_value(serde_json::json!({
            "timestamp": 1_700_000_000.0 + elapsed, "elapsed_secs": elapsed, "interval_secs": 1.0,
            "kvm": "vmx", "exit_source": "kvm_exit", "drops": {},
            "tenants": [{"tenant": "vm/web", "identity": {"kind": "libvirt_vm", "name": "web"},
                         "cgroups": [{"id": 7, "path": "/machine.slice/machine-qemu\\x2d1\\x2dweb.scope"}],
                         "counts": {"kvm_exit.EPT_VIOLATION": io}, "rates": {"kvm_exit.EPT_VIOLATION": 10.0}}]
        }))
        .unwrap()
    }

    /// A recording `vmtrace record` wrote on a PVM host (agent/tests/data/README.md).
    const RECORDING_V1: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/recording-v1.jsonl"
    ));

    #[test]
    fn a_recorded_file_reads_back_and_rewrites_byte_for_byte() {
        let mut reader = reader(RECORDING_V1).unwrap();
        assert!(reader.header().is_some());
        let samples: Vec<Sample> = reader.by_ref().collect::<Result<_, _>>().unwrap();
        let lines: Vec<&str> = RECORDING_V1.lines().skip(1).collect();
        assert_eq!(samples.len(), lines.len());
        assert!(samples.iter().any(|s| !s.tenants.is_empty()));
        // Every kind and gauge the agent wrote then is one this vmtrace knows.
        for tenant in samples.iter().flat_map(|s| &s.tenants) {
            let kinds = tenant.counts.keys().chain(tenant.rates.keys());
            for kind in kinds.chain(tenant.latency.keys()) {
                assert!(!matches!(kind, Kind::Unknown(_)), "{kind}");
            }
            for gauge in tenant.gauges.keys() {
                assert!(!matches!(gauge, Gauge::Unknown(_)), "{gauge}");
            }
        }
        let tenant = &samples[2].tenants[0];
        assert!(tenant.counts[&Kind::Exit(ExitReason(2))] > 0);
        assert!(tenant.gauges.contains_key(&Gauge::TaxRatio));
        for (sample, line) in samples.iter().zip(lines) {
            assert_eq!(serde_json::to_string(sample).unwrap(), line);
        }
    }

    fn reader(text: &str) -> Result<RecordingReader, RecordingError> {
        RecordingReader::new(Box::new(Cursor::new(text.to_owned())), "test.jsonl")
    }

    fn recording(samples: &[Sample]) -> String {
        let header = Header::new(KvmFlavour::Vmx, ExitSource::KvmExit, Duration::ZERO, false);
        let mut buf = Vec::new();
        let mut writer = RecordingWriter::new(&mut buf, &header).unwrap();
        for s in samples {
            writer.write(s).unwrap();
        }
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn a_recording_from_another_host_reads_back_exactly() {
        let samples = vec![sample(1.0, 10), sample(2.0, 20)];
        let mut r = reader(&recording(&samples)).unwrap();
        assert_eq!(r.header().unwrap().kvm, KvmFlavour::Vmx);
        let back: Vec<Sample> = r.by_ref().map(Result::unwrap).collect();
        assert_eq!(back, samples);
    }

    #[test]
    fn headers_of_other_versions_and_formats_are_refused_clearly() {
        let newer = r#"{"format":"vmtrace-recording","version":2}"#;
        let e = reader(newer).err().unwrap().to_string();
        assert_eq!(
            e,
            "test.jsonl is a version 2 recording; this vmtrace reads versions 1 to 1 (a newer vmtrace wrote it)"
        );
        let other = reader(r#"{"format":"pcap","version":1}"#).err().unwrap();
        assert!(matches!(other, RecordingError::NotARecording { .. }));
        let garbage = reader("\u{1}binary junk").err().unwrap().to_string();
        assert!(
            garbage.starts_with("test.jsonl is not a vmtrace recording"),
            "{garbage}"
        );
        assert!(matches!(
            reader("").err().unwrap(),
            RecordingError::Empty { .. }
        ));
        let no_version = reader(r#"{"format":"vmtrace-recording"}"#).err().unwrap();
        assert!(matches!(no_version, RecordingError::BadHeader { .. }));
        let bad_header = r#"{"format":"vmtrace-recording","version":1,"kvm":"pvm"}"#;
        let e = reader(bad_header).err().unwrap().to_string();
        assert!(
            e.starts_with("test.jsonl, line 1: bad recording header:"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_sample_names_its_line_and_a_cut_last_line_ends_quietly() {
        let good = recording(&[sample(1.0, 10)]);
        let mut r = reader(&format!("{good}\n{{\"nope\": 1}}\n")).unwrap();
        assert!(r.next_sample().unwrap().is_some());
        let e = r.next_sample().unwrap_err().to_string();
        assert!(e.starts_with("test.jsonl, line 4: not a sample:"), "{e}");

        let mut cut = reader(&format!("{good}{{\"timestamp\": 1.0, \"tena")).unwrap();
        assert!(cut.next_sample().unwrap().is_some());
        assert!(cut.next_sample().unwrap().is_none());
    }

    #[test]
    fn watch_json_output_replays_without_a_header() {
        let line = serde_json::to_string(&sample(1.0, 5)).unwrap();
        let mut r = reader(&format!("{line}\n{line}\n")).unwrap();
        assert!(r.header().is_none());
        assert_eq!(r.by_ref().count(), 2);
    }

    #[test]
    fn pacing_follows_recorded_time_and_speed() {
        let mut pacer = Pacer::new(Some(2.0));
        assert_eq!(pacer.delay(&sample(1.0, 0)), Duration::ZERO);
        assert_eq!(pacer.delay(&sample(3.0, 0)), Duration::from_secs(1));
        // Time going backwards or absurd gaps never panic.
        assert_eq!(pacer.delay(&sample(0.0, 0)), Duration::ZERO);
        assert_eq!(pacer.delay(&sample(1e300, 0)), Pacer::MAX_WAIT);
        let mut fast = Pacer::new(None);
        fast.delay(&sample(1.0, 0));
        assert_eq!(fast.delay(&sample(100.0, 0)), Duration::ZERO);
        assert!(parse_speed("0").is_err());
        assert!(parse_speed("NaN").is_err());
        assert_eq!(parse_speed("2.5"), Ok(2.5));
    }

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
            guest_time_unavailable: None,
            figures_unavailable: Vec::new(),
            iommu_faults: Vec::new(),
            drops: std::collections::BTreeMap::default(),
            probes_not_attached: Vec::new(),
            probes_attached: Vec::new(),
            maps: Vec::new(),
            state: crate::sample::sampler::StateSizes::default(),
            last: true,
        };
        writer.write(&sample).unwrap();
        assert_eq!(writer.samples(), 1);
        let bytes = writer.bytes();
        assert_eq!(bytes, buf.len() as u64);
        assert_eq!(String::from_utf8(buf).unwrap().lines().count(), 2);
    }
}
