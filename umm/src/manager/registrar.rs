//! The miss path: a slow hit under the lock, or watch + register + publish, with the
//! overlap rules of devices that refuse overlapping registrations.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{BackendErrorKind, ErasedTranslation};
use crate::entry::{Acquire, ChunkBox, EntryRef, LIVE};
use crate::error::{memlock_limit, Error, Result};
use crate::range::{is_mapped, Range};
use crate::source::{NotifierSource, Uncovered};

use super::device::{DeviceSlot, DeviceState, Locked};
use super::invalidation::overlapping;
use super::Manager;

/// How many times a registration invalidated while in flight is retried.
const REGISTER_ATTEMPTS: u32 = 3;

/// Marks a registration in flight for lock-free recorders (see `Manager::record`); the
/// mark is taken off on every path, unwinding from a panicking backend included.
struct InFlight<'a> {
    dev: &'a DeviceSlot,
}

impl<'a> InFlight<'a> {
    fn begin(dev: &'a DeviceSlot, st: &mut DeviceState, want: Range) -> Self {
        st.inflight = None;
        // Bounds before the count: a recorder that sees the count sees them.
        dev.set_inflight(st, want);
        dev.registering.fetch_add(1, Ordering::SeqCst);
        InFlight { dev }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.dev.registering.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The first `made` sources' watches of one registration, undone on drop (on every path:
/// a failed or panicking registration, an undone one, a deregistered entry).
pub(super) struct Watches<'a> {
    pub sources: &'a [Arc<dyn NotifierSource>],
    pub cookie: u64,
    pub range: Range,
    pub made: usize,
}

impl Drop for Watches<'_> {
    fn drop(&mut self) {
        for s in &self.sources[..self.made] {
            s.unwatch(self.cookie, self.range);
        }
    }
}

impl Manager {
    /// The locked path of a pin on one device: slow hit, or registration.
    pub(super) fn pin_slow(
        &self,
        dev: &DeviceSlot,
        range: &Range,
        stripe: usize,
    ) -> Result<EntryRef> {
        let want = range.align_out(dev.caps.alignment)?;
        if want.len() > dev.caps.max_registration {
            return Err(Error::TooLarge {
                device: dev.id,
                range: want,
                max: dev.caps.max_registration,
            });
        }
        let mut locked = Locked::lock(self, dev, true)?;
        locked.settle();
        if let Some(e) = Self::find_containing(dev, locked.st(), range) {
            match e.try_acquire(stripe, range, dev.era(), true) {
                Ok(()) => return Ok(e),
                Err(Acquire::Saturated) => {
                    return Err(Error::TooManyPins {
                        device: dev.id,
                        range: *range,
                    })
                }
                Err(Acquire::Refused { .. }) => {} // cannot happen to a live entry under the lock
            }
        }
        self.owner.check_pid()?;
        dev.counters.misses.add(1);
        // Checked first only where the backend would not fail on unmapped memory itself.
        let check_first = self.config.check_mapped && !dev.caps.rejects_unmapped;
        let unmapped = |want: &Range| self.config.check_mapped && !is_mapped(want);
        if check_first && unmapped(&want) {
            return Err(Error::Unmapped { range: want });
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.register_and_publish(&mut locked, want, stripe) {
                Ok(Some(e)) => return Ok(e),
                Err(Error::Backend { .. }) if unmapped(&want) => {
                    return Err(Error::Unmapped { range: want })
                }
                Err(e) => return Err(e),
                Ok(None) if attempts < REGISTER_ATTEMPTS => {
                    tracing::debug!(device = %dev.id, range = %want, "registration invalidated in flight; retrying");
                    if check_first && unmapped(&want) {
                        return Err(Error::Unmapped { range: want });
                    }
                }
                Ok(None) => {
                    return Err(Error::Unstable {
                        device: dev.id,
                        range: want,
                        attempts,
                    })
                }
            }
        }
    }

    /// A live entry of the current era containing `range`: the one the index has on its
    /// first page, or one that a newer entry shadows there.
    fn find_containing(dev: &DeviceSlot, st: &DeviceState, range: &Range) -> Option<EntryRef> {
        let era = dev.era();
        let fits = |e: &EntryRef| e.state() == LIVE && e.era() == era && e.range().contains(range);
        let raw = dev.index.lookup(range.start());
        // SAFETY: the index only holds words made by EntryRef::to_raw of this device's
        // chunks, which live as long as the device.
        let top = (raw != 0).then(|| unsafe { EntryRef::from_raw(raw) });
        if let Some(e) = top.filter(fits) {
            return Some(e);
        }
        st.shadowed_near(range).rev().find(fits)
    }

    /// Watches, registers and publishes `want` (for a no-overlap device: the union with
    /// the overlapping entries it absorbs); `Ok(None)` when an invalidation hit the range
    /// while it was in flight (the registration was undone).
    fn register_and_publish(
        &self,
        locked: &mut Locked<'_>,
        want: Range,
        stripe: usize,
    ) -> Result<Option<EntryRef>> {
        let dev = locked.dev;
        let (in_flight, target) = if dev.caps.allows_overlap {
            (InFlight::begin(dev, locked.st(), want), want)
        } else {
            self.make_room_without_overlap(locked, want)?
        };
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let result = self.watch_and_register(locked, cookie, target);
        // Events recorded since the watch: drain sources, apply everything recorded.
        self.sync_sources();
        self.apply_pending(dev, locked.st());
        let hit_in_flight = locked.st().inflight.take().is_some_and(|(_, hit)| hit);
        let translation = result?;
        if hit_in_flight {
            drop(in_flight);
            self.undo_registration(dev, cookie, target, translation);
            return Ok(None);
        }
        let st = locked.st();
        if st.free.is_empty() {
            let chunk = ChunkBox::new(dev.id.index, st.chunks.next_number());
            st.chunks.push(&chunk);
            for e in chunk.entries().rev() {
                st.free.push(e);
            }
            dev.chunks.write().push(chunk);
        }
        let entry = st.free.pop(&st.chunks).expect("refilled above");
        // SAFETY: the entry is FREE and unreferenced (fresh, or retired with refs == 0);
        // writer lock held.
        unsafe { entry.publish(target, cookie, dev.era(), translation, stripe) };
        st.lru.push_back(entry, &st.chunks);
        st.max_len = st.max_len.max(target.len());
        // The entries whose pages it takes in the index are found through `shadowed` from
        // now on (as is the entry itself if the index cannot hold it).
        for other in overlapping(dev, st, &target) {
            st.shadow(other);
        }
        if !dev.index.covers(target.end()) {
            st.shadow(entry);
        }
        let c = &dev.counters;
        c.registered_bytes.add(target.len() as u64);
        c.registered_entries.add(1);
        c.cached_entries.add(1);
        c.registrations.add(1);
        // The index is written last: hits may find the entry from here on.
        dev.index
            .insert(&mut st.nodes, target.start(), target.end(), entry.to_raw());
        // Only now: an invalidator that sees no registration in flight sees the index
        // entry (SeqCst RMW after the Release stores; `record` loads in the other order).
        drop(in_flight);
        tracing::debug!(device = %dev.id, range = %target, "registered");
        self.enforce_limits(dev, st);
        Ok(Some(entry))
    }

    /// For devices that refuse overlaps: waits (bounded) until no pinned entry, live or
    /// stale, overlaps `want`, then marks the registration in flight, deregisters every
    /// overlapping entry and returns what to register (see [`Manager::absorb`]). Adjacent
    /// entries are left alone (the device accepts them). The wait releases the lock, so it
    /// happens before the registration is marked in flight.
    fn make_room_without_overlap<'l>(
        &self,
        locked: &mut Locked<'l>,
        want: Range,
    ) -> Result<(InFlight<'l>, Range)> {
        let dev = locked.dev;
        let start = Instant::now();
        loop {
            locked.settle();
            // Old-era entries there are unlinked now (doomed ones are deregistered by
            // `absorb`, pinned ones are waited for as stale holders below).
            self.clean_old_overlapping(dev, locked.st(), &want);
            let st = locked.st();
            // A stale entry keeps its registration until its last pin drops; a live one is
            // held if it has references (probed here, decided by `try_kill` below).
            let holder = st
                .stale
                .iter(&st.chunks)
                .map(|e| e.range())
                .find(|r| r.overlaps(&want))
                .or_else(|| {
                    overlapping(dev, st, &want)
                        .iter()
                        .find(|e| e.refs() != 0)
                        .map(|e| e.range())
                });
            if let Some(holder) = holder {
                let waited = start.elapsed();
                if waited >= self.config.busy_timeout {
                    return Err(Error::DeviceRangeBusy {
                        device: dev.id,
                        range: want,
                        holder,
                        waited,
                    });
                }
                let slice = (self.config.busy_timeout - waited).min(Duration::from_millis(5));
                let st = locked.st.as_mut().expect("held");
                dev.released.wait_for(st, slice);
                continue;
            }
            let in_flight = InFlight::begin(dev, st, want);
            let mut victims = Vec::new();
            let mut raced = false;
            for e in overlapping(dev, st, &want) {
                if e.try_kill() {
                    victims.push(e);
                } else {
                    raced = true; // a hit took it since the check: wait for it
                    break;
                }
            }
            if raced {
                for e in victims {
                    e.set_state(LIVE);
                }
                continue;
            }
            return Ok((in_flight, self.absorb(dev, st, want, victims)));
        }
    }

    /// Deregisters `victims` (killed entries overlapping `want`) and returns the range to
    /// register: `want` merged with the victims that are still mapped, when that fits the
    /// backend, else `want` alone.
    fn absorb(
        &self,
        dev: &DeviceSlot,
        st: &mut DeviceState,
        want: Range,
        victims: Vec<EntryRef>,
    ) -> Range {
        let ranges: Vec<(EntryRef, Range)> = victims.into_iter().map(|e| (e, e.range())).collect();
        // Everything leaving the index is in flight from here: an invalidation of it is
        // seen and the registration retried (see `Manager::record`).
        let leaving = ranges.iter().fold(want, |u, (_, r)| u.union(r));
        dev.set_inflight(st, leaving);
        let mut union = want;
        let mut mapped = Vec::with_capacity(ranges.len());
        for (_, r) in &ranges {
            // A neighbour no longer (entirely) mapped although no source said so is stale:
            // deregister it, do not merge it.
            let m = !self.config.check_mapped || is_mapped(r);
            if m {
                union = union.union(r);
            }
            mapped.push(m);
        }
        let merge = union.len() <= dev.caps.max_registration;
        for ((e, r), m) in ranges.into_iter().zip(mapped) {
            self.unlink_live(dev, st, e);
            if !m {
                dev.counters.invalidated_entries.add(1);
                tracing::debug!(device = %dev.id, range = %r, "unmapped neighbour dropped instead of merged");
            } else if merge {
                dev.counters.merges.add(1);
            }
            st.doomed.push(e);
        }
        self.reap(dev, st);
        if merge {
            union
        } else {
            want
        }
    }

    fn watch_and_register(
        &self,
        locked: &mut Locked<'_>,
        cookie: u64,
        target: Range,
    ) -> Result<ErasedTranslation> {
        let dev = locked.dev;
        let sources = self.sources.read().clone();
        let mut watches = Watches {
            sources: &sources,
            cookie,
            range: target,
            made: 0,
        };
        for s in sources.iter() {
            if let Err(source) = s.watch(cookie, target) {
                let source_name = s.name().to_string();
                return Err(match source.downcast::<Uncovered>() {
                    Ok(u) => Error::Uncovered {
                        source_name,
                        range: u.range,
                        mapping: u.mapping,
                        operation: u.operation,
                    },
                    Err(source) => Error::Watch {
                        source_name,
                        range: target,
                        source,
                    },
                });
            }
            watches.made += 1;
        }
        // Out of pinnable memory: evict least recently used entries until the bytes freed
        // cover the request, retry, and repeat while anything is left to evict.
        let result = loop {
            match dev.backend.register(target) {
                Err(e) if e.kind == BackendErrorKind::OutOfMemory => {
                    let freed =
                        self.evict_lru(dev, locked.st(), |freed| freed >= target.len() as u64);
                    tracing::debug!(device = %dev.id, range = %target, freed, "out of pinnable memory: evicted least recently used, retrying");
                    if freed == 0 {
                        break Err(e);
                    }
                }
                r => break r,
            }
        };
        match result {
            Ok(t) => {
                watches.made = 0; // kept: the registration is published or undone later
                Ok(t)
            }
            Err(source) if source.kind == BackendErrorKind::OutOfMemory => {
                Err(Error::MemlockLimit {
                    device: dev.id,
                    range: target,
                    registered_bytes: dev.counters.registered_bytes.get(),
                    memlock_limit: memlock_limit(),
                    source,
                })
            }
            Err(source) => Err(Error::Backend {
                device: dev.id,
                range: target,
                source,
            }),
        }
    }

    fn undo_registration(
        &self,
        dev: &DeviceSlot,
        cookie: u64,
        target: Range,
        translation: ErasedTranslation,
    ) {
        dev.counters.registrations.add(1);
        let sources = self.sources.read().clone();
        let _unwatch = Watches {
            sources: &sources,
            cookie,
            range: target,
            made: sources.len(),
        };
        self.deregister(dev, target, translation);
    }

    pub(super) fn deregister(
        &self,
        dev: &DeviceSlot,
        range: Range,
        translation: ErasedTranslation,
    ) {
        dev.counters.deregistrations.add(1);
        if let Err(e) = dev.backend.deregister(range, translation) {
            dev.counters.deregistration_errors.add(1);
            tracing::warn!(device = %dev.id, %range, error = %e, "deregistration failed");
        } else {
            tracing::debug!(device = %dev.id, %range, "deregistered");
        }
    }
}
