//! The manager: devices, the cache of registrations, pins and invalidation.
//!
//! # Structure
//!
//! Every attached device has its own cache: a lock-free radix index (`umm/src/index.rs`) for
//! hits, and behind a writer lock (`parking_lot::Mutex`, one per device, never global) the
//! authoritative set of live entries, the LRU, the list of stale-but-pinned entries and
//! the entries waiting for deregistration. A [`Pin`] of several devices holds one entry
//! reference per device; a range pinned on a NIC and a GPU is one registration per device,
//! shared by every pin of that range on that device.
//!
//! # A hit (no lock, no allocation)
//!
//! 1. For each notifier source with a generation counter (the kernel module): one load,
//!    compared with the value seen at the last drain. If it moved, drain it first.
//! 2. One load each of the device's `dirty`/`applied` counters: if an invalidation was
//!    recorded but not yet applied, take the slow path.
//! 3. Walk the radix index for the first page of the range → entry.
//! 4. `lock xadd` on this thread's stripe of the entry's reference count, load the state,
//!    check the range: done. Dropping the [`Pin`] is one `lock xadd` and one load.
//!
//! # Invalidation
//!
//! [`Manager::invalidate`] may run on a notifier thread (userfaultfd reader) while the
//! thread that caused the event is blocked, possibly inside a `pin` that holds a device's
//! writer lock (a backend that unmaps while registering). So it never waits for a writer
//! lock: for each device whose index (or an in-flight registration) overlaps the range it
//! pushes the range onto the device's bounded, allocation-free queue of pending
//! invalidations (overflow sets an "invalidate everything" flag), bumps the device's
//! `dirty` counter, and then applies the queue if `try_lock` succeeds. Whoever holds the
//! lock applies the queue before publishing anything and again after unlocking. From the
//! moment `invalidate` returns, no hit can return an overlapping entry: hits compare
//! `dirty` with `applied` first. [`Manager::invalidate_deferred`] is the record-only half,
//! for hooks that run inside `malloc`.
//!
//! Applying an invalidation marks entries `INVALID` and unlinks them; it never calls a
//! backend. Deregistration (fan-out to every device holding an overlapping entry, exactly
//! once per registration) happens:
//! * when the last [`Pin`] of a stale entry drops (in that thread, or queued for the lock
//!   holder if the device's lock is busy),
//! * at the start of every `pin` miss of that device,
//! * in [`Manager::flush`], and periodically in the optional [`Reaper`] thread,
//! * when the manager is dropped.
//!
//! # Devices that refuse overlapping registrations (CUDA)
//!
//! A miss first completes every pending deregistration of the device (under its lock, so
//! one still being released by another thread is finished before we continue), then merges
//! the request with every overlapping or adjacent unreferenced live entry into one larger
//! registration, deregistering those first. If an overlapping entry (live or stale) is
//! still pinned, the miss waits up to [`Config::busy_timeout`] for it to be released and
//! then fails with [`Error::DeviceRangeBusy`] naming the device, the request and the
//! holder; it never returns the stale translation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
use smallvec::SmallVec;

use crate::backend::{Backend, BackendError, BackendErrorKind, Capabilities, ErasedBackend};
use crate::device::{Device, DeviceId};
use crate::entry::{thread_stripe, Chunk, EntryRef, INVALID, KILLING, LIVE};
use crate::error::{memlock_limit, Error, Result};
use crate::index::RadixIndex;
use crate::range::{page_size, Range};
use crate::source::{InvalidationSink, NotifierSource};
use crate::stats::{DeviceStats, Stats};

/// Most devices one pin may name.
pub const MAX_PIN_DEVICES: usize = 8;
/// Most devices one manager may attach.
pub const MAX_DEVICES: usize = 64;
/// Most notifier sources with a generation counter one manager may hold (sources without
/// one are not limited).
pub const MAX_SOURCES: usize = 8;
/// Capacity of each device's queue of recorded invalidations; beyond it the device
/// invalidates everything at the next apply.
const PENDING_CAPACITY: usize = 1024;
/// Capacity of each device's queue of entries released while its lock was busy.
const RELEASE_CAPACITY: usize = 1024;
/// How many times a registration invalidated while in flight is retried.
const REGISTER_ATTEMPTS: u32 = 3;

/// Manager settings. The cache limits apply to each device separately.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes a device may keep registered before unreferenced entries are evicted
    /// (least recently used first). Pinned entries are never evicted, so pins can exceed
    /// it. Default: 8 GiB.
    pub max_cached_bytes: u64,
    /// Registrations a device may keep before unreferenced entries are evicted.
    /// Default: 131072.
    pub max_cached_entries: usize,
    /// How long a miss on a device that refuses overlaps waits for an overlapping pinned
    /// entry to be released before failing with [`Error::DeviceRangeBusy`].
    /// Default: 200 ms.
    pub busy_timeout: Duration,
    /// Whether a miss checks that the range is mapped (one `msync(MS_ASYNC)`), so an
    /// unmapped range fails with [`Error::Unmapped`] instead of an opaque backend error.
    /// Default: true.
    pub check_mapped: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_cached_bytes: 8 << 30,
            max_cached_entries: 1 << 17,
            busy_timeout: Duration::from_millis(200),
            check_mapped: true,
        }
    }
}

/// What only the device's writer lock holder touches.
struct DeviceState {
    /// Every chunk of entries ever allocated; freed with the device. Boxed: entries must
    /// not move (the index and pins point at them).
    #[allow(clippy::vec_box)]
    chunks: Vec<Box<Chunk>>,
    free: Vec<EntryRef>,
    /// Live entries by (start, id).
    live: BTreeMap<(usize, u64), EntryRef>,
    /// Longest live entry ever: bounds the backward scan for overlaps.
    max_len: usize,
    /// Live entries in LRU order (CLOCK: hits set a bit, the sweep gives a second chance).
    lru: BTreeMap<u64, EntryRef>,
    lru_next: u64,
    /// Invalidated (or merged away) entries still referenced by pins.
    stale: BTreeMap<u64, EntryRef>,
    /// Entries with no reference left, waiting for their deregistration.
    doomed: Vec<EntryRef>,
    registered_bytes: u64,
    registered_entries: u64,
    /// An in-flight registration and whether an applied invalidation overlapped it.
    inflight: Option<(Range, bool)>,
}

#[derive(Default)]
struct DeviceCounters {
    misses: AtomicU64,
    registrations: AtomicU64,
    deregistrations: AtomicU64,
    deregistration_errors: AtomicU64,
    invalidated_entries: AtomicU64,
    evictions: AtomicU64,
    merges: AtomicU64,
}

struct DeviceSlot {
    id: DeviceId,
    name: String,
    caps: Capabilities,
    backend: Box<dyn ErasedBackend>,
    index: RadixIndex,
    /// Bumped after each recorded invalidation; hits compare it with `applied`.
    dirty: AtomicU64,
    /// The `dirty` value whose records have all been applied.
    applied: AtomicU64,
    /// Registrations in flight: invalidations are recorded even if the index is empty.
    registering: AtomicUsize,
    pending: ArrayQueue<Range>,
    pending_all: AtomicBool,
    releases: ArrayQueue<EntryRef>,
    state: Mutex<DeviceState>,
    /// Signalled when entries are deregistered (busy waits of no-overlap devices).
    released: Condvar,
    counters: DeviceCounters,
}

impl DeviceSlot {
    #[inline]
    fn clean(&self) -> bool {
        self.dirty.load(Ordering::SeqCst) == self.applied.load(Ordering::SeqCst)
    }

    /// Records `range` (or everything) for the lock holder. Allocation-free, lock-free.
    fn record(&self, range: Option<Range>) {
        let fits = match range {
            Some(r) => self.pending.push(r).is_ok(),
            None => false,
        };
        if !fits {
            self.pending_all.store(true, Ordering::SeqCst);
        }
        self.dirty.fetch_add(1, Ordering::SeqCst);
    }

    fn has_work(&self) -> bool {
        !self.clean() || !self.releases.is_empty()
    }
}

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
    /// Every source, for watch/unwatch on the miss path.
    sources: RwLock<Vec<Arc<dyn NotifierSource>>>,
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

/// Exclusive access to a device's writer side; on drop it unlocks and then keeps applying
/// work that other threads recorded while it was held (the "combining" half of the
/// never-wait rule of [`Manager::invalidate`]).
struct Locked<'a> {
    manager: &'a Manager,
    dev: &'a DeviceSlot,
    st: Option<MutexGuard<'a, DeviceState>>,
    /// Whether this thread may call the backend (false on notifier threads).
    may_call_backend: bool,
}

impl<'a> Locked<'a> {
    fn st(&mut self) -> &mut DeviceState {
        self.st.as_mut().expect("held until drop")
    }

    /// Applies recorded invalidations and queued releases, then (if allowed) deregisters
    /// what is doomed.
    fn settle(&mut self) {
        let manager = self.manager;
        let dev = self.dev;
        let st = self.st.as_mut().expect("held until drop");
        manager.apply_pending(dev, st);
        if self.may_call_backend {
            manager.reap(dev, st);
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.settle();
        self.st = None;
        while self.dev.has_work() {
            match self.dev.state.try_lock() {
                Some(g) => {
                    self.st = Some(g);
                    self.settle();
                    self.st = None;
                }
                None => break, // the new holder settles on its unlock
            }
        }
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
            sources: RwLock::new(Vec::new()),
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
    pub fn id(&self) -> crate::source::ManagerId {
        crate::source::ManagerId(self.id)
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
        let slot = DeviceSlot {
            id,
            name: Backend::name(&backend).to_string(),
            caps,
            backend: Box::new(backend),
            index: RadixIndex::new(),
            dirty: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            registering: AtomicUsize::new(0),
            pending: ArrayQueue::new(PENDING_CAPACITY),
            pending_all: AtomicBool::new(false),
            releases: ArrayQueue::new(RELEASE_CAPACITY),
            state: Mutex::new(DeviceState {
                chunks: Vec::new(),
                free: Vec::new(),
                live: BTreeMap::new(),
                max_len: 0,
                lru: BTreeMap::new(),
                lru_next: 0,
                stale: BTreeMap::new(),
                doomed: Vec::new(),
                registered_bytes: 0,
                registered_entries: 0,
                inflight: None,
            }),
            released: Condvar::new(),
            counters: DeviceCounters::default(),
        };
        tracing::debug!(device = %id, name = %slot.name, ?caps, "attached device");
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
    /// (registrations made before are not watched: add sources before pinning).
    pub fn add_source(&self, source: Arc<dyn NotifierSource>) -> Result<()> {
        self.owner.check()?;
        let mut sources = self.sources.write();
        source.attach(self.id()).map_err(|e| Error::Source {
            source_name: source.name().to_string(),
            source: e,
        })?;
        if source.generation().is_some() {
            let n = self.gen_count.load(Ordering::Acquire);
            if n >= MAX_SOURCES {
                source.detach(self.id());
                return Err(Error::TooManySources { max: MAX_SOURCES });
            }
            let slot = SourceSlot {
                seen: AtomicU64::new(source.generation().map_or(0, |g| g.load(Ordering::Acquire))),
                source: source.clone(),
            };
            let slot = self.gen_sources[n].get_or_init(|| slot);
            let gen = slot.source.generation().expect("checked above");
            self.gen_ptrs[n].store(gen as *const AtomicU64 as *mut AtomicU64, Ordering::Release);
            self.gen_count.store(n + 1, Ordering::Release);
        }
        tracing::debug!(source = source.name(), "added notifier source");
        sources.push(source);
        Ok(())
    }

    fn device_at(&self, index: u32) -> Result<&DeviceSlot> {
        self.device(DeviceId {
            manager: self.id,
            index,
        })
    }

    fn device(&self, id: DeviceId) -> Result<&DeviceSlot> {
        self.devices
            .get(id.index())
            .filter(|_| id.manager == self.id)
            .and_then(|d| d.get())
            .ok_or(Error::UnknownDevice(id))
    }

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
            match self.try_hit(dev, &range, stripe) {
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
        Ok(pin)
    }

    #[inline]
    fn try_hit(&self, dev: &DeviceSlot, range: &Range, stripe: usize) -> Option<EntryRef> {
        if !dev.clean() {
            return None;
        }
        let raw = dev.index.lookup(range.start());
        if raw == 0 {
            return None;
        }
        // SAFETY: the index only holds words made by EntryRef::to_raw of this device's
        // chunks, which live as long as the device.
        let entry = unsafe { EntryRef::from_raw(raw) };
        match entry.try_acquire(stripe, range, true) {
            Ok(()) => Some(entry),
            Err(slow) => {
                if slow {
                    self.slow_release(dev, entry);
                }
                None
            }
        }
    }

    fn lock<'a>(&'a self, dev: &'a DeviceSlot, may_call_backend: bool) -> Locked<'a> {
        Locked {
            manager: self,
            dev,
            st: Some(dev.state.lock()),
            may_call_backend,
        }
    }

    fn try_lock<'a>(&'a self, dev: &'a DeviceSlot, may_call_backend: bool) -> Option<Locked<'a>> {
        dev.state.try_lock().map(|g| Locked {
            manager: self,
            dev,
            st: Some(g),
            may_call_backend,
        })
    }

    /// The locked path of a pin on one device: slow hit, or registration.
    fn pin_slow(&self, dev: &DeviceSlot, range: &Range, stripe: usize) -> Result<EntryRef> {
        let want = range.align_out(dev.caps.alignment)?;
        if want.len() > dev.caps.max_registration {
            return Err(Error::TooLarge {
                device: dev.id,
                range: want,
                max: dev.caps.max_registration,
            });
        }
        let mut locked = self.lock(dev, true);
        locked.settle();
        if let Some(e) = Self::find_containing(locked.st(), range) {
            if e.try_acquire(stripe, range, true).is_ok() {
                return Ok(e);
            }
        }
        self.owner.check_pid()?;
        dev.counters.misses.fetch_add(1, Ordering::Relaxed);
        if self.config.check_mapped && !is_mapped(&want) {
            return Err(Error::Unmapped { range: want });
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let target = if dev.caps.allows_overlap {
                want
            } else {
                self.make_room_without_overlap(&mut locked, want)?
            };
            match self.register_and_publish(&mut locked, target, stripe)? {
                Some(e) => return Ok(e),
                None if attempts < REGISTER_ATTEMPTS => {
                    tracing::debug!(device = %dev.id, range = %target, "registration invalidated in flight; retrying");
                    if self.config.check_mapped && !is_mapped(&want) {
                        return Err(Error::Unmapped { range: want });
                    }
                }
                None => {
                    return Err(Error::Unstable {
                        device: dev.id,
                        range: target,
                        attempts,
                    })
                }
            }
        }
    }

    /// A live entry containing `range`, searching every live entry that starts at or
    /// before it (the index only knows the newest entry of each page).
    fn find_containing(st: &DeviceState, range: &Range) -> Option<EntryRef> {
        let lo = range.start().saturating_sub(st.max_len);
        st.live
            .range((lo, 0)..=(range.start(), u64::MAX))
            .rev()
            .map(|(_, e)| *e)
            .find(|e| {
                // SAFETY: writer lock held.
                unsafe { e.writer() }.range.contains(range)
            })
    }

    /// Live entries overlapping (or, with `touching`, adjacent to) `range`.
    fn live_overlapping(st: &DeviceState, range: &Range, touching: bool) -> Vec<EntryRef> {
        let lo = range.start().saturating_sub(st.max_len);
        st.live
            .range((lo, 0)..=(range.end(), u64::MAX))
            .map(|(_, e)| *e)
            .filter(|e| {
                // SAFETY: writer lock held.
                let r = unsafe { e.writer() }.range;
                if touching {
                    r.overlaps_or_touches(range)
                } else {
                    r.overlaps(range)
                }
            })
            .collect()
    }

    /// For devices that refuse overlaps: deregisters every unreferenced entry overlapping
    /// or adjacent to `want` and returns the union to register; waits (bounded) for
    /// pinned overlapping entries, live or stale.
    fn make_room_without_overlap(&self, locked: &mut Locked<'_>, want: Range) -> Result<Range> {
        let dev = locked.dev;
        let start = Instant::now();
        loop {
            locked.settle();
            let st = locked.st();
            // A stale entry that is still pinned keeps its registration: wait for it.
            let stale_holder = st
                .stale
                .values()
                .map(|e| {
                    // SAFETY: writer lock held.
                    unsafe { e.writer() }.range
                })
                .find(|r| r.overlaps(&want));
            let mut victims = Vec::new();
            let mut live_holder = None;
            if stale_holder.is_none() {
                for e in Self::live_overlapping(st, &want, true) {
                    // SAFETY: writer lock held.
                    let r = unsafe { e.writer() }.range;
                    if e.try_kill() {
                        victims.push(e);
                    } else if r.overlaps(&want) {
                        live_holder = Some(r);
                        break;
                    } // a pinned adjacent entry may stay: adjacency is allowed.
                }
            }
            match stale_holder.or(live_holder) {
                None => {
                    // Each victim overlaps or touches `want`, so the union stays contiguous.
                    let st = locked.st();
                    let mut target = want;
                    for &e in &victims {
                        // SAFETY: writer lock held.
                        let r = unsafe { e.writer() }.range;
                        self.unlink_live(dev, st, e);
                        if self.config.check_mapped && !is_mapped(&r) {
                            // Part of it is no longer mapped although no source said so:
                            // it is stale. Deregister it, do not merge it.
                            dev.counters
                                .invalidated_entries
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(device = %dev.id, range = %r, "unmapped neighbour dropped instead of merged");
                        } else {
                            target = target.union(&r);
                            dev.counters.merges.fetch_add(1, Ordering::Relaxed);
                        }
                        st.doomed.push(e);
                    }
                    self.reap(dev, st);
                    return Ok(target);
                }
                Some(holder) => {
                    for e in victims {
                        e.set_state(LIVE); // not merged after all
                    }
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
                }
            }
        }
    }

    /// Watches, registers and publishes `target`; `Ok(None)` when an invalidation hit the
    /// range while it was being registered (the registration was undone).
    fn register_and_publish(
        &self,
        locked: &mut Locked<'_>,
        target: Range,
        stripe: usize,
    ) -> Result<Option<EntryRef>> {
        let dev = locked.dev;
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        dev.registering.fetch_add(1, Ordering::SeqCst);
        locked.st().inflight = Some((target, false));
        let result = self.watch_and_register(locked, cookie, target);
        // Events recorded since the watch: drain sources, apply everything recorded.
        self.sync_sources();
        self.apply_pending(dev, locked.st());
        let hit_in_flight = locked.st().inflight.take().is_some_and(|(_, hit)| hit);
        let translation = match result {
            Ok(t) if !hit_in_flight => t,
            Ok(t) => {
                dev.registering.fetch_sub(1, Ordering::SeqCst);
                self.undo_registration(dev, cookie, target, t);
                return Ok(None);
            }
            Err(e) => {
                dev.registering.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        };
        let st = locked.st();
        if st.free.is_empty() {
            let chunk = Chunk::new(dev.id.index);
            st.free.extend(chunk.entries().rev());
            st.chunks.push(chunk);
        }
        let entry = st.free.pop().expect("refilled above");
        // SAFETY: the entry is FREE and unreferenced (fresh, or retired with refs == 0);
        // writer lock held.
        unsafe { entry.publish(target, cookie, translation, stripe) };
        let seq = st.lru_next;
        st.lru_next += 1;
        // SAFETY: writer lock held.
        unsafe { entry.writer() }.lru_seq = seq;
        st.lru.insert(seq, entry);
        st.live.insert((target.start(), cookie), entry);
        st.max_len = st.max_len.max(target.len());
        st.registered_bytes += target.len() as u64;
        st.registered_entries += 1;
        dev.counters.registrations.fetch_add(1, Ordering::Relaxed);
        // The index is written last: hits may find the entry from here on.
        dev.index
            .insert(target.start(), target.end(), entry.to_raw());
        // Only now: an invalidator that sees no registration in flight sees the index
        // entry (SeqCst RMW after the Release stores; `record` loads in the other order).
        dev.registering.fetch_sub(1, Ordering::SeqCst);
        tracing::debug!(device = %dev.id, range = %target, "registered");
        self.enforce_limits(dev, st);
        Ok(Some(entry))
    }

    fn watch_and_register(
        &self,
        locked: &mut Locked<'_>,
        cookie: u64,
        target: Range,
    ) -> Result<crate::backend::ErasedTranslation> {
        let dev = locked.dev;
        let sources = self.sources.read().clone();
        for (i, s) in sources.iter().enumerate() {
            if let Err(source) = s.watch(cookie, target) {
                for s in &sources[..i] {
                    s.unwatch(cookie, target);
                }
                let source_name = s.name().to_string();
                return Err(match source.downcast::<crate::source::Uncovered>() {
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
        }
        let mut result = dev.backend.register(target);
        if matches!(&result, Err(e) if e.kind == BackendErrorKind::OutOfMemory) {
            let evicted = self.evict_all_unreferenced(dev, locked.st());
            tracing::debug!(device = %dev.id, range = %target, evicted, "out of pinnable memory: evicted, retrying once");
            result = dev.backend.register(target);
        }
        result.map_err(|source: BackendError| {
            for s in &sources {
                s.unwatch(cookie, target);
            }
            if source.kind == BackendErrorKind::OutOfMemory {
                Error::MemlockLimit {
                    device: dev.id,
                    range: target,
                    registered_bytes: locked.st().registered_bytes,
                    memlock_limit: memlock_limit(),
                    source,
                }
            } else {
                Error::Backend {
                    device: dev.id,
                    range: target,
                    source,
                }
            }
        })
    }

    fn undo_registration(
        &self,
        dev: &DeviceSlot,
        cookie: u64,
        target: Range,
        translation: crate::backend::ErasedTranslation,
    ) {
        dev.counters.registrations.fetch_add(1, Ordering::Relaxed);
        self.deregister(dev, target, translation);
        for s in self.sources.read().iter() {
            s.unwatch(cookie, target);
        }
    }

    fn deregister(
        &self,
        dev: &DeviceSlot,
        range: Range,
        translation: crate::backend::ErasedTranslation,
    ) {
        dev.counters.deregistrations.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = dev.backend.deregister(range, translation) {
            dev.counters
                .deregistration_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(device = %dev.id, %range, error = %e, "deregistration failed");
        } else {
            tracing::debug!(device = %dev.id, %range, "deregistered");
        }
    }

    /// Removes a killed or invalidated entry from the live set, the LRU and the index, and
    /// re-exposes the live entries it shadowed in the index.
    fn unlink_live(&self, dev: &DeviceSlot, st: &mut DeviceState, e: EntryRef) {
        // SAFETY: writer lock held.
        let w = unsafe { e.writer() };
        let (range, id, seq) = (w.range, w.id, w.lru_seq);
        st.live.remove(&(range.start(), id));
        st.lru.remove(&seq);
        let index = &dev.index;
        index.remove(range.start(), range.end(), e.to_raw());
        for other in Self::live_overlapping(st, &range, false) {
            // SAFETY: writer lock held.
            let r = unsafe { other.writer() }.range;
            index.fill_empty(
                r.start().max(range.start()),
                r.end().min(range.end()),
                other.to_raw(),
            );
        }
    }

    /// Applies recorded invalidations and queued releases. Never calls a backend.
    fn apply_pending(&self, dev: &DeviceSlot, st: &mut DeviceState) {
        let target = dev.dirty.load(Ordering::SeqCst);
        if target != dev.applied.load(Ordering::SeqCst) {
            if dev.pending_all.swap(false, Ordering::SeqCst) {
                while dev.pending.pop().is_some() {}
                self.invalidate_locked(dev, st, None);
            }
            while let Some(r) = dev.pending.pop() {
                self.invalidate_locked(dev, st, Some(r));
            }
            dev.applied.fetch_max(target, Ordering::SeqCst);
        }
        while let Some(e) = dev.releases.pop() {
            Self::reclaim_if_unreferenced(st, e);
        }
    }

    /// Marks every live entry overlapping `range` (all when `None`) invalid.
    fn invalidate_locked(&self, dev: &DeviceSlot, st: &mut DeviceState, range: Option<Range>) {
        if let Some((inflight, hit)) = st.inflight.as_mut() {
            if range.is_none_or(|r| r.overlaps(inflight)) {
                *hit = true;
            }
        }
        let victims: Vec<EntryRef> = match range {
            Some(r) => Self::live_overlapping(st, &r, false),
            None => st.live.values().copied().collect(),
        };
        for e in victims {
            e.set_state(INVALID);
            self.unlink_live(dev, st, e);
            dev.counters
                .invalidated_entries
                .fetch_add(1, Ordering::Relaxed);
            if e.refs() == 0 {
                st.doomed.push(e);
            } else {
                // SAFETY: writer lock held.
                let w = unsafe { e.writer() };
                w.stale = true;
                st.stale.insert(w.id, e);
            }
        }
    }

    /// Moves an invalid entry whose last reference is gone to the doomed list (once).
    fn reclaim_if_unreferenced(st: &mut DeviceState, e: EntryRef) {
        if e.state() != INVALID || e.refs() != 0 {
            return;
        }
        // SAFETY: writer lock held.
        let w = unsafe { e.writer() };
        if w.stale {
            w.stale = false;
            st.stale.remove(&w.id);
            st.doomed.push(e);
        }
    }

    /// Deregisters every doomed entry and recycles it. Calls the backend.
    fn reap(&self, dev: &DeviceSlot, st: &mut DeviceState) {
        if st.doomed.is_empty() || self.owner.check_pid().is_err() {
            // (In a fork child the registrations are the parent's: never deregister them.)
            return;
        }
        let sources = self.sources.read().clone();
        for e in std::mem::take(&mut st.doomed) {
            let (range, id) = {
                // SAFETY: writer lock held.
                let w = unsafe { e.writer() };
                (w.range, w.id)
            };
            // SAFETY: writer lock held, entry not LIVE (INVALID or KILLING) and unreferenced
            // (checked when it was doomed; a doomed entry is unreachable for new hits).
            if let Some(t) = unsafe { e.retire() } {
                self.deregister(dev, range, t);
            }
            for s in &sources {
                s.unwatch(id, range);
            }
            st.registered_bytes -= range.len() as u64;
            st.registered_entries -= 1;
            st.free.push(e);
        }
        dev.released.notify_all();
    }

    /// Evicts least recently used unreferenced entries until the device is within the
    /// configured limits (or only pinned entries remain).
    fn enforce_limits(&self, dev: &DeviceSlot, st: &mut DeviceState) {
        let over = |st: &DeviceState| {
            st.registered_entries as usize > self.config.max_cached_entries
                || st.registered_bytes > self.config.max_cached_bytes
        };
        if !over(st) {
            return;
        }
        // CLOCK: at most two sweeps (the first clears reference bits).
        let mut budget = 2 * st.lru.len();
        while over(st) && budget > 0 {
            budget -= 1;
            let Some((&seq, &e)) = st.lru.iter().next() else {
                break;
            };
            st.lru.remove(&seq);
            if e.take_referenced() || !e.try_kill() {
                let seq = st.lru_next;
                st.lru_next += 1;
                // SAFETY: writer lock held.
                unsafe { e.writer() }.lru_seq = seq;
                st.lru.insert(seq, e);
                continue;
            }
            // SAFETY: writer lock held.
            unsafe { e.writer() }.lru_seq = seq;
            st.lru.insert(seq, e); // unlink_live removes it by its seq
            self.unlink_live(dev, st, e);
            dev.counters.evictions.fetch_add(1, Ordering::Relaxed);
            st.doomed.push(e);
            // Deregister now: the point is to free backend resources.
            self.reap(dev, st);
        }
    }

    /// Evicts every unreferenced live entry of `dev`; returns how many.
    fn evict_all_unreferenced(&self, dev: &DeviceSlot, st: &mut DeviceState) -> usize {
        let candidates: Vec<EntryRef> = st.live.values().copied().collect();
        let mut n = 0;
        for e in candidates {
            if e.try_kill() {
                self.unlink_live(dev, st, e);
                dev.counters.evictions.fetch_add(1, Ordering::Relaxed);
                st.doomed.push(e);
                n += 1;
            }
        }
        self.reap(dev, st);
        n
    }

    /// Deregisters every cached entry that no [`Pin`] holds, on every device; returns how
    /// many were evicted.
    pub fn evict_unreferenced(&self) -> usize {
        self.each_device()
            .map(|dev| {
                let mut locked = self.lock(dev, true);
                locked.settle();
                self.evict_all_unreferenced(dev, locked.st())
            })
            .sum()
    }

    fn each_device(&self) -> impl Iterator<Item = &DeviceSlot> {
        let n = self.device_count.load(Ordering::Acquire);
        self.devices[..n].iter().filter_map(|d| d.get())
    }

    /// Drains every notifier source whose generation moved since its last drain.
    #[inline]
    fn sync_sources(&self) {
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
    fn drain_source(&self, slot: &SourceSlot, now: u64) {
        slot.source.drain(self);
        // Release: a hit that sees this value also sees what the drain recorded.
        slot.seen.fetch_max(now, Ordering::AcqRel);
    }

    /// Invalidates every registration overlapping `range`, on every device.
    ///
    /// Callable from any thread, including a notifier thread whose event blocks a thread
    /// inside [`Manager::pin`]: it never waits for a writer lock and never calls a backend
    /// (see the [module docs](self)). When it returns, no hit returns an overlapping
    /// registration; the deregistrations follow (last pin drop, next miss, `flush`,
    /// reaper). It may allocate and free while applying; hooks that can run inside the
    /// allocator use [`Manager::invalidate_deferred`].
    pub fn invalidate(&self, range: Range) {
        if self.record(Some(range)) {
            for dev in self.each_device() {
                if !dev.clean() {
                    drop(self.try_lock(dev, false));
                }
            }
        }
    }

    /// The recording half of [`Manager::invalidate`]: allocation-free, lock-free and
    /// async-signal-safe. The invalidation is applied by the next `pin`, `flush`,
    /// `is_valid` or reaper pass; no hit returns an overlapping registration after this
    /// returns.
    pub fn invalidate_deferred(&self, range: Range) {
        self.record(Some(range));
    }

    /// Invalidates every registration on every device (a notifier lost events).
    pub fn invalidate_all(&self) {
        self.record(None);
        for dev in self.each_device() {
            drop(self.try_lock(dev, false));
        }
    }

    /// Records the invalidation on each device it may concern; returns whether any.
    fn record(&self, range: Option<Range>) -> bool {
        let mut any = false;
        for dev in self.each_device() {
            let concerned = match range {
                // `registering` before the index: a registration that finished in
                // between has published its index entry (see register_and_publish).
                Some(r) => {
                    dev.registering.load(Ordering::SeqCst) > 0
                        || dev.index.any_in(r.start(), r.end())
                        || !dev.clean()
                }
                None => true,
            };
            if concerned {
                dev.record(range);
                any = true;
            }
        }
        match range {
            None => self.invalidate_alls.fetch_add(1, Ordering::Relaxed),
            Some(_) if any => self.invalidations.fetch_add(1, Ordering::Relaxed),
            Some(_) => 0,
        };
        any
    }

    /// Applies every recorded invalidation, drains the notifier sources, and deregisters
    /// every stale entry no pin holds. Returns when all of that is done.
    pub fn flush(&self) {
        self.sync_sources();
        for dev in self.each_device() {
            drop(self.lock(dev, true));
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

    /// The slow release path of an entry that was not `LIVE` when a reference dropped.
    #[cold]
    fn slow_release(&self, dev: &DeviceSlot, e: EntryRef) {
        match self.try_lock(dev, true) {
            Some(mut locked) => Self::reclaim_if_unreferenced(locked.st(), e),
            None => {
                if dev.releases.push(e).is_err() {
                    let mut locked = self.lock(dev, true);
                    Self::reclaim_if_unreferenced(locked.st(), e);
                }
            }
        }
    }

    /// A snapshot of the counters. Takes each device's writer lock briefly.
    pub fn stats(&self) -> Stats {
        let devices = self
            .each_device()
            .map(|dev| {
                let st = dev.state.lock();
                // Stripes are never reset, so the pool's sum counts recycled entries too.
                let hits: u64 = st
                    .chunks
                    .iter()
                    .flat_map(|c| c.entries())
                    .map(|e| e.hits())
                    .sum();
                let c = &dev.counters;
                DeviceStats {
                    id: dev.id,
                    name: dev.name.clone(),
                    hits,
                    misses: c.misses.load(Ordering::Relaxed),
                    registrations: c.registrations.load(Ordering::Relaxed),
                    deregistrations: c.deregistrations.load(Ordering::Relaxed),
                    deregistration_errors: c.deregistration_errors.load(Ordering::Relaxed),
                    invalidated_entries: c.invalidated_entries.load(Ordering::Relaxed),
                    evictions: c.evictions.load(Ordering::Relaxed),
                    merges: c.merges.load(Ordering::Relaxed),
                    registered_bytes: st.registered_bytes,
                    registered_entries: st.registered_entries,
                    cached_entries: st.live.len() as u64,
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

/// Whether every page of `range` is mapped: `msync(MS_ASYNC)` fails with `ENOMEM` on
/// unmapped pages and otherwise does nothing for anonymous memory.
fn is_mapped(range: &Range) -> bool {
    // SAFETY: msync only inspects the mappings of the range; MS_ASYNC schedules nothing
    // that touches our memory.
    unsafe {
        libc::msync(
            range.start() as *mut libc::c_void,
            range.len(),
            libc::MS_ASYNC,
        ) == 0
    }
}

impl InvalidationSink for Manager {
    fn invalidate(&self, range: Range) {
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
        if self.owner.check_pid().is_err() {
            // A fork child's copy: the registrations are the parent's. Leave them alone.
            return;
        }
        // No pin can exist (they borrow the manager): deregister everything still held.
        for dev in self.each_device() {
            let mut st = dev.state.lock();
            self.apply_pending(dev, &mut st);
            let mut all: Vec<EntryRef> = st.live.values().copied().collect();
            all.extend(st.stale.values().copied());
            for e in all {
                e.set_state(INVALID);
                // SAFETY: writer lock held.
                unsafe { e.writer() }.stale = false;
                st.doomed.push(e);
            }
            st.live.clear();
            st.lru.clear();
            st.stale.clear();
            self.reap(dev, &mut st);
        }
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
                &self.holds.iter().map(|h| h.device()).collect::<Vec<_>>(),
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
    /// invalidation overlapping it was reported (even if not yet applied).
    pub fn is_valid(&self) -> bool {
        self.manager.sync_sources();
        self.holds.iter().all(|h| {
            let Ok(dev) = self.manager.device_at(h.device()) else {
                return false;
            };
            if !dev.clean() {
                drop(self.manager.lock(dev, false));
            }
            // KILLING is an evictor's transient probe: it cannot succeed while we hold a
            // reference, so the entry is still valid.
            matches!(h.state(), LIVE | KILLING)
        })
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let stripe = self.stripe as usize;
        for h in &self.holds {
            if h.release(stripe) {
                if let Ok(dev) = self.manager.device_at(h.device()) {
                    self.manager.slow_release(dev, *h);
                }
            }
        }
    }
}
