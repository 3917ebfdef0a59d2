//! Waiting for a condition, with a time limit.

use std::time::{Duration, Instant};

/// How often a condition is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Some`, for at most `timeout` (and once
/// more when it has passed); `None` if it never did. For callers that report the last state seen.
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Some`; panics naming `what` when
/// `timeout` has passed.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll(timeout, check).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value_or_none_at_the_deadline() {
        let mut calls = 0;
        let value = wait_for("the third call", Duration::from_secs(5), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(value, 3);
        let started = Instant::now();
        assert_eq!(poll(Duration::from_millis(300), || None::<()>), None);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
