//! Giving registrations back: deregistration (reaping), the cache limits and eviction,
//! `flush` and the reaper thread.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::device::{DeviceSlot, DeviceState, Locked};
use super::registrar::Watches;
use super::Manager;
use crate::entry::{EntryRef, INVALID, LIVE};

impl Manager {
    /// The slow release path of an entry that was not `LIVE` when a reference dropped (or
    /// of any entry while its device is over its limits).
    #[cold]
    pub(super) fn slow_release(&self, dev: &DeviceSlot, e: EntryRef) {
        match Locked::try_lock(self, dev, true) {
            Some(mut locked) => self.reclaim(dev, locked.st(), e),
            None => {
                if dev.releases.push(e).is_err() {
                    // Queue full: wait for the lock. Inside one of this device's own
                    // backend calls we cannot; the entry is then found by `flush`.
                    if let Ok(mut locked) = Locked::lock(self, dev, true) {
                        self.reclaim(dev, locked.st(), e);
                    }
                }
            }
        }
    }

    /// After a reference to `e` dropped: an invalid entry with no reference left is
    /// doomed (once); a parked live entry with no reference left returns to the LRU.
    pub(super) fn reclaim(&self, dev: &DeviceSlot, st: &mut DeviceState, e: EntryRef) {
        if e.refs() != 0 {
            return;
        }
        // SAFETY: writer lock held.
        let w = unsafe { e.writer() };
        match e.state() {
            INVALID if w.stale => {
                w.stale = false;
                st.stale.remove(e, &st.chunks);
                st.doomed.push(e);
            }
            // (A parked entry of an earlier era is on the old list now.)
            LIVE if w.parked && e.era() == dev.era() => {
                w.parked = false;
                st.parked.remove(e, &st.chunks);
                st.lru.push_back(e, &st.chunks);
            }
            _ => {}
        }
    }

    /// Deregisters every doomed entry and recycles it. Calls the backend. Entries are
    /// taken one at a time and accounted for before the backend is called, so a backend
    /// that panics loses nothing: the entry it panicked on is recycled and unwatched, and
    /// the rest stay doomed for the next reap.
    pub(super) fn reap(&self, dev: &DeviceSlot, st: &mut DeviceState) {
        if st.doomed.is_empty() || self.owner.check_pid().is_err() {
            // (In a fork child the registrations are the parent's: never deregister them.)
            return;
        }
        let sources = self.sources.read().clone();
        while let Some(e) = st.doomed.pop() {
            let (range, id) = (e.range(), e.id());
            // SAFETY: writer lock held, entry not LIVE (INVALID or KILLING) and unreferenced
            // (checked when it was doomed; a doomed entry is unreachable for new hits).
            let translation = unsafe { e.retire() };
            st.free.push(e);
            let c = &dev.counters;
            c.registered_bytes.sub(range.len() as u64);
            c.registered_entries.sub(1);
            // Unwatched on every path, a panicking backend included.
            let _unwatch = Watches {
                sources: &sources,
                cookie: id,
                range,
                made: sources.len(),
            };
            if let Some(t) = translation {
                self.deregister(dev, range, t);
            }
        }
        dev.released.notify_all();
    }

    /// Evicts least recently used unreferenced entries (CLOCK: a recently hit entry gets a
    /// second chance) until `enough(bytes freed)` or nothing evictable is left; returns the
    /// bytes freed. Entries found pinned are parked off the LRU, so each is examined once
    /// per pinned episode: eviction is O(1) amortised however many entries are pinned.
    pub(super) fn evict_lru(
        &self,
        dev: &DeviceSlot,
        st: &mut DeviceState,
        mut enough: impl FnMut(u64) -> bool,
    ) -> u64 {
        let mut freed = 0u64;
        // At most two passes: the first may only clear reference bits.
        let mut budget = 2 * st.lru.len();
        while !enough(freed) && budget > 0 {
            budget -= 1;
            dev.counters.eviction_scans.add(1);
            let Some(e) = st.lru.front(&st.chunks) else {
                break;
            };
            if e.take_referenced() {
                st.lru.remove(e, &st.chunks);
                st.lru.push_back(e, &st.chunks);
                continue;
            }
            if !e.try_kill() {
                st.lru.remove(e, &st.chunks);
                // SAFETY: writer lock held.
                unsafe { e.writer() }.parked = true;
                st.parked.push_back(e, &st.chunks);
                continue;
            }
            let range = e.range();
            self.unlink_live(dev, st, e);
            dev.counters.evictions.add(1);
            tracing::debug!(device = %dev.id, %range, "evicted");
            st.doomed.push(e);
            freed += range.len() as u64;
            // Now, not after the loop: the limits are measured in registered bytes/entries.
            self.reap(dev, st);
        }
        freed
    }

    /// Evicts until the device is within the configured limits. When only pinned entries
    /// are left over the limit, the device is flagged so that every pin drop takes the
    /// slow path and the entry is evicted as soon as it becomes evictable.
    pub(super) fn enforce_limits(&self, dev: &DeviceSlot, st: &mut DeviceState) {
        let (max_bytes, max_entries) = if self.config.cache {
            (
                self.config.max_cached_bytes,
                self.config.max_cached_entries as u64,
            )
        } else {
            (0, 0)
        };
        let c = &dev.counters;
        let over =
            || c.registered_entries.get() > max_entries || c.registered_bytes.get() > max_bytes;
        if !over() {
            dev.over_limit.store(false, Ordering::SeqCst);
            return;
        }
        // The flag goes up before the sweep probes references: a pin dropped after the
        // probe found it sees the flag and comes back here (SeqCst on both sides).
        if !dev.over_limit.swap(true, Ordering::SeqCst) {
            // Parked entries may have been released while the flag was down: back to the LRU.
            let parked: Vec<EntryRef> = st.parked.iter(&st.chunks).collect();
            for e in parked {
                self.reclaim(dev, st, e);
            }
        }
        self.evict_lru(dev, st, |_| !over());
        if !over() {
            dev.over_limit.store(false, Ordering::SeqCst);
        }
    }

    /// Deregisters every cached entry that no [`super::Pin`] holds, on every device;
    /// returns how many were evicted. Devices whose backend call is running on this thread
    /// are skipped.
    pub fn evict_unreferenced(&self) -> usize {
        self.each_device()
            .map(|dev| {
                let Ok(mut locked) = Locked::lock(self, dev, true) else {
                    return 0;
                };
                locked.settle();
                let before = dev.counters.evictions.get();
                self.evict_lru(dev, locked.st(), |_| false);
                (dev.counters.evictions.get() - before) as usize
            })
            .sum()
    }

    /// Applies every recorded invalidation, drains the notifier sources, deregisters every
    /// stale entry no pin holds and evicts down to the limits. Returns when all of that is
    /// done (devices whose backend call is running on this thread are skipped).
    pub fn flush(&self) {
        self.sync_sources();
        for dev in self.each_device() {
            let Ok(mut locked) = Locked::lock(self, dev, true) else {
                continue;
            };
            let st = locked.st();
            self.apply_pending(dev, st);
            self.clean_old(dev, st, usize::MAX);
            let stale: Vec<EntryRef> = st.stale.iter(&st.chunks).collect();
            for e in stale {
                self.reclaim(dev, st, e);
            }
            self.reap(dev, st);
            self.enforce_limits(dev, st);
        }
    }

    /// Settles the other devices that owe deregistrations (without waiting for their
    /// locks: a busy lock's holder settles on its unlock).
    pub(super) fn settle_others(&self) {
        for dev in self.each_device() {
            if dev.owes_work.load(Ordering::Relaxed) || dev.has_work() {
                drop(Locked::try_lock(self, dev, true));
            }
        }
    }

    /// Starts a thread that calls [`Manager::flush`] every `interval` (deregistering stale
    /// entries promptly even when the application stops pinning). It holds only a weak
    /// reference; dropping the returned [`Reaper`] stops and joins it.
    pub fn start_reaper(self: &Arc<Self>, interval: Duration) -> Reaper {
        let weak: Weak<Manager> = Arc::downgrade(self);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("umm-reaper".into())
            .spawn(move || loop {
                {
                    let mut stopped = stop2.0.lock();
                    if !*stopped {
                        stop2.1.wait_for(&mut stopped, interval);
                    }
                    if *stopped {
                        return;
                    }
                }
                match weak.upgrade() {
                    Some(m) => m.flush(),
                    None => return,
                }
            })
            .ok();
        Reaper { stop, thread }
    }
}

/// The background thread of [`Manager::start_reaper`]; dropping it stops the thread.
pub struct Reaper {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
