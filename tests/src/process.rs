//! Child processes a test starts: killed and reaped when it ends, whether it passes or panics.

use std::process::{Child, Command};

/// A child process killed (and reaped) on drop.
pub struct Proc {
    name: String,
    pub child: Child,
}

impl Proc {
    /// Starts `command`; `name` says what it is in failure messages.
    pub fn spawn(name: &str, command: &mut Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Panics with `context` if the process has exited.
    pub fn assert_running(&mut self, context: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status} {context}", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
