//! The `vmtrace` command.

fn main() -> std::process::ExitCode {
    vmtrace::cmd::main()
}
