//! `cargo xtask seccomp`: deploy/seccomp/vmtrace.json, the containers-common default seccomp
//! profile (what CRI-O and podman apply as RuntimeDefault) with `bpf()` and `perf_event_open()`
//! allowed without CAP_SYS_ADMIN. The kernel still requires CAP_BPF and CAP_PERFMON for them; the
//! default profile predates those capabilities and gates both on CAP_SYS_ADMIN (docs/deploy.md).

use std::{fs, path::Path};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The runtime's default profile, from Debian's golang-github-containers-common.
const DEFAULT_PROFILE: &str = "/usr/share/containers/seccomp.json";
/// Where the profile ships, relative to the workspace root.
pub const PROFILE: &str = "deploy/seccomp/vmtrace.json";
/// What vmtrace needs beyond the default: map and program creation, and tracepoint perf events.
const NEEDED: [&str; 2] = ["bpf", "perf_event_open"];

/// Writes the profile (`check`: fails instead when the shipped one differs from what the installed
/// default gives, e.g. after containers-common changed its default).
pub fn run(workspace_root: &Path, check: bool) -> Result<()> {
    crate::setup::install_packages(&["golang-github-containers-common"])?;
    let default: Value = serde_json::from_str(
        &fs::read_to_string(DEFAULT_PROFILE)
            .with_context(|| format!("reading {DEFAULT_PROFILE}"))?,
    )
    .with_context(|| format!("parsing {DEFAULT_PROFILE}"))?;
    let profile = serde_json::to_string_pretty(&with_vmtrace_syscalls(default)?)? + "\n";
    let path = workspace_root.join(PROFILE);
    if check {
        let shipped = fs::read_to_string(&path).unwrap_or_default();
        if shipped != profile {
            bail!(
                "{PROFILE} is not the installed runtime default ({DEFAULT_PROFILE}) plus {NEEDED:?}: \
                 run `cargo xtask seccomp` and commit it"
            );
        }
        return Ok(());
    }
    fs::create_dir_all(path.parent().unwrap_or(workspace_root))?;
    fs::write(&path, profile).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("seccomp: wrote {PROFILE}");
    Ok(())
}

/// `default` without [`NEEDED`] in its capability-gated rules, and one rule allowing them.
fn with_vmtrace_syscalls(mut default: Value) -> Result<Value> {
    let Some(rules) = default["syscalls"].as_array_mut() else {
        bail!("{DEFAULT_PROFILE} has no `syscalls` list");
    };
    for rule in rules.iter_mut() {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|name| !NEEDED.iter().any(|needed| name == needed));
        }
    }
    rules.retain(|rule| {
        rule["names"]
            .as_array()
            .is_none_or(|names| !names.is_empty())
    });
    rules.push(json!({
        "names": NEEDED,
        "action": "SCMP_ACT_ALLOW",
        "comment": "vmtrace: the kernel requires CAP_BPF for bpf() and CAP_PERFMON for perf_event_open() of tracepoints",
    }));
    Ok(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_needed_syscalls_leave_the_gated_rules_for_one_rule_of_their_own() {
        let default = json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["bpf", "setns"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["bpf", "setns"], "action": "SCMP_ACT_ERRNO", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["perf_event_open"], "action": "SCMP_ACT_ERRNO"},
        ]});
        let profile = with_vmtrace_syscalls(default).unwrap();
        let rules = profile["syscalls"].as_array().unwrap();
        assert_eq!(rules.len(), 4, "{rules:#?}");
        assert_eq!(rules[1]["names"], json!(["setns"]));
        assert_eq!(rules[2]["names"], json!(["setns"]));
        assert_eq!(rules[3]["names"], json!(["bpf", "perf_event_open"]));
        assert_eq!(rules[3]["action"], "SCMP_ACT_ALLOW");
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    }
}
