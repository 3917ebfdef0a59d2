//! What `/proc` says about a process's cost (CPU time, peak and current memory) and the host's load.

use anyhow::{Context, Result};

/// A process's CPU time and memory at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// CPU time since the process started, in seconds: time on CPU of its threads in nanoseconds
    /// (`/proc/<pid>/task/*/schedstat`) where the kernel keeps it, else user + system time from
    /// `/proc/<pid>/stat`, whose 10 ms clock ticks are too coarse for an agent that needs well under
    /// a millisecond a tick.
    pub cpu_secs: f64,
    /// Peak resident set size (`VmHWM`), KiB.
    pub hwm_kib: u64,
    /// Resident set size now (`VmRSS`), KiB.
    pub rss_kib: u64,
}

pub fn usage(pid: u32) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let ticks = cpu_ticks(&stat).context("parsing /proc/<pid>/stat")?;
    Ok(Usage {
        cpu_secs: on_cpu_ns(pid).map_or(ticks as f64 / clock_ticks_per_sec(), |ns| ns as f64 / 1e9),
        hwm_kib: status_kib(&status, "VmHWM").context("no VmHWM in /proc/<pid>/status")?,
        rss_kib: status_kib(&status, "VmRSS").context("no VmRSS in /proc/<pid>/status")?,
    })
}

/// utime + stime (fields 14 and 15 of proc(5)'s stat), in clock ticks, every thread included.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field 14 is fields[11].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Time on CPU of all the process's threads, in ns (the first field of each thread's schedstat).
fn on_cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// A `Key:   1234 kB` line of `/proc/<pid>/status`, in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name == key).then(|| value.split_whitespace().next()?.parse().ok())?
    })
}

/// User + system time of this process and of its children that have been waited for, in clock
/// ticks (the unit of /proc/stat).
pub fn own_cpu_ticks() -> f64 {
    let secs = |who| {
        // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid, writable rusage.
        unsafe { libc::getrusage(who, &raw mut usage) };
        let time = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        time(usage.ru_utime) + time(usage.ru_stime)
    };
    (secs(libc::RUSAGE_SELF) + secs(libc::RUSAGE_CHILDREN)) * clock_ticks_per_sec()
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Busy and total jiffies of all CPUs together, from the first line of /proc/stat.
pub fn host_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    busy_and_total(&stat).context("parsing /proc/stat")
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: busy is all but idle and iowait.
pub fn busy_and_total(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = values.iter().sum();
    let idle = values.get(3)? + values.get(4)?;
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_with_spaces() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 2911 0 0 0 \
                    37 12 0 0 20 0 1 0 123456 27000000 1500 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(49));
        assert_eq!(cpu_ticks("12 (x) S 1"), None);
    }

    #[test]
    fn status_lines_in_kib() {
        let status =
            "Name:\tvmtrace\nVmPeak:\t  30000 kB\nVmHWM:\t    9876 kB\nVmRSS:\t    9000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(9876));
        assert_eq!(status_kib(status, "VmRSS"), Some(9000));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn host_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\n";
        assert_eq!(busy_and_total(stat), Some((160, 1000)));
    }
}
