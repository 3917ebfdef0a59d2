//! `cargo xtask soak`: the soak test (tests/tests/soak.rs) for as long as asked. `cargo xtask test`
//! runs the same test for 2 minutes; this is the long run whose figures docs/soak.md gives.

use anyhow::{Result, ensure};

use crate::{setup, workspace};

pub fn run(minutes: u64) -> Result<()> {
    ensure!(
        (1..=24 * 60).contains(&minutes),
        "--minutes must be from 1 to 1440, not {minutes}"
    );
    setup::run()?;
    eprintln!(
        "soak: {minutes} min of churn and load against the agent; the figures come at the end"
    );
    setup::exec(
        workspace::cargo(&workspace::workspace_root())
            .args([
                "test",
                "-p",
                "vmtrace-tests",
                "--test",
                "soak",
                "--",
                "--nocapture",
            ])
            .env("VMTRACE_SOAK_SECS", (minutes * 60).to_string())
            // A soak that cannot run is a failure, not a skip.
            .env("VMTRACE_REQUIRE_CAPS", "1"),
    )
}
