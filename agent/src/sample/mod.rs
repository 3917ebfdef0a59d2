//! Samples: the one source of data every view reads (`sampler`), taken on one clock (`ticks`), with
//! what the kernel accounts per cgroup added to each tenant (`accounting`: CPU by mode, the
//! virtualisation tax, memory, dTLB) and the recent past of every tenant (`timeline`).

pub(crate) mod accounting;
pub(crate) mod errors;
pub(crate) mod recording;
pub mod sampler;
pub(crate) mod ticks;
pub(crate) mod timeline;
