//! [`Manager::pin`]: the lock-free hit, and the [`Pin`] it returns.

use std::sync::atomic::Ordering;

use smallvec::SmallVec;

use crate::backend::Backend;
use crate::device::{Device, DeviceId};
use crate::entry::{thread_stripe, Acquire, EntryRef};
use crate::error::{Error, Result};
use crate::range::Range;

use super::device::{DeviceSlot, Locked};
use super::{Manager, MAX_PIN_DEVICES};

impl Manager {
    /// Pins `range` on every device in `devices`: afterwards each device holds a
    /// registration covering the range until the returned [`Pin`] drops.
    ///
    /// A hit (a valid cached registration of that device covers the range) calls no
    /// backend, takes no lock and allocates nothing (for up to 4 devices). Misses register
    /// the range rounded out to the device's alignment; only the devices that missed are
    /// registered.
    pub fn pin(&self, range: Range, devices: &[DeviceId]) -> Result<Pin<'_>> {
        if devices.len() > MAX_PIN_DEVICES {
            return Err(Error::BadDeviceList {
                reason: "more than MAX_PIN_DEVICES devices",
            });
        }
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].contains(d) {
                return Err(Error::BadDeviceList {
                    reason: "a device is named twice",
                });
            }
        }
        self.owner.check()?;
        self.sync_sources();
        let stripe = thread_stripe();
        let mut pin = Pin {
            manager: self,
            range,
            stripe: stripe as u8,
            holds: SmallVec::new(),
        };
        let mut missed: SmallVec<[&DeviceSlot; MAX_PIN_DEVICES]> = SmallVec::new();
        for &id in devices {
            let dev = self.device(id)?;
            match self.try_hit(dev, &range, stripe)? {
                Some(entry) => pin.holds.push(entry),
                None => missed.push(dev),
            }
        }
        if missed.is_empty() {
            return Ok(pin);
        }
        if missed.len() < devices.len() {
            self.partial_hits.fetch_add(1, Ordering::Relaxed);
        }
        for dev in missed {
            // On error `pin` drops and releases what it already holds.
            let entry = self.pin_slow(dev, &range, stripe)?;
            pin.holds.push(entry);
        }
        // Deregistrations other devices owe (e.g. the NIC's registration of a range that
        // was unmapped while only the GPU missed since) are done now, not at some later
        // miss of theirs.
        self.settle_others();
        Ok(pin)
    }

    #[inline]
    fn try_hit(&self, dev: &DeviceSlot, range: &Range, stripe: usize) -> Result<Option<EntryRef>> {
        if !dev.clean() {
            return Ok(None);
        }
        let raw = dev.index.lookup(range.start());
        if raw == 0 {
            return Ok(None);
        }
        // SAFETY: the index only holds words made by EntryRef::to_raw of this device's
        // chunks, which live as long as the device.
        let entry = unsafe { EntryRef::from_raw(raw) };
        match entry.try_acquire(stripe, range, dev.era(), true) {
            Ok(()) => Ok(Some(entry)),
            Err(Acquire::Refused { slow }) => {
                if slow {
                    self.slow_release(dev, entry);
                }
                Ok(None)
            }
            Err(Acquire::Saturated) => Err(Error::TooManyPins {
                device: dev.id,
                range: *range,
            }),
        }
    }

    /// Drains every notifier source whose generation moved since its last drain.
    #[inline]
    pub(super) fn sync_sources(&self) {
        let n = self.gen_count.load(Ordering::Acquire);
        for i in 0..n {
            let p = self.gen_ptrs[i].load(Ordering::Acquire);
            // SAFETY: the pointer comes from a source held in `gen_sources[i]` for the
            // manager's lifetime; `generation()` must live as long as the source.
            let now = unsafe { &*p }.load(Ordering::Acquire);
            if let Some(slot) = self.gen_sources[i].get() {
                if now != slot.seen.load(Ordering::Acquire) {
                    self.drain_source(slot, now);
                }
            }
        }
    }

    #[cold]
    fn drain_source(&self, slot: &super::SourceSlot, now: u64) {
        slot.source.drain(self);
        // Release: a hit that sees this value also sees what the drain recorded.
        slot.seen.fetch_max(now, Ordering::AcqRel);
    }
}

/// A range pinned on one or more devices; see [`Manager::pin`].
///
/// While the pin lives, each device keeps its registration of the range (even if the
/// range is invalidated meanwhile: the registration holds its pages until the last pin
/// drops, so device I/O through it stays memory-safe, and [`Pin::is_valid`] says whether
/// it still describes what is mapped). Dropping it is one atomic decrement per device.
pub struct Pin<'m> {
    manager: &'m Manager,
    range: Range,
    stripe: u8,
    /// One entry per device (an entry knows its device).
    holds: SmallVec<[EntryRef; 4]>,
}

// SAFETY: a Pin holds references to entries whose counters are atomics and whose
// translations are immutable while referenced; dropping it from another thread is the same
// atomic decrement on the stripe it recorded.
unsafe impl Send for Pin<'_> {}
// SAFETY: shared access only reads immutable translations and atomic states.
unsafe impl Sync for Pin<'_> {}

impl std::fmt::Debug for Pin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin")
            .field("range", &self.range)
            .field(
                "devices",
                &self
                    .holds
                    .iter()
                    .map(|h| h.device())
                    .collect::<SmallVec<[u32; 4]>>(),
            )
            .finish()
    }
}

impl<'m> Pin<'m> {
    /// The range that was asked for (registrations cover at least this).
    pub fn range(&self) -> Range {
        self.range
    }

    fn hold(&self, device: DeviceId) -> Option<&EntryRef> {
        if device.manager != self.manager.id {
            return None;
        }
        self.holds.iter().find(|h| h.device() == device.index)
    }

    /// The device's translation of the registration that covers this pin, or `None` if
    /// the pin does not include that device (or the handle is from another manager).
    /// It describes the whole [`registered_range`](Pin::registered_range); add
    /// [`offset`](Pin::offset) to reach the pin's range.
    pub fn translation<B: Backend>(&self, device: Device<B>) -> Option<&B::Translation> {
        let hold = self.hold(device.id)?;
        // SAFETY: this pin holds a reference taken while the entry was LIVE.
        let t = unsafe { hold.translation() }?;
        t.downcast_ref::<B::Translation>()
    }

    /// The range the device registered for this pin (rounded out, possibly merged).
    pub fn registered_range(&self, device: impl Into<DeviceId>) -> Option<Range> {
        self.hold(device.into()).and_then(|h| h.range_unlocked())
    }

    /// Offset of the pin's first byte inside the device's registered range.
    pub fn offset(&self, device: impl Into<DeviceId>) -> Option<usize> {
        self.registered_range(device)
            .map(|r| self.range.start() - r.start())
    }

    /// Whether every device's registration still describes what is mapped: false once an
    /// invalidation overlapping it was reported (even if not yet applied). Called from
    /// inside a backend call of one of the pin's devices, it answers conservatively
    /// (false) when an invalidation is pending there, since it cannot apply it.
    pub fn is_valid(&self) -> bool {
        self.manager.sync_sources();
        self.holds.iter().all(|h| {
            let Ok(dev) = self.manager.device_at(h.device()) else {
                return false;
            };
            if !dev.clean() && Locked::lock(self.manager, dev, false).is_err() {
                return false;
            }
            h.holds_valid(dev.era())
        })
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let stripe = self.stripe as usize;
        for h in &self.holds {
            let not_live = h.release(stripe);
            if let Ok(dev) = self.manager.device_at(h.device()) {
                if not_live || dev.over_limit.load(Ordering::Relaxed) {
                    self.manager.slow_release(dev, *h);
                }
            }
        }
    }
}
