//! The probe: a sink that timestamps what it is told.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use umm::{InvalidationSink, Range};

/// Records up to [`Probe::CAPACITY`] reports with their `CLOCK_MONOTONIC` time; it is both
/// an [`InvalidationSink`] (for sources) and a [`umm_interpose::HookSink`] (for hooks).
/// The record vector is preallocated, so recording does not allocate.
pub struct Probe {
    records: Mutex<Vec<(u64, Range)>>,
    count: AtomicU64,
    alls: AtomicU64,
}

/// Nanoseconds of `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Probe {
    /// Most records kept between two [`Probe::clear`]s.
    pub const CAPACITY: usize = 4096;

    /// An empty probe.
    pub fn new() -> Arc<Probe> {
        Arc::new(Probe {
            records: Mutex::new(Vec::with_capacity(Self::CAPACITY)),
            count: AtomicU64::new(0),
            alls: AtomicU64::new(0),
        })
    }

    fn record(&self, range: Range) {
        let t = now_ns();
        let mut r = self.records.lock();
        if r.len() < Self::CAPACITY {
            r.push((t, range));
        }
        drop(r);
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Reports so far (including those beyond the capacity).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// `invalidate_all` calls so far.
    pub fn invalidate_alls(&self) -> u64 {
        self.alls.load(Ordering::SeqCst)
    }

    /// Forgets the records (keeps the capacity).
    pub fn clear(&self) {
        self.records.lock().clear();
    }

    /// The earliest report at or after `since` that overlaps `range`.
    pub fn first_overlap(&self, range: Range, since: u64) -> Option<u64> {
        self.records
            .lock()
            .iter()
            .filter(|(t, r)| *t >= since && r.overlaps(&range))
            .map(|(t, _)| *t)
            .min()
    }
}

impl InvalidationSink for Probe {
    fn invalidate(&self, range: Range) {
        self.record(range);
    }
    fn invalidate_all(&self) {
        self.alls.fetch_add(1, Ordering::SeqCst);
    }
}

impl umm_interpose::HookSink for Probe {
    fn invalidate_from_hook(&self, range: Range) {
        self.record(range);
    }
}
