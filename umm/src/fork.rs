//! Telling a fork child's copy of a manager from the original.
//!
//! A forked child inherits a copy of every manager, with the parent's registrations and
//! watches (kernel objects and fds shared with the parent). Acting on them from the child
//! (deregistering, unwatching) would break the parent, so a manager refuses to work in a
//! child. `pthread_atfork` bumps a counter in the child, so the check is one load; a child
//! made by a raw `clone`/`fork` syscall skips the handler, so the slow paths compare the
//! pid too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

/// Forks this process descends from (bumped in the child by the atfork handler).
static FORKS: AtomicU64 = AtomicU64::new(0);
static HANDLER: Once = Once::new();

extern "C" fn in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

fn pid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// The process that created something, as seen at creation.
#[derive(Debug)]
pub(crate) struct Owner {
    forks: u64,
    pid: u32,
}

impl Owner {
    /// The calling process.
    pub(crate) fn current() -> Owner {
        HANDLER.call_once(|| {
            // SAFETY: registers a handler that only does an atomic add (async-signal-safe,
            // as a child handler must be).
            unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        });
        Owner {
            forks: FORKS.load(Ordering::Relaxed),
            pid: pid(),
        }
    }

    /// Cheap check (one load): fails in a child forked through libc.
    #[inline]
    pub(crate) fn check(&self) -> Result<()> {
        if FORKS.load(Ordering::Relaxed) == self.forks {
            Ok(())
        } else {
            Err(Error::ForkedChild { parent: self.pid })
        }
    }

    /// Full check: also catches children made by raw `fork`/`clone` syscalls.
    pub(crate) fn check_pid(&self) -> Result<()> {
        self.check()?;
        if pid() == self.pid {
            Ok(())
        } else {
            Err(Error::ForkedChild { parent: self.pid })
        }
    }
}
