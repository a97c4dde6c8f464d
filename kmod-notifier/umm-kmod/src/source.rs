//! [`KmodSource`]: the kernel module as a [`umm::NotifierSource`].
//!
//! # Delivery: poll-driven drain, no reader thread
//!
//! The kernel bumps the mmap'd generation inside the MMU notifier, before the causing
//! syscall returns. The manager compares it on every cache hit (one load) and calls
//! [`drain`](NotifierSource::drain) when it moved; `drain` reads the ring with non-blocking
//! `read()`s and hands each record to the manager as `invalidate(range)`, or
//! `invalidate_all()` for an overflow record. So a hit never returns a stale registration,
//! and no thread is needed. Records pile up in the kernel ring only while nobody pins; if
//! the ring fills, the overflow record turns into one `invalidate_all` (nothing is lost).
//! A manager with a reaper (`Manager::start_reaper`) also drains periodically, which
//! releases invalidated registrations of an idle process.
//!
//! Every event kind is treated as an invalidation, including protection changes
//! (`mprotect`, fork's write-protection): they do not replace pages themselves, but treating
//! them as harmless is not proven for every backend, and they only cost a re-registration.
//!
//! The kernel's event kind is not trusted to mean less: on Linux 6.1 KSM merging and page
//! migration arrive as `CLEAR` (see [`crate::EventKind`]), and every kind is an invalidation.
//!
//! # Watches
//!
//! Each manager cookie becomes one kernel watch of the registration's range rounded out to
//! pages, so overlapping or repeated ranges of different cookies need no reference count.
//! The module allocates the watch ids (dense, so its index costs about 140 bytes per watch
//! whatever the cookies look like); the source maps each cookie to its kernel id. One open
//! file holds at most the module's `max_watches` watches (default 262144): past it, `watch`
//! fails with [`Error::WatchLimit`] and the manager fails that `pin`.
//!
//! # One manager
//!
//! A source serves one manager at a time (its cookies name the watches): a second
//! [`attach`](NotifierSource::attach) fails with [`Error::AlreadyAttached`]; open another
//! source for another manager. After [`detach`](NotifierSource::detach) it may serve a new one.
//!
//! # Fork
//!
//! The open file belongs to the process that opened it. A fork child's copy of the source
//! does nothing: `watch` and `attach` fail with [`Error::ForkedChild`], `unwatch`, `drain`
//! and `detach` return without a system call, and dropping it closes only the child's
//! descriptor. The parent's watches and records are untouched (the module enforces the
//! same: every use from another address space is `EPERM`). A child that pins memory with
//! its own manager opens its own source.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use umm::{page_size, InvalidationSink, ManagerId, NotifierSource, Range};

use crate::device::NotifyDevice;
use crate::error::{Error, Result};
use crate::sys;

/// Records read per `read()` call while draining.
const DRAIN_BATCH: usize = 128;

/// The kernel module as an invalidation source for [`umm::Manager`].
#[derive(Debug)]
pub struct KmodSource {
    dev: NotifyDevice,
    /// The drain buffer. Held while records are read **and** delivered, so a concurrent
    /// `drain` returns only after every record read before it was applied to the sink.
    buf: Mutex<Vec<sys::umm_notify_record>>,
    /// Manager cookie -> the module's watch id.
    ids: Mutex<HashMap<u64, u64>>,
    /// The manager this source serves.
    attached: Mutex<Option<ManagerId>>,
}

impl KmodSource {
    /// Opens `/dev/umm_notify` for the calling process.
    pub fn open() -> Result<KmodSource> {
        Ok(KmodSource::new(NotifyDevice::open()?))
    }

    /// Wraps an open device.
    pub fn new(dev: NotifyDevice) -> KmodSource {
        KmodSource {
            dev,
            buf: Mutex::new(vec![sys::umm_notify_record::default(); DRAIN_BATCH]),
            ids: Mutex::new(HashMap::new()),
            attached: Mutex::new(None),
        }
    }

    /// The underlying device.
    pub fn device(&self) -> &NotifyDevice {
        &self.dev
    }

    /// How many cookies are watched now.
    pub fn watches(&self) -> usize {
        lock(&self.ids).len()
    }

    /// The kernel watch of a manager range: rounded out to pages.
    fn page_range(range: Range) -> Result<Range> {
        range
            .align_out(page_size())
            .map_err(|source| Error::Range { range, source })
    }
}

/// Locks `m`, ignoring poisoning (the guarded data stays consistent: every update is one
/// insert or remove).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NotifierSource for KmodSource {
    fn name(&self) -> &str {
        "kmod-notifier"
    }

    fn attach(&self, manager: ManagerId) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.dev.is_forked_copy() {
            return Err(Box::new(Error::ForkedChild {
                path: self.dev.path().to_path_buf(),
                opener: self.dev.opener(),
                caller: std::process::id(),
            }));
        }
        let mut attached = lock(&self.attached);
        match *attached {
            Some(other) if other != manager => Err(Box::new(Error::AlreadyAttached {
                attached: other,
                requested: manager,
            })),
            _ => {
                *attached = Some(manager);
                Ok(())
            }
        }
    }

    fn detach(&self, manager: ManagerId) {
        let mut attached = lock(&self.attached);
        if *attached != Some(manager) {
            return;
        }
        *attached = None;
        let ids: Vec<(u64, u64)> = lock(&self.ids).drain().collect();
        if self.dev.is_forked_copy() {
            // The watches are the parent's: forget our copy of the map, touch nothing.
            return;
        }
        // Watches the manager left behind would collide with the next manager's cookies.
        for (cookie, id) in ids {
            if let Err(e) = self.dev.unwatch(id) {
                tracing::warn!(cookie, id, error = %e, "kmod-notifier: unwatch at detach failed");
            }
        }
    }

    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let r = KmodSource::page_range(range)?;
        let mut ids = lock(&self.ids);
        if ids.contains_key(&cookie) {
            return Err(Box::new(Error::CookieInUse { cookie }));
        }
        let id = self.dev.watch(r.start() as u64, r.len() as u64)?;
        ids.insert(cookie, id);
        Ok(())
    }

    fn unwatch(&self, cookie: u64, range: Range) {
        if self.dev.is_forked_copy() {
            tracing::debug!(
                cookie,
                ?range,
                "kmod-notifier: unwatch in a fork child ignored"
            );
            return;
        }
        let Some(id) = lock(&self.ids).remove(&cookie) else {
            tracing::debug!(
                cookie,
                ?range,
                "kmod-notifier: unwatch of an unknown cookie"
            );
            return;
        };
        if let Err(e) = self.dev.unwatch(id) {
            tracing::warn!(cookie, id, ?range, error = %e, "kmod-notifier: unwatch failed");
        }
    }

    fn generation(&self) -> Option<&AtomicU64> {
        Some(self.dev.generation())
    }

    fn drain(&self, sink: &dyn InvalidationSink) {
        if self.dev.is_forked_copy() {
            // The records are the parent's; the kernel would refuse (EPERM) anyway.
            return;
        }
        let mut buf = lock(&self.buf);
        loop {
            let n = match self.dev.read_records(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    // Cannot tell what was lost: everything may have changed.
                    tracing::error!(error = %e, "kmod-notifier: reading events failed; invalidating all");
                    sink.invalidate_all();
                    return;
                }
            };
            for r in &buf[..n] {
                if r.kind == sys::UMM_NOTIFY_EVENT_OVERFLOW {
                    tracing::debug!(
                        seq = r.seq,
                        "kmod-notifier: ring overflowed; invalidating all"
                    );
                    sink.invalidate_all();
                    continue;
                }
                match Range::from_bounds(r.start as usize, r.end as usize) {
                    Ok(range) => sink.invalidate(range),
                    Err(e) => {
                        tracing::error!(?r, error = %e, "kmod-notifier: malformed record; invalidating all");
                        sink.invalidate_all();
                    }
                }
            }
            if n < buf.len() {
                return;
            }
        }
    }
}
