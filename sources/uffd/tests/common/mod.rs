//! Helpers shared by umm-uffd's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use umm_uffd::{Options, UffdSource};

/// How long a step may take before the test calls it a hang.
pub const LIMIT: Duration = Duration::from_secs(20);

static SERIAL: Mutex<()> = Mutex::new(());

/// Tests of one binary run one at a time while they hold this: each makes its own source,
/// and a source registers whole spans of the VMA around a watch, which another test's
/// adjacent (merged) anonymous mapping can share; its registration would then fail with
/// EBUSY.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a thread and fails (instead of hanging the suite) if it takes longer than
/// `limit`.
pub fn within_limit<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what}: did not finish within {limit:?} (hang)"))
}

/// [`within_limit`] with [`LIMIT`].
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    within_limit(what, LIMIT, f)
}

/// A source with `options`, or `None` (after a SKIP line) where userfaultfd is unusable.
pub fn source(options: Options) -> Option<Arc<UffdSource>> {
    match UffdSource::new(options) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("SKIP: userfaultfd not usable here: {e}");
            None
        }
    }
}
