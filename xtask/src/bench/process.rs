//! A child process that is stopped when dropped, whatever path the benchmark takes out.

use std::{
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    pub fn spawn(command: &mut Command, name: &str) -> Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Self {
            child,
            name: name.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `None` while running, else how it ended.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.name))
    }

    /// Waits for the process to end by itself.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))
    }

    /// Sends SIGINT (a tracer then prints its last report) and waits up to `timeout`, then kills.
    pub fn interrupt(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            bail!("{} had already stopped ({status})", self.name);
        }
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        // SAFETY: kill(2) with a pid this process spawned and has not yet reaped (try_wait above
        // saw it running), so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        bail!(
            "{} did not stop within {timeout:?} of SIGINT; killed",
            self.name
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
