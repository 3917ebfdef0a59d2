//! Kicking a vCPU thread out of KVM_RUN: a signal with an empty handler makes the ioctl return
//! EINTR, after which the thread sees the abort flag. Used only when another vCPU failed.

use std::sync::OnceLock;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {}

/// The signal used for kicks (SIGRTMIN), with its empty handler installed once per process.
pub(crate) fn kick_signal() -> Option<c_int> {
    static SIGNAL: OnceLock<Option<c_int>> = OnceLock::new();
    *SIGNAL.get_or_init(|| {
        let signal = SIGRTMIN();
        register_signal_handler(signal, on_kick)
            .ok()
            .map(|()| signal)
    })
}

/// Sends the kick signal to `thread`, which must not have been joined yet.
pub(crate) fn kick(thread: libc::pthread_t) {
    if let Some(signal) = kick_signal() {
        // SAFETY: the caller guarantees `thread` is a thread of this process that has not been
        // joined or detached, so its pthread_t is valid (a thread that already ended is still
        // valid until joined); the signal has a handler that does nothing.
        unsafe {
            libc::pthread_kill(thread, signal);
        }
    }
}
