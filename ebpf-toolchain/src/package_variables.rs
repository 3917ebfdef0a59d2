//! The variables cargo sets for a program it runs (`cargo run`, a test), which a cargo started by
//! that program would pass on to every build script.

use std::process::Command;

/// Variables cargo sets for the one package whose program it runs, besides the `CARGO_PKG_` and
/// `CARGO_BIN_` families.
const SET_FOR_ONE_PACKAGE: [&str; 6] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "OUT_DIR",
];

/// Removes them from `command`, a cargo run from such a program. A build script that tracks one of
/// them (ring's tracks `CARGO_MANIFEST_DIR`) would otherwise see it differ between `cargo test` run
/// from a shell, from `cargo xtask`, and from a test, and rebuild its crate and all above it.
pub fn remove(command: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if SET_FOR_ONE_PACKAGE.contains(&key)
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
        {
            command.env_remove(key);
        }
    }
    command
}
