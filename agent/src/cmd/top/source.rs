//! Where `top` gets its samples: the probes (live), a recording paced as recorded, or a stream of
//! samples on stdin (a running agent's `vmtrace watch --json`).

use std::{
    path::Path,
    sync::mpsc::{self, Receiver, TryRecvError},
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    probe::load::ProbeOptions,
    sample::recording::{Pacer, RecordingReader, describe},
    sample::sampler::{Sample, Sampler},
    tenant::{aggregate::name_pods, kubernetes::PodDirectory},
};

/// The answer to "anything new?".
pub enum Feed {
    Sample(Box<Sample>),
    /// A live sample failed (a map read refused, a cgroup file gone): skipped, and the next tick
    /// tries afresh, as the agent does.
    Skipped(anyhow::Error),
    /// Nothing yet; ask again after this long at the latest.
    Wait(Duration),
    /// No more samples will come.
    End,
}

pub enum Source {
    Live {
        sampler: Box<Sampler>,
        interval: Duration,
        next: Instant,
        /// Pod names from the API server, when it is known.
        pods: Option<PodDirectory>,
    },
    File {
        reader: Box<RecordingReader>,
        pacer: Pacer,
        /// The next sample and when it is due.
        pending: Option<(Box<Sample>, Instant)>,
    },
    Stream {
        samples: Receiver<Result<Sample, String>>,
    },
}

impl Source {
    /// Attaches the probes; the first sample comes one interval later. At most `max_tenants` are
    /// shown by name; pod tenants are named from `pods` where it knows them.
    pub fn live(
        options: ProbeOptions,
        max_tenants: usize,
        interval: Duration,
        pods: Option<PodDirectory>,
    ) -> Result<Self> {
        // The per-vCPU view's counts: top runs the probes for itself alone.
        let options = ProbeOptions {
            thread_exits: true,
            ..options
        };
        let mut sampler = Sampler::start(&options)?;
        sampler.limit_tenants(max_tenants);
        Ok(Self::Live {
            sampler: Box::new(sampler),
            interval,
            next: Instant::now() + interval,
            pods,
        })
    }

    /// A recording file paced at `speed` (`None`: as fast as possible), or with `-` the samples
    /// arriving on stdin, shown as they come.
    pub fn replay(path: &Path, speed: Option<f64>) -> Result<(Self, String)> {
        let reader = RecordingReader::open(path)?;
        let label = describe(&reader);
        if path == Path::new("-") {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for sample in reader {
                    if tx.send(sample.map_err(|e| e.to_string())).is_err() {
                        return;
                    }
                }
            });
            return Ok((Self::Stream { samples: rx }, label));
        }
        Ok((
            Self::File {
                reader: Box::new(reader),
                pacer: Pacer::new(speed),
                pending: None,
            },
            label,
        ))
    }

    /// Whether samples keep coming whether or not they are shown (so pausing must buffer them).
    pub fn is_live(&self) -> bool {
        !matches!(self, Self::File { .. })
    }

    /// A new sample if one is due.
    pub fn poll(&mut self) -> Result<Feed> {
        match self {
            Self::Live {
                sampler,
                interval,
                next,
                pods,
            } => {
                let now = Instant::now();
                if now < *next {
                    return Ok(Feed::Wait(*next - now));
                }
                // Skip ticks missed while busy rather than sampling in a burst.
                while *next <= now {
                    *next += *interval;
                }
                Ok(match sampler.sample() {
                    Ok(mut sample) => {
                        if let Some(pods) = pods {
                            name_pods(&mut sample.tenants, pods);
                        }
                        Feed::Sample(Box::new(sample))
                    }
                    Err(e) => Feed::Skipped(e),
                })
            }
            Self::File {
                reader,
                pacer,
                pending,
            } => {
                if pending.is_none() {
                    let Some(sample) = reader.next_sample()? else {
                        return Ok(Feed::End);
                    };
                    let due = Instant::now() + pacer.delay(&sample);
                    *pending = Some((Box::new(sample), due));
                }
                let now = Instant::now();
                match pending.take() {
                    Some((sample, due)) if due <= now => Ok(Feed::Sample(sample)),
                    Some((sample, due)) => {
                        *pending = Some((sample, due));
                        Ok(Feed::Wait(due - now))
                    }
                    None => Ok(Feed::End),
                }
            }
            Self::Stream { samples } => match samples.try_recv() {
                Ok(Ok(sample)) => Ok(Feed::Sample(Box::new(sample))),
                Ok(Err(e)) => Err(anyhow::anyhow!(e)),
                Err(TryRecvError::Empty) => Ok(Feed::Wait(Duration::from_millis(50))),
                Err(TryRecvError::Disconnected) => Ok(Feed::End),
            },
        }
    }
}
