//! One registration of one range on one device, and its lock-free reference count.
//!
//! # Reference counting
//!
//! A hit must not write a cache line that another thread's hit writes too (two threads
//! pinning the same buffer would bounce it between cores, ~100 ns per op measured here).
//! So the count is split into [`STRIPES`] cache-line-sized counters; a thread always uses
//! the stripe [`thread_stripe`] gave it, and a [`crate::Pin`] remembers its stripe so that
//! it decrements the same one wherever it is dropped. The true count is the sum.
//!
//! Each stripe word holds the references in its low [`REF_BITS`] bits and a hit counter
//! above them, so one `lock xadd` both takes the reference and counts the hit.
//!
//! # Killing an entry (the one subtle protocol)
//!
//! A reader (hit) does `stripe.fetch_add` **then** loads `state`; a killer (invalidation,
//! eviction, merge; always under the device's writer lock) stores a non-`LIVE` state
//! **then** sums the stripes. Both sides use `SeqCst`, so in the single total order either
//! the reader sees the new state (and backs off) or the killer sees the reader's reference
//! (and leaves the entry to the last [`crate::Pin`] to drop). A reader that backs off, and
//! any release that finds the entry not `LIVE`, goes to the device's slow release path,
//! which re-sums under the lock: whoever sees zero last reclaims, exactly once, because the
//! `INVALID → FREE` transition happens under the lock.
//!
//! # Memory
//!
//! Entries are type-stable: a device owns every entry it ever allocated until the manager
//! is dropped and recycles freed ones, so a reader that loaded a pointer from the index
//! just before the entry was freed dereferences valid memory. It then validates (state and
//! range after taking its reference) instead of relying on the pointer being current.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::backend::ErasedTranslation;
use crate::range::Range;

/// Number of reference-count stripes per entry.
pub(crate) const STRIPES: usize = 4;
/// Bits of each stripe word that count references; the bits above count hits.
pub(crate) const REF_BITS: u32 = 24;
const REF_MASK: u64 = (1 << REF_BITS) - 1;
const HIT_ONE: u64 = 1 << REF_BITS;

/// Not in use: on the device's free list.
pub(crate) const FREE: u32 = 0;
/// Valid and findable by hits.
pub(crate) const LIVE: u32 = 1;
/// Invalidated: never returned again; deregistered once the last reference drops.
pub(crate) const INVALID: u32 = 2;
/// Transient, under the writer lock: being evicted or merged if nobody holds it.
pub(crate) const KILLING: u32 = 3;

#[repr(align(64))]
struct Stripe(AtomicU64);

/// State only the holder of the device's writer lock touches.
pub(crate) struct WriterSide {
    /// The registered range (the lock-free copy is `start`/`end`).
    pub range: Range,
    /// Unique per registration; the cookie given to notifier sources.
    pub id: u64,
    /// Position in the device's LRU.
    pub lru_seq: u64,
    /// Whether the entry is on the device's `stale` list (invalid, still referenced).
    pub stale: bool,
}

/// See the [module docs](self).
#[repr(align(64))]
pub(crate) struct Entry {
    stripes: [Stripe; STRIPES],
    /// `FREE`, `LIVE`, `INVALID` or `KILLING`; written under the writer lock only.
    state: AtomicU32,
    /// CLOCK bit: set by hits (only when clear, so a hot entry's line stays shared),
    /// cleared by the evictor's sweep.
    referenced: AtomicBool,
    /// Registered range, readable without the lock once `state == LIVE` was seen.
    start: AtomicUsize,
    end: AtomicUsize,
    /// Written only while the entry is `FREE` and unreferenced (publication) or being
    /// reclaimed with no references left; read through a [`crate::Pin`] that holds a
    /// reference taken while `LIVE`.
    translation: UnsafeCell<Option<ErasedTranslation>>,
    /// Guarded by the device's writer lock.
    writer: UnsafeCell<WriterSide>,
}

// SAFETY: every field is an atomic except `translation` and `writer`. `writer` is only
// accessed by the holder of the owning device's writer lock. `translation` is written only
// when no reader can read it (see its field doc and the module docs: readers hold a
// reference taken while LIVE, and writes happen before publication or after the last
// reference is gone), and the translation itself is `Send + Sync`.
unsafe impl Sync for Entry {}
// SAFETY: as above; moving an entry between threads moves only `Send` data.
unsafe impl Send for Entry {}

impl Entry {
    pub(crate) fn new() -> Box<Entry> {
        Box::new(Entry {
            stripes: std::array::from_fn(|_| Stripe(AtomicU64::new(0))),
            state: AtomicU32::new(FREE),
            referenced: AtomicBool::new(false),
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            translation: UnsafeCell::new(None),
            writer: UnsafeCell::new(WriterSide {
                range: Range::new(0, 1).expect("static range"),
                id: 0,
                lru_seq: 0,
                stale: false,
            }),
        })
    }

    /// Takes a reference if the entry is `LIVE` and covers `want`; counts a hit when `hit`.
    /// On failure the caller holds nothing, but may have to run the slow release path
    /// (returned as `Err(true)`).
    #[inline]
    pub(crate) fn try_acquire(&self, stripe: usize, want: &Range, hit: bool) -> Result<(), bool> {
        let inc = if hit { HIT_ONE | 1 } else { 1 };
        // SeqCst: pairs with the killer's SeqCst state store + stripe loads (module docs).
        self.stripes[stripe].0.fetch_add(inc, Ordering::SeqCst);
        // SeqCst load also acquires the range stores published before `LIVE`.
        if self.state.load(Ordering::SeqCst) == LIVE
            && self.start.load(Ordering::Relaxed) <= want.start()
            && want.end() <= self.end.load(Ordering::Relaxed)
        {
            if hit && !self.referenced.load(Ordering::Relaxed) {
                self.referenced.store(true, Ordering::Relaxed);
            }
            return Ok(());
        }
        Err(self.release_counted(stripe, inc))
    }

    /// Drops one reference taken on `stripe`. Returns whether the entry is not `LIVE`, in
    /// which case the caller must run the device's slow release path.
    #[inline]
    pub(crate) fn release(&self, stripe: usize) -> bool {
        self.release_counted(stripe, 1)
    }

    #[inline]
    fn release_counted(&self, stripe: usize, dec: u64) -> bool {
        self.stripes[stripe].0.fetch_sub(dec, Ordering::SeqCst);
        self.state.load(Ordering::SeqCst) != LIVE
    }

    /// Sum of references over all stripes. Exact once the state is not `LIVE` (module docs).
    pub(crate) fn refs(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::SeqCst) & REF_MASK)
            .sum()
    }

    /// Hits counted on this entry since it was allocated.
    pub(crate) fn hits(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed) >> REF_BITS)
            .sum()
    }

    pub(crate) fn state(&self) -> u32 {
        self.state.load(Ordering::SeqCst)
    }

    /// Sets the state; the caller holds the device's writer lock.
    pub(crate) fn set_state(&self, state: u32) {
        self.state.store(state, Ordering::SeqCst);
    }

    /// Tries `LIVE → KILLING → (no references)`; on `false` the entry is `LIVE` again.
    /// The caller holds the writer lock.
    pub(crate) fn try_kill(&self) -> bool {
        self.set_state(KILLING);
        if self.refs() == 0 {
            true
        } else {
            self.set_state(LIVE);
            false
        }
    }

    /// Reads and clears the CLOCK bit.
    pub(crate) fn take_referenced(&self) -> bool {
        self.referenced.swap(false, Ordering::Relaxed)
    }

    /// Publishes a fresh registration in a `FREE` entry and takes one reference on
    /// `stripe` for the caller. The caller holds the writer lock.
    ///
    /// # Safety
    /// The entry must be `FREE` with no reference held, so no reader reads `translation`.
    pub(crate) unsafe fn publish(
        &self,
        range: Range,
        id: u64,
        translation: ErasedTranslation,
        stripe: usize,
    ) {
        debug_assert_eq!(self.state(), FREE);
        // SAFETY: caller guarantees no reader; writer lock serialises writers.
        unsafe {
            *self.translation.get() = Some(translation);
            let w = &mut *self.writer.get();
            w.range = range;
            w.id = id;
            w.stale = false;
        }
        self.start.store(range.start(), Ordering::Relaxed);
        self.end.store(range.end(), Ordering::Relaxed);
        self.referenced.store(false, Ordering::Relaxed);
        self.stripes[stripe].0.fetch_add(1, Ordering::SeqCst);
        // Release (SeqCst): readers that see LIVE see the range and translation.
        self.set_state(LIVE);
    }

    /// Takes the translation of an entry with no references left and marks it `FREE`.
    ///
    /// # Safety
    /// The caller holds the writer lock, the entry is not `LIVE`, and `refs() == 0`.
    pub(crate) unsafe fn retire(&self) -> Option<ErasedTranslation> {
        self.set_state(FREE);
        // SAFETY: no reference is held, so no Pin reads the translation (caller's contract).
        unsafe { (*self.translation.get()).take() }
    }

    /// The translation, for a [`crate::Pin`] that holds a reference.
    ///
    /// # Safety
    /// The caller holds a reference taken while the entry was `LIVE`.
    pub(crate) unsafe fn translation(&self) -> Option<&ErasedTranslation> {
        // SAFETY: no writer runs while a reference is held (caller's contract).
        unsafe { (*self.translation.get()).as_ref() }
    }

    /// The registered range, for a holder of a reference (lock-free copy).
    pub(crate) fn range_unlocked(&self) -> Range {
        let start = self.start.load(Ordering::Relaxed);
        let end = self.end.load(Ordering::Relaxed);
        Range::from_bounds(start, end).unwrap_or(Range::new(start, 1).expect("nonzero"))
    }

    /// Writer-side fields.
    ///
    /// # Safety
    /// The caller holds the owning device's writer lock and no other reference to them.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn writer(&self) -> &mut WriterSide {
        // SAFETY: exclusive by the writer lock (caller's contract).
        unsafe { &mut *self.writer.get() }
    }
}

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's stripe: assigned round-robin at first use, so up to [`STRIPES`] threads
/// never share a reference-count line.
#[inline]
pub(crate) fn thread_stripe() -> usize {
    STRIPE.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            v
        } else {
            let v = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(v);
            v
        }
    })
}
