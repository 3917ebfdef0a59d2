//! The commands of the `vmtrace` binary, one module each, and the argument types they share.

pub mod agent;
pub mod args;
pub mod doctor;
pub mod record;
pub mod replay;
pub mod report;
pub mod top;
pub mod watch;
