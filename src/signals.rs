//! SIGTERM and SIGINT for the training commands: the first asks the run to stop at the
//! next step boundary with a resume point written (Kubernetes sends SIGTERM before it
//! evicts a pod); a second one exits at once with 143.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(f) = FLAG.get() {
        if f.swap(true, Ordering::SeqCst) {
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
    }
    f
}
