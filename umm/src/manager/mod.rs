//! The manager: devices, the cache of registrations, pins and invalidation.
//!
//! # Structure
//!
//! Every attached device has its own cache (`device`): a lock-free radix index that finds
//! every live entry by any of its pages (hits read it; under the lock it is also the set
//! of live entries, with a small map of the entries a newer overlapping one shadows), and
//! behind a writer lock (`parking_lot::Mutex`, one per device, never global) the LRU, the
//! stale-but-pinned entries and the entries waiting for deregistration, as intrusive lists. A [`Pin`] of several devices holds one entry reference per
//! device; a range pinned on a NIC and a GPU is one registration per device, shared by
//! every pin of that range on that device. The code is split by job:
//!
//! | file | job |
//! |---|---|
//! | `config.rs` | [`Config`], `from_env` |
//! | `device.rs` | one device's cache, its lock (`Locked`) and re-entrancy guard |
//! | `hit.rs` | [`Manager::pin`]'s lock-free hit, [`Pin`] |
//! | `registrar.rs` | misses: overlap rules of no-overlap devices, watch + register + publish |
//! | `invalidation.rs` | recording and applying invalidations, eras, finding overlaps |
//! | `lists.rs` | the intrusive entry lists (LRU, parked, old era, stale, free) |
//! | `reclaim.rs` | deregistration (reaping), limits and eviction, `flush`, the reaper |
//! | `../entry.rs` | the entry layout and the lock-free reference count / kill protocol |
//!
//! # A hit (no lock, no allocation)
//!
//! 1. For each notifier source with a generation counter (the kernel module): one load,
//!    compared with the value seen at the last drain. If it moved, drain it first.
//! 2. One load each of the device's `dirty`/`applied` counters: if an invalidation was
//!    recorded but not yet applied, take the slow path.
//! 3. Walk the radix index for the first page of the range → entry.
//! 4. `lock xadd` on this thread's stripe of the entry's reference count, load the state,
//!    era and range (the entry's header line, which also holds the translation the pin
//!    hands out): done. Dropping the [`Pin`] is one `lock xadd` and two loads. The
//!    one-device hit is inlined into the caller.
//!
//! # Invalidation
//!
//! [`Manager::invalidate`] may run on a notifier thread (userfaultfd reader) while the
//! thread that caused the event is blocked, possibly inside a `pin` that holds a device's
//! writer lock (a backend that unmaps while registering). So it never waits for a writer
//! lock: for each device whose index (or in-flight registration) overlaps the range, it
//! applies the invalidation at once if `try_lock` succeeds (no registration is in flight
//! then: they run under the lock); otherwise it pushes the range onto the device's
//! bounded, allocation-free queue of pending invalidations (overflow sets an "invalidate
//! everything" flag, counted) and bumps the device's `dirty` counter. Whoever holds the
//! lock applies the queue before publishing anything and again after unlocking.
//! From the moment `invalidate` returns, no hit can return an overlapping entry: hits
//! compare `dirty` with `applied` first. [`Manager::invalidate_deferred`] is the
//! record-only half, for hooks that run inside `malloc`. Invalidating everything is O(1)
//! under the lock: the device's era moves on (hits refuse older eras) and the old entries
//! are unlinked a slice at a time afterwards, so bulk work does not hold the lock for long.
//!
//! Applying an invalidation marks entries `INVALID` and unlinks them; it never calls a
//! backend. Deregistration (fan-out to every device holding an overlapping entry, exactly
//! once per registration) happens:
//! * when the last [`Pin`] of a stale entry drops (in that thread, or queued for the lock
//!   holder if the device's lock is busy),
//! * at every `pin` miss, for the device that missed **and** every other device that owes
//!   deregistrations, so an unmapped range does not stay pinned on the NIC because only
//!   the GPU missed,
//! * in [`Manager::flush`], and periodically in the optional [`Reaper`] thread,
//! * when the manager is dropped.
//!
//! # Devices that refuse overlapping registrations (CUDA)
//!
//! A miss first completes every pending deregistration of the device (under its lock, so
//! one still being released by another thread is finished before we continue), then merges
//! the request with every *overlapping* unreferenced live entry into one registration
//! (adjacent ones are left alone: CUDA accepts adjacent registrations), deregistering those
//! first; if the union would exceed the backend's maximum registration, the overlapping
//! entries are deregistered without merging. If an overlapping entry (live or stale) is
//! still pinned, the miss waits up to [`Config::busy_timeout`] for it to be released and
//! then fails with [`Error::DeviceRangeBusy`] naming the device, the request and the
//! holder; it never returns the stale translation. The request and the entries it absorbs
//! are marked in flight before they leave the index, so an invalidation arriving meanwhile
//! is seen and the registration retried.
//!
//! # Failing safe
//!
//! Reference counts saturate ([`Error::TooManyPins`]) instead of wrapping; a backend that
//! panics leaves the manager consistent (nothing leaks: the remaining deregistrations are
//! done later, a registration in flight is unwound); a `pin` or `flush` from inside a
//! backend call of the same device fails with [`Error::Reentrant`] or skips that device
//! instead of deadlocking; a fork child's copy of a manager refuses to work
//! ([`Error::ForkedChild`]).

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::backend::Backend;
use crate::device::{Device, DeviceId};
use crate::entry::INVALID;
use crate::error::{Error, Result};
use crate::range::page_size;
use crate::source::{InvalidationSink, ManagerId, NotifierSource};
use crate::stats::{DeviceStats, Stats};

mod config;
mod device;
mod hit;
mod invalidation;
mod lists;
mod reclaim;
mod registrar;

pub use config::{Config, ENV_VARS};
pub use hit::{OwnedPin, Pin, Pinned};
pub use reclaim::Reaper;

use device::DeviceSlot;

/// Most devices one pin may name.
pub const MAX_PIN_DEVICES: usize = 8;
/// Most devices one manager may attach.
pub const MAX_DEVICES: usize = 64;
/// Most notifier sources with a generation counter one manager may hold (sources without
/// one are not limited).
pub const MAX_SOURCES: usize = 8;

struct SourceSlot {
    source: Arc<dyn NotifierSource>,
    seen: AtomicU64,
}

static NEXT_MANAGER: AtomicU32 = AtomicU32::new(1);

/// One registration cache for every device of the process; see the [module docs](self).
///
/// `Manager` is `Send + Sync`; share it by reference, in an `Arc`, or in a `static`.
pub struct Manager {
    id: u32,
    /// Who created the manager: a fork child's copy refuses to work (see [`Error::ForkedChild`]).
    owner: crate::fork::Owner,
    config: Config,
    devices: Box<[OnceLock<DeviceSlot>]>,
    device_count: AtomicUsize,
    attach_lock: Mutex<()>,
    /// Every source, for watch/unwatch on the miss path: a snapshot a miss clones with one
    /// reference-count increment (replaced whole by `add_source`).
    sources: RwLock<Arc<[Arc<dyn NotifierSource>]>>,
    /// Sources with a generation counter, checked by every hit.
    gen_sources: Box<[OnceLock<SourceSlot>]>,
    gen_ptrs: Box<[AtomicPtr<AtomicU64>]>,
    gen_count: AtomicUsize,
    next_cookie: AtomicU64,
    partial_hits: AtomicU64,
    invalidations: AtomicU64,
    invalidate_alls: AtomicU64,
}

impl Default for Manager {
    fn default() -> Self {
        Manager::new(Config::default())
    }
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("id", &self.id)
            .field("devices", &self.device_count.load(Ordering::Relaxed))
            .field("config", &self.config)
            .finish()
    }
}

impl Manager {
    /// A manager with `config`.
    pub fn new(config: Config) -> Manager {
        Manager {
            id: NEXT_MANAGER.fetch_add(1, Ordering::Relaxed),
            owner: crate::fork::Owner::current(),
            config,
            devices: (0..MAX_DEVICES).map(|_| OnceLock::new()).collect(),
            device_count: AtomicUsize::new(0),
            attach_lock: Mutex::new(()),
            sources: RwLock::new(Arc::new([])),
            gen_sources: (0..MAX_SOURCES).map(|_| OnceLock::new()).collect(),
            gen_ptrs: (0..MAX_SOURCES)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            gen_count: AtomicUsize::new(0),
            next_cookie: AtomicU64::new(1),
            partial_hits: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            invalidate_alls: AtomicU64::new(0),
        }
    }

    /// This manager's identity, as given to [`NotifierSource::attach`].
    pub fn id(&self) -> ManagerId {
        ManagerId(self.id)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Attaches a device; its capabilities are read once now.
    pub fn attach<B: Backend>(&self, backend: B) -> Result<Device<B>> {
        let _g = self.attach_lock.lock();
        let n = self.device_count.load(Ordering::Acquire);
        if n >= MAX_DEVICES {
            return Err(Error::TooManyDevices { max: MAX_DEVICES });
        }
        let mut caps = backend.capabilities();
        caps.alignment = caps.alignment.max(page_size()).next_power_of_two();
        let id = DeviceId {
            manager: self.id,
            index: n as u32,
        };
        let name = Backend::name(&backend).to_string();
        crate::device::set_name(id, &name);
        tracing::debug!(device = %id, %name, ?caps, "attached device");
        let slot = DeviceSlot::new(id, name, caps, Box::new(backend));
        if self.devices[n].set(slot).is_err() {
            unreachable!("device slots are filled in order under attach_lock");
        }
        self.device_count.store(n + 1, Ordering::Release);
        Ok(Device::new(id))
    }

    /// The backend of an attached device, e.g. to submit work with its translations.
    pub fn backend<B: Backend>(&self, device: Device<B>) -> Result<&B> {
        let dev = self.device(device.id)?;
        dev.backend
            .as_any()
            .downcast_ref::<B>()
            .ok_or(Error::UnknownDevice(device.id))
    }

    /// Adds a notifier source. It is asked to watch every registration made from now on
    /// (registrations made before are not watched: add sources before pinning). A source
    /// may refuse to serve a second manager ([`Error::Source`]). Takes the source by
    /// value or in an `Arc` (see [`crate::source::IntoSource`]).
    pub fn add_source(&self, source: impl crate::source::IntoSource) -> Result<()> {
        let source = source.into_source();
        self.owner.check()?;
        let mut sources = self.sources.write();
        source.attach(self.id()).map_err(|e| Error::Source {
            source_name: source.name().to_string(),
            source: e,
        })?;
        if let Some(gen) = source.generation() {
            let n = self.gen_count.load(Ordering::Acquire);
            if n >= MAX_SOURCES {
                source.detach(self.id());
                return Err(Error::TooManySources { max: MAX_SOURCES });
            }
            let slot = SourceSlot {
                seen: AtomicU64::new(gen.load(Ordering::Acquire)),
                source: source.clone(),
            };
            let slot = self.gen_sources[n].get_or_init(|| slot);
            let gen = slot.source.generation().expect("checked above");
            self.gen_ptrs[n].store(gen as *const AtomicU64 as *mut AtomicU64, Ordering::Release);
            self.gen_count.store(n + 1, Ordering::Release);
        }
        tracing::debug!(source = source.name(), "added notifier source");
        *sources = sources.iter().cloned().chain([source]).collect();
        Ok(())
    }

    /// This manager's device number `index` (a pin's entries name theirs).
    #[inline]
    fn device_at(&self, index: u32) -> Option<&DeviceSlot> {
        self.devices.get(index as usize).and_then(|d| d.get())
    }

    #[inline]
    fn device(&self, id: DeviceId) -> Result<&DeviceSlot> {
        (id.manager == self.id)
            .then(|| self.device_at(id.index))
            .flatten()
            .ok_or_else(|| Error::UnknownDevice(id))
    }

    fn each_device(&self) -> impl Iterator<Item = &DeviceSlot> {
        let n = self.device_count.load(Ordering::Acquire);
        self.devices[..n].iter().filter_map(|d| d.get())
    }

    /// A snapshot of the counters. Takes no writer lock (hits and misses go on meanwhile);
    /// each device's counters are read one after the other, so a snapshot taken while
    /// the manager works is not one atomic instant.
    pub fn stats(&self) -> Stats {
        let devices = self
            .each_device()
            .map(|dev| {
                // Stripes are never reset, so the pool's sum counts recycled entries too.
                let hits: u64 = dev.chunks.read().iter().map(|c| c.hits()).sum();
                let c = &dev.counters;
                DeviceStats {
                    id: dev.id,
                    name: dev.name.clone(),
                    hits,
                    misses: c.misses.get(),
                    registrations: c.registrations.get(),
                    deregistrations: c.deregistrations.get(),
                    deregistration_errors: c.deregistration_errors.get(),
                    invalidated_entries: c.invalidated_entries.get(),
                    evictions: c.evictions.get(),
                    eviction_scans: c.eviction_scans.get(),
                    merges: c.merges.get(),
                    queue_overflows: c.queue_overflows.load(Ordering::Relaxed),
                    registered_bytes: c.registered_bytes.get(),
                    registered_entries: c.registered_entries.get(),
                    cached_entries: c.cached_entries.get(),
                    index_bytes: dev.index.bytes() as u64,
                }
            })
            .collect();
        Stats {
            partial_hits: self.partial_hits.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            invalidate_all: self.invalidate_alls.load(Ordering::Relaxed),
            devices,
        }
    }
}

impl InvalidationSink for Manager {
    fn invalidate(&self, range: crate::Range) {
        Manager::invalidate(self, range)
    }

    fn invalidate_all(&self) {
        Manager::invalidate_all(self)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        // Sources first, while the manager is whole: hooks stop calling it.
        let id = self.id();
        for s in self.sources.get_mut().iter() {
            s.detach(id);
        }
        if self.config.stats_at_exit {
            eprintln!("umm: {} at exit:\n{}", self.id(), self.stats());
        }
        if self.owner.check_pid().is_err() {
            // A fork child's copy: the registrations are the parent's. Leave them alone.
            return;
        }
        // No pin can exist (they borrow the manager): deregister everything still held.
        for dev in self.each_device() {
            let mut st = dev.state.lock();
            self.apply_pending(dev, &mut st);
            self.clean_old(dev, &mut st, usize::MAX);
            let st = &mut *st;
            for list in [&mut st.lru, &mut st.parked, &mut st.stale] {
                while let Some(e) = list.pop_front(&st.chunks) {
                    e.set_state(INVALID);
                    st.doomed.push(e);
                }
            }
            self.reap(dev, st);
        }
        crate::device::forget_names(self.id);
    }
}
