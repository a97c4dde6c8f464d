//! One registration of one range on one device, and its lock-free reference count.
//!
//! # Reference counting
//!
//! A hit must not write a cache line that another thread's hit writes too (two threads
//! pinning the same buffer would bounce it between cores, ~100 ns per op measured here).
//! So the count is split into [`STRIPES`] counters kept in separate per-stripe arrays (see
//! the layout below); a thread always uses
//! the stripe [`thread_stripe`] gave it, and a [`crate::Pin`] remembers its stripe so that
//! it decrements the same one wherever it is dropped. The true count is the sum.
//!
//! Each stripe word holds the references in its low [`REF_BITS`] bits and a hit counter
//! above them, so one `lock xadd` both takes the reference and counts the hit.
//!
//! The reference bits never wrap (a wrapped count would let a held registration be
//! deregistered and its entry reused: a use-after-free reachable from safe code with
//! `mem::forget`). `lock xadd` returns the old word, so an acquire that finds a stripe at
//! [`REF_SATURATED`] references takes its increment back and fails with
//! [`Acquire::Saturated`]; the margin above it (2^23 increments in flight at once) cannot
//! be reached by racing threads.
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
//! The killer sums only the stripes marked in the entry's `stripes_used` bits: a reader
//! sets its stripe's bit (SeqCst, and only if it is clear) after its increment and before
//! its state load, and bits are never cleared, not even when the entry is recycled (a
//! reader holding an old `EntryRef` may take a reference on the entry's next life). So a
//! reader that did not see the killer's state precedes it, and so does its bit, in the
//! total order: the killer's later load of the bits sees it, and sums that stripe.
//!
//! An evictor's or merger's probe (`try_kill`) is the same protocol with a way back: it
//! stores `KILLING`, and if it finds a reference it stores `LIVE` again. So `KILLING` is
//! transient, and a holder of a reference must read it as "still valid" (it cannot be
//! killed while held).
//!
//! # Memory and layout
//!
//! Entries are type-stable: a device owns every entry it ever allocated until the manager
//! is dropped and recycles freed ones, so a reader that loaded a reference from the index
//! just before the entry was freed reads valid memory. It then validates (state and
//! range after taking its reference) instead of relying on the reference being current.
//!
//! Entries live in 4 KiB-aligned [`Chunk`]s of [`CHUNK`] entries, laid out by field, not by
//! entry: what a hit and its pin read (state, range, era, id and translation) is one
//! 64-byte line per entry, each reference-count stripe is an array of its own (a thread
//! only ever writes its stripe's array, so threads do not share written lines), and what
//! hits never touch (the writer's bookkeeping) is kept apart. A hit that reads its
//! translation touches two lines: its entry's header and its stripe's counter (measured
//! with the translation in an array of its own, reading it cost a third cache miss: a hit
//! with the read over 10^5 entries took twice as long as one without). An [`EntryRef`]
//! packs the chunk address and the
//! slot into one word, which is what the radix index stores.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::backend::ErasedTranslation;
use crate::range::Range;

/// Number of reference-count stripes per entry.
pub(crate) const STRIPES: usize = 4;
/// Bits of each stripe word that count references; the bits above count hits.
pub(crate) const REF_BITS: u32 = 24;
const REF_MASK: u64 = (1 << REF_BITS) - 1;
/// References one stripe may hold; beyond it an acquire fails (see the module docs).
pub(crate) const REF_SATURATED: u64 = 1 << (REF_BITS - 1);
const HIT_ONE: u64 = 1 << REF_BITS;
/// Entries per chunk; a slot number fits in the low bits of the 4 KiB-aligned chunk
/// address next to the index's tag bit.
pub(crate) const CHUNK: usize = 512;
const SLOT_SHIFT: u32 = 1;

/// Not in use: on the device's free list.
pub(crate) const FREE: u32 = 0;
/// Valid and findable by hits.
pub(crate) const LIVE: u32 = 1;
/// Invalidated: never returned again; deregistered once the last reference drops.
pub(crate) const INVALID: u32 = 2;
/// Transient, under the writer lock: being evicted or merged if nobody holds it.
pub(crate) const KILLING: u32 = 3;

/// What a hit and its pin read, in one cache line: the state, range and era it checks
/// and the translation it hands out.
#[repr(C, align(64))]
struct Header {
    /// `FREE`, `LIVE`, `INVALID` or `KILLING`; written under the writer lock only.
    state: AtomicU32,
    /// CLOCK bit (0/1): set by hits (only when clear, so a hot entry's line stays shared),
    /// cleared by the evictor's sweep.
    referenced: AtomicU16,
    /// Bit `s` is set once stripe `s` took a reference on this entry, in any of its lives
    /// (never cleared), before the taker reads the state: a killer sums only those stripes
    /// (module docs), one counter line instead of [`STRIPES`] when one thread pins.
    stripes_used: AtomicU16,
    /// Registered range, readable without the lock once `state == LIVE` was seen.
    start: AtomicUsize,
    end: AtomicUsize,
    /// The device's era when the entry was published: a `LIVE` entry of an older era was
    /// invalidated wholesale (`invalidate_all`) and is not yet cleaned up; hits refuse it.
    era: AtomicU64,
    /// The registration's id (the cookie its sources watch), unique per manager; written
    /// with the translation.
    id: AtomicU64,
    /// Written only while the entry is `FREE` and unreferenced (publication) or being
    /// reclaimed with no references left; read through a [`crate::Pin`] that holds a
    /// reference taken while `LIVE`.
    translation: UnsafeCell<Option<ErasedTranslation>>,
}

/// Why [`EntryRef::try_acquire`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Acquire {
    /// Not `LIVE`, of another era, or not covering the request: the caller holds nothing;
    /// `slow` says whether it must run the device's slow release path.
    Refused { slow: bool },
    /// The stripe holds [`REF_SATURATED`] references already.
    Saturated,
}

/// State only the holder of the device's writer lock touches: the entry's links in the
/// device's intrusive lists (see `manager::lists`) and which of them it is on. The range
/// and the registration id are not repeated here: the header and [`Published`] hold them.
pub(crate) struct WriterSide {
    pub prev: Option<EntryRef>,
    pub next: Option<EntryRef>,
    /// Whether the entry is parked: found pinned by the evictor and taken off the LRU so
    /// that sweeps do not revisit it (it returns when its last pin drops).
    pub parked: bool,
    /// Whether the entry is on the device's stale list (invalid, still referenced).
    pub stale: bool,
    /// Whether the entry is in the device's map of shadowed entries (a newer entry took
    /// some of its pages in the index).
    pub shadowed: bool,
}

/// One stripe's counters, padded by a cache line so that the same entry's counters in
/// different stripes do not share their low 12 address bits (4 KiB aliasing between the
/// two hyperthreads of a core doing `lock xadd` on them measurably slowed two threads
/// hitting the same buffer).
#[repr(align(64))]
struct StripeArray {
    counters: [AtomicU64; CHUNK],
    _pad: [u64; 8],
}

/// [`CHUNK`] entries, by field (see the module docs).
#[repr(align(4096))]
pub(crate) struct Chunk {
    /// The device (index) whose entries these are: a pin's reference alone names its
    /// device, keeping pins small (their size showed in the hit's cost).
    device: u32,
    headers: [Header; CHUNK],
    stripes: [StripeArray; STRIPES],
    /// Guarded by the device's writer lock.
    writers: [UnsafeCell<WriterSide>; CHUNK],
}

// SAFETY: every field is atomic except `translations` and `writers`. `writers` are only
// accessed by the holder of the owning device's writer lock. A translation is written only
// when no reader can read it (see the field doc and the module docs: readers hold a
// reference taken while LIVE, and writes happen before publication or after the last
// reference is gone), and translations are `Send + Sync`.
unsafe impl Sync for Chunk {}
// SAFETY: as above; moving a chunk between threads moves only `Send` data.
unsafe impl Send for Chunk {}

impl Chunk {
    pub(crate) fn new(device: u32) -> Box<Chunk> {
        Box::new(Chunk {
            device,
            headers: std::array::from_fn(|_| Header {
                state: AtomicU32::new(FREE),
                referenced: AtomicU16::new(0),
                stripes_used: AtomicU16::new(0),
                start: AtomicUsize::new(0),
                end: AtomicUsize::new(0),
                era: AtomicU64::new(0),
                id: AtomicU64::new(0),
                translation: UnsafeCell::new(None),
            }),
            stripes: std::array::from_fn(|_| StripeArray {
                counters: std::array::from_fn(|_| AtomicU64::new(0)),
                _pad: [0; 8],
            }),
            writers: std::array::from_fn(|_| {
                UnsafeCell::new(WriterSide {
                    prev: None,
                    next: None,
                    parked: false,
                    stale: false,
                    shadowed: false,
                })
            }),
        })
    }

    /// References to every entry of the chunk.
    pub(crate) fn entries(&self) -> impl DoubleEndedIterator<Item = EntryRef> + '_ {
        (0..CHUNK).map(move |slot| EntryRef::new(self, slot))
    }
}

/// One entry: its chunk's address with the slot number in the low bits (the chunk is
/// 4 KiB-aligned), one word, which is also what the radix index stores.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct EntryRef(std::num::NonZeroUsize);

// SAFETY: an EntryRef points into a chunk owned by a device, which outlives every use of
// the reference (chunks are freed only when the device is dropped); Chunk is Sync.
unsafe impl Send for EntryRef {}
// SAFETY: as above.
unsafe impl Sync for EntryRef {}

const CHUNK_MASK: usize = std::mem::align_of::<Chunk>() - 1;

impl EntryRef {
    pub(crate) fn new(chunk: &Chunk, slot: usize) -> EntryRef {
        debug_assert!(slot < CHUNK);
        let raw = chunk as *const Chunk as usize | (slot << SLOT_SHIFT);
        EntryRef(std::num::NonZeroUsize::new(raw).expect("chunk address is not null"))
    }

    /// The word the index stores: chunk address | slot << 1 (bit 0 stays clear).
    pub(crate) fn to_raw(self) -> usize {
        self.0.get()
    }

    /// Inverse of [`EntryRef::to_raw`].
    ///
    /// # Safety
    /// `raw` came from `to_raw` of an entry whose chunk is still owned by its device.
    #[inline]
    pub(crate) unsafe fn from_raw(raw: usize) -> EntryRef {
        // SAFETY: non-zero: it came from to_raw (caller's contract).
        EntryRef(unsafe { std::num::NonZeroUsize::new_unchecked(raw) })
    }

    #[inline]
    fn chunk(&self) -> &Chunk {
        // SAFETY: the high bits are the address of a chunk that outlives every EntryRef
        // (see the Send impl).
        unsafe { &*((self.0.get() & !CHUNK_MASK) as *const Chunk) }
    }

    /// The index of the device owning the entry.
    #[inline]
    pub(crate) fn device(&self) -> u32 {
        self.chunk().device
    }

    #[inline]
    fn slot(&self) -> usize {
        (self.0.get() >> SLOT_SHIFT) & (CHUNK - 1)
    }

    #[inline]
    fn header(&self) -> &Header {
        &self.chunk().headers[self.slot()]
    }

    #[inline]
    fn stripe(&self, stripe: usize) -> &AtomicU64 {
        &self.chunk().stripes[stripe].counters[self.slot()]
    }

    /// Takes a reference if the entry is `LIVE`, of `era`, and covers `want`; counts a hit
    /// when `hit`. On failure the caller holds nothing (see [`Acquire`]).
    #[inline]
    pub(crate) fn try_acquire(
        &self,
        stripe: usize,
        want: &Range,
        era: u64,
        hit: bool,
    ) -> Result<(), Acquire> {
        let inc = if hit { HIT_ONE | 1 } else { 1 };
        let h = self.header();
        // SeqCst: pairs with the killer's SeqCst state store + stripe loads (module docs).
        let old = self.stripe(stripe).fetch_add(inc, Ordering::SeqCst);
        if old & REF_MASK >= REF_SATURATED {
            self.stripe(stripe).fetch_sub(inc, Ordering::SeqCst);
            return Err(Acquire::Saturated);
        }
        self.mark_stripe_used(stripe);
        // SeqCst load also acquires the range stores published before `LIVE`.
        if h.state.load(Ordering::SeqCst) == LIVE
            && h.era.load(Ordering::Relaxed) == era
            && h.start.load(Ordering::Relaxed) <= want.start()
            && want.end() <= h.end.load(Ordering::Relaxed)
        {
            if hit && h.referenced.load(Ordering::Relaxed) == 0 {
                h.referenced.store(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        Err(Acquire::Refused {
            slow: self.release_counted(stripe, inc),
        })
    }

    /// Whether a holder of a reference still has a valid entry: `LIVE` (or an evictor's
    /// transient `KILLING` probe, which cannot succeed while a reference is held) and of
    /// the device's current `era`.
    pub(crate) fn holds_valid(&self, era: u64) -> bool {
        matches!(self.state(), LIVE | KILLING) && self.header().era.load(Ordering::Relaxed) == era
    }

    /// Drops one reference taken on `stripe`. Returns whether the entry is not `LIVE`, in
    /// which case the caller must run the device's slow release path.
    #[inline]
    pub(crate) fn release(&self, stripe: usize) -> bool {
        self.release_counted(stripe, 1)
    }

    #[inline]
    fn release_counted(&self, stripe: usize, dec: u64) -> bool {
        self.stripe(stripe).fetch_sub(dec, Ordering::SeqCst);
        self.header().state.load(Ordering::SeqCst) != LIVE
    }

    /// Sum of references over all stripes. Exact once the state is not `LIVE` (module docs).
    pub(crate) fn refs(&self) -> u64 {
        let used = self.header().stripes_used.load(Ordering::SeqCst);
        (0..STRIPES)
            .filter(|s| used & (1 << s) != 0)
            .map(|s| self.stripe(s).load(Ordering::SeqCst) & REF_MASK)
            .sum()
    }

    /// Sets `stripe`'s bit in `stripes_used` (a load when it is set already, as it is
    /// after the first reference). Called after the increment and before the state load.
    #[inline]
    fn mark_stripe_used(&self, stripe: usize) {
        let bit = 1 << stripe;
        let used = &self.header().stripes_used;
        if used.load(Ordering::SeqCst) & bit == 0 {
            used.fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// Hits counted on this entry since its chunk was allocated.
    pub(crate) fn hits(&self) -> u64 {
        (0..STRIPES)
            .map(|s| self.stripe(s).load(Ordering::Relaxed) >> REF_BITS)
            .sum()
    }

    pub(crate) fn state(&self) -> u32 {
        self.header().state.load(Ordering::SeqCst)
    }

    /// Sets the state; the caller holds the device's writer lock.
    pub(crate) fn set_state(&self, state: u32) {
        self.header().state.store(state, Ordering::SeqCst);
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
        self.header().referenced.swap(0, Ordering::Relaxed) != 0
    }

    /// Publishes a fresh registration in a `FREE` entry and takes one reference on
    /// `stripe` for the caller. The caller holds the writer lock.
    ///
    /// # Safety
    /// The entry must be `FREE` with no reference held, so no reader reads its translation.
    pub(crate) unsafe fn publish(
        &self,
        range: Range,
        id: u64,
        era: u64,
        translation: ErasedTranslation,
        stripe: usize,
    ) {
        debug_assert_eq!(self.state(), FREE);
        // SAFETY: caller guarantees no reader; the writer lock serialises writers.
        unsafe {
            *self.header().translation.get() = Some(translation);
            let w = self.writer();
            w.stale = false;
            w.parked = false;
            w.shadowed = false;
        }
        let h = self.header();
        h.start.store(range.start(), Ordering::Relaxed);
        h.end.store(range.end(), Ordering::Relaxed);
        h.era.store(era, Ordering::Relaxed);
        h.id.store(id, Ordering::Relaxed);
        h.referenced.store(0, Ordering::Relaxed);
        self.stripe(stripe).fetch_add(1, Ordering::SeqCst);
        self.mark_stripe_used(stripe);
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
        unsafe { (*self.header().translation.get()).take() }
    }

    /// The translation, for a [`crate::Pin`] that holds a reference.
    ///
    /// # Safety
    /// The caller holds a reference taken while the entry was `LIVE`.
    pub(crate) unsafe fn translation(&self) -> Option<&ErasedTranslation> {
        // SAFETY: no writer runs while a reference is held (caller's contract).
        unsafe { (*self.header().translation.get()).as_ref() }
    }

    /// The registration id (of the current or last publication); exact for a holder of a
    /// reference taken while `LIVE` and under the writer lock.
    pub(crate) fn id(&self) -> u64 {
        self.header().id.load(Ordering::Relaxed)
    }

    /// The registered range of a published entry (the lock holder's view; exact under
    /// the device's writer lock).
    pub(crate) fn range(&self) -> Range {
        self.range_unlocked().expect("a published entry")
    }

    /// The device era the entry was published in.
    pub(crate) fn era(&self) -> u64 {
        self.header().era.load(Ordering::Relaxed)
    }

    /// The registered range, for a holder of a reference (lock-free copy).
    /// `None` only for an entry that was never published.
    pub(crate) fn range_unlocked(&self) -> Option<Range> {
        let h = self.header();
        Range::from_bounds(
            h.start.load(Ordering::Relaxed),
            h.end.load(Ordering::Relaxed),
        )
        .ok()
    }

    /// Writer-side fields.
    ///
    /// # Safety
    /// The caller holds the owning device's writer lock and no other reference to them.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn writer(&self) -> &mut WriterSide {
        // SAFETY: exclusive by the writer lock (caller's contract).
        unsafe { &mut *self.chunk().writers[self.slot()].get() }
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
