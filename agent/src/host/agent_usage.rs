//! The agent's own CPU time and memory, from /proc/self.

use std::fs;

use crate::host::procfs::{clock_ticks_per_second, stat_field};

/// User and system CPU seconds of this process (`utime` and `stime`, fields 14 and 15).
pub fn cpu_secs() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let ticks = clock_ticks_per_second() as f64;
    let secs = |n: usize| {
        stat_field(&stat, n)
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |t| t / ticks)
    };
    (secs(14), secs(15))
}

/// Resident memory of this process in bytes.
pub fn rss_bytes() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let (user, system) = cpu_secs();
        assert!(user + system > 0.0, "{user} {system}");
        assert!(rss_bytes() > 1024 * 1024);
    }
}
