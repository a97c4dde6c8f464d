//! Telling a fork child's copy of a manager from the original.
//!
//! A forked child inherits a copy of every manager, with the parent's registrations and
//! watches (kernel objects and fds shared with the parent). Acting on them from the child
//! (deregistering, unwatching) would break the parent, so a manager refuses to work in a
//! child. `pthread_atfork` bumps a counter in the child, so the check on a hit is one load.
//! A child made by a raw `clone`/`fork` syscall skips the handler; for it the slow paths
//! read the word of a page mapped `MADV_WIPEONFORK`, which the kernel hands to every child
//! zero-filled, however it was made: the word holds the pid of the process that last set
//! it, so comparing it with the owner's pid is one load, not a `getpid` system call per
//! miss. (Kernels before 4.14 lack the advice; there the slow paths call `getpid`.)

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

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

/// The pid word of the wipe-on-fork page (see the module docs), or `None` where the
/// kernel lacks the advice.
fn wiped_pid_word() -> Option<&'static AtomicUsize> {
    static PAGE: OnceLock<Option<usize>> = OnceLock::new();
    let page = (*PAGE.get_or_init(|| {
        let len = crate::range::page_size();
        // (Never unmapped unless the advice fails: process-wide.)
        let p = crate::range::map_anonymous(len)?.as_ptr();
        // SAFETY: advice on the mapping made above.
        if unsafe { libc::madvise(p, len, libc::MADV_WIPEONFORK) } != 0 {
            // SAFETY: unmapping the mapping made above, which nothing references yet.
            unsafe { libc::munmap(p, len) };
            return None;
        }
        Some(p as usize)
    }))?;
    // SAFETY: the page stays mapped for the life of the process and is only accessed
    // through this atomic; zero-filled memory is a valid AtomicUsize.
    Some(unsafe { &*(page as *const AtomicUsize) })
}

/// This process's pid, read from the wipe-on-fork page (set on first use in each process).
fn current_pid() -> u32 {
    let Some(word) = wiped_pid_word() else {
        return pid();
    };
    match word.load(Ordering::Relaxed) {
        0 => {
            let me = pid();
            word.store(me as usize, Ordering::Relaxed);
            me
        }
        known => known as u32,
    }
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
            pid: current_pid(),
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
        if current_pid() == self.pid {
            Ok(())
        } else {
            Err(Error::ForkedChild { parent: self.pid })
        }
    }
}
