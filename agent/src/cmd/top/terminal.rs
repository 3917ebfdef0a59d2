//! The terminal while `top` runs: raw mode and the alternate screen, and getting the user's shell
//! back intact on every way out: `q`, Ctrl-C (a key in raw mode), SIGINT/SIGTERM/SIGHUP from
//! outside, an error, or a panic.

use std::{
    io::{self, Stdout},
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor::{Hide, Show},
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
};

/// Whether the terminal is in `top`'s state and needs restoring.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Set by SIGINT, SIGTERM or SIGHUP; the event loop sees it within one poll.
static STOP: AtomicBool = AtomicBool::new(false);

/// The terminal in raw mode on the alternate screen; restored when dropped.
pub struct TerminalGuard {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    pub fn enter() -> io::Result<Self> {
        install_panic_hook();
        install_signal_handlers();
        spawn_watchdog();
        enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        let mut stdout = io::stdout();
        if let Err(e) = execute!(stdout, EnterAlternateScreen, Hide) {
            restore();
            return Err(e);
        }
        match Terminal::new(CrosstermBackend::new(stdout)) {
            Ok(terminal) => Ok(Self { terminal }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves the alternate screen and raw mode, once, whoever calls first (drop or panic hook).
pub fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
    }
}

/// Whether a termination signal arrived.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Restores the terminal before the panic message is printed, so the message is readable and the
/// shell usable.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// How long the event loop has to notice a termination signal before the watchdog ends the process.
const GRACE: Duration = Duration::from_secs(1);

/// Ends the process if a termination signal is not acted on in time. The event loop checks for one
/// every tick, but when the terminal hangs up under it (its tmux or ssh session killed), crossterm
/// can spin inside its input reading and never return to the loop.
fn spawn_watchdog() {
    static WATCHDOG: Once = Once::new();
    WATCHDOG.call_once(|| {
        std::thread::spawn(|| {
            while !stop_requested() {
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(GRACE);
            restore();
            std::process::exit(1);
        });
    });
}

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Termination signals set [`STOP`] instead of killing the process with the terminal still raw.
fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe, and lives for the whole program.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut());
        }
    }
}
