//! How vmtrace logs: warnings and errors through tracing, and the agent's status lines (what it
//! serves, what it watches), as text or, with `--log-format json`, one JSON object per line for a
//! log pipeline.

use std::sync::OnceLock;

/// The log's format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON: timestamp, level, fields.message,
    /// target).
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Sets up logging to stderr: the level from `VMTRACE_LOG` (default `warn`; status lines always
/// show).
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMTRACE_LOG")
        // kube-rs logs every failed request at error level; the agent says the same once per
        // outage (tenant::kubernetes), so by default kube's own lines stay out.
        .unwrap_or_else(|_| "warn,kube_client=off,kube_runtime=off".into())
        .add_directive("vmtrace::status=info".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// A status line: printed as is in text, an info event of target `vmtrace::status` in JSON.
pub fn status(line: &str) {
    if FORMAT.get() == Some(&LogFormat::Json) {
        tracing::info!(target: "vmtrace::status", "{line}");
    } else {
        eprintln!("{line}");
    }
}

/// The error that ends a command, as its last line.
pub fn fatal(error: &anyhow::Error) {
    if FORMAT.get() == Some(&LogFormat::Json) {
        tracing::error!(target: "vmtrace::status", "vmtrace: error: {error:#}");
    } else {
        eprintln!("vmtrace: error: {error:#}");
    }
}
