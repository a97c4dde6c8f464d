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
//! # Watches
//!
//! Each manager cookie becomes one kernel watch of the registration's range rounded out to
//! pages, so overlapping or repeated ranges of different cookies need no reference count.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use umm::{page_size, InvalidationSink, NotifierSource, Range};

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
        }
    }

    /// The underlying device.
    pub fn device(&self) -> &NotifyDevice {
        &self.dev
    }

    /// The kernel watch of a manager range: rounded out to pages.
    fn page_range(range: Range) -> Result<Range> {
        range
            .align_out(page_size())
            .map_err(|source| Error::Range { range, source })
    }
}

impl NotifierSource for KmodSource {
    fn name(&self) -> &str {
        "kmod-notifier"
    }

    fn watch(
        &self,
        cookie: u64,
        range: Range,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let r = KmodSource::page_range(range)?;
        self.dev.watch(cookie, r.start() as u64, r.len() as u64)?;
        Ok(())
    }

    fn unwatch(&self, cookie: u64, range: Range) {
        if let Err(e) = self.dev.unwatch(cookie) {
            tracing::warn!(cookie, ?range, error = %e, "kmod-notifier: unwatch failed");
        }
    }

    fn generation(&self) -> Option<&AtomicU64> {
        Some(self.dev.generation())
    }

    fn drain(&self, sink: &dyn InvalidationSink) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
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
