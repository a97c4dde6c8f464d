//! [`Manager::pin`]: the lock-free hit, and the [`Pin`] it returns.

use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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
    #[inline]
    pub fn pin(&self, range: Range, devices: &[DeviceId]) -> Result<Pin<'_>> {
        // The common case, inlined into the caller so the pin is built in place: one
        // device, a hit.
        if let [device] = devices {
            if let Some(pin) = self.try_pin_one(range, *device) {
                return Ok(pin);
            }
        }
        self.pin_any(range, devices)
    }

    /// A hit on one device, or `None` for [`Manager::pin_any`] to handle (a miss, or
    /// anything that fails: it finds the same failure and reports it).
    #[inline]
    fn try_pin_one(&self, range: Range, device: DeviceId) -> Option<Pin<'_>> {
        self.owner.check().ok()?;
        self.sync_sources();
        let stripe = thread_stripe();
        let dev = self.device(device).ok()?;
        let entry = self.try_hit(dev, &range, stripe).ok()??;
        let mut holds = SmallVec::new();
        holds.push(entry);
        Some(Pin {
            manager: self,
            range,
            stripe: stripe as u8,
            holds,
        })
    }

    /// [`Manager::pin`] for any number of devices, hits and misses.
    #[inline(never)]
    fn pin_any(&self, range: Range, devices: &[DeviceId]) -> Result<Pin<'_>> {
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

/// A range pinned on one or more devices; see [`Manager::pin`] ([`Pin`], which borrows
/// the manager) and [`Manager::pin_owned`] ([`OwnedPin`], which keeps it alive).
///
/// While the pin lives, each device keeps its registration of the range (even if the
/// range is invalidated meanwhile: the registration holds its pages until the last pin
/// drops, so device I/O through it stays memory-safe, and [`is_valid`](Pinned::is_valid)
/// says whether it still describes what is mapped). Dropping it is one atomic decrement
/// per device.
pub struct Pinned<M: Deref<Target = Manager>> {
    manager: M,
    range: Range,
    stripe: u8,
    /// One entry per device (an entry knows its device).
    holds: SmallVec<[EntryRef; 4]>,
}

/// A pin that borrows its manager: the cheapest form (no reference count traffic), for
/// I/O that completes while the manager is in scope.
pub type Pin<'m> = Pinned<&'m Manager>;

/// A pin that owns a reference to its manager (`Arc<Manager>`): `'static`, so it can be
/// stored until an asynchronous completion arrives. See [`Manager::pin_owned`].
pub type OwnedPin = Pinned<Arc<Manager>>;

impl Manager {
    /// [`Manager::pin`], returning a pin that keeps the manager alive: keep it with the
    /// work request and drop it when the device reports the completion.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use std::sync::Arc;
    /// use umm::{Manager, OwnedPin, Range, testing::RecordingBackend};
    ///
    /// let manager = Arc::new(Manager::default());
    /// let nic = manager.attach(RecordingBackend::new("nic")).unwrap();
    /// let buf = vec![7u8; 8192];
    /// let mut in_flight: HashMap<u64, OwnedPin> = HashMap::new(); // by work-request id
    /// let pin = manager.pin_owned(Range::of_slice(&buf).unwrap(), &[nic.id()]).unwrap();
    /// let _key = pin.translation(nic).unwrap(); // post the send with it ...
    /// in_flight.insert(1, pin);                   // ... and keep the pin with the request
    /// // Later, on the completion of work request 1:
    /// drop(in_flight.remove(&1));
    /// ```
    pub fn pin_owned(self: &Arc<Self>, range: Range, devices: &[DeviceId]) -> Result<OwnedPin> {
        let mut pin = self.pin(range, devices)?;
        Ok(Pinned {
            manager: self.clone(),
            range: pin.range,
            stripe: pin.stripe,
            holds: std::mem::take(&mut pin.holds),
        })
    }
}

// SAFETY: a pin holds references to entries whose counters are atomics and whose
// translations are immutable while referenced; dropping it from another thread is the same
// atomic decrement on the stripe it recorded. The manager handle is `Send` when `M` is.
unsafe impl<M: Deref<Target = Manager> + Send> Send for Pinned<M> {}
// SAFETY: shared access only reads immutable translations and atomic states.
unsafe impl<M: Deref<Target = Manager> + Sync> Sync for Pinned<M> {}

impl<M: Deref<Target = Manager>> std::fmt::Debug for Pinned<M> {
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

impl<M: Deref<Target = Manager>> Pinned<M> {
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
    /// It describes the whole [`registered_range`](Pinned::registered_range); add
    /// [`offset`](Pinned::offset) to reach the pin's range.
    pub fn translation<B: Backend>(&self, device: Device<B>) -> Option<&B::Translation> {
        let hold = self.hold(device.id)?;
        // SAFETY: this pin holds a reference taken while the entry was LIVE; the entry is
        // the device's (`hold` matched the manager and the index), and a `Device<B>` is
        // only ever handed out for a device whose backend is `B`, so the translation is a
        // `B::Translation`.
        unsafe { hold.translation()?.get::<B::Translation>() }
    }

    /// Which registration of the device serves this pin: unique per registration in this
    /// manager, so two pins with the same id share one registration (a cache hit), and a
    /// different id means the range was registered afresh. Comparing translations instead
    /// can mislead (a backend may reuse handle values).
    pub fn registration_id(&self, device: impl Into<DeviceId>) -> Option<u64> {
        let hold = self.hold(device.into())?;
        // (This pin holds a reference taken while the entry was LIVE: the id is its own.)
        Some(hold.id())
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
        let manager: &Manager = &self.manager;
        manager.sync_sources();
        self.holds.iter().all(|h| {
            let Some(dev) = manager.device_at(h.device()) else {
                return false;
            };
            if !dev.clean() && Locked::lock(manager, dev, false).is_err() {
                return false;
            }
            h.holds_valid(dev.era())
        })
    }
}

impl<M: Deref<Target = Manager>> Drop for Pinned<M> {
    fn drop(&mut self) {
        let manager: &Manager = &self.manager;
        let stripe = self.stripe as usize;
        for h in &self.holds {
            let not_live = h.release(stripe);
            if let Some(dev) = manager.device_at(h.device()) {
                if not_live || dev.over_limit.load(Ordering::SeqCst) {
                    manager.slow_release(dev, *h);
                }
            }
        }
    }
}
