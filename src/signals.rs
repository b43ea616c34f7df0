//! SIGTERM and SIGINT for the training commands: the first asks the run to stop at the
//! next step boundary with a resume point written (Kubernetes sends SIGTERM before it
//! evicts a pod); a second one exits at once with 143.
//!
//! SIGUSR1 asks the same stop, but never escalates: it is what a trial process of
//! `gpo sweep` gets when the sweep dies (`PR_SET_PDEATHSIG`). The kernel sends that signal
//! again each time the dying sweep's threads exit one after another (the child is reparented
//! to each in turn), so a signal that exits on its second delivery would lose the resume
//! point.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int) {
    if let Some(f) = FLAG.get() {
        if f.swap(true, Ordering::SeqCst) && sig != libc::SIGUSR1 {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(143) };
        }
    }
}

/// The stop flag, with the handlers installed (once).
pub fn stop_flag() -> Arc<AtomicBool> {
    let f = FLAG
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
    // SAFETY: the handler only touches an initialized atomic and calls _exit.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR1, on_signal as *const () as libc::sighandler_t);
    }
    f
}
