//! Argument types shared by several commands.

use std::time::Duration;

use clap::Args;

use crate::{probe::load::ProbeOptions, tenant::aggregate::DEFAULT_MAX_TENANTS};

/// The sampling intervals accepted: a map read every 10 ms at most, and at least once an hour
/// (rates over longer spans hide every burst, and a stalled agent would look alive).
pub const INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_hours(1));
/// The timeline windows accepted: at least one interval (checked where both are known), at most a
/// day, which bounds the memory the agent's timeline takes.
pub const WINDOW_RANGE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_hours(24));

/// The tenant caps accepted: at least one tenant by name, at most a million (beyond that the cap
/// bounds nothing an exporter could carry).
pub const MAX_TENANTS_RANGE: (usize, usize) = (1, 1_000_000);

/// Parses a tenant cap, from 1 to 1,000,000.
pub fn parse_max_tenants(text: &str) -> Result<usize, String> {
    let value: usize = text.trim().parse().map_err(|e| format!("`{text}`: {e}"))?;
    check_max_tenants(value, "the tenant cap")?;
    Ok(value)
}

/// Refuses a tenant cap outside [`MAX_TENANTS_RANGE`]; `what` names the setting.
pub fn check_max_tenants(value: usize, what: &str) -> Result<(), String> {
    let (min, max) = MAX_TENANTS_RANGE;
    if value < min || value > max {
        return Err(format!(
            "{what} must be from {min} to {max} tenants, not {value}"
        ));
    }
    Ok(())
}

/// Parses a sampling interval (`1s`, `500ms`), from 10 ms to 1 hour.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    parse_in_range(text, "the interval", INTERVAL_RANGE)
}

/// Parses a timeline window (`10m`), from 10 ms to 24 hours.
pub fn parse_window(text: &str) -> Result<Duration, String> {
    parse_in_range(text, "the window", WINDOW_RANGE)
}

/// Parses a duration and refuses one outside `range`; `what` names it in the error.
pub fn parse_in_range(
    text: &str,
    what: &str,
    range: (Duration, Duration),
) -> Result<Duration, String> {
    let value = humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e}"))?;
    check_range(value, what, range)?;
    Ok(value)
}

/// Refuses a duration outside `range` (bounds included), with a message that names both bounds.
pub fn check_range(
    value: Duration,
    what: &str,
    (min, max): (Duration, Duration),
) -> Result<(), String> {
    if value < min || value > max {
        return Err(format!(
            "{what} must be at least {} and at most {}, not {}",
            humantime::format_duration(min),
            humantime::format_duration(max),
            humantime::format_duration(value),
        ));
    }
    Ok(())
}

/// Flags for the optional probes and the sampling, for every command that runs the probes.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct ProbeArgs {
    /// Also measure kick service latency (a queue's first kick to its VMM's read of the doorbell
    /// eventfd), reported under `kick.q<N>`. Attaches syscalls:sys_enter_read, which runs on every
    /// read() of the host, so it is off by default. Implies --vm-ioctls.
    #[arg(long, env = "VMTRACE_KICK_LATENCY")]
    pub kick_latency: bool,
    /// Also follow the VMMs' setup ioctls (KVM_IOEVENTFD, KVM_SET_USER_MEMORY_REGION) to learn
    /// doorbells and guest memory exactly: port doorbells' kicks, `kick.any` for doorbells without
    /// datamatch, their VM fds, and returned memory clipped to guest memory. Attaches
    /// syscalls:sys_enter_ioctl, which runs on every ioctl of the host (KVM_RUN included), so it is
    /// off by default; without it, kicks of MMIO doorbells are inferred per queue from the writes
    /// the kernel completes (docs/virtio-kicks.md).
    #[arg(long, env = "VMTRACE_VM_IOCTLS")]
    pub vm_ioctls: bool,
    /// Also measure the VMMs' service time per exit (a return to the VMM to the same thread's next
    /// KVM_RUN), reported as the latency of `exit.<reason>`. Attaches kvm:kvm_fpu, which runs on
    /// every KVM_RUN and costs an exit-heavy guest about 300 ns per exit it takes to its VMM, so it
    /// is off by default (docs/latency.md).
    #[arg(long, env = "VMTRACE_SERVICE_TIME")]
    pub service_time: bool,
    /// How many tenants are reported by name; the counts of any more are summed into one tenant
    /// labelled `overflow`, so totals stay exact [default: 1000].
    #[arg(long, env = "VMTRACE_MAX_TENANTS", value_parser = parse_max_tenants)]
    pub max_tenants: Option<usize>,
}

impl ProbeArgs {
    /// The tenant cap given, or the default.
    pub fn max_tenants(&self) -> usize {
        self.max_tenants.unwrap_or(DEFAULT_MAX_TENANTS)
    }
}

impl From<ProbeArgs> for ProbeOptions {
    fn from(args: ProbeArgs) -> Self {
        // Exits per thread are top's alone; it turns them on.
        Self {
            kick_latency: args.kick_latency,
            vm_ioctls: args.vm_ioctls,
            service_time: args.service_time,
            thread_exits: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_from_10ms_to_an_hour_are_accepted() {
        assert_eq!(parse_interval("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_interval("1h"), Ok(Duration::from_hours(1)));
        for (text, needle) in [
            ("0", "not 0s"),
            ("0s", "not 0s"),
            ("9ms", "at least 10ms"),
            ("1h 1s", "at most 1h"),
            ("365days", "at most 1h"),
            ("soon", "`soon`"),
            ("-1s", "`-1s`"),
        ] {
            let err = parse_interval(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn tenant_caps_from_one_to_a_million_are_accepted() {
        assert_eq!(parse_max_tenants("1"), Ok(1));
        assert_eq!(parse_max_tenants("1000000"), Ok(1_000_000));
        for text in ["0", "1000001", "-1", "many"] {
            assert!(parse_max_tenants(text).is_err(), "{text}");
        }
    }

    #[test]
    fn windows_from_10ms_to_a_day_are_accepted() {
        assert_eq!(parse_window("24h"), Ok(Duration::from_hours(24)));
        assert_eq!(parse_window("10m"), Ok(Duration::from_mins(10)));
        for text in ["0", "5ms", "25h", "1y"] {
            let err = parse_window(text).unwrap_err();
            assert!(err.contains("at most 1day"), "{text}: {err}");
        }
    }
}

/// Where pod tenants' names come from: the Kubernetes API server.
#[derive(Debug, Clone, Default, Args)]
pub struct KubeArgs {
    /// The Kubernetes node this host is (`k8s.node.name` on the agent's exports), usually from the
    /// downward API. With it, inside a cluster or with --kube-api, pod tenants get their namespace
    /// and name (and KubeVirt VMs their VirtualMachineInstance name) from the API server, watching
    /// this node's pods only.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubernetes API server base URL, for use outside a cluster (e.g. `kubectl proxy`'s
    /// `http://127.0.0.1:8001`); inside a cluster the service environment and account are used.
    #[arg(long, env = "VMTRACE_KUBE_API")]
    pub kube_api: Option<String>,
}
