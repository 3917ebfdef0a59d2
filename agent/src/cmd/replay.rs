//! `vmtrace replay`: a recording (`sample::recording`) fed to the watch views or `top`, paced at
//! the recorded speed.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::{
    cmd::watch::print_sample,
    sample::recording::{Pacer, RecordingReader, describe, parse_speed},
};

/// Reads a file written by `vmtrace record` (or saved `vmtrace watch --json` output) and prints its
/// samples as `vmtrace watch` would, paced as they were recorded. Needs no privileges and nothing
/// from this host: a recording from another machine replays here. A file that is not a recording,
/// or of a newer format version, is refused with one clear error.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The recording; `-` reads stdin.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print each sample as one JSON object per line, exactly as recorded (as `watch --json`).
    #[arg(long, conflicts_with_all = ["table", "top"])]
    pub json: bool,
    /// Print each sample as `vmtrace watch`'s table (the default).
    #[arg(long, conflicts_with = "top")]
    pub table: bool,
    /// Show the recording in `vmtrace top`'s interactive view (same as `vmtrace top --replay FILE`).
    #[arg(long)]
    pub top: bool,
    /// Replay this many times faster than recorded, e.g. `10` or `0.5`.
    #[arg(long, default_value = "1", value_parser = parse_speed, conflicts_with = "no_delay")]
    pub speed: f64,
    /// Print every sample at once, without waiting between them.
    #[arg(long)]
    pub no_delay: bool,
}

pub fn run(args: &ReplayArgs) -> Result<()> {
    if args.top {
        return crate::cmd::top::run_replay(&args.file, (!args.no_delay).then_some(args.speed));
    }
    let mut reader = RecordingReader::open(&args.file)?;
    eprintln!("vmtrace: replaying {}", describe(&reader));
    let mut pacer = Pacer::new((!args.no_delay).then_some(args.speed));
    while let Some(sample) = reader.next_sample()? {
        std::thread::sleep(pacer.delay(&sample));
        if !print_sample(&sample, args.json)? {
            return Ok(());
        }
    }
    Ok(())
}
