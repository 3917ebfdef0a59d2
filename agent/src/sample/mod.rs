//! Samples: the one source of data every view reads (`sampler`), taken on one clock (`ticks`), with
//! latency summaries (`latency`) and the recent past of every tenant (`timeline`).

pub mod latency;
pub mod sampler;
pub(crate) mod ticks;
pub(crate) mod timeline;
