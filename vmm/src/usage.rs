//! What the kernel accounted to this VMM, read by the VMM of itself: CPU time, page faults and
//! context switches (`getrusage`), and each vCPU thread's guest time (`/proc/thread-self/stat`).
//! The agent reports the same figures per tenant, from its probes and the tenant's cgroup; these
//! are their ground truth.

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The kernel's accounting of this process over some span: every thread, ended ones included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time in user mode, µs (guest time included: the kernel accounts it as user time).
    pub user_us: u64,
    /// CPU time in the kernel, µs.
    pub system_us: u64,
    /// Page faults served without I/O.
    pub minor_faults: u64,
    /// Page faults that needed I/O.
    pub major_faults: u64,
    /// Times a thread gave up the CPU (blocked).
    pub voluntary_switches: u64,
    /// Times a thread was preempted.
    pub involuntary_switches: u64,
}

/// `getrusage(RUSAGE_SELF)`.
fn rusage_of_process() -> Result<libc::rusage, Error> {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the call to fill.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) } != 0 {
        return Err(Error::Usage(format!(
            "getrusage: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(usage)
}

impl Usage {
    /// This process's accounting so far (`getrusage(RUSAGE_SELF)`).
    pub fn of_process() -> Result<Self, Error> {
        let usage = rusage_of_process()?;
        let micros = |t: libc::timeval| {
            u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
        };
        let count = |n: libc::c_long| u64::try_from(n).unwrap_or(0);
        Ok(Self {
            user_us: micros(usage.ru_utime),
            system_us: micros(usage.ru_stime),
            minor_faults: count(usage.ru_minflt),
            major_faults: count(usage.ru_majflt),
            voluntary_switches: count(usage.ru_nvcsw),
            involuntary_switches: count(usage.ru_nivcsw),
        })
    }

    /// What was accounted between `earlier` and `self`.
    #[must_use]
    pub fn since(self, earlier: Self) -> Self {
        Self {
            user_us: self.user_us.saturating_sub(earlier.user_us),
            system_us: self.system_us.saturating_sub(earlier.system_us),
            minor_faults: self.minor_faults.saturating_sub(earlier.minor_faults),
            major_faults: self.major_faults.saturating_sub(earlier.major_faults),
            voluntary_switches: self
                .voluntary_switches
                .saturating_sub(earlier.voluntary_switches),
            involuntary_switches: self
                .involuntary_switches
                .saturating_sub(earlier.involuntary_switches),
        }
    }

    /// Every page fault, minor and major.
    pub fn faults(&self) -> u64 {
        self.minor_faults + self.major_faults
    }
}

/// The calling thread's guest time so far, ns: field 43 of `/proc/thread-self/stat`, which the
/// kernel gives in clock ticks (`USER_HZ`, 100 per second on Linux, so 10 ms steps).
pub fn thread_guest_ns() -> Result<u64, Error> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")
        .map_err(|e| Error::Usage(format!("/proc/thread-self/stat: {e}")))?;
    let ticks = guest_ticks(&stat)
        .ok_or_else(|| Error::Usage(format!("no guest_time in /proc/thread-self/stat: {stat}")))?;
    Ok(ticks * (1_000_000_000 / clock_ticks_per_second()?))
}

/// Field 43 (guest_time) of a `/proc/.../stat` line. The second field, the command, is in
/// parentheses and may hold spaces and parentheses itself, so fields are counted after its last
/// `)`, which is field 2.
fn guest_ticks(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    after_comm
        .split_whitespace()
        .nth(43 - 3)
        .and_then(|f| f.parse().ok())
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the times in `/proc/.../stat`.
fn clock_ticks_per_second() -> Result<u64, Error> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| Error::Usage(format!("sysconf(_SC_CLK_TCK) = {ticks}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_time_is_field_43_counted_after_the_command() {
        // A command with a space and a parenthesis; utime 7, stime 8, guest_time 42.
        let mut fields: Vec<String> = (3..=52).map(|i| format!("{}", i * 1000)).collect();
        fields[43 - 3] = "42".into();
        let stat = format!("123 (vcpu 0) x) {}", fields.join(" "));
        assert_eq!(guest_ticks(&stat), Some(42));
        assert_eq!(guest_ticks("123 (short) S 1"), None);
    }

    #[test]
    fn this_process_is_accounted() {
        let before = Usage::of_process().unwrap();
        let pages: Vec<u8> = vec![1; 64 << 20];
        let after = Usage::of_process().unwrap();
        assert!(pages.iter().map(|&b| u64::from(b)).sum::<u64>() > 0);
        assert!(after.since(before).faults() >= 1, "{before:?} → {after:?}");
        assert!(thread_guest_ns().is_ok());
    }
}
