//! One attached device's cache: the lock-free half hits read, and the writer side behind
//! the device's lock.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use crate::backend::{Capabilities, ErasedBackend};
use crate::device::DeviceId;
use crate::entry::{ChunkBox, EntryRef};
use crate::error::{Error, Result};
use crate::index::{NodePool, RadixIndex};
use crate::range::Range;

use super::lists::{ChunkTable, FreeList, List};
use super::Manager;

/// Capacity of each device's queue of recorded invalidations; beyond it the device
/// invalidates everything at the next apply (counted in `Stats::queue_overflows`).
pub(super) const PENDING_CAPACITY: usize = 1024;
/// Capacity of each device's queue of entries released while its lock was busy.
pub(super) const RELEASE_CAPACITY: usize = 1024;

/// Entries keyed by (start, registration id).
pub(super) type EntryMap = BTreeMap<(usize, u64), EntryRef>;

/// What only the device's writer lock holder touches.
///
/// Every published entry is on exactly one list: `lru` or `parked` (live, current era),
/// `old` (live but of an earlier era: invalidated wholesale, still to be unlinked),
/// `stale` (invalid, still pinned), `doomed` (invalid, waiting for its deregistration) or
/// `free`. The radix index finds the live and old entries by page; `shadowed` holds the
/// ones it cannot find that way.
pub(super) struct DeviceState {
    /// The device's chunks by number, for the lists' links (`dev.chunks` owns them).
    pub chunks: ChunkTable,
    /// The nodes of the device's index (`DeviceSlot::index`), for its updates.
    pub nodes: NodePool,
    pub free: FreeList,
    /// Live and old entries of which a newer entry took pages in the index (and those
    /// beyond the index's reach): with the index, every live entry is found by any of its
    /// pages. Empty unless registrations overlap.
    pub shadowed: EntryMap,
    /// Longest entry ever: bounds the backward scan of `shadowed` for overlaps.
    pub max_len: usize,
    /// Unreferenced-when-last-seen live entries in LRU order (CLOCK: hits set a bit, the
    /// sweep gives a second chance).
    pub lru: List,
    /// Live entries the evictor found pinned, off the LRU until their last pin drops.
    pub parked: List,
    /// Entries of earlier eras (invalidated wholesale in O(1) by `invalidate_all` or a
    /// queue overflow), still to be unlinked; cleaned a slice at a time.
    pub old: List,
    /// Invalidated (or merged away) entries still referenced by pins.
    pub stale: List,
    /// Entries with no reference left, waiting for their deregistration.
    pub doomed: Vec<EntryRef>,
    /// The range of the registration in flight (request plus the neighbours it absorbs)
    /// and whether an applied invalidation overlapped it.
    pub inflight: Option<(Range, bool)>,
}

impl DeviceState {
    /// Adds `e` to `shadowed` (once).
    pub fn shadow(&mut self, e: EntryRef) {
        // SAFETY: `DeviceState` is only reached under the device's writer lock.
        let w = unsafe { e.writer() };
        if !std::mem::replace(&mut w.shadowed, true) {
            self.shadowed.insert((e.range().start(), e.id()), e);
        }
    }

    /// Takes `e` out of `shadowed` if it is there.
    pub fn unshadow(&mut self, e: EntryRef) {
        // SAFETY: as in `shadow`.
        let w = unsafe { e.writer() };
        if std::mem::take(&mut w.shadowed) {
            self.shadowed.remove(&(e.range().start(), e.id()));
        }
    }

    /// The shadowed entries that may overlap `range` (those starting at most `max_len`
    /// before it and before its end), in start order; callers check the overlap.
    pub fn shadowed_near(&self, range: &Range) -> impl DoubleEndedIterator<Item = EntryRef> + '_ {
        let lo = range.start().saturating_sub(self.max_len);
        self.shadowed
            .range((lo, 0)..=(range.end(), u64::MAX))
            .map(|(_, e)| *e)
    }
}

/// A counter only the device's writer lock holder changes and anyone reads
/// (`Manager::stats`): changed with a plain load and store, not a locked read-modify-write
/// (the lock already orders the writers; a miss and its deregistration change six).
#[derive(Default)]
pub(super) struct LockedCounter(AtomicU64);

impl LockedCounter {
    /// Adds `n`; the caller holds the device's writer lock.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0
            .store(self.0.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    /// Subtracts `n`; the caller holds the device's writer lock.
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0
            .store(self.0.load(Ordering::Relaxed) - n, Ordering::Relaxed);
    }

    /// Sets the value; the caller holds the device's writer lock.
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters readable without the lock (`Manager::stats`).
#[derive(Default)]
pub(super) struct DeviceCounters {
    pub misses: LockedCounter,
    pub registrations: LockedCounter,
    pub deregistrations: LockedCounter,
    pub deregistration_errors: LockedCounter,
    pub invalidated_entries: LockedCounter,
    pub evictions: LockedCounter,
    pub eviction_scans: LockedCounter,
    pub merges: LockedCounter,
    /// Bumped by lock-free recorders: a locked read-modify-write.
    pub queue_overflows: AtomicU64,
    pub registered_bytes: LockedCounter,
    pub registered_entries: LockedCounter,
    pub cached_entries: LockedCounter,
}

pub(super) struct DeviceSlot {
    pub id: DeviceId,
    pub name: String,
    pub caps: Capabilities,
    pub backend: Box<dyn ErasedBackend>,
    pub index: RadixIndex,
    /// Bumped after each recorded invalidation; hits compare it with `applied`.
    pub dirty: AtomicU64,
    /// The `dirty` value whose records have all been applied.
    pub applied: AtomicU64,
    /// Bumped when everything is invalidated at once; hits refuse entries of older eras.
    pub era: AtomicU64,
    /// A registration is in flight (0 or 1: one at a time under the lock); its range is
    /// `inflight_lo..inflight_hi`, stored before the count goes up and widened before
    /// absorbed neighbours leave the index (see `Manager::record`).
    pub registering: AtomicUsize,
    pub inflight_lo: AtomicUsize,
    pub inflight_hi: AtomicUsize,
    pub pending: ArrayQueue<Range>,
    pub pending_all: AtomicBool,
    pub releases: ArrayQueue<EntryRef>,
    /// Set while the device is over its limits and only pinned entries are left to
    /// evict: every pin drop then takes the slow path, so an entry is evicted as soon as
    /// it becomes evictable (limits hold after release, not only at the next miss).
    pub over_limit: AtomicBool,
    /// Deregistrations are owed (doomed entries, or old-era entries to clean): a miss or
    /// slow release of another device settles this one too.
    pub owes_work: AtomicBool,
    /// Every chunk of entries ever allocated; freed with the device. Boxed: entries must
    /// not move (the index and pins point at them). Its own lock, so `stats` never takes
    /// the writer lock.
    #[allow(clippy::vec_box)]
    pub chunks: RwLock<Vec<ChunkBox>>,
    pub state: Mutex<DeviceState>,
    /// Signalled when entries are deregistered (busy waits of no-overlap devices).
    pub released: Condvar,
    pub counters: DeviceCounters,
}

impl DeviceSlot {
    pub fn new(
        id: DeviceId,
        name: String,
        caps: Capabilities,
        backend: Box<dyn ErasedBackend>,
    ) -> Self {
        DeviceSlot {
            id,
            name,
            caps,
            backend,
            index: RadixIndex::new(),
            dirty: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            era: AtomicU64::new(0),
            registering: AtomicUsize::new(0),
            inflight_lo: AtomicUsize::new(0),
            inflight_hi: AtomicUsize::new(0),
            pending: ArrayQueue::new(PENDING_CAPACITY),
            pending_all: AtomicBool::new(false),
            releases: ArrayQueue::new(RELEASE_CAPACITY),
            over_limit: AtomicBool::new(false),
            owes_work: AtomicBool::new(false),
            chunks: RwLock::new(Vec::new()),
            state: Mutex::new(DeviceState {
                chunks: ChunkTable::default(),
                nodes: NodePool::new(),
                free: FreeList::default(),
                shadowed: BTreeMap::new(),
                max_len: 0,
                lru: List::default(),
                parked: List::default(),
                old: List::default(),
                stale: List::default(),
                doomed: Vec::new(),
                inflight: None,
            }),
            released: Condvar::new(),
            counters: DeviceCounters::default(),
        }
    }

    #[inline]
    pub fn clean(&self) -> bool {
        self.dirty.load(Ordering::SeqCst) == self.applied.load(Ordering::SeqCst)
    }

    #[inline]
    pub fn era(&self) -> u64 {
        self.era.load(Ordering::SeqCst)
    }

    /// Records `range` (or everything) for the lock holder. Allocation-free, lock-free.
    pub fn record(&self, range: Option<Range>) {
        let fits = match range {
            Some(r) => self.pending.push(r).is_ok(),
            None => false,
        };
        if !fits {
            if range.is_some() {
                self.counters
                    .queue_overflows
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.pending_all.store(true, Ordering::SeqCst);
        }
        self.dirty.fetch_add(1, Ordering::SeqCst);
    }

    pub fn has_work(&self) -> bool {
        !self.clean() || !self.releases.is_empty()
    }

    /// Whether a registration in flight may overlap `range` (see `Manager::record`).
    pub fn inflight_overlaps(&self, range: &Range) -> bool {
        self.registering.load(Ordering::SeqCst) > 0
            && range.start() < self.inflight_hi.load(Ordering::SeqCst)
            && self.inflight_lo.load(Ordering::SeqCst) < range.end()
    }

    /// Publishes (or widens) the in-flight range for lock-free recorders.
    pub fn set_inflight(&self, st: &mut DeviceState, range: Range) {
        st.inflight = Some((range, st.inflight.is_some_and(|(_, hit)| hit)));
        self.inflight_lo.store(range.start(), Ordering::SeqCst);
        self.inflight_hi.store(range.end(), Ordering::SeqCst);
    }
}

/// Most device locks one thread records as held at once (a chain of backend calls that
/// each pin on another device); deeper, re-entrancy is no longer detected.
const HELD_MAX: usize = 16;

/// The device locks this thread holds, as `manager id << 32 | device index` (never 0):
/// a blocking `lock` of one of them from inside a backend call would deadlock. Plain
/// cells, constant-initialised: every lock and unlock touches it.
struct HeldLocks {
    keys: [Cell<u64>; HELD_MAX],
    len: Cell<usize>,
}

impl HeldLocks {
    fn contains(&self, key: u64) -> bool {
        self.keys[..self.len.get()].iter().any(|k| k.get() == key)
    }

    fn push(&self, key: u64) {
        let n = self.len.get();
        if n < HELD_MAX {
            self.keys[n].set(key);
            self.len.set(n + 1);
        }
    }

    fn remove(&self, key: u64) {
        let n = self.len.get();
        if let Some(i) = (0..n).rev().find(|&i| self.keys[i].get() == key) {
            self.keys[i].set(self.keys[n - 1].get());
            self.len.set(n - 1);
        }
    }
}

thread_local! {
    static HELD: HeldLocks = const {
        HeldLocks {
            keys: [const { Cell::new(0) }; HELD_MAX],
            len: Cell::new(0),
        }
    };
}

/// Exclusive access to a device's writer side; on drop it unlocks and then keeps applying
/// work that other threads recorded while it was held (the "combining" half of the
/// never-wait rule of [`Manager::invalidate`]).
pub(super) struct Locked<'a> {
    pub manager: &'a Manager,
    pub dev: &'a DeviceSlot,
    pub st: Option<MutexGuard<'a, DeviceState>>,
    /// Whether this thread may call the backend (false on notifier threads).
    pub may_call_backend: bool,
}

impl<'a> Locked<'a> {
    fn key(manager: &Manager, dev: &DeviceSlot) -> u64 {
        u64::from(manager.id) << 32 | u64::from(dev.id.index)
    }

    /// Blocks for the device's lock; refuses (instead of deadlocking) when this thread
    /// already holds it, i.e. when called from inside one of the device's backend calls.
    pub fn lock(manager: &'a Manager, dev: &'a DeviceSlot, may_call_backend: bool) -> Result<Self> {
        let key = Self::key(manager, dev);
        if HELD.with(|h| h.contains(key)) {
            return Err(Error::Reentrant { device: dev.id });
        }
        let g = dev.state.lock();
        Ok(Self::held(manager, dev, g, may_call_backend))
    }

    pub fn try_lock(
        manager: &'a Manager,
        dev: &'a DeviceSlot,
        may_call_backend: bool,
    ) -> Option<Self> {
        let g = dev.state.try_lock()?;
        Some(Self::held(manager, dev, g, may_call_backend))
    }

    fn held(
        manager: &'a Manager,
        dev: &'a DeviceSlot,
        g: MutexGuard<'a, DeviceState>,
        may_call_backend: bool,
    ) -> Self {
        HELD.with(|h| h.push(Self::key(manager, dev)));
        Locked {
            manager,
            dev,
            st: Some(g),
            may_call_backend,
        }
    }

    pub fn st(&mut self) -> &mut DeviceState {
        self.st.as_mut().expect("held until drop")
    }

    /// Applies recorded invalidations and queued releases, cleans a slice of old-era
    /// entries, then (if allowed, and not while unwinding from a backend panic) deregisters
    /// what is doomed and evicts down to the limits.
    pub fn settle(&mut self) {
        let manager = self.manager;
        let dev = self.dev;
        let st = self.st.as_mut().expect("held until drop");
        manager.apply_pending(dev, st);
        manager.clean_old(dev, st, super::invalidation::OLD_SLICE);
        if self.may_call_backend && !std::thread::panicking() {
            manager.reap(dev, st);
            if dev.over_limit.load(Ordering::Relaxed) {
                manager.enforce_limits(dev, st);
            }
        }
        dev.owes_work.store(
            !st.doomed.is_empty() || !st.old.is_empty(),
            Ordering::Relaxed,
        );
    }

    fn unlock(&mut self) {
        if self.st.take().is_some() {
            let key = Self::key(self.manager, self.dev);
            HELD.with(|h| h.remove(key));
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        loop {
            self.settle();
            self.unlock();
            if !self.dev.has_work() {
                return;
            }
            match self.dev.state.try_lock() {
                Some(g) => {
                    HELD.with(|h| h.push(Self::key(self.manager, self.dev)));
                    self.st = Some(g);
                }
                None => return, // the new holder settles on its unlock
            }
        }
    }
}
